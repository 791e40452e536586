"""Worker memory while it builds a consensus base: `python -m decree_ray.bench_memory --out bench [--arch A]`.

The default consensus (decree.consensus) takes the median of 9 members of an architecture. A worker that holds
all 9 as models needs 9 models of memory before it scans anything: 12 GB for ViT-L/14 towers, more than many GPU
nodes' host memory, and the consensus is on by default. decree_ray.base_models reads the members one after
another into one model, writes each from it to the worker's cache, and takes the distances and the median one
tensor at a time, the median into that same model. This measures both ways on the same 9 files, each in a
fresh process (peak anonymous memory), and checks that both build the median computed apart.

Members: one randomly initialised model of `--arch` (no weights are downloaded) and 9 copies of it each moved
by a little noise, as fine-tunes of one model are (their weight distance is far under FINETUNE_DISTANCE).
Both ways read the files with safetensors directly (the worker's contained loader is left out: it costs both
the same). Writes OUT/memory.json and OUT/MEMORY.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEMBERS = 9


class _AnonPeak:
    """Peak of RssAnon (/proc/self/status), sampled every 5 ms: the memory the kernel cannot take back (RSS also
    counts the pages of files the process maps, as safetensors does, which the kernel drops under pressure)."""

    def __init__(self):
        import threading

        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.now())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now())


def _digest(items) -> str:
    import torch

    h = hashlib.sha256()
    for k, v in items:
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def reference_digest(paths: list[str]) -> str:
    """The median of the member files computed apart from both ways (no model: safetensors and torch.median,
    one tensor at a time), so that "the same median" is also the right one."""
    from safetensors import safe_open

    from decree.consensus import median_state_dict

    files = [safe_open(p, framework="pt", device="cpu") for p in paths]
    keys = sorted(files[0].keys())
    return _digest((k, median_state_dict([{k: f.get_tensor(k)} for f in files])[k]) for k in keys)


def write_members(arch: str, folder: Path, n: int = MEMBERS, scale: float = 0.02) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    from decree.encoders import create_encoder

    torch.manual_seed(0)
    base = create_encoder(arch).backbone.state_dict()
    paths = []
    for i in range(n):
        gen = torch.Generator().manual_seed(100 + i)
        state = {k: (v + scale * v.abs().mean() * torch.randn(v.shape, generator=gen)).contiguous()
                 if v.is_floating_point() else v.clone() for k, v in base.items()}
        paths.append(folder / f"member-{i}.safetensors")
        save_file(state, str(paths[-1]))
        del state
    return paths


class _Reader:
    def read(self, path, **_):
        from safetensors.torch import load_file

        return load_file(str(path))


def _child(mode: str, arch: str, paths: list[str], cache: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from decree.encoders import create_encoder

    create_encoder(arch)  # the architecture's own code and one model, as a worker that scans has already
    anon_before = _AnonPeak.now()
    anon = _AnonPeak()
    t0 = time.perf_counter()
    if mode == "all in memory":
        from decree.consensus import consensus_bases

        members = [create_encoder(arch, _Reader().read(p)) for p in paths]
        bases = consensus_bases(members, paths)
        del members
    else:
        from decree_ray.base_models import BaseModels
        from decree_ray.worker import ScanSettings, error_text

        settings = ScanSettings(shadow="unused", bases=tuple((arch, p) for p in paths))
        bases = BaseModels(settings, _Reader(), Path(cache), "cpu", error_text).get(arch, None)
    seconds = time.perf_counter() - t0
    anon_peak = anon.stop()
    return {"mode": mode, "peak_anon_mib": round(anon_peak, 1), "anon_before_mib": round(anon_before, 1),
            "seconds": round(seconds, 2), "groups": [b.members for b in bases],
            "median_digest": _digest(sorted(bases[0].encoder.backbone.state_dict().items()))}


def run(arch: str, out: Path, repeats: int = 2) -> dict:
    import torch

    from decree.encoders import create_encoder

    params = sum(p.numel() for p in create_encoder(arch).backbone.parameters())
    runs = []
    with tempfile.TemporaryDirectory(prefix="decree-bench-memory-") as tmp:
        paths = [str(p) for p in write_members(arch, Path(tmp))]
        want = reference_digest(paths)
        for _ in range(repeats):  # interleaved: load on the machine hits both alike
            for mode in ("all in memory", "one tensor at a time"):
                cmd = [sys.executable, "-m", "decree_ray.bench_memory", "--child", mode, "--arch", arch,
                       "--cache", str(Path(tmp) / "cache"), *paths]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    model_mib = params * 4 / 2**20
    result = {"arch": arch, "parameters": params, "model_mib_fp32": round(model_mib, 1), "members": MEMBERS,
              "runs": runs, "reference_digest": want,
              "same_median": {r["median_digest"] for r in runs} == {want},
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs, torch {torch.__version__}"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "MEMORY.md").write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = ["# Worker memory while it builds a consensus base", "",
             (f"Generated by `python -m decree_ray.bench_memory` (`make bench-memory`). Machine: {r['machine']}. "
             f"Architecture `{r['arch']}`: {r['parameters']:,} parameters, {r['model_mib_fp32']:.0f} MiB of fp32 "
             f"weights; {r['members']} members (the default consensus), each a fine-tune-like copy of one model. "
             "Each row is a fresh process that has already built the architecture once (as a worker that scans "
             "has). Memory: the peak of RssAnon (/proc/self/status, sampled every 5 ms) over the process before "
             "it built the consensus, the memory the kernel cannot take back. Peak RSS is not shown: it counts the "
             "member files' pages that safetensors maps (dropped by the kernel under pressure), and on Linux a "
             "child's getrusage peak starts from its parent's."), "",
             "| way | memory growth (MiB) | in models | seconds |", "|---|---|---|---|"]
    m = r["model_mib_fp32"]
    for x in r["runs"]:
        anon = x["peak_anon_mib"] - x["anon_before_mib"]
        lines.append(f"| {x['mode']} | {anon:.0f} | {anon / m:.1f} | {x['seconds']:.1f} |")
    lines += ["", ("Both ways built the median of the member files as computed apart (safetensors and torch.median "
              f"per tensor, no model; a digest of every weight): {'yes' if r['same_median'] else '**no**'}. "
              "*All in memory*: the members as models, then the median (what a worker did before). *One tensor at a "
              "time*: decree_ray.base_models, the members read one after another into one model and each written "
              "from it to the worker's cache as safetensors, the distances and the median read tensor by tensor, "
              "the median written into that same model."), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--arch", default="open_clip/ViT-B-16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.arch, args.paths, args.cache)))
        return 0
    r = run(args.arch, args.out, args.repeats)
    print(markdown(r))
    return 0 if r["same_median"] else 1


if __name__ == "__main__":
    sys.exit(main())
