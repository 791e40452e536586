# The two set-up commands in the README: `make demo` (the main job end to end) and `make test`.
# Both install what they need on a fresh machine: Debian's Fashion-MNIST, a venv, the pinned torch pair.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO    ?= .demo

.PHONY: install demo test test-fast bench bench-quality bench-scale reliability clean

install: $(STAMP) $(FMNIST)

$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi

# torch/torchvision first and pinned: that pair installs from the local disk, anything newer downloads gigabytes.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/python -m decree_ray.demo --workdir $(DEMO)

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q tests -m "not slow"

bench: bench-quality bench-scale

# Builds (and caches) the default zoo when BENCH_ARGS names none; the committed run used
#   BENCH_ARGS="--zoo ZOO_I2I --zoo ZOO_CLIP --paper-max-steps 200"
BENCH_ARGS ?= --paper-max-steps 200
bench-quality: install
	$(BIN)/decree bench --out bench $(BENCH_ARGS)

# bench/RELIABILITY.md and bench/reliability/*.json: only this target writes them (tests leave the tree clean)
reliability: install
	$(BIN)/python tests/reliability_report.py

bench-scale: install
	$(BIN)/python -m decree_ray.bench_scale --out bench --n 1000 --keys 100000

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
