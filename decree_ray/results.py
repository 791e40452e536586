"""Results on disk (or S3): atomic Parquet part files, compaction into results.parquet, and resume state.

Layout under OUT: `parts/part-<run>-<seq>.parquet` (written as rows arrive), `results.parquet` (one row per
uri, the latest one wins), `evidence/<sha256(content_key)[:16]>/*.png`. A crash loses at most the rows not yet flushed;
the next run reads what is there and does not scan those encoders again.
"""

from __future__ import annotations

import datetime
import io
import json
import time
import uuid
import warnings
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .schema import SCHEMA, now_utc, to_table
from .storage import DEFAULT_S3, S3Options

RESULTS_NAME = "results.parquet"
PARTS_DIR = "parts"


def results_path(out: str) -> str:
    return storage.join(out, RESULTS_NAME)


def _table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def read_table(uri: str, options: S3Options = DEFAULT_S3) -> pa.Table:
    src = io.BytesIO(storage.read_bytes(uri, options)) if storage.is_s3(uri) else uri
    return pq.read_table(src, schema=SCHEMA)


class PartWriter:
    """Buffers rows and writes them as part files: every `every` rows or `seconds`, whichever comes first."""

    def __init__(self, out: str, *, every: int = 16, seconds: float = 30.0, options: S3Options = DEFAULT_S3):
        self.folder = storage.join(out, PARTS_DIR)
        self.run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
        self.every, self.seconds, self.options = max(1, every), seconds, options
        self.rows: list[dict[str, Any]] = []
        self.seq = 0
        self.written = 0
        self._last = time.monotonic()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.every:
            self.flush()
        else:
            self.flush_if_due()

    def flush_if_due(self) -> None:
        """Called from the dispatch loop too, so a slow fleet still persists rows every `seconds`."""
        if self.rows and time.monotonic() - self._last >= self.seconds:
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        if not self.rows:
            return
        name = f"part-{self.run_id}-{self.seq:06d}.parquet"
        storage.write_bytes(storage.join(self.folder, name), _table_bytes(to_table(self.rows)), self.options)
        self.seq += 1
        self.written += len(self.rows)
        self.rows = []


def _sources(out: str, options: S3Options) -> tuple[list[str], list[str]]:
    parts = storage.list_files(storage.join(out, PARTS_DIR), ".parquet", options)
    main = results_path(out)
    return ([main] if storage.exists(main, options) else []), parts


CLOCK_SKEW = datetime.timedelta(minutes=10)


def _broken_invariant(rows: list[dict[str, Any]]) -> str | None:
    from .schema import STATUSES

    required = [f.name for f in SCHEMA if not f.nullable]
    horizon = now_utc() + CLOCK_SKEW
    for row in rows:
        missing = [c for c in required if row.get(c) is None]
        if missing:
            return f"null in not-null columns {missing}"
        if row["status"] not in STATUSES:
            return f"unknown status {str(row['status'])[:40]!r}"
        if row["scanned_at"] > horizon:
            return f"scanned_at {row['scanned_at'].isoformat()} is in the future"
    return None


def _read_all(out: str, options: S3Options) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """(rows, part files read, part files unreadable). One row per uri: the latest by scanned_at."""
    main, parts = _sources(out, options)
    latest: dict[str, dict[str, Any]] = {}
    good, bad = [], []
    for uri in main + parts:
        try:
            table = read_table(uri, options)
        except (pa.ArrowException, OSError) as e:
            if uri in main:  # the compacted table holds every earlier run: never silently drop it
                raise OSError(f"results table {uri} is unreadable ({e}); move it aside to start over") from e
            warnings.warn(f"skipping unreadable part file {uri}: {e}", stacklevel=3)
            bad.append(uri)
            continue
        rows = table.to_pylist()
        problem = _broken_invariant(rows)
        if problem is not None and uri not in main:
            # a part that parses but breaks the schema's promises (a null id, a status that is not one, a
            # scanned_at in the future that would win every merge): set aside like an unreadable one
            warnings.warn(f"setting aside part file {uri}: {problem}", stacklevel=3)
            bad.append(uri)
            continue
        good.extend([uri] if uri in parts else [])
        for row in rows:
            if row.get("uri") is None or row.get("scanned_at") is None:
                continue  # only possible in a damaged results.parquet: never let one row stop the merge
            old = latest.get(row["uri"])
            if old is None or row["scanned_at"] >= old["scanned_at"]:
                latest[row["uri"]] = row
    return sorted(latest.values(), key=lambda r: (r["id"], r["uri"])), good, bad


def load_rows(out: str, options: S3Options = DEFAULT_S3) -> list[dict[str, Any]]:
    """Every row under OUT, one per uri: the latest by scanned_at. Unreadable part files are skipped
    (their encoders are simply scanned again); an unreadable results.parquet is an error."""
    return _read_all(out, options)[0]


def compact(out: str, options: S3Options = DEFAULT_S3, finalize=None) -> str:
    """Merge part files into results.parquet (atomically), then remove the parts it now contains.

    `finalize(rows) -> rows` runs on the merged table first (the fleet verdicts, which need every row).
    Unreadable parts are renamed to `*.parquet.corrupt`: kept for inspection, no longer read."""
    rows, good, bad = _read_all(out, options)
    if finalize is not None:
        rows = finalize(rows)
    target = results_path(out)
    storage.write_bytes(target, _table_bytes(to_table(rows)), options)
    for part in good:
        storage.delete(part, options)
    for part in bad:
        storage.write_bytes(part + ".corrupt", storage.read_bytes(part, options), options)
        storage.delete(part, options)
    return target


def checkpoint_format(uri: str) -> str:
    """The file's suffix, lowercased: .pt and .safetensors of the same bytes parse differently."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[1].lower() if "." in name else ""


def content_key(sha256: str, arch: str | None, profile: str | None, *, image_size: int | None = None,
                mean=None, std=None, fmt: str = "", settings: str = "") -> str:
    """Two checkpoints with this key give the same scan: scanned once, reported for each uri.

    Everything the scan's outcome depends on: the bytes, how they are parsed (format), built (arch) and fed
    (image_size, mean, std), the inversion profile, and `settings` (settings_key: overrides, step budget,
    threshold, shadow set, decree version). A run with other settings matches nothing and rescans."""
    return json.dumps([sha256, arch, profile, image_size, _floats(mean), _floats(std), fmt, settings],
                      separators=(",", ":"))


def settings_key(*, profile: str, overrides=(), steps: int | None = None, threshold: float | None = None,
                 shadow_limit: int | None = None, shadow_sha256: str = "", image_size: int | None = None,
                 trust_sidecar_preprocessing: bool = False, bases=()) -> str:
    """A digest of every setting besides the checkpoint that changes a verdict."""
    import hashlib

    try:
        from decree import __version__ as version
    except ImportError:  # the driver may run without the core importable; the workers check their own
        version = None
    blob = json.dumps({"profile": profile, "overrides": sorted((str(k), repr(v)) for k, v in overrides),
                       "steps": steps, "threshold": threshold, "shadow_limit": shadow_limit,
                       "shadow": shadow_sha256, "decree": version,
                       "preprocessing": [image_size, bool(trust_sidecar_preprocessing)],
                       **({"bases": sorted([str(a), str(s)] for a, s in bases)} if bases else {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def settings_key_of(settings, shadow_sha256: str, arch: str | None) -> str:
    """settings_key of a JobConfig (the driver) or a ScanSettings (a worker) for encoders of `arch`: they name
    these fields alike, so a setting added to the key is added in one place and driver and workers cannot
    disagree. Only `arch`'s own bases enter: a consensus member that changes in one architecture rescans that
    architecture, not the whole fleet."""
    s = settings
    return settings_key(profile=s.profile, overrides=s.overrides, steps=s.steps, threshold=s.threshold,
                        shadow_limit=s.shadow_limit, shadow_sha256=shadow_sha256, image_size=s.image_size,
                        trust_sidecar_preprocessing=s.trust_sidecar_preprocessing,
                        bases=tuple((a, src) for a, src in s.bases if a == arch))


class SettingsKeys:
    """settings_key_of per architecture, computed once each: `keys(arch)`."""

    def __init__(self, settings, shadow_sha256: str):
        self.settings, self.shadow_sha256 = settings, shadow_sha256
        self._keys: dict[str | None, str] = {}

    def __call__(self, arch: str | None) -> str:
        if arch not in self._keys:
            self._keys[arch] = settings_key_of(self.settings, self.shadow_sha256, arch)
        return self._keys[arch]


def shadow_digest(uri: str, options: S3Options = DEFAULT_S3) -> str:
    """SHA-256 of a shadow set as stored: a file's bytes (local or s3://), or a local folder's files and names."""
    import hashlib
    from pathlib import Path

    if storage.is_s3(uri):
        return hashlib.sha256(storage.read_bytes(uri, options)).hexdigest()
    path = Path(uri)
    if not path.is_dir():
        return storage.sha256_file(path)[0]
    h = hashlib.sha256()
    for p in sorted(q for q in path.iterdir() if q.is_file()):
        h.update(p.name.encode("utf-8", "surrogateescape") + b"\0" + storage.sha256_file(p)[0].encode())
    return h.hexdigest()


CLAIMED = "+claimed"  # marks a content key whose preprocessing was the audited party's claim, checked


def _key_parts(key: str | None) -> list | None:
    try:
        parts = json.loads(key) if key else None
    except ValueError:
        return None
    return parts if isinstance(parts, list) and len(parts) == 8 and isinstance(parts[7], str) else None


def made_with(key: str | None, keys) -> bool | None:
    """Whether a content key was made with this run's settings for its own architecture (`keys(arch)`, a
    SettingsKeys); None for keys written before the settings part existed."""
    parts = _key_parts(key)
    if parts is None:
        return None
    # a checked claim is still made with this run's settings
    return parts[7].removesuffix(CLAIMED) == keys(parts[1] if isinstance(parts[1], str) else None)


def _floats(values) -> list[float] | None:
    return None if values is None else [float(x) for x in values]


def task_content_key(sha256: str, task, profile: str | None, settings: str = "") -> str:
    # claimed preprocessing is checked against the auditor's: not the same verdict as the same values trusted
    return content_key(sha256, task.arch, profile, image_size=task.image_size, mean=task.mean, std=task.std,
                       fmt=checkpoint_format(task.uri), settings=settings + (CLAIMED if task.claims_preprocessing else ""))


def ok_rows_by_content(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Resume state: ok rows by their `content_key` column (rows written before that column are rescanned)."""
    return {r["content_key"]: r for r in rows if r["status"] == "ok" and r.get("content_key")}


def ok_rows_by_uri(rows: list[dict[str, Any]], keys) -> dict[str, dict[str, Any]]:
    """Ok rows made with this run's settings (`keys(arch)`) that carry a listing identity, by uri (resume
    without a download)."""
    return {r["uri"]: r for r in rows if r["status"] == "ok" and r.get("source_identity") and r.get("sha256")
            and made_with(r.get("content_key"), keys)}


def legacy_ok_rows(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Ok rows written before the `content_key` column, by (uri, sha256, arch, profile): reused only for the
    same uri (a plain resume), never for other uris whose preprocessing may differ."""
    return {(r["uri"], r["sha256"], r["arch"], r["profile"]): r for r in rows
            if r["status"] == "ok" and r["sha256"] and not r.get("content_key")}
