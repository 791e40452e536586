"""The options `decree scan` and `decree submit` share, and their parsing (sizes, `--set` overrides).

Typer needs each command's signature spelled out; the option types are defined once here.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from ..config import DEFAULT_MAX_CHECKPOINT_BYTES

if TYPE_CHECKING:
    from ..config import JobConfig

EXIT_CLEAN, EXIT_FOUND, EXIT_ERROR = 0, 1, 2
err_console = Console(stderr=True)

Source = Annotated[
    str, typer.Argument(help="s3://bucket/prefix, a local folder, or a manifest (.jsonl/.csv/.parquet).")
]
Shadow = Annotated[str, typer.Option("--shadow", help="Shadow set: .npz/.parquet/image folder, local or s3://.")]
Out = Annotated[str, typer.Option("--out", help="Output folder or s3:// prefix (parts, results.parquet, evidence).")]
Profile = Annotated[str, typer.Option("--profile", help="Inversion profile: fast | paper.")]
Threshold = Annotated[Optional[float], typer.Option("--threshold", help="PL1 threshold (default: the core's).")]
GpusPer = Annotated[
    Optional[float],
    typer.Option(
        "--gpus-per-encoder", help="GPUs per actor, fractional OK. Default: 1 if the cluster has GPUs, else CPU actors."
    ),
]
CpusPer = Annotated[float, typer.Option("--cpus-per-encoder", help="CPUs per actor (also its torch threads).")]
MaxEnc = Annotated[Optional[int], typer.Option("--max-encoders", help="Stop after this many encoders from the source.")]
Endpoint = Annotated[Optional[str], typer.Option("--endpoint-url", help="S3-compatible endpoint (MinIO, moto, ...).")]
Arch = Annotated[
    Optional[str], typer.Option("--arch", help="Architecture when neither manifest nor <checkpoint>.json names one.")
]
ImageSize = Annotated[
    Optional[int],
    typer.Option("--image-size", min=8, max=1024,
                 help="Input size to scan at when the manifest names none (default: each architecture's own). "
                 "A <checkpoint>.json's size is the audited party's claim: scanned too, the more suspicious verdict "
                 "stands."),
]
TrustSidecars = Annotated[
    bool,
    typer.Option("--trust-sidecar-preprocessing",
                 help="Believe image_size/mean/std from <checkpoint>.json or a hub config alone (only when you wrote "
                 "them): skips the second scan at --image-size / the architecture's own preprocessing."),
]
Steps = Annotated[Optional[int], typer.Option("--steps", help="Override the profile's max_steps (quick runs).")]
Timeout = Annotated[float, typer.Option("--timeout", help="Seconds per encoder before it is recorded as an error.")]
StartupTimeout = Annotated[
    float,
    typer.Option("--startup-timeout",
                 help="Seconds to wait with no worker ready (an autoscaler adding GPU nodes) before giving up."),
]
LoadTimeout = Annotated[
    float,
    typer.Option("--load-timeout", help="Seconds to read one checkpoint (in a child process) before it is killed "
                 "and becomes an error row."),
]
Retries = Annotated[int, typer.Option("--max-retries", help="Retries of an encoder whose worker died.")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="Number of actors (default: fill the cluster).")]
LocalCpus = Annotated[int, typer.Option("--local-cpus", help="CPUs of the embedded Ray (no --address).")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]
MaxSize = Annotated[
    Optional[str],
    typer.Option(
        "--max-checkpoint-size",
        help="Refuse bigger checkpoints before downloading them (error row). Bytes, or e.g. 500MB, 2GiB; "
        "'none': no limit.  [default: 16GiB]",
    ),
]
Sets = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set",
        help="Inversion setting over the profile, KEY=VALUE (repeatable; JSON values), e.g. --set max_steps=200 "
        "--set settle_fraction=0 (0 turns settle_fraction / prune_at off).",
    ),
]
References = Annotated[
    Optional[list[str]],
    typer.Option(
        "--reference",
        help="Id or uri of a known-clean encoder (e.g. the publisher's original weights; repeatable). With 3 or "
        "more in a group of comparable encoders, the fleet statistics come from them alone.",
    ),
]
Bases = Annotated[
    Optional[list[str]],
    typer.Option(
        "--base",
        help="ARCH=SOURCE: the model ARCH's encoders were fine-tuned from (SOURCE: `pretrained` for the offline "
        "weights, a checkpoint path or s3:// uri; repeatable). Each encoder's trigger is stamped for it too: a "
        "natural trigger collapses the base as well, a backdoor's does not (specific_pl1). Only for fine-tunes of it. "
        "Base unknown: ARCH=consensus (the median of 9 of the scan's own ARCH encoders, picked by uri digest) or "
        "3 to 15 fine-tunes of it named for one ARCH: their coordinate-wise median stands in for it.",
    ),
]
FleetCutoff = Annotated[
    float,
    typer.Option("--fleet-cutoff", min=0.1, help="Anomaly index above which an encoder is an outlier among its peers."),
]
Consensus = Annotated[
    bool,
    typer.Option("--consensus/--no-consensus",
                 help="Every architecture the listing names (manifest, --arch) at least 3 times and no --base covers "
                 "gets a consensus base: up to 9 of its encoders grouped into fine-tunes of one model, each group's "
                 "weight median standing in for that model; an encoder near one is also judged by specific_pl1."),
]
FleetCluster = Annotated[
    float,
    typer.Option("--fleet-cluster", min=0.0, max=1.0,
                 help="Without references, a group's upper cluster of scores anchors its statistics when it holds at "
                 "least this share of the group (and 6 encoders) and stands apart from the rest; 0: the whole "
                 "group's median and MAD."),
]
Prefetch = Annotated[
    int,
    typer.Option(
        "--prefetch",
        min=0,
        help="Encoders queued on each actor behind the one it scans: the next download starts as a scan ends.",
    ),
]

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*((?:[kmgt]i?)?b?)\s*", re.IGNORECASE)


def parse_size(text: str | None) -> int | None:
    """'1000' -> 1000, '500MB' -> 500*10**6, '2GiB' -> 2*2**30 (K/M/G/T; 'i' means powers of 1024)."""
    if text is None:
        return DEFAULT_MAX_CHECKPOINT_BYTES
    if text.strip().lower() in ("none", "unlimited"):
        return None
    m = _SIZE.fullmatch(text)
    if not m:
        raise _fail(f"--max-checkpoint-size: cannot read {text!r} (bytes, or e.g. 500MB, 2GiB)")
    unit = m[2].lower().rstrip("b")
    base = 1024 if unit.endswith("i") else 1000
    power = "kmgt".find(unit[:1]) + 1 if unit else 0
    return int(float(m[1]) * base**power)


def _fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    err_console.print(f"[red]error:[/] {message}")
    return typer.Exit(code)


def parse_sets(sets: list[str] | None, profile: str) -> tuple[tuple[str, object], ...]:
    """`--set KEY=VALUE` pairs, checked against the profile's InversionConfig before any Ray work starts."""
    from dataclasses import fields

    from decree.inversion import InversionConfig

    names = {f.name for f in fields(InversionConfig)} - {"profile"}
    out: dict[str, object] = {}
    for item in sets or ():
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in names:
            raise _fail(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(names))}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key] = _tuples(value)
    try:
        InversionConfig.from_profile(profile, **out)
    except (TypeError, ValueError) as e:
        raise _fail(f"--set: {e}") from None
    return tuple(out.items())


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


# CLI parameter -> (JobConfig field, conversion(value, all parameters)); every other parameter is a JobConfig
# field of the same name, passed as it is
_CONVERTED = {
    "sets": ("overrides", lambda v, p: parse_sets(v, p["profile"])),
    "workers": ("num_workers", lambda v, p: v),
    "max_checkpoint_size": ("max_checkpoint_bytes", lambda v, p: parse_size(v)),
    "reference": ("references", lambda v, p: tuple(v or ())),
    "base": ("bases", lambda v, p: parse_bases(v)),
}


def parse_bases(items) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items or ():
        arch, sep, source = item.partition("=")
        if not sep:
            raise _fail(f"--base {item!r}: expected ARCH=SOURCE, e.g. timm/tf_efficientnet_lite0=pretrained")
        out.append((arch.strip(), source.strip()))
    return tuple(out)


def config_from_options(params: dict, skip=()) -> "JobConfig":
    """The JobConfig of a `scan`/`submit` call, from its parameters (`locals()`), validated (exit 2 if not)."""
    import dataclasses

    from ..config import JobConfig

    fields = {f.name for f in dataclasses.fields(JobConfig)}
    kwargs = {}
    for name, value in params.items():
        if name in skip or (name not in fields and name not in _CONVERTED):
            continue  # CLI-only options (--quiet) and the command's own local names
        field, convert = _CONVERTED.get(name, (name, lambda v, p: v))
        kwargs[field] = convert(value, params)
    try:
        return JobConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise _fail(str(e)) from None
