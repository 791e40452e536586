"""The results table: one row per encoder, whatever happened to it.

`SCHEMA` is the pyarrow schema of every part file and of results.parquet; `SCHEMA_MARKDOWN` documents it
(the README pastes it). Rows are plain dicts built by `new_row`, so a worker, a timeout and a dead actor all
produce the same shape.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any

import pyarrow as pa

STATUSES = ("ok", "error", "skipped")
VERDICTS = ("trojaned", "clean")

# (name, type, nullable, description) - the one place the columns are defined.
_COLUMNS: list[tuple[str, pa.DataType, bool, str]] = [
    ("id", pa.string(), False, "Encoder id: the manifest's `id`, else the key relative to the source prefix/folder."),
    ("uri", pa.string(), False, "Where the checkpoint was read (s3://... or a local path). One row per uri."),
    ("sha256", pa.string(), True, "SHA-256 of the checkpoint bytes, computed by the worker (null if unreadable)."),
    ("size_bytes", pa.int64(), True, "Checkpoint size in bytes."),
    ("arch", pa.string(), True, "Architecture scanned (`timm/...`, `torchvision/...`, `open_clip/...`)."),
    ("label", pa.string(), True, "Ground truth from the manifest (`clean`/`trojaned`), if known."),
    ("arch_source", pa.string(), True,
     "Where `arch` came from: `manifest`, `sidecar` (<checkpoint>.json), `hub config` (a Hugging Face snapshot's "
     "config.json / open_clip_config.json) or `--arch`."),
    (
        "status",
        pa.string(),
        False,
        "`ok` (scanned), `error` (could not be scanned; see `error`), `skipped` (not a checkpoint).",
    ),
    ("error", pa.string(), True, "Why the encoder was not scanned (typed core error message, timeout, dead worker)."),
    ("unsafe_globals", pa.list_(pa.string()), True, "Imports an unsafe pickle asked for (nothing was run)."),
    ("l1_norm", pa.float64(), True, "L1 norm of the inverted trigger mask."),
    ("pl1_norm", pa.float64(), True, "L1 norm / image area. Lower = more suspicious."),
    ("similarity", pa.float64(), True, "Mean cosine similarity the inverted trigger reached."),
    ("reached_tau", pa.bool_(), True, "Whether the inversion reached the similarity target tau."),
    ("steps", pa.int64(), True, "Optimization steps taken."),
    (
        "seconds",
        pa.float64(),
        True,
        "Wall time of the scan of this encoder (0 when reused from an identical checkpoint).",
    ),
    ("profile", pa.string(), True, "Inversion profile (`fast` or `paper`)."),
    ("device", pa.string(), True, "Device the scan ran on (`cpu`, `cuda:0`)."),
    ("threshold", pa.float64(), True, "PL1 threshold the verdict used."),
    (
        "verdict",
        pa.string(),
        True,
        (
            "The encoder's verdict, null unless ok: `trojaned` when the patch or the blend search (or, with --base, "
            "specific_pl1) flagged it at its threshold, or (`verdict_basis` fleet) when its `anomaly_index` exceeds the fleet cutoff; else `clean`. "
            "In a group anchored by references or a clean cluster (`fleet_anchor`), a threshold flags only a score "
            "below every anchor encoder's."
        ),
    ),
    ("patch_verdict", pa.string(), True, "Verdict of the patch search alone: reached_tau and pl1_norm < threshold."),
    ("blend_pl1", pa.float64(), True, "Whole-image search: the smallest blend weight alpha that made the shadow set embed alike."),
    ("blend_similarity", pa.float64(), True, "Mean cosine similarity the blend trigger reached (held-out shadow images)."),
    ("blend_reached_tau", pa.bool_(), True, "Whether the blend search reached tau."),
    ("blend_steps", pa.int64(), True, "Optimization steps of the blend search (null: not run, the patch search had flagged it)."),
    ("blend_threshold", pa.float64(), True, "Blend weight below which the blend search calls the encoder trojaned."),
    ("blend_verdict", pa.string(), True, "Verdict of the blend search alone (null: not run)."),
    ("base_similarity", pa.float64(), True,
     "With --base: the base model's mean cosine similarity on the shadow images stamped with this encoder's trigger."),
    ("specific_pl1", pa.float64(), True,
     "With --base: pl1_norm divided by how many times farther from a full collapse the base stays than the encoder "
     "(at least 1): a natural trigger, which the base shares, keeps its area; a backdoor's shrinks."),
    ("specific_verdict", pa.string(), True, "With --base: reached_tau and specific_pl1 < half the threshold or (base_distance ≤ 0.001) < 0.1 × base_pl1, base_distance ≤ 0.006."),
    ("base_pl1", pa.float64(), True,
     "With --base: the base's own PL1 on this shadow set (its smallest natural trigger, searched as this encoder's was); "
     "null without a base or when the base never reached tau."),
    ("base_members", pa.int64(), True,
     "With a consensus base (by default, --base ARCH=consensus, or several --base for one ARCH): how many members "
     "made the median this encoder was compared with; 0: it is a fine-tune of none of the groups (judged without a "
     "base). Null: a single base or none."),
    ("base_distance", pa.float64(), True,
     "Weight distance (mean 1 - cosine over the weight tensors) from this encoder to the base it was compared with, "
     "or to the nearest consensus when none was near enough (0.1). Null: no base."),
    ("base_group", pa.string(), True,
     "With a consensus base: the lineage this encoder was compared with (a digest of that group's member uris); "
     "fleet statistics judge a lineage of 6 or more among itself. Null: none."),
    ("image_size", pa.int64(), True, "Input size the encoder was scanned at (the deciding scan's)."),
    ("preprocess_source", pa.string(), True,
     "Where the input size and normalization came from: `manifest` (the auditor), `sidecar` or `hub config` (the "
     "audited party's claim), `default` (the architecture's own, or --image-size)."),
    ("preprocess_decided", pa.string(), True,
     "When claimed preprocessing differed from the auditor's, both were scanned: `claimed` or `reference` says "
     "which verdict stands (the more suspicious one); null when only one scan ran."),
    ("shadow_sha256", pa.string(), True, "Digest of the shadow set the encoder was scanned with."),
    (
        "anomaly_index",
        pa.float64(),
        True,
        (
            "Robust z-score (median/MAD) of log PL1 (or log blend weight or log specific_pl1, whichever is highest) "
            "against comparable "
            "encoders (same arch, image_size, shadow set and profile): their references or, without references, "
            "their clean cluster (README: Verdicts). Positive = smaller trigger than its peers."
        ),
    ),
    ("fleet_peers", pa.int64(), True, "How many comparable encoders the anomaly index was computed against."),
    (
        "verdict_basis",
        pa.string(),
        True,
        "`fleet` (enough peers: anomaly index and thresholds decided) or `threshold` (too few peers: thresholds only).",
    ),
    (
        "fleet_anchor",
        pa.string(),
        True,
        (
            "What the fleet statistics came from: `references`, `cluster` (the group's clean cluster) or `group` "
            "(the whole group: no references, no cluster stood apart); null with `verdict_basis` threshold."
        ),
    ),
    (
        "suspicion",
        pa.float64(),
        True,
        (
            "One score for every rule the verdict uses, higher = more suspicious, above 1 exactly when the verdict is "
            "trojaned: the largest of each search's cut over its score (threshold / pl1_norm, blend_threshold / "
            "blend_pl1, the specific cut / specific_pl1; a search that never reached tau, and a threshold the "
            "anchor overrules, left out) and anomaly_index / the fleet cutoff (negative: a larger trigger than its peers'). "
            "Comparable across architectures and shadow sets; `decree report` ranks and draws its ROC by it. Null "
            "unless ok."
        ),
    ),
    ("scanned_at", pa.timestamp("us", tz="UTC"), False, "When this row was produced (UTC)."),
    ("decree_version", pa.string(), True, "Version of the `decree` core that produced the row."),
    ("evidence_mask", pa.string(), True, "Path/uri of the inverted mask PNG."),
    ("evidence_pattern", pa.string(), True, "Path/uri of the inverted pattern PNG."),
    ("evidence_stamp", pa.string(), True, "Path/uri of the inverted trigger (mask times pattern) on black."),
    (
        "evidence_grid",
        pa.string(),
        True,
        "Path/uri of a grid: shadow images, the same stamped with the trigger, the mask as a heat map over them.",
    ),
    (
        "content_key",
        pa.string(),
        True,
        (
            "What makes two scans identical: sha256, arch, profile, image_size, mean, std and checkpoint format. "
            "A later run reuses an ok row with the same key instead of scanning again (null if never fetched)."
        ),
    ),
    (
        "source_identity",
        pa.string(),
        True,
        (
            "The listing's identity of the checkpoint when it was scanned: size and ETag (S3), or size, mtime, "
            "ctime and inode (local). A re-run reuses the ok row of an unchanged entry without downloading it."
        ),
    ),
]

SCHEMA = pa.schema([pa.field(name, typ, nullable=nullable) for name, typ, nullable, _ in _COLUMNS])
COLUMNS = [name for name, *_ in _COLUMNS]
# Columns that legitimately differ between two runs over the same encoders.
VOLATILE_COLUMNS = ("seconds", "scanned_at", "device", "evidence_mask", "evidence_pattern", "evidence_stamp",
                    "evidence_grid", "source_identity")
# Columns derived from the whole table when it is compacted (decree.fleet), not by the scan of one encoder.
FLEET_COLUMNS = ("anomaly_index", "fleet_peers", "verdict_basis", "fleet_anchor", "suspicion")
# Columns taken from a previous scan when an identical checkpoint is reported under another key.
SCAN_COLUMNS = (
    "sha256",
    "size_bytes",
    "arch",
    "status",
    "error",
    "unsafe_globals",
    "l1_norm",
    "pl1_norm",
    "similarity",
    "reached_tau",
    "steps",
    "profile",
    "device",
    "threshold",
    "verdict",
    "patch_verdict",
    "blend_pl1",
    "blend_similarity",
    "blend_reached_tau",
    "blend_steps",
    "blend_threshold",
    "blend_verdict",
    "base_similarity",
    "specific_pl1",
    "specific_verdict",
    "base_pl1",
    "base_members",
    "image_size",
    "shadow_sha256",
    "preprocess_source",
    "preprocess_decided",
    "decree_version",
    "evidence_mask",
    "evidence_pattern",
    "evidence_stamp",
    "evidence_grid",
    "content_key",
)


def _markdown() -> str:
    lines = ["| column | type | description |", "|---|---|---|"]
    for name, typ, nullable, desc in _COLUMNS:
        lines.append(f"| `{name}` | {typ}{'' if nullable else ' (not null)'} | {desc} |")
    return "\n".join(lines)


SCHEMA_MARKDOWN = _markdown()


def now_utc() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


# C0 and C1 control characters (ESC starts terminal sequences: cursor moves, OSC 52 clipboard writes), DEL
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def safe_text(value: str) -> str:
    """Untrusted text as it may enter a row, a log or a terminal: valid UTF-8 (a lone surrogate from a file name
    or a checkpoint key becomes its escape, instead of aborting the Parquet writer) and no control characters
    (escaped as \\xNN). Idempotent, so a row can pass through it again."""
    text = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


_NAMED = re.compile(r" \[raw:[0-9a-f]{32}\]$")


def row_name(raw: str) -> str:
    """An id or uri as a row keeps it: `safe_text`, and kept apart from every other name. Escaping is not
    injective (a raw byte 0xff and the literal text `\\udcff` escape alike) and the table keeps one row per uri,
    so a name that escaping changed (or that already ends like a marked name) gets a digest of its raw form."""
    text = safe_text(raw)
    if text == raw and not _NAMED.search(raw):
        return raw
    import hashlib

    return f"{text} [raw:{hashlib.sha256(raw.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}]"


def _safe(value: Any) -> Any:
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, list):
        return [_safe(v) for v in value]
    return value


def new_row(
    *,
    id: str,
    uri: str,
    status: str,
    arch: str | None = None,
    label: str | None = None,
    error: str | None = None,
    **values: Any,
) -> dict[str, Any]:
    """A complete row: every column present, unknown ones None."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown result columns: {sorted(unknown)}")
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(values)
    row.update(arch=arch, label=label, error=error, status=status)
    row = {k: _safe(v) for k, v in row.items()}
    row.update(id=row_name(id), uri=row_name(uri))
    if row["scanned_at"] is None:
        row["scanned_at"] = now_utc()
    if row["verdict"] is not None and row["verdict"] not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS} or None, got {row['verdict']!r}")
    return row


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=SCHEMA)
