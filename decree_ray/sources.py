"""Where encoders come from: an s3:// prefix, a local folder, or a manifest (.jsonl/.csv/.parquet, local or S3).

`iter_tasks(source)` is a generator: listings are streamed page by page and manifests line by line, so a
source of 100,000 keys never becomes one list. Nothing listed is dropped silently: a local file is a checkpoint
by its name or, failing that, by its first bytes; every other entry becomes a task with status="skipped" and the
reason (counted in `SourceStats` too), except the `<checkpoint>.json` sidecars that belong to a checkpoint.
Manifest entries are always scanned or an error: one that cannot be (bad uri, escape from the manifest folder)
becomes a task with status="error", and one with an unusual name is still loaded, by content.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from . import hub, storage
from .metadata import MetadataError, missing, preprocessing
from .redact import redact
from .storage import DEFAULT_S3, S3Options

MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")
MAX_SIDECAR_BYTES = 64 << 10


def checkpoint_suffixes() -> frozenset[str]:
    from decree.encoders import CHECKPOINT_SUFFIXES

    return frozenset(CHECKPOINT_SUFFIXES)


PREPROCESSING = ("image_size", "mean", "std")
CLAIMED_SOURCES = ("sidecar", "hub config")  # preprocessing from beside the checkpoint: the audited party's word


@dataclass(frozen=True)
class EncoderTask:
    """One encoder to scan. Small and picklable: the driver ships tasks, never weights."""

    id: str
    uri: str
    arch: str | None = None
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    label: str | None = None
    size_bytes: int | None = None
    status: str = "pending"  # "pending", or "error"/"skipped" when the source already knows
    error: str | None = None
    # Look for `<checkpoint>.json` (arch, image_size, mean, std, label) next to the checkpoint.
    sidecar: bool = False
    # The listing's cheap identity of the file (size + ETag or mtime/ctime/inode): unchanged means not refetched.
    identity: str | None = None
    arch_source: str | None = None  # where `arch` came from: manifest | sidecar | hub config | --arch
    preprocess_source: str | None = None  # where image_size/mean/std came from: manifest | sidecar | hub config

    @property
    def claims_preprocessing(self) -> bool:
        """Its preprocessing is the audited party's claim (checked against the auditor's unless trusted)."""
        return self.preprocess_source in CLAIMED_SOURCES


@dataclass
class SourceStats:
    listed: int = 0
    skipped_keys: int = 0
    sidecars: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, uri: str) -> None:
        self.skipped_keys += 1
        if len(self.skipped_examples) < 20:
            self.skipped_examples.append(uri)


def is_manifest(source: str) -> bool:
    return str(source).lower().endswith(MANIFEST_SUFFIXES)


def iter_tasks(
    source: str, *, arch: str | None = None, options: S3Options = DEFAULT_S3, stats: SourceStats | None = None
) -> Iterator[EncoderTask]:
    """Stream the encoders of `source`. `arch` is the fallback when neither manifest nor sidecar names one."""
    stats = stats if stats is not None else SourceStats()
    source = str(source)
    if is_manifest(source):
        yield from _iter_manifest(source, arch, options, stats)
        return
    if storage.is_s3(source):
        prefix = source if source.endswith("/") or not source.rsplit("/", 1)[-1] else source + "/"
        if _is_checkpoint(source):  # a single object
            prefix = source
        listing = ((uri, size, None, ident) for uri, size, ident in storage.iter_s3_entries(prefix, options))
    else:
        path = Path(source)
        if path.is_file():
            st = path.stat()
            prefix, listing = str(path.parent) + "/", iter([(str(path), st.st_size, None, storage.local_identity(st))])
        elif path.is_dir():
            prefix, listing = str(path).rstrip("/") + "/", storage.iter_local_files(path)
        else:
            raise FileNotFoundError(f"source not found: {source} (expected a folder, s3://bucket/prefix or a manifest)")
    given = "--arch" if arch else None
    for uri, size, problem, ident in listing:
        stats.listed += 1
        rel = (uri[len(prefix) :] if uri.startswith(prefix) else uri.rsplit("/", 1)[-1]).lstrip("/")
        hf = None if storage.is_s3(uri) else hub.hub_file(uri)
        if hf is not None:
            if problem is None and not hub.is_weights(hf.name):  # config.json, README.md: the snapshot's own files
                stats.sidecars += 1
                continue
            rel = hf.encoder_id
        if problem is None and not _is_checkpoint(uri):
            if _is_sidecar(uri):
                stats.sidecars += 1
                continue
            problem = _not_a_checkpoint(uri)
        if problem is None and not storage.is_s3(uri):
            problem = hub.skip_reason(uri, hf)
            if is_shard_index(uri):
                ident = None  # the shards' identities are not the index's: always fetched and hashed
        if problem is not None:  # a row that says why, never a silent gap or an aborted listing
            rel = hf.file_id if hf is not None else rel  # never the id of the snapshot's scanned weights
            if problem.startswith("not a checkpoint"):
                stats.skip(uri)
            yield EncoderTask(id=rel, uri=uri, arch=arch, status="skipped", error=problem)
            continue
        yield EncoderTask(id=rel, uri=uri, arch=arch, size_bytes=size, sidecar=True, identity=ident, arch_source=given)


def apply_sidecar(task: EncoderTask, options: S3Options = DEFAULT_S3) -> EncoderTask:
    """`<checkpoint>.json` (or `<stem>.json`) may name arch, image_size, mean, std, label (MetadataError if it
    names them badly). Read by the worker before a scan, and by the driver to tell an unchanged entry."""
    from dataclasses import replace

    stem = task.uri.rsplit(".", 1)[0]
    for candidate in (task.uri + ".json", stem + ".json"):
        if candidate == task.uri:  # a shard index is not its own sidecar
            continue
        try:
            data = storage.read_optional(candidate, options, max_bytes=MAX_SIDECAR_BYTES)
        except storage.TooLarge as e:
            raise MetadataError(f"sidecar {e} (a sidecar names an arch and preprocessing: a few hundred bytes)") from e
        if data is None:
            continue
        try:
            meta = json.loads(data)
        except (ValueError, RecursionError):
            continue  # not a sidecar of ours; without an arch the scan says so in the row
        if not isinstance(meta, dict):
            continue
        given = preprocessing(meta)
        return _with_claims(replace(task, arch=given["arch"] or task.arch, label=given["label"] or task.label,
                                    arch_source="sidecar" if given["arch"] else task.arch_source), given, "sidecar")
    hf = None if storage.is_s3(task.uri) else hub.hub_file(task.uri)
    if hf is not None and task.arch_source in (None, "--arch"):
        try:
            found = hub.hub_metadata(hf)
        except ValueError as e:
            raise MetadataError(str(e)) from e
        if found is not None:
            given = preprocessing(found)
            return _with_claims(replace(task, arch=given["arch"], arch_source="hub config"), given, "hub config")
    return task


def _with_claims(task: EncoderTask, given: dict, source: str) -> EncoderTask:
    """Preprocessing from beside the checkpoint fills only what the manifest (the auditor) left open; it is the
    audited party's claim, so the row says so (and the worker checks it against the auditor's preprocessing)."""
    from dataclasses import replace

    if task.preprocess_source == "manifest" or not any(given[k] for k in PREPROCESSING):
        return task
    return replace(task, image_size=task.image_size or given["image_size"], mean=task.mean or given["mean"],
                   std=task.std or given["std"], preprocess_source=source)


def is_shard_index(uri: str) -> bool:
    """A `*.safetensors.index.json`: its shards change without it, so it has no listing identity."""
    return uri.lower().endswith(hub.INDEX_SUFFIX)


def _is_checkpoint(uri: str) -> bool:
    low = uri.lower()
    return PurePosixPath(low).suffix in checkpoint_suffixes() or is_shard_index(low)


def _is_sidecar(uri: str) -> bool:
    return uri.lower().endswith(".json") and _is_checkpoint(uri[: -len(".json")])


def _not_a_checkpoint(uri: str) -> str | None:
    """None if a local file is a checkpoint by content; else why it is skipped. S3 objects are judged by name:
    reading the head of every other key of a bucket would cost a request each."""
    if storage.is_s3(uri):
        return "not a checkpoint by name (S3 keys are not opened to check their content)"
    from decree.encoders.checkpoint import SNIFF_BYTES, sniff

    try:
        with open(uri, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
    except OSError as e:
        return f"cannot read: {type(e).__name__}"
    if sniff(head) is None:
        return "not a checkpoint (neither its name nor its content is safetensors or a torch zip/pickle/tar)"
    return None


# ---------------------------------------------------------------------------------------------- manifests


def resolve_manifest_uri(manifest: str, uri: str) -> str:
    """`uri` relative to the manifest's folder; raises ValueError if it escapes that folder."""
    uri = (uri or "").strip()
    if not uri:
        raise ValueError("manifest entry has no uri")
    folder = manifest.rsplit("/", 1)[0] if storage.is_s3(manifest) else str(Path(manifest).resolve().parent)
    if "://" in uri:
        if not storage.is_s3(uri):
            raise ValueError(f"unsupported uri scheme in manifest: {uri!r}")
        rel = uri[len(folder) + 1 :] if uri.startswith(folder + "/") else None
        if rel is None:
            raise ValueError(f"uri {uri!r} is outside the manifest folder {folder}/")
    else:
        rel = uri.replace("\\", "/")
        if rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
            raise ValueError(f"absolute path {uri!r} in manifest: uris must be relative to the manifest folder")
    parts = rel.split("/")
    if ".." in parts:
        raise ValueError(f"uri {uri!r} escapes the manifest folder ('..')")
    rel = posixpath.normpath(rel)
    if rel in (".", ""):
        raise ValueError(f"uri {uri!r} names the manifest folder itself")
    return storage.join(folder, rel)


def _iter_manifest_records(manifest: str, options: S3Options) -> Iterator[dict[str, Any] | Exception]:
    lower = manifest.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        src = io.BytesIO(storage.read_bytes(manifest, options)) if storage.is_s3(manifest) else manifest
        for batch in pq.ParquetFile(src).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    if storage.is_s3(manifest):
        bucket, key = storage.split_s3(manifest)
        body = storage.s3_client(options).get_object(Bucket=bucket, Key=key)["Body"]
        # one bad byte must not end the manifest: it survives as an escape, the row's text is sanitized later
        lines: Iterator[str] = codecs.iterdecode(body.iter_lines(), "utf-8", errors="surrogateescape")
    else:
        lines = (line.rstrip("\r\n") for line in  # noqa: SIM115 - streamed
                 open(manifest, encoding="utf-8", errors="surrogateescape"))
    if lower.endswith(".csv"):
        yield from csv.DictReader(lines)
        return
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:  # also too-deep nesting, too-long integers
            yield ValueError(f"manifest line {n} is not JSON: {type(e).__name__}: {str(e)[:200]}")
            continue
        yield record if isinstance(record, dict) else ValueError(f"manifest line {n} is not a JSON object")


def _task_from_record(manifest: str, n: int, record: dict[str, Any], arch: str | None) -> EncoderTask:
    raw_uri = record.get("uri")
    raw_uri = redact(raw_uri) if isinstance(raw_uri, str) else raw_uri  # presigned URLs carry credentials
    rid = record.get("id")
    ident = str(rid)[:300] if not missing(rid) and isinstance(rid, (str, int)) else None
    ident = ident or (str(raw_uri)[:300] if isinstance(raw_uri, str) and raw_uri else f"line-{n}")
    label = record.get("label") if isinstance(record.get("label"), str) else None
    try:
        if not missing(raw_uri) and not isinstance(raw_uri, str):
            raise ValueError(f"uri must be a string, got {type(raw_uri).__name__}")
        uri = resolve_manifest_uri(manifest, "" if missing(raw_uri) else raw_uri)
    except ValueError as e:
        # entries without a uri each keep their own row (the job keeps one row per uri)
        uri = f"{manifest}#{n}" if not isinstance(raw_uri, str) or not raw_uri.strip() else raw_uri
        return EncoderTask(id=ident, uri=uri, label=label, status="error", error=str(e))
    try:
        meta = preprocessing(record)
    except MetadataError as e:
        return EncoderTask(id=ident, uri=uri, label=label, status="error", error=f"bad manifest entry: {e}")
    task_arch = meta["arch"]
    task = EncoderTask(
        id=ident,
        uri=uri,
        arch=task_arch or arch,
        image_size=meta["image_size"],
        mean=meta["mean"],
        std=meta["std"],
        label=meta["label"],
        sidecar=task_arch is None,
        arch_source="manifest" if task_arch else ("--arch" if arch else None),
        preprocess_source="manifest" if any(meta[k] for k in PREPROCESSING) else None,
    )
    return task  # whatever its name: the loader decides by content, and says so in the row if it is not one


def _iter_manifest(manifest: str, arch: str | None, options: S3Options, stats: SourceStats) -> Iterator[EncoderTask]:
    if not storage.is_s3(manifest) and not Path(manifest).is_file():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    for n, record in enumerate(_iter_manifest_records(manifest, options), 1):
        stats.listed += 1
        if isinstance(record, Exception):
            yield EncoderTask(id=f"line-{n}", uri=f"{manifest}#{n}", status="error", error=str(record))
            continue
        yield _task_from_record(manifest, n, record, arch)
