"""Where bytes live: local paths and s3:// uris behind the same few functions.

S3 settings (region, credentials) come from the standard AWS environment/config; `endpoint_url` points at an
S3-compatible store (MinIO, moto, Ceph). Retries are botocore's (`adaptive` or `standard` mode), never a loop.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import stat
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class S3Options:
    """How to reach S3. Frozen and hashable so each process builds one client per setting."""

    endpoint_url: str | None = None
    retry_mode: str = "adaptive"
    max_attempts: int = 8

    def __post_init__(self):
        if self.retry_mode not in ("adaptive", "standard", "legacy"):
            raise ValueError(f"retry_mode must be adaptive|standard|legacy, got {self.retry_mode!r}")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")


DEFAULT_S3 = S3Options()  # the standard AWS environment/config, no custom endpoint


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    if not is_s3(uri):
        raise ValueError(f"not an s3:// uri: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"s3 uri without a bucket: {uri!r}")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join path segments onto a local path or an s3:// uri."""
    if is_s3(base):
        out = base.rstrip("/")
        for p in parts:
            out += "/" + p.strip("/")
        return out
    return str(Path(base, *parts))


@functools.lru_cache(maxsize=8)
def s3_client(options: S3Options = DEFAULT_S3):
    """One boto3 client per process and setting (clients are thread-safe; sessions are not shared)."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": options.retry_mode, "max_attempts": options.max_attempts})
    return boto3.session.Session().client("s3", endpoint_url=options.endpoint_url, config=config)


def iter_s3_entries(uri: str, options: S3Options = DEFAULT_S3) -> Iterator[tuple[str, int, str]]:
    """(uri, size, identity) of every object under an s3:// prefix, page by page (never one big list).
    The identity (size and ETag, which changes with the content) lets a re-run skip unchanged objects."""
    bucket, prefix = split_s3(uri)
    paginator = s3_client(options).get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", ()):
            size = int(obj["Size"])
            yield f"s3://{bucket}/{obj['Key']}", size, f"s3:{size}:{obj.get('ETag', '')}"


def iter_s3_objects(uri: str, options: S3Options = DEFAULT_S3) -> Iterator[tuple[str, int]]:
    """(uri, size) of every object under an s3:// prefix, page by page."""
    for u, size, _ in iter_s3_entries(uri, options):
        yield u, size


def local_identity(st: os.stat_result) -> str:
    """Size, mtime, ctime and inode: a rewrite changes ctime, which (unlike mtime) its owner cannot set back."""
    return f"file:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def iter_local_files(folder: str | Path) -> Iterator[tuple[str, int | None, str | None, str | None]]:
    """(path, size, None, identity) of every regular file under a folder, sorted per directory, walked lazily;
    entries that are not to be read come as (path, None, reason, None): a dangling symlink, a symlink out of the
    folder (never followed: its target is not the audited party's to name), a FIFO, socket or device."""
    from .hub import is_storage_dir, repo_root

    # links may point anywhere inside the folder, or inside the Hugging Face repo folder that holds it
    # (a snapshot's files link to the repo's blobs/), never further out
    root_real = os.path.realpath(repo_root(folder) or folder)
    for root, dirs, files in os.walk(folder):  # os.walk does not descend into symlinked folders
        dirs[:] = sorted(d for d in dirs if not is_storage_dir(root, d))  # blobs/ are listed via snapshots/
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                if os.path.islink(path):
                    target = os.path.realpath(path)
                    if os.path.commonpath([root_real, target]) != root_real:
                        yield path, None, "symlink out of the scanned folder (not followed)", None
                        continue
                    if not os.path.exists(target):
                        yield path, None, "dangling symlink", None
                        continue
                st = os.stat(path)
            except (OSError, ValueError) as e:
                yield path, None, f"cannot stat: {type(e).__name__}", None
                continue
            if not stat.S_ISREG(st.st_mode):
                yield path, None, "not a regular file (FIFO, socket or device)", None
                continue
            yield path, st.st_size, None, local_identity(st)


def exists(uri: str, options: S3Options = DEFAULT_S3) -> bool:
    if not is_s3(uri):
        return Path(uri).exists()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        s3_client(options).head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def size_of(uri: str, options: S3Options = DEFAULT_S3) -> int:
    """Size in bytes without reading the body: a HEAD on S3, a stat locally (missing objects raise)."""
    return size_and_identity(uri, options)[0]


def read_bytes(uri: str, options: S3Options = DEFAULT_S3) -> bytes:
    if not is_s3(uri):
        return Path(uri).read_bytes()
    bucket, key = split_s3(uri)
    return s3_client(options).get_object(Bucket=bucket, Key=key)["Body"].read()


def identity_of(uri: str, options: S3Options = DEFAULT_S3) -> str:
    """The listing identity of one entry (as iter_s3_entries / iter_local_files give it): a HEAD or a stat."""
    return size_and_identity(uri, options)[1]


def size_and_identity(uri: str, options: S3Options = DEFAULT_S3) -> tuple[int, str]:
    """size_of and identity_of from one HEAD (or stat): a request to the store is most of a tiny encoder's fetch."""
    if not is_s3(uri):
        st = os.stat(uri)
        return st.st_size, local_identity(st)
    bucket, key = split_s3(uri)
    head = s3_client(options).head_object(Bucket=bucket, Key=key)
    return int(head["ContentLength"]), f"s3:{int(head['ContentLength'])}:{head.get('ETag', '')}"


class TooLarge(ValueError):
    pass


def read_optional(uri: str, options: S3Options = DEFAULT_S3, max_bytes: int | None = None) -> bytes | None:
    """The bytes at `uri`, or None when nothing is there (other failures raise). With `max_bytes`, a bigger
    object raises TooLarge after reading at most max_bytes + 1 bytes of it (a hostile sidecar can be huge)."""
    if not is_s3(uri):
        path = Path(uri)
        if not path.is_file():
            return None
        with open(path, "rb") as fh:
            data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise TooLarge(f"{path.name} is over {max_bytes} bytes")
        return data
    from botocore.exceptions import ClientError

    try:
        if max_bytes is None:
            return read_bytes(uri, options)
        bucket, key = split_s3(uri)
        data = s3_client(options).get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{max_bytes}")["Body"].read()
        if len(data) > max_bytes:
            raise TooLarge(f"{uri.rsplit('/', 1)[-1]} is over {max_bytes} bytes")
        return data
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def write_bytes(uri: str, data: bytes, options: S3Options = DEFAULT_S3) -> None:
    """Atomic write: a single PUT on S3; tmp file + rename locally (readers never see half a file)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client(options).put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def upload_file(path: str | Path, uri: str, options: S3Options = DEFAULT_S3) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client(options).upload_file(str(path), bucket, key)
    else:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, uri)


def delete(uri: str, options: S3Options = DEFAULT_S3) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client(options).delete_object(Bucket=bucket, Key=key)
    else:
        Path(uri).unlink(missing_ok=True)


def list_files(prefix: str, suffix: str = "", options: S3Options = DEFAULT_S3) -> list[str]:
    """Files directly under a folder/prefix ending with `suffix` (for part files: small lists)."""
    if is_s3(prefix):
        return [u for u, _ in iter_s3_objects(prefix.rstrip("/") + "/", options) if u.endswith(suffix)]
    folder = Path(prefix)
    if not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and p.name.endswith(suffix))


_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def cache_name(uri: str) -> str:
    """A flat, safe local file name for any key: no '/', no '..', bounded length, suffix kept.

    S3 keys may contain '../', absolute-looking segments or odd bytes; the cache path must never follow them.
    """
    base = uri.rstrip("/").rsplit("/", 1)[-1]
    safe = _UNSAFE_CHARS.sub("_", base).lstrip(".") or "object"
    digest = hashlib.sha256(uri.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{digest}-{safe[-80:]}"


def fetch(uri: str, cache_dir: str | Path, options: S3Options = DEFAULT_S3) -> tuple[Path, bool]:
    """A local path for `uri`: S3 objects are downloaded into `cache_dir` (returns True: delete after use)."""
    if not is_s3(uri):
        return Path(uri), False
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    dest = cache_dir / cache_name(uri)
    bucket, key = split_s3(uri)
    tmp = Path(tempfile.mkstemp(dir=cache_dir, suffix=".part")[1])
    try:
        s3_client(options).download_file(bucket, key, str(tmp))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest, True


def snapshot_local(path: str | Path, cache_dir: str | Path, max_bytes: int | None = None) -> tuple[Path, str, int]:
    """Copy a local checkpoint into the cache while hashing it: the bytes scanned are the bytes hashed, even if
    the audited party rewrites the file between the listing, the hash and the load. Returns (copy, sha, size)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, suffix=".part")
    tmp = Path(tmp_name)
    h, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
            while chunk := src.read(HASH_CHUNK):
                h.update(chunk)
                dst.write(chunk)
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:  # grew past the limit after its listing
                    raise TooLarge(f"{Path(path).name} grew past {max_bytes} bytes while it was read")
        dest = cache_dir / cache_name(str(path))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest, h.hexdigest(), size


def sha256_file(path: str | Path) -> tuple[str, int]:
    """(hex digest, size) of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size
