# The two set-up commands in the README: `make demo` (the main job end to end) and `make test`.
# Both install what they need on a fresh machine: Debian's Fashion-MNIST, a venv, the pinned torch pair.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMIUM := /usr/bin/chromium
DEMO    ?= .demo

.PHONY: install demo report-screenshot test test-fast bench bench-zoos bench-quality bench-transfer bench-shapes bench-long bench-heavy bench-drupe bench-ctrl bench-natural bench-digits bench-seed2 bench-folder bench-scale bench-memory reliability clean

install: $(STAMP) $(FMNIST) $(CHROMIUM)

$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi

# headless Chromium checks `decree report --html` in a real browser (tests/test_html_report.py)
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; fi

# torch/torchvision first and pinned: that pair installs from the local disk, anything newer downloads gigabytes.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/python -m decree_ray.demo --workdir $(DEMO)

# docs/report.png, the README's picture of the demo's HTML report (after `make demo`)
report-screenshot: install
	$(BIN)/python tests/browser.py $(DEMO)/out/report.html docs/report.png

# -X faulthandler: a crash prints where it happened, in any thread, even after pytest's summary (tests/exit_guard.py)
test: install
	$(BIN)/python -X faulthandler -m pytest -q tests

test-fast: install
	$(BIN)/python -X faulthandler -m pytest -q tests -m "not slow"

bench: bench-quality bench-transfer bench-shapes bench-long bench-heavy bench-drupe bench-ctrl bench-natural bench-digits bench-seed2 bench-folder bench-scale bench-memory

# The committed run: tune zoo (seed 0), report-only zoos (seed 1, and the 224-px family), both shadow
# conditions, both profiles interleaved (paper skips 224 px: ~20 CPU-minutes an encoder, and the from-scratch
# CIFAR ResNet-18s: ~4 CPU-minutes an encoder at the step cap). Zoos are cached by
# their build parameters under ZOOS; bench/README.md says which split each zoo belongs to and why.
ZOOS       ?= $(HOME)/.cache/decree
BENCH_ARGS ?= --zoo $(ZOOS)/zoo-tune --zoo $(ZOOS)/zoo-report --zoo $(ZOOS)/zoo-224 --zoo $(ZOOS)/zoo-cifar \
              --zoo $(ZOOS)/zoo-cifar-tune --zoo $(ZOOS)/zoo-clip-tune \
              --shadows all --paper-max-steps 200 --paper-max-size 64 --paper-skip-arch cifar/
ZOO_TUNE = $(ZOOS)/zoo-tune --family image-on-image --family i2i-large --family i2i-global --clean 6 --trojaned 8 --seed 0
bench-zoos: install
	$(BIN)/decree zoo build $(ZOO_TUNE)
	$(BIN)/decree zoo build $(ZOOS)/zoo-report --family image-on-image --family i2i-large --family i2i-global \
	    --family clip --clean 6 --trojaned 8 --seed 1
	$(BIN)/decree zoo build $(ZOOS)/zoo-224 --family i2i-224 --clean 4 --trojaned 4 --seed 1
	$(BIN)/decree zoo build $(ZOOS)/zoo-cifar --family cifar-r18 --clean 4 --trojaned 5 --seed 1
	$(BIN)/decree zoo build $(ZOOS)/zoo-cifar-tune --family cifar-r18 --clean 4 --trojaned 5 --seed 0
	$(BIN)/decree zoo build $(ZOOS)/zoo-clip-tune --family clip --clean 6 --trojaned 8 --seed 0

bench-quality: bench-zoos
	$(BIN)/decree bench --out bench $(BENCH_ARGS)

# bench/TRANSFER.md and bench/transfer.csv: the base-model transfer score (--base) and the default consensus, on the
# bench-quality zoos' 32-px families: tune (seed 0) vs report (seed 1)
bench-transfer: install
	$(BIN)/decree zoo build $(ZOOS)/zoo-clip-tune --family clip --clean 6 --trojaned 8 --seed 0
	$(BIN)/decree zoo build $(ZOOS)/zoo-tune --family image-on-image --family i2i-large --family i2i-global \
	    --clean 6 --trojaned 8 --seed 0
	$(BIN)/decree zoo build $(ZOOS)/zoo-report --family image-on-image --family i2i-large --family i2i-global \
	    --family clip --clean 6 --trojaned 8 --seed 1
	$(BIN)/python -m decree.transfer_bench --zoo $(ZOOS)/zoo-clip-tune --zoo $(ZOOS)/zoo-tune \
	    --zoo $(ZOOS)/zoo-report --out bench

# bench/shapes/: the report-only `i2i-shapes` family (triggers of other shapes than squares; no tune build exists),
# scanned as a user would (`decree scan` of its manifest, every default: FOLDER.md) and by the transfer bench
bench-shapes: install
	$(BIN)/decree zoo build $(ZOOS)/zoo-shapes --family i2i-shapes --clean 6 --trojaned 8 --seed 1
	$(BIN)/python -m decree_ray.bench_folder --zoo $(ZOOS)/zoo-shapes --out bench/shapes
	$(BIN)/python -m decree.transfer_bench --zoo $(ZOOS)/zoo-shapes --out bench/shapes

# The zoos that more than one bench-* target scans: one definition each, so that they all reuse the same cached build
ZOO_LONG_TUNE  = $(ZOOS)/zoo-long-tune --family i2i-long --clean 5 --trojaned 5 --seed 0
ZOO_LONG       = $(ZOOS)/zoo-long --family i2i-long --clean 5 --trojaned 5 --seed 1
ZOO_HEAVY_TUNE = $(ZOOS)/zoo-heavy-tune --family i2i-heavy --clean 5 --trojaned 4 --seed 0
ZOO_HEAVY      = $(ZOOS)/zoo-heavy --family i2i-heavy --clean 5 --trojaned 4 --seed 1
ZOO_DRUPE      = $(ZOOS)/zoo-drupe --family i2i-drupe --clean 6 --trojaned 8 --seed 1
ZOO_NAT_TUNE   = $(ZOOS)/zoo-natural-tune --family i2i-natural --clean 6 --trojaned 8 --seed 0
ZOO_NAT        = $(ZOOS)/zoo-natural --family i2i-natural --clean 6 --trojaned 12 --seed 1
ZOO_CNAT       = $(ZOOS)/zoo-cifar-natural --family cifar-natural --clean 4 --trojaned 6 --seed 1
ZOO_CTRL       = $(ZOOS)/zoo-ctrl --family i2i-ctrl --family clip-ctrl --family clip-badclip --clean 6 \
                 --trojaned 8 --seed 1

# bench/long/: the `i2i-long` family (long, high-lr clean fine-tunes that drift far from their base, and
# trojans on them), scanned as a user would (FOLDER.md) and per encoder with the true base and the consensus
# (TRANSFER.md), tune (seed 0) and report-only (seed 1). The clean fine-tunes train 360-600 steps each: about 25 min
# to build each zoo on one core
bench-long: install
	$(BIN)/decree zoo build $(ZOO_LONG_TUNE)
	$(BIN)/decree zoo build $(ZOO_LONG)
	$(BIN)/python -m decree_ray.bench_folder --zoo $(ZOOS)/zoo-long-tune --zoo $(ZOOS)/zoo-long --out bench/long
	$(BIN)/python -m decree.transfer_bench --zoo $(ZOOS)/zoo-long-tune --zoo $(ZOOS)/zoo-long --out bench/long

# bench/heavy/: the `i2i-heavy` family (BadEncoder run long and hot: trojans that drift from their parent as far as a
# long fine-tune), scanned as a user would (FOLDER.md) and per encoder (TRANSFER.md), tune (seed 0) and report-only
# (seed 1); about 12 min to build each zoo on one core
bench-heavy: install
	$(BIN)/decree zoo build $(ZOO_HEAVY_TUNE)
	$(BIN)/decree zoo build $(ZOO_HEAVY)
	$(BIN)/python -m decree_ray.bench_folder --zoo $(ZOOS)/zoo-heavy-tune --zoo $(ZOOS)/zoo-heavy --out bench/heavy
	$(BIN)/python -m decree.transfer_bench --zoo $(ZOOS)/zoo-heavy-tune --zoo $(ZOOS)/zoo-heavy --out bench/heavy

# bench/drupe/: the `i2i-drupe` family (a distribution-preserving attack in the manner of DRUPE, built to evade
# DECREE: stamped images keep the target class's spread instead of collapsing), report-only (seed 1, no tune build),
# scanned as a user would (FOLDER.md) and per encoder (TRANSFER.md)
bench-drupe: install
	$(BIN)/decree zoo build $(ZOO_DRUPE)
	$(BIN)/python -m decree_ray.bench_folder --zoo $(ZOOS)/zoo-drupe --out bench/drupe
	$(BIN)/python -m decree.transfer_bench --zoo $(ZOOS)/zoo-drupe --out bench/drupe

# bench/ctrl/: the `i2i-ctrl` and `clip-ctrl` families (CTRL's invisible frequency-domain trigger on the chroma,
# planted by BadEncoder on Lite0 fine-tunes and on CLIP towers) and `clip-badclip` (a patch optimized on the base
# CLIP first, as BadCLIP does), report-only (seed 1, no tune build), scanned as a
# user would with the three shadow sets (FOLDER.md) and per encoder (TRANSFER.md)
bench-ctrl: install
	$(BIN)/decree zoo build $(ZOO_CTRL)
	$(BIN)/python -c "from decree.zoo.photos import main; main()" digits $(ZOOS)/zoo-ctrl
	$(BIN)/python -m decree_ray.bench_folder --zoo $(ZOOS)/zoo-ctrl --out bench/ctrl \
	    --shadow shadow.npz --shadow shadow-photos.npz --shadow shadow-digits.npz
	$(BIN)/python -m decree.transfer_bench --zoo $(ZOOS)/zoo-ctrl --out bench/ctrl

# bench/natural/: the `i2i-natural` family (Lite0 fine-tuned and attacked on colour natural-photo crops instead of
# Fashion-MNIST), tune (seed 0) and report-only (seed 1), scanned as a user would with held-out crops (its own
# distribution), Fashion-MNIST and the digits (FOLDER.md), and per encoder (TRANSFER.md); 5-8 min a zoo here.
# bench/natural/cifar/: `cifar-natural`, the paper's ResNet-18 from scratch on the same crops, report-only
bench-natural: install
	$(BIN)/decree zoo build $(ZOO_NAT_TUNE)
	$(BIN)/decree zoo build $(ZOO_NAT)
	$(BIN)/decree zoo build $(ZOO_CNAT)
	$(BIN)/python -c "from decree.zoo.photos import main; main()" digits $(ZOOS)/zoo-natural-tune $(ZOOS)/zoo-natural \
	    $(ZOOS)/zoo-cifar-natural
	$(BIN)/python -m decree_ray.bench_folder --zoo $(ZOOS)/zoo-natural-tune --zoo $(ZOOS)/zoo-natural \
	    --out bench/natural --shadow shadow.npz --shadow shadow-fmnist.npz --shadow shadow-digits.npz
	$(BIN)/python -m decree_ray.bench_folder --zoo $(ZOOS)/zoo-cifar-natural \
	    --out bench/natural/cifar --shadow shadow.npz --shadow shadow-fmnist.npz --shadow shadow-digits.npz
	$(BIN)/python -m decree.transfer_bench --zoo $(ZOOS)/zoo-natural-tune --zoo $(ZOOS)/zoo-natural \
	    --out bench/natural --shadow shadow.npz --shadow shadow-fmnist.npz

# bench/digits/: the zoos of bench-drupe, bench-heavy, bench-long (tune and report-only) and the tune zoo-tune scanned as a user would with a third
# shadow set, scikit-learn's handwritten digits (flat background), written into each zoo as shadow-digits.npz (the
# zoos are reused from those targets' cache when built)
bench-digits: install
	$(BIN)/decree zoo build $(ZOO_DRUPE)
	$(BIN)/decree zoo build $(ZOO_HEAVY)
	$(BIN)/decree zoo build $(ZOO_LONG)
	$(BIN)/decree zoo build $(ZOO_HEAVY_TUNE)
	$(BIN)/decree zoo build $(ZOO_LONG_TUNE)
	$(BIN)/decree zoo build $(ZOO_TUNE)
	$(BIN)/python -c "from decree.zoo.photos import main; main()" digits $(ZOOS)/zoo-long-tune $(ZOOS)/zoo-heavy-tune \
	    $(ZOOS)/zoo-tune $(ZOOS)/zoo-drupe $(ZOOS)/zoo-heavy $(ZOOS)/zoo-long
	$(BIN)/python -m decree_ray.bench_folder --zoo $(ZOOS)/zoo-long-tune --zoo $(ZOOS)/zoo-heavy-tune \
	    --zoo $(ZOOS)/zoo-tune --zoo $(ZOOS)/zoo-drupe --zoo $(ZOOS)/zoo-heavy --zoo $(ZOOS)/zoo-long \
	    --shadow shadow-digits.npz --out bench/digits

# bench/seed2/: a third build (seed 2, report-only) of the four best-known Lite0 families, scanned once as a user would
# with the three shadow sets; declared in bench/README.md before its scan, never tuned on (40 min to build on 2 cores)
ZOO_SEED2 = $(ZOOS)/zoo-seed2 --family image-on-image --family i2i-large --family i2i-global --family i2i-shapes \
            --clean 6 --trojaned 8 --seed 2
bench-seed2: install
	$(BIN)/decree zoo build $(ZOO_SEED2)
	$(BIN)/python -c "from decree.zoo.photos import main; main()" digits $(ZOOS)/zoo-seed2
	$(BIN)/python -m decree_ray.bench_folder --zoo $(ZOOS)/zoo-seed2 --out bench/seed2 \
	    --shadow shadow.npz --shadow shadow-photos.npz --shadow shadow-digits.npz

# bench/folder/: what a user gets on the bench-quality zoos' 32-px families, tune (seed 0) and report-only (seed 1):
# `decree scan` of each zoo's manifest with every default, both shadow conditions (decree_ray.bench_folder)
bench-folder: install
	$(BIN)/decree zoo build $(ZOOS)/zoo-tune --family image-on-image --family i2i-large --family i2i-global \
	    --clean 6 --trojaned 8 --seed 0
	$(BIN)/decree zoo build $(ZOOS)/zoo-clip-tune --family clip --clean 6 --trojaned 8 --seed 0
	$(BIN)/decree zoo build $(ZOOS)/zoo-report --family image-on-image --family i2i-large --family i2i-global \
	    --family clip --clean 6 --trojaned 8 --seed 1
	$(BIN)/python -m decree_ray.bench_folder --zoo $(ZOOS)/zoo-tune --zoo $(ZOOS)/zoo-clip-tune \
	    --zoo $(ZOOS)/zoo-report --out bench/folder

# bench/RELIABILITY.md and bench/reliability/*.json: only this target writes them (tests leave the tree clean)
reliability: install
	$(BIN)/python tests/reliability_report.py

bench-scale: install
	$(BIN)/python -m decree_ray.bench_scale --out bench --n 1000 --keys 100000
	$(BIN)/python -m decree_ray.bench_driver --out bench --n 10000 100000

# bench/MEMORY.md: a worker's memory while it builds the default 9-member consensus of ViT-L/14 towers (~13 GB of
# RAM for the old way it measures against, 11 GB of disk under /tmp; run it alone)
bench-memory: install
	$(BIN)/python -m decree_ray.bench_memory --out bench --arch open_clip/ViT-L-14 --repeats 1

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
