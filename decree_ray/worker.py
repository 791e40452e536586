"""The per-actor scanner: built once (device, shadow set, inversion config), then fed encoders by the driver.

A plain class so it can be tested without Ray; `decree_ray.job` wraps it with `ray.remote`. Each encoder is two
calls on the same actor: `fetch` (download to the local cache, read the sidecar, hash) and then, only if the
driver has no result for that content yet, `scan(uri)` (or `drop(uri)`). Fetched files are held by uri, so the
driver can queue the next encoder's fetch behind the current scan and the actor never waits for a round trip.
Every exception becomes a row, never a crash.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import storage
from .redact import redact
from .results import task_content_key as content_key
from .schema import new_row
from .sources import EncoderTask, apply_sidecar, is_shard_index
from .storage import S3Options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanSettings:
    """What every worker needs; shipped once when the actor is created."""

    shadow: str
    out: str | None = None  # evidence PNGs go to OUT/evidence/<sha256>/
    profile: str = "fast"
    steps: int | None = None
    threshold: float | None = None
    shadow_limit: int | None = None
    evidence: bool = True
    cache_dir: str | None = None
    threads: int = 1
    max_checkpoint_bytes: int | None = None  # refuse bigger checkpoints before downloading them
    load_timeout: float = 120.0  # reading one checkpoint, in the worker's loader process
    image_size: int | None = None  # the auditor's input size for encoders whose manifest line names none
    trust_sidecar_preprocessing: bool = False  # else a sidecar's preprocessing is checked against the auditor's
    overrides: tuple[tuple[str, Any], ...] = ()  # extra InversionConfig fields, e.g. (("restarts", 1),)
    bases: tuple[tuple[str, str], ...] = ()  # (arch, "pretrained" | checkpoint path | s3 uri): decree.transfer
    auto_bases: tuple[str, ...] = ()  # architectures whose consensus the job picked by default (decree_ray.bases)
    s3: S3Options = field(default_factory=S3Options)
    shadow_sha256: str | None = None  # the driver's digest of the shadow set; None: of the file this worker reads


EVIDENCE_COLUMNS = ("evidence_mask", "evidence_pattern", "evidence_stamp", "evidence_grid")
EVIDENCE_BYTES = "_evidence_bytes"  # {column: (file name, PNG bytes)} on a row for a local --out; not a column
WARM_ARCHS = 8  # at most this many architectures warmed at start (each family's library is imported once anyway)


def _digest(path: Path) -> tuple[str, int]:
    """sha256 and size of a checkpoint; a shard index covers its shards' bytes too (the index alone says nothing
    about the weights), so a changed shard is a changed checkpoint."""
    from decree.encoders.checkpoint import SHARD_INDEX_SUFFIX, shard_files

    sha, size = storage.sha256_file(path)
    if not path.name.endswith(SHARD_INDEX_SUFFIX):
        return sha, size
    import hashlib

    h = hashlib.sha256(sha.encode())
    for shard in shard_files(path):
        part, n = storage.sha256_file(shard)
        h.update(f"{shard.name}:{part}".encode())
        size += n
    return h.hexdigest(), size


def write_evidence(row: dict[str, Any], out: str) -> dict[str, Any]:
    """Driver side: write the PNG bytes a worker returned into OUT/evidence/<key>/ and point the row at them."""
    files = row.pop(EVIDENCE_BYTES, None)
    if not files:
        return row
    folder = Path(out) / "evidence" / _evidence_key(row.get("content_key") or row.get("sha256") or row["uri"])
    row = dict(row)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for column, (name, data) in files.items():
            name = Path(str(name)).name
            if column not in EVIDENCE_COLUMNS or not name.endswith(".png"):
                continue
            target = folder / name
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
            row[column] = str(target)
    except OSError as e:  # evidence is a by-product: the verdict stands without it
        log.warning("evidence for %s not written: %s", row.get("id"), e)
        row.update(dict.fromkeys(EVIDENCE_COLUMNS))
    return row


def _evidence_key(content_key: str) -> str:
    """Evidence folder name: the same bytes scanned with other preprocessing or settings get their own images."""
    import hashlib

    return hashlib.sha256(content_key.encode()).hexdigest()[:16]


def decree_version() -> str | None:
    try:
        import decree

        return getattr(decree, "__version__", None)
    except ImportError:
        return None


def error_text(exc: BaseException) -> str:
    """A core error's own message; anything else keeps its type so the cause stays visible."""
    from decree.errors import DecreeError

    if isinstance(exc, DecreeError):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def error_row(task: EncoderTask, message: str, **values: Any) -> dict[str, Any]:
    return new_row(
        id=task.id,
        uri=task.uri,
        status="error",
        arch=task.arch,
        label=task.label,
        error=redact(message),  # defence in depth: error texts may quote presigned URLs or keys
        decree_version=decree_version(),
        **{"arch_source": task.arch_source, **values},
    )


@dataclass
class _Held:
    task: EncoderTask
    path: Path
    delete: bool
    sha256: str
    size: int


class ScanWorker:
    def __init__(self, settings: ScanSettings):
        import torch

        torch.set_num_threads(max(1, settings.threads))
        self.settings = settings
        self.device = self._pick_device()
        root = Path(settings.cache_dir or tempfile.gettempdir()) / "decree-ray-cache"
        self.cache = root / uuid.uuid4().hex[:12]  # per actor: concurrent actors never share files
        self.cache.mkdir(parents=True, exist_ok=True)
        self._shadow = None
        self._config = None
        self._keys = None  # results.SettingsKeys, once the shadow set's digest is known
        self._held: dict[str, _Held] = {}  # fetched, not yet scanned or dropped; by uri, in fetch order
        from decree.encoders.contained import ContainedReader

        from .base_models import BaseModels

        # checkpoints are read in a child process: a load that hangs, bloats or crashes is killed and named
        self._reader = ContainedReader(timeout=settings.load_timeout)
        self._bases = BaseModels(settings, self._reader, self.cache, self.device, error_text)

    def _pick_device(self) -> str:
        import torch

        if not torch.cuda.is_available():
            return "cpu"
        try:
            import ray

            if ray.is_initialized() and not ray.get_gpu_ids():
                return "cpu"  # an actor without a GPU share must not grab one
        except ImportError:
            pass
        return "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU

    def ready(self, archs: tuple[str, ...] = ()) -> str:
        """Load the shared state eagerly so the first encoder's timeout does not pay for it: the shadow set, the
        inversion config, and the libraries of `archs`' families (the driver names the ones it has queued)."""
        from decree.encoders.registry import warm_family

        self._reader.start()  # imports torch in the child while the shadow set decodes and timm imports here
        self._shadow_set()
        self._inversion_config()
        for arch in archs[:WARM_ARCHS]:
            warm_family(str(arch))
        return self.device

    # -- shared state -------------------------------------------------------------------------------
    def _shadow_set(self):
        if self._shadow is None:
            from decree.shadow import ShadowSet

            path, delete = storage.fetch(self.settings.shadow, self.cache / "shadow", self.settings.s3)
            try:
                if self._keys is None:
                    from .results import SettingsKeys, shadow_digest

                    self._keys = SettingsKeys(self.settings, self.settings.shadow_sha256 or shadow_digest(str(path)))
                self._shadow = ShadowSet(path, limit=self.settings.shadow_limit)  # decoded once, tensors per size
            finally:
                if delete:
                    path.unlink(missing_ok=True)
        return self._shadow

    def _inversion_config(self):
        if self._config is None:
            from decree.inversion import InversionConfig

            overrides = dict(self.settings.overrides)
            if self.settings.steps is not None:
                base = InversionConfig.from_profile(self.settings.profile)
                min_steps = min(overrides.get("min_steps", base.min_steps), self.settings.steps)
                overrides.update(max_steps=self.settings.steps, min_steps=min_steps)
            self._config = InversionConfig.from_profile(self.settings.profile, **overrides)
        return self._config

    # -- per encoder --------------------------------------------------------------------------------
    def fetch(self, task: EncoderTask) -> dict[str, Any]:
        """Download and hash. Returns {"task", "sha256", "size_bytes"} or {"row": error row}."""
        self.drop(task.uri)
        limit = self.settings.max_checkpoint_bytes
        try:
            size = task.size_bytes
            if task.identity is None and not is_shard_index(task.uri):
                # a manifest entry: its listing identity, taken before the bytes are read (a re-run compares it);
                # the same HEAD gives the size the limit is checked against
                head_size, identity = storage.size_and_identity(task.uri, self.settings.s3)
                task, size = replace(task, identity=identity), head_size if size is None else size
            if limit is not None:
                size = size if size is not None else storage.size_of(task.uri, self.settings.s3)
                if size > limit:  # refused before a single byte of it is downloaded
                    return {"row": self._too_big(task, size, limit)}
            copied = None
            if not storage.is_s3(task.uri) and not is_shard_index(task.uri):
                copied = storage.snapshot_local(task.uri, self.cache, limit)  # hash and scan the same bytes
                path, delete = copied[0], True
            else:
                path, delete = storage.fetch(task.uri, self.cache, self.settings.s3)
        except Exception as e:  # noqa: BLE001 - any download failure is this encoder's error row
            return {"row": error_row(task, f"cannot read {task.uri}: {error_text(e)}")}
        try:
            sha, size = copied[1:] if copied else _digest(path)
            if limit is not None and size > limit:  # the object grew after its listing/HEAD
                if delete:
                    path.unlink(missing_ok=True)
                return {"row": self._too_big(task, size, limit, sha256=sha)}
            if task.sidecar:
                task = apply_sidecar(task, self.settings.s3)  # MetadataError: this encoder's error row
        except Exception as e:  # noqa: BLE001
            if delete:
                path.unlink(missing_ok=True)
            return {"row": error_row(task, f"cannot read {task.uri}: {error_text(e)}")}
        self._held[task.uri] = _Held(task, path, delete, sha, size)
        return {"task": task, "sha256": sha, "size_bytes": size}

    @staticmethod
    def _too_big(task: EncoderTask, size: int, limit: int, **known: Any) -> dict[str, Any]:
        return error_row(task, f"checkpoint is {size} bytes, over the limit of {limit} bytes", size_bytes=size, **known)

    def drop(self, uri: str | None = None) -> None:
        """Forget a fetched checkpoint (all of them without `uri`) and delete its cached file."""
        for key in list(self._held) if uri is None else [uri]:
            held = self._held.pop(key, None)
            if held is not None and held.delete:
                held.path.unlink(missing_ok=True)

    def scan(self, uri: str | None = None) -> dict[str, Any]:
        """Scan a fetched checkpoint (the latest one without `uri`); always one row; its cached file is deleted."""
        if uri is None and self._held:
            uri = next(reversed(self._held))
        held = self._held.get(uri) if uri is not None else None
        if held is None:
            raise RuntimeError(f"scan({uri!r}) without a successful fetch()")
        task = held.task
        self._shadow_set()
        key = content_key(held.sha256, task, self.settings.profile, self._keys(task.arch))  # the driver matches on it
        known = dict(sha256=held.sha256, size_bytes=held.size, content_key=key)
        try:
            if not task.arch:
                return error_row(
                    task, "no architecture: give it in the manifest, a <checkpoint>.json sidecar or --arch", **known
                )
            return self._scan(held, known)
        finally:
            self.drop(uri)

    def _scan(self, held: _Held, known: dict[str, Any]) -> dict[str, Any]:
        from decree.errors import UnsafeCheckpointError

        task = held.task
        evidence_dir = None
        if self.settings.evidence and self.settings.out:
            evidence_dir = self.cache / "evidence" / _evidence_key(known["content_key"])
        try:
            from decree.scan import scan_encoder

            limit = self.settings.max_checkpoint_bytes  # the file was checked, but the loader refuses too
            reference = None
            if task.claims_preprocessing and not self.settings.trust_sidecar_preprocessing:
                reference = {"image_size": self.settings.image_size}  # the architecture's own mean/std
            size = task.image_size or self.settings.image_size
            base = self._bases.get(task.arch, size)
            result = scan_encoder(
                self._reader.read(held.path, max_bytes=limit, name=task.uri.rsplit("/", 1)[-1]),
                task.arch,
                self._shadow_set(),
                config=self._inversion_config(),
                reference=reference,
                base=base,
                image_size=size,
                mean=task.mean,
                std=task.std,
                threshold=self.settings.threshold,
                device=self.device,
                evidence_dir=evidence_dir,
                encoder_id=held.sha256[:16],
            )
            values = result.to_row()
        except UnsafeCheckpointError as e:
            return error_row(task, error_text(e), unsafe_globals=list(e.blocked), **known)
        except Exception as e:  # noqa: BLE001 - one encoder's failure is its row, never the job's
            return error_row(task, error_text(e), **known)
        if not all(math.isfinite(float(values.get(k) or 0.0)) for k in ("l1_norm", "pl1_norm", "similarity")):
            return error_row(task, "inversion produced a non-finite result (NaN/Inf)", **known)
        if evidence_dir is not None:
            values = self._publish_evidence(values, _evidence_key(known["content_key"]), evidence_dir)
        values = {k: v for k, v in values.items() if k not in ("id", "uri", "status", "arch", "label", "error")}
        values.setdefault("decree_version", decree_version())
        files = values.pop(EVIDENCE_BYTES, None)
        row = new_row(id=task.id, uri=task.uri, status="ok", arch=task.arch, label=task.label,
                      arch_source=task.arch_source, preprocess_source=task.preprocess_source or "default", **known,
                      **values)
        return {**row, EVIDENCE_BYTES: files} if files else row

    def _publish_evidence(self, values: dict[str, Any], folder: str, local_dir: Path) -> dict[str, Any]:
        """Upload the evidence PNGs to an S3 --out; for a local --out, hand their bytes back with the row (the
        driver writes them: on a multi-node cluster this worker's disk is not the driver's). If that fails the
        scan still stands: ok row, evidence columns null."""
        keys = EVIDENCE_COLUMNS
        dest = storage.join(self.settings.out, "evidence", folder)
        out = dict(values)
        if not storage.is_s3(self.settings.out):
            try:
                out[EVIDENCE_BYTES] = {key: (Path(src).name, Path(src).read_bytes()) for key in keys
                                       if (src := values.get(key)) and Path(src).is_file()}
                out.update(dict.fromkeys(keys))  # set by the driver once written
            except OSError as e:
                log.warning("evidence for %s unreadable: %s", folder, error_text(e))
                out.update(dict.fromkeys(keys))
            finally:
                shutil.rmtree(local_dir, ignore_errors=True)
            return out
        try:
            for key in keys:
                src = values.get(key)
                if src and Path(src).is_file():
                    target = storage.join(dest, Path(src).name)
                    storage.upload_file(src, target, self.settings.s3)
                    out[key] = target
        except Exception as e:  # noqa: BLE001 - evidence is a by-product; losing it must not lose the verdict
            log.warning("evidence upload for %s failed: %s", folder, redact(error_text(e)))
            out.update(dict.fromkeys(keys))
        finally:
            shutil.rmtree(local_dir, ignore_errors=True)
        return out

    def close(self) -> None:
        self.drop()
        self._reader.close()
        shutil.rmtree(self.cache, ignore_errors=True)
