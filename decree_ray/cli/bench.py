"""`decree bench`: detection quality (ROC) and speed of the `fast` profile vs the paper's settings on a zoo.

A thin layer over decree.benchmark.run_benchmark. Without --zoo (or DECREE_BENCH_ZOO) it builds a zoo with
decree.zoo.build_zoo into a cache folder (reused while the build parameters are the same).

Exit codes: 0 benchmark written, 2 it could not run (no zoo, bad option) or every scan failed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

ZooOpt = Annotated[
    list[Path] | None,
    typer.Option("--zoo",
                 help="Existing zoo folder (manifest.jsonl, encoders/, shadow.npz); repeat for several zoos (e.g. an "
                      "image-on-image one and a CLIP one). Default: $DECREE_BENCH_ZOO (folders separated by spaces "
                      "or ':'), else a zoo built into the cache folder."),
]
OutOpt = Annotated[Path, typer.Option("--out", help="Output folder: results.json, encoders.csv, RESULTS.md, roc.png.")]
ProfilesOpt = Annotated[str, typer.Option("--profiles", help="Comma-separated inversion profiles, run interleaved.")]
PaperStepsOpt = Annotated[
    int, typer.Option("--paper-max-steps", min=0,
                      help="Step cap of the paper profile (its schedule allows 1000 epochs); 0: no cap.")
]
FastStepsOpt = Annotated[int | None, typer.Option("--fast-max-steps", min=1, help="Override the fast profile's max_steps.")]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="At most N encoders, balanced over family and label.")]
FamiliesOpt = Annotated[
    str | None,
    typer.Option("--families", help="Comma-separated: image-on-image, image-on-pair, text-on-pair, clip (= both pair)."),
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available).")]
ThresholdOpt = Annotated[float | None, typer.Option("--threshold", help="PL1 verdict threshold (default: the core's).")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", min=1, help="torch CPU threads (default: torch's).")]
FreshOpt = Annotated[bool, typer.Option("--fresh", help="Rescan everything instead of resuming from encoders.csv.")]
ShadowsOpt = Annotated[
    str, typer.Option("--shadows", help="Comma-separated shadow sets of each zoo to scan with: shadow.npz (in-"
                      "distribution), shadow-photos.npz (natural photos), or 'all'. The first is RESULTS.md's.")
]
PaperSizeOpt = Annotated[
    int, typer.Option("--paper-max-size", min=0,
                      help="The paper profile skips encoders with a larger input size (0: none skipped).")
]
PaperSkipOpt = Annotated[
    str | None, typer.Option("--paper-skip-arch",
                             help="Comma-separated arch prefixes the paper profile skips (cost), e.g. cifar/.")
]
RejudgeOpt = Annotated[bool, typer.Option(
    "--rejudge", help="Only re-derive the fleet and folder verdicts (results.json's generalization, "
                      "GENERALIZATION.md) from OUT/encoders.csv: no zoo, no scan.")]
ProfileStepsOpt = Annotated[int, typer.Option("--profile-steps", min=0, help="Steps of the CPU profile (0: none).")]
# Only for the default zoo (no --zoo, no DECREE_BENCH_ZOO), built into the cache folder.
ZooCleanOpt = Annotated[int, typer.Option("--zoo-clean", min=0, help="When building: clean encoders per family.")]
ZooTrojOpt = Annotated[int, typer.Option("--zoo-trojaned", min=0, help="When building: trojaned encoders per family.")]
ZooSeedOpt = Annotated[int, typer.Option("--zoo-seed", help="When building: the zoo's seed.")]
ZooQuickOpt = Annotated[bool, typer.Option("--zoo-quick", help="When building: tiny data, few steps (smoke runs only).")]


def default_zoo_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "decree" / "bench-zoo"


def zoo_families(families: list[str] | None) -> tuple[str, ...]:
    """Benchmark families -> the zoo builder's families (the CLIP attacks live in one `clip` family)."""
    if not families:
        from decree.zoo import FAMILIES

        return tuple(FAMILIES)
    out = []
    for f in families:
        z = "image-on-image" if f == "image-on-image" else "clip"
        if z not in out:
            out.append(z)
    return tuple(out)


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def resolve_zoos(zoos: list[Path] | None, families: list[str] | None, clean: int, trojaned: int, seed: int,
                 quick: bool) -> list[Path]:
    """Named zoos must exist (a typo must not start a long build); with none named, build into the cache."""
    if not zoos:
        env = os.environ.get("DECREE_BENCH_ZOO", "")
        zoos = [Path(p) for p in re.split(rf"[\s{re.escape(os.pathsep)}]+", env) if p]
    if not zoos:
        return [build_default_zoo(default_zoo_dir(), families, clean, trojaned, seed, quick)]
    missing = [str(z) for z in zoos if not (z / "manifest.jsonl").is_file()]
    if missing:
        raise FileNotFoundError(f"not a zoo folder (no manifest.jsonl): {', '.join(missing)}; build one with "
                                "`decree zoo build`, or omit --zoo to build the default zoo into the cache")
    return list(zoos)


def build_default_zoo(path: Path, families: list[str] | None, clean: int, trojaned: int, seed: int,
                      quick: bool) -> Path:
    from decree.zoo import ZooConfig, build_zoo

    console.print(f"default zoo {path}: building (or reusing) {clean} clean + {trojaned} trojaned per family "
                  f"({', '.join(zoo_families(families))}), seed {seed}")
    config = ZooConfig.tiny() if quick else ZooConfig()
    return Path(build_zoo(path, clean=clean, trojaned=trojaned, families=zoo_families(families), seed=seed,
                          config=config))


def bench_command(
    zoo: ZooOpt = None,
    out: OutOpt = Path("bench"),
    profiles: ProfilesOpt = "fast,paper",
    paper_max_steps: PaperStepsOpt = 1200,
    fast_max_steps: FastStepsOpt = None,
    limit: LimitOpt = None,
    families: FamiliesOpt = None,
    device: DeviceOpt = None,
    threshold: ThresholdOpt = None,
    threads: ThreadsOpt = None,
    fresh: FreshOpt = False,
    profile_steps: ProfileStepsOpt = 5,
    shadows: ShadowsOpt = "shadow.npz",
    paper_max_size: PaperSizeOpt = 0,
    paper_skip_arch: PaperSkipOpt = None,
    zoo_clean: ZooCleanOpt = 8,
    zoo_trojaned: ZooTrojOpt = 8,
    zoo_seed: ZooSeedOpt = 0,
    zoo_quick: ZooQuickOpt = False,
    rejudge: RejudgeOpt = False,
) -> None:
    """Benchmark DECREE on a zoo of labelled encoders: ROC-AUC, TPR@5%FPR and seconds per encoder, fast vs paper."""
    import torch

    from decree.benchmark import FAMILIES, run_benchmark
    from decree.inversion import PROFILES

    profile_list = _split(profiles)
    family_list = _split(families) or None
    bad = [p for p in profile_list if p not in PROFILES]
    if not profile_list or bad:
        err_console.print(f"[red]error:[/] unknown profile(s) {bad}; choose from {sorted(PROFILES)}")
        raise typer.Exit(2)
    bad = [f for f in family_list or [] if f not in FAMILIES and f != "clip"]
    if bad:
        err_console.print(f"[red]error:[/] unknown families {bad}; choose from {', '.join(FAMILIES)}, clip")
        raise typer.Exit(2)
    if rejudge:
        from decree.benchmark import rejudge as rejudge_table

        try:
            rejudge_table(out)
        except (OSError, ValueError, KeyError) as e:
            err_console.print(f"[red]rejudge failed:[/] {e}")
            raise typer.Exit(2) from None
        console.print(f"re-derived {out}/results.json (generalization) and GENERALIZATION.md from encoders.csv")
        return
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        zoo_dirs = resolve_zoos(zoo, family_list, zoo_clean, zoo_trojaned, zoo_seed, zoo_quick)
        results = run_benchmark(
            zoo_dirs, out, profile_list, device=device, paper_max_steps=paper_max_steps or None,
            fast_overrides={"max_steps": fast_max_steps} if fast_max_steps else None, limit=limit,
            families=family_list, threshold=threshold, resume=not fresh, profile_steps=profile_steps,
            shadows=("shadow.npz", "shadow-photos.npz") if shadows == "all" else tuple(_split(shadows)),
            paper_max_size=paper_max_size or None, paper_skip_archs=tuple(_split(paper_skip_arch)),
            log=lambda m: console.print(m, markup=False, highlight=False))
    except (OSError, ValueError, RuntimeError) as e:
        err_console.print(f"[red]benchmark failed:[/] {e}")
        raise typer.Exit(2) from None
    if results["n_clean"] + results["n_trojaned"] == 0:
        err_console.print("[red]every scan failed[/]; see the error column of encoders.csv")
        raise typer.Exit(2)
    console.print(f"wrote {out}/results.json, encoders.csv, RESULTS.md, roc.png, profile.txt")
