"""`decree plan SOURCE --gpus N`: what a scan of SOURCE costs before any GPU is started.

Lists the encoders exactly as `decree scan` would (`sources.iter_tasks`), then multiplies: GPU-seconds are
the sum over encoders of the seconds one encoder takes on one GPU, for its arch. Those seconds come, in
order, from `--seconds-per-encoder`, a benchmark file (`--timings`, default bench/results.json) or the
placeholder table `PLACEHOLDER_SECONDS` below, and the output always says which.

The core (`make_plan`) is a pure function over `EncoderRecord`s so it is tested without any listing.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

DEFAULT_TIMINGS = Path("bench/results.json")

# Placeholders until the GPU benchmark lands: seconds for one encoder, `fast` profile (400 steps,
# batch 32), on one A10G-class GPU, by family. Not measured; `decree plan` labels them as such.
PLACEHOLDER_SECONDS: dict[str, float] = {"torchvision": 60.0, "timm": 60.0, "open_clip": 180.0}
PLACEHOLDER_UNKNOWN_ARCH = 120.0
UNKNOWN_ARCH = "(unknown arch)"


@dataclass(frozen=True)
class EncoderRecord:
    uri: str
    arch: str | None
    size_bytes: int | None


@dataclass(frozen=True)
class Timings:
    """Seconds per encoder by arch, and where they came from (shown to the user)."""

    seconds: Mapping[str, float]
    source: str


@dataclass(frozen=True)
class ArchLine:
    arch: str
    count: int
    total_bytes: int
    unknown_size: int  # encoders whose size the listing did not give
    seconds_per_encoder: float
    seconds_source: str

    @property
    def gpu_seconds(self) -> float:
        return self.count * self.seconds_per_encoder


@dataclass(frozen=True)
class Plan:
    lines: tuple[ArchLine, ...]
    gpus: int
    startup_minutes: float
    dollars_per_gpu_hour: float | None

    @property
    def count(self) -> int:
        return sum(line.count for line in self.lines)

    @property
    def total_bytes(self) -> int:
        return sum(line.total_bytes for line in self.lines)

    @property
    def gpu_hours(self) -> float:
        return sum(line.gpu_seconds for line in self.lines) / 3600.0

    @property
    def wall_hours(self) -> float:
        """Perfect packing over `gpus`, but never shorter than the slowest single encoder, plus node start-up."""
        if not self.lines:
            return 0.0
        longest = max(line.seconds_per_encoder for line in self.lines)
        scan_seconds = max(sum(line.gpu_seconds for line in self.lines) / self.gpus, longest)
        return scan_seconds / 3600.0 + self.startup_minutes / 60.0

    @property
    def billed_gpu_hours(self) -> float:
        # Every GPU is billed from boot: the start-up minutes count once per GPU.
        return self.gpu_hours + self.gpus * self.startup_minutes / 60.0

    @property
    def dollars(self) -> float | None:
        return None if self.dollars_per_gpu_hour is None else self.billed_gpu_hours * self.dollars_per_gpu_hour

    def to_dict(self) -> dict[str, Any]:
        return {
            "encoders": self.count,
            "total_bytes": self.total_bytes,
            "gpus": self.gpus,
            "gpu_hours": self.gpu_hours,
            "wall_hours": self.wall_hours,
            "startup_minutes": self.startup_minutes,
            "billed_gpu_hours": self.billed_gpu_hours,
            "dollars": self.dollars,
            "by_arch": [asdict(line) | {"gpu_seconds": line.gpu_seconds} for line in self.lines],
        }


def seconds_for(arch: str, timings: Timings | None) -> tuple[float, str]:
    """Measured seconds for `arch` if the benchmark has them, else the family placeholder."""
    if timings is not None and arch in timings.seconds:
        return float(timings.seconds[arch]), timings.source
    family = arch.split("/", 1)[0]
    if family in PLACEHOLDER_SECONDS:
        return PLACEHOLDER_SECONDS[family], f"placeholder ({family}, not measured)"
    return PLACEHOLDER_UNKNOWN_ARCH, "placeholder (unknown family, not measured)"


def make_plan(
    records: Iterable[EncoderRecord],
    *,
    gpus: int,
    timings: Timings | None = None,
    seconds_per_encoder: float | None = None,
    startup_minutes: float = 0.0,
    dollars_per_gpu_hour: float | None = None,
) -> Plan:
    """Group the records by arch and price them. Streams `records` once (a listing may be huge)."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if seconds_per_encoder is not None and seconds_per_encoder <= 0:
        raise ValueError(f"seconds_per_encoder must be > 0, got {seconds_per_encoder}")
    counts: dict[str, list[int]] = {}  # arch -> [count, bytes, unknown sizes]
    for rec in records:
        acc = counts.setdefault(rec.arch or UNKNOWN_ARCH, [0, 0, 0])
        acc[0] += 1
        if rec.size_bytes is None:
            acc[2] += 1
        else:
            acc[1] += int(rec.size_bytes)
    lines = []
    for arch in sorted(counts):
        count, nbytes, unknown = counts[arch]
        if seconds_per_encoder is not None:
            secs, src = float(seconds_per_encoder), "--seconds-per-encoder"
        else:
            secs, src = seconds_for(arch, timings)
        lines.append(ArchLine(arch, count, nbytes, unknown, secs, src))
    return Plan(tuple(lines), gpus, startup_minutes, dollars_per_gpu_hour)


# ------------------------------------------------------------------------------------------ timings file


def load_timings(path: str | Path) -> Timings | None:
    """Seconds per encoder by arch from a benchmark JSON; None if the file is absent.

    Accepted shapes: {"seconds_per_encoder": {arch: s}} or rows (a list, or {"rows"/"results": [...]})
    with "arch" and "seconds" (median per arch; rows with status other than "ok" are ignored). Rows
    measured on a GPU are preferred over CPU rows when both exist.
    """
    path = Path(path)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, (dict, list)):
        return None
    device = data.get("device") if isinstance(data, dict) else None
    if isinstance(data, dict) and isinstance(data.get("seconds_per_encoder"), dict):
        table = {str(k): float(v) for k, v in data["seconds_per_encoder"].items()}
        return Timings(table, f"measured ({path}{', ' + device if device else ''})")
    rows = data if isinstance(data, list) else (data.get("rows") or data.get("results") or [])
    rows = [r for r in rows if isinstance(r, dict) and r.get("arch") and isinstance(r.get("seconds"), (int, float))]
    rows = [r for r in rows if r.get("status", "ok") == "ok" and r["seconds"] > 0]
    on_gpu = [r for r in rows if str(r.get("device", "")).startswith("cuda")]
    rows = on_gpu or rows
    if not rows:
        return None
    where = "cuda" if on_gpu else ", ".join(sorted({str(r.get("device") or "device not recorded") for r in rows}))
    by_arch: dict[str, list[float]] = {}
    for r in rows:
        by_arch.setdefault(str(r["arch"]), []).append(float(r["seconds"]))
    table = {arch: statistics.median(v) for arch, v in by_arch.items()}
    return Timings(table, f"measured ({path}, {where}, median of {len(rows)} rows)")


# ------------------------------------------------------------------------------------------------ listing


def iter_records(source: str, *, arch: str | None = None, endpoint_url: str | None = None) -> Iterator[EncoderRecord]:
    """The encoders `decree scan` would see, as records. Sizes/arches not in the listing are filled cheaply:
    local files are stat'ed and their `<checkpoint>.json` sidecar read; S3 manifests get sizes from one
    listing of the manifest's folder. S3 sidecars are not fetched (one GET per encoder): pass --arch."""
    from .. import storage
    from ..sources import is_manifest, iter_tasks
    from ..storage import S3Options

    options = S3Options(endpoint_url=endpoint_url)
    s3_sizes: dict[str, int] | None = None
    for task in iter_tasks(source, arch=arch, options=options):
        if task.status != "pending":
            continue  # skipped/bad entries are rows in a scan but cost no GPU time
        size, task_arch = task.size_bytes, task.arch
        if storage.is_s3(task.uri):
            if size is None and is_manifest(source):
                if s3_sizes is None:
                    s3_sizes = dict(storage.iter_s3_objects(source.rsplit("/", 1)[0] + "/", options))
                size = s3_sizes.get(task.uri)
        else:
            if size is None and Path(task.uri).is_file():
                size = Path(task.uri).stat().st_size
            if task.sidecar:
                task_arch = _local_sidecar_arch(task.uri) or task_arch
        yield EncoderRecord(task.uri, task_arch, size)


def _local_sidecar_arch(uri: str) -> str | None:
    # Same lookup order as the scan worker: <checkpoint>.json, then <stem>.json.
    for candidate in (Path(uri + ".json"), Path(uri.rsplit(".", 1)[0] + ".json")):
        try:
            meta = json.loads(candidate.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(meta, dict) and meta.get("arch"):
            return str(meta["arch"])
    return None


# ----------------------------------------------------------------------------------------------- the CLI


def _human_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def _hours(h: float) -> str:
    return f"{h:.2f} h" if h >= 1 else f"{h * 60:.1f} min"


def render(plan: Plan) -> str:
    lines = [f"{'arch':<40} {'encoders':>8} {'size':>10} {'s/encoder':>9} {'GPU-h':>8}  seconds from"]
    for ln in plan.lines:
        size = _human_bytes(ln.total_bytes) + ("*" if ln.unknown_size else "")
        lines.append(
            f"{ln.arch:<40} {ln.count:>8} {size:>10} {ln.seconds_per_encoder:>9.1f} "
            f"{ln.gpu_seconds / 3600:>8.2f}  {ln.seconds_source}"
        )
    lines.append(f"{'total':<40} {plan.count:>8} {_human_bytes(plan.total_bytes):>10} {'':>9} {plan.gpu_hours:>8.2f}")
    if any(ln.unknown_size for ln in plan.lines):
        lines.append("* some sizes unknown to the listing (not counted)")
    lines.append(
        f"wall time on {plan.gpus} GPU(s): {_hours(plan.wall_hours)} "
        f"(= GPU-hours / GPUs, at least the slowest encoder, + {plan.startup_minutes:g} min node start-up)"
    )
    if plan.dollars is not None:
        lines.append(
            f"cost: {plan.billed_gpu_hours:.2f} billed GPU-h x ${plan.dollars_per_gpu_hour:g}/GPU-h = ${plan.dollars:,.2f}"
        )
    if any(ln.seconds_source.startswith("placeholder") for ln in plan.lines):
        lines.append("note: placeholder seconds are not measurements; run the benchmark (bench/results.json) or pass --seconds-per-encoder")
    return "\n".join(lines)


def plan_command(
    source: Annotated[str, typer.Argument(help="s3://bucket/prefix/, a local folder, or a manifest (.jsonl/.csv/.parquet).")],
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="GPUs the scan will run on (sum over worker nodes).")] = 8,
    endpoint_url: Annotated[str | None, typer.Option("--endpoint-url", help="S3-compatible endpoint (MinIO, moto).")] = None,
    arch: Annotated[str | None, typer.Option("--arch", help="Arch for encoders the listing does not name one for.")] = None,
    seconds_per_encoder: Annotated[
        float | None, typer.Option("--seconds-per-encoder", min=0.001, help="Use this for every arch instead of measured/placeholder seconds.")
    ] = None,
    timings: Annotated[Path, typer.Option("--timings", help="Benchmark JSON with measured seconds per encoder.")] = DEFAULT_TIMINGS,
    startup_minutes: Annotated[float, typer.Option("--startup-minutes", min=0.0, help="Node boot + setup before the first scan.")] = 10.0,
    dollars_per_gpu_hour: Annotated[
        float | None, typer.Option("--dollars-per-gpu-hour", min=0.0, help="Price one GPU-hour (e.g. 1.01 for an on-demand g5.xlarge).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """List the encoders of SOURCE and estimate GPU-hours, wall time and cost for a scan on --gpus GPUs.

    Exit codes: 0 planned, 2 the source could not be listed or an argument is invalid.
    """
    try:
        records = iter_records(source, arch=arch, endpoint_url=endpoint_url)
        plan = make_plan(
            records, gpus=gpus, timings=load_timings(timings), seconds_per_encoder=seconds_per_encoder,
            startup_minutes=startup_minutes, dollars_per_gpu_hour=dollars_per_gpu_hour,
        )
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(plan.to_dict(), indent=2) if as_json else render(plan))
