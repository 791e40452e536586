"""`decree zoo build OUT`: build a benchmark zoo of clean and trojaned encoders (decree.zoo.build_zoo).

Exit codes: 0 built (or already up to date), 2 the build failed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

zoo_app = typer.Typer(help="Build a zoo of clean and trojaned encoders.", no_args_is_help=True,
                      add_completion=False, pretty_exceptions_enable=False)
console = Console()
err_console = Console(stderr=True)

# decree.zoo.ALL_FAMILIES, spelled out so `--help` does not import torch (tests/test_zoo.py keeps them equal)
FAMILY_NAMES = ("image-on-image", "clip", "i2i-large", "i2i-global", "i2i-224", "cifar-r18", "i2i-shapes", "i2i-long",
                "i2i-heavy", "i2i-drupe", "i2i-ctrl", "clip-ctrl",
                "clip-badclip", "i2i-natural", "cifar-natural")

Out = Annotated[Path, typer.Argument(help="Output folder (encoders/, manifest.jsonl, shadow.npz, zoo.json).")]
Clean = Annotated[int, typer.Option("--clean", min=0, help="Clean encoders per family.")]
Trojaned = Annotated[int, typer.Option("--trojaned", min=0, help="Trojaned encoders per family.")]
Family = Annotated[
    Optional[list[str]],
    typer.Option("--family", help=f"{' | '.join(FAMILY_NAMES)} (repeatable; default: the first two)."),
]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the whole build (specs, splits, ids).")]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Rebuild even if OUT was built with these parameters.")]
Quick = Annotated[bool, typer.Option("--quick", help="Tiny data and few steps (smoke tests; attacks may be weak).")]
Threads = Annotated[Optional[int], typer.Option("--threads", min=1, help="torch threads (default: the config's).")]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def summary_table(entries: list[dict]) -> Table:
    table = Table(title="zoo")
    for col in ("id", "label", "attack", "attack_strength", "clean_fidelity"):
        table.add_column(col, justify="right" if col in ("attack_strength", "clean_fidelity") else "left")
    for e in entries:
        style = "red" if e["label"] == "trojaned" else None
        table.add_row(e["id"], e["label"], e.get("attack") or "-", _fmt(e.get("attack_strength")),
                      _fmt(e.get("clean_fidelity")), style=style)
    return table


@zoo_app.callback()
def zoo_callback() -> None:
    """Build a zoo of clean and trojaned encoders (a group, so `build` stays a subcommand)."""


@zoo_app.command("build")
def build_command(out: Out, clean: Clean = 8, trojaned: Trojaned = 8, family: Family = None, seed: Seed = 0,
                  no_cache: NoCache = False, quick: Quick = False, threads: Threads = None) -> None:
    """Fine-tune clean encoders and BadEncoder-style trojans from real weights on Fashion-MNIST (i2i-natural and
    cifar-natural: on natural-photo crops, in a zoo of their own)."""
    from dataclasses import replace

    from decree.zoo import ALL_FAMILIES, FAMILIES, ZooConfig, build_zoo, read_manifest

    families = tuple(family) if family else FAMILIES
    unknown = [f for f in families if f not in ALL_FAMILIES]
    if unknown:
        err_console.print(f"[red]unknown family {', '.join(unknown)}; choose from {', '.join(ALL_FAMILIES)}[/red]")
        raise typer.Exit(2)
    config = ZooConfig.tiny() if quick else ZooConfig()
    if threads is not None:
        config = replace(config, threads=threads)
    logger = logging.getLogger("decree.zoo")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # open_clip configures the root logger: every line came out twice in CLIP builds
    try:
        path = build_zoo(out, clean=clean, trojaned=trojaned, families=families, seed=seed, cache=not no_cache,
                         config=config)
    except (OSError, ValueError, RuntimeError) as e:
        err_console.print(f"[red]zoo build failed: {e}[/red]")
        raise typer.Exit(2) from None
    entries = read_manifest(path)
    console.print(summary_table(entries))
    console.print(f"{len(entries)} encoders in {path} (manifest.jsonl, shadow.npz)")
