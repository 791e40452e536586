"""The job's per-encoder path without Ray: source -> ScanWorker.fetch -> ScanWorker.scan, one row per uri.

Mirrors `decree_ray.job._Job` closely enough for property tests (which need hundreds of runs, not Ray's
startup), while going through the same public pieces: `iter_tasks`, `ScanWorker`, `new_row`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from decree_ray.schema import FLEET_COLUMNS, VOLATILE_COLUMNS, new_row
from decree_ray.sources import iter_tasks
from decree_ray.storage import DEFAULT_S3, S3Options
from decree_ray.worker import ScanSettings, ScanWorker, write_evidence

FAST = (("restarts", 1), ("batch_size", 8), ("eval_images", 8))


def settings(shadow, out, cache, *, steps: int = 3, s3: S3Options = DEFAULT_S3, **kw) -> ScanSettings:
    return ScanSettings(shadow=str(shadow), out=str(out), cache_dir=str(cache), steps=steps, overrides=FAST, s3=s3, **kw)


def scan_source(source: str, worker: ScanWorker, *, arch: str | None = None, s3: S3Options = DEFAULT_S3) -> list[dict]:
    """Every encoder of `source` scanned by one worker; rows in source order, one per distinct uri."""
    rows, seen = [], set()
    for task in iter_tasks(str(source), arch=arch, options=s3):
        if task.uri in seen:
            continue
        seen.add(task.uri)
        if task.status != "pending":
            rows.append(new_row(id=task.id, uri=task.uri, status=task.status, arch=task.arch, label=task.label,
                                error=task.error))
            continue
        fetched = worker.fetch(task)
        # as the driver does: a local --out gets the evidence PNGs the worker handed back
        rows.append(fetched["row"] if "row" in fetched else write_evidence(worker.scan(), str(worker.settings.out)))
    return rows


def stable(rows: list[dict]) -> dict[str, dict]:
    """Rows keyed by uri without the columns that legitimately differ between runs (or that only the compacted
    table has: the fleet statistics)."""
    out = {}
    skip = set(VOLATILE_COLUMNS) | set(FLEET_COLUMNS)
    for r in rows:
        out[r["uri"]] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items() if k not in skip}
    return out


def tree(root: Path) -> dict[str, str]:
    """relative path -> content hash of every file under root (to prove what was, and was not, written)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            try:
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
            except OSError:
                out[str(p.relative_to(root))] = "?"
    return out


def written_outside(before: dict[str, str], after: dict[str, str], allowed: tuple[str, ...]) -> list[str]:
    """Files created or changed under the sandbox that are not under one of the allowed folders."""
    changed = [k for k, v in after.items() if before.get(k) != v]
    removed = [k for k in before if k not in after]
    return sorted(k for k in changed + removed if not any(k == a or k.startswith(a + os.sep) for a in allowed))
