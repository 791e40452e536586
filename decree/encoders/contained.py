"""Checkpoint reading in a child process: the bound for what cannot be checked ahead.

The safe loader refuses code, but a pickle made only of allowed opcodes can still cost hours (a memo DAG hashed
as a dict key) or kill the interpreter (native recursion). A scan worker therefore reads each checkpoint in a
long-lived child process and kills it past a time or memory bound; the error names the cause and the next
checkpoint gets a fresh child. Tensors come back as raw bytes behind a JSON header: nothing the child sends is
unpickled, and the parent checks every dtype, shape and size before it builds a tensor.
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..errors import CheckpointError, DecreeError, UnsafeCheckpointError

LOAD_TIMEOUT = 120.0  # s: a multi-GB checkpoint reads in seconds from a local disk
MIN_MEMORY = 2 << 30  # the child's resident memory may grow to max(this, 3 × file size) + its own baseline
MAX_DEPTH = 8  # nesting of dicts kept (wrappers are at most a few deep)
_HEADER_MAX = 256 << 20  # a header lists keys and shapes: far below this for any real checkpoint
_LEN = struct.Struct(">Q")
_READ_AHEAD = 64 << 10  # bytes: the least a read asks the pipe for (a frame header, a small tensor, the next ones)
_RSS_EVERY = 0.01  # s: while frames flow, the child's memory is read at most this often (each 50 ms wait: always)
_READY = b"ready"  # the child's first frame, once its imports are done
STARTUP_TIMEOUT = 120.0  # s: how long a fresh loader may take to import torch before it is called broken
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.complex64, torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2)}


class LoadLimitError(CheckpointError):
    """Reading the checkpoint crossed a time or memory bound, or crashed the loader; it was killed."""


# -- the child ------------------------------------------------------------------------------------------
def _encode(obj, tensors: list, seen: dict, depth: int = 0):
    """Tree of dicts (JSON) with tensors replaced by their index; other leaves are dropped (weights only)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in seen:  # tied weights are sent once
            seen[key] = len(tensors)
            tensors.append(t)
        return {"t": seen[key]}
    if isinstance(obj, dict) and depth < MAX_DEPTH:
        items = []
        for k, v in obj.items():
            enc = _encode(v, tensors, seen, depth + 1)
            if enc is not None:
                items.append([k if isinstance(k, str) else {"k": repr(k)[:80]}, enc])
        return {"d": items}
    return None


def _send(out, data: bytes) -> None:
    out.write(_LEN.pack(len(data)))
    out.write(data)


_SPAWN_EVENTS = frozenset({"os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                           "os.forkpty", "pty.spawn", "os.startfile"})
SPAWN_EXIT = 70  # the child's exit code when something in it tried to start a process


def _refuse_spawns(event: str, _args) -> None:  # pragma: no cover - runs in the subprocess
    # Defence in depth: the safe loader runs no code, but if it ever did, the loader process starts nothing.
    if event in _SPAWN_EVENTS:
        os._exit(SPAWN_EXIT)


def _address_limit(extra: int | None) -> None:  # pragma: no cover - runs in the subprocess
    """A hard bound under the parent's polling: the address space may grow by `extra` bytes (None: lifted)."""
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if extra is None:
            resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
            return
        with open("/proc/self/status") as fh:
            vm = next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("VmSize:"))
        cap = vm + int(extra)
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    except (ImportError, OSError, ValueError, StopIteration):
        pass  # not Linux: the parent's polling still bounds it


def _out_of_memory(exc: BaseException) -> bool:
    seen = 0
    while exc is not None and seen < 8:
        text = str(exc).lower()
        if isinstance(exc, MemoryError) or ("alloc" in text and "memory" in text):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _child() -> None:  # pragma: no cover - runs in the subprocess (tested through ContainedReader)
    sys.addaudithook(_refuse_spawns)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed by a library goes to stderr, never into the frames
    torch.set_num_threads(1)
    from .checkpoint import read_state_dict

    _send(out, _READY)  # imports done: the parent's clock for the first checkpoint starts now
    out.flush()
    inp = sys.stdin.buffer
    while True:
        head = inp.read(_LEN.size)
        if len(head) < _LEN.size:
            return
        req = json.loads(inp.read(_LEN.unpack(head)[0]))
        try:
            _address_limit(req.get("memory"))
            try:
                obj = read_state_dict(req["path"], max_bytes=req.get("max_bytes"))
            finally:
                _address_limit(None)
            if not isinstance(obj, dict):
                raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
            tensors: list[torch.Tensor] = []
            tree = _encode(obj, tensors, {})
            declared = sum(t.numel() * t.element_size() for t in tensors)
            if declared > _tensor_budget(req["size"]):  # the parent measured the file (and its shards)
                # stride-0 or overlapping views: a few bytes of storage that would expand to gigabytes
                raise CheckpointError(f"checkpoint's tensors declare {declared} bytes, far more than its file holds "
                                      "(overlapping views); refused")
            flat = [t.contiguous().reshape(-1) for t in tensors]
            meta = [{"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                     "nbytes": f.numel() * f.element_size()} for t, f in zip(tensors, flat)]
            _send(out, json.dumps({"ok": True, "tree": tree, "tensors": meta}).encode())
            for f in flat:
                _send(out, f.view(torch.uint8).numpy().tobytes() if f.numel() else b"")
        except Exception as e:  # noqa: BLE001 - the address-space limit surfaces as whatever allocation failed
            _send(out, json.dumps({"ok": False, **_failure(e, req)}).encode())
        out.flush()


def _failure(e: Exception, req: dict) -> dict:  # pragma: no cover - runs in the subprocess
    """The reply's error kind, message (and blocked imports) for a failed read."""
    if _out_of_memory(e):
        return {"kind": "LoadLimitError", "message": f"checkpoint load exceeded {req['memory'] / (1 << 30):.1f} GB "
                f"of memory reading {req['name']} (refused)"}
    if isinstance(e, DecreeError):
        return {"kind": type(e).__name__, "message": str(e), "blocked": list(getattr(e, "blocked", []))}
    # any other failure of the loader is this checkpoint's error
    return {"kind": "CheckpointError", "message": f"loader failed: {type(e).__name__}: {str(e)[:300]}"}


# -- the parent -----------------------------------------------------------------------------------------
def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None  # not Linux: the time bound still holds


class ContainedReader:
    """`read(path)` -> the checkpoint's tensors (nested dicts as the file holds them), read in a child process."""

    def __init__(self, timeout: float = LOAD_TIMEOUT, min_memory: int = MIN_MEMORY, memory_factor: float = 3.0):
        self.timeout = float(timeout)
        self.min_memory = int(min_memory)
        self.memory_factor = float(memory_factor)
        self._proc: subprocess.Popen | None = None
        self._baseline = 0
        self._pending = bytearray()  # read ahead of the frame being read: small frames arrive many to a read
        self._rss_at = 0.0  # when the child's memory was last read
        self._started = False  # the child has said it is ready (its torch import is not a checkpoint's time)

    def start(self) -> None:
        """Start the child now (it imports torch, ~1.5 s), so the first checkpoint does not wait for it."""
        if self._proc is not None and self._proc.poll() is None:
            return
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from decree.encoders.contained import _child; _child()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
            preexec_fn=_no_core_dumps if os.name == "posix" else None)
        self._started = False
        self._pending.clear()

    def close(self) -> None:
        self._pending.clear()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def read(self, path: str | Path, *, max_bytes: int | None = None, name: str | None = None) -> dict:
        """`name`: how errors call the file (the scan reads a cached copy; the row should name the original)."""
        path = Path(path)
        size = _total_size(path)
        self.start()
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        memory = max(self.min_memory, int(self.memory_factor * size))
        shown = name or path.name
        req = json.dumps({"path": str(path), "max_bytes": max_bytes, "memory": memory, "name": shown,
                          "size": size}).encode()
        try:
            if not self._started:  # a fresh child imports torch first: slow on a loaded machine, no file's fault
                startup = time.monotonic() + max(STARTUP_TIMEOUT, self.timeout)
                if self._frame(proc, startup, 1 << 50, shown) != _READY:
                    raise LoadLimitError(f"loader did not start before reading {shown}")
                self._started = True
            deadline = time.monotonic() + self.timeout
            self._baseline = _rss(proc.pid) or 0  # the loader is idle between checkpoints: growth from here counts
            proc.stdin.write(_LEN.pack(len(req)) + req)
            proc.stdin.flush()
            header = json.loads(self._frame(proc, deadline, memory, shown))
            if not header.get("ok"):
                raise _error(header)
            tensors = [self._tensor(proc, deadline, memory, shown, m, size) for m in header["tensors"]]
            return _decode(header["tree"], tensors)
        except LoadLimitError:
            self.close()
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            self.close()
            raise LoadLimitError(f"loader crashed reading {shown}: {type(e).__name__}") from e

    def _frame(self, proc, deadline: float, memory: int, name: str, limit: int = _HEADER_MAX) -> bytes:
        n = _LEN.unpack(self._exact(proc, _LEN.size, deadline, memory, name))[0]
        if n > limit:
            raise LoadLimitError(f"loader sent a {n}-byte frame for {name} (limit {limit})")
        return self._exact(proc, n, deadline, memory, name)

    def _tensor(self, proc, deadline, memory, name, meta: dict, file_size: int) -> torch.Tensor:
        dtype = _DTYPES.get(meta.get("dtype"))
        shape = meta.get("shape")
        if dtype is None or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise LoadLimitError(f"loader sent an invalid tensor header for {name}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != meta.get("nbytes") or nbytes > _tensor_budget(file_size):
            raise LoadLimitError(f"loader sent an implausible tensor for {name}")
        data = self._frame(proc, deadline, memory, name, limit=nbytes)
        if len(data) != nbytes:
            raise LoadLimitError(f"loader sent a short tensor for {name}")
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)

    def _exact(self, proc, n: int, deadline: float, memory: int, name: str) -> bytes:
        """n bytes from the child. A checkpoint of small tensors is hundreds of small frames: reads of at least
        _READ_AHEAD bytes take several at once (what is past the frame waits in `_pending`, at most that much),
        so each frame is not a select and a /proc read of its own; a large tensor is read straight, as sent."""
        fd, pending = proc.stdout.fileno(), self._pending
        if len(pending) >= n:
            out = bytes(pending[:n])
            del pending[:n]
            return out
        chunks, got = [bytes(pending)], len(pending)
        pending.clear()
        while got < n:
            ready, _, _ = select.select([fd], [], [], 0.05)
            self._check(proc, deadline, memory, name, alive=bool(ready))  # a poll, at most one /proc read
            if not ready:
                continue
            want = n - got
            chunk = os.read(fd, min(want, 1 << 22) if want >= _READ_AHEAD else _READ_AHEAD)
            if not chunk:
                self._check(proc, deadline, memory, name, ended=True)
            if len(chunk) > want:
                pending += chunk[want:]
                chunk = chunk[:want]
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _check(self, proc, deadline: float, memory: int, name: str, ended: bool = False, alive: bool = False) -> None:
        code = None if alive else proc.poll()  # with data waiting, the frames are read before an exit is noticed
        if ended or code is not None:
            code = proc.wait() if code is None else code
            if code == SPAWN_EXIT:
                raise LoadLimitError(f"reading {name} tried to start a process; the loader was stopped before it "
                                     "ran")
            how = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else f"exit {code}"
            raise LoadLimitError(f"loader crashed reading {name} ({how}); nothing in it was run")
        now = time.monotonic()
        if now > deadline:
            raise LoadLimitError(f"checkpoint load exceeded {self.timeout:g} s reading {name} (killed)")
        if alive and now - self._rss_at < _RSS_EVERY:  # frames are flowing: the load itself is over
            return
        self._rss_at = now
        rss = _rss(proc.pid)
        if rss is not None:
            if rss - self._baseline > memory:
                raise LoadLimitError(f"checkpoint load exceeded {memory / (1 << 30):.1f} GB of memory reading {name} "
                                     "(killed)")


def _tensor_budget(file_size: int) -> int:
    return 2 * file_size + (16 << 20)  # tied weights may be sent twice; headers and small files get slack


def _total_size(path: Path) -> int:
    """Bytes behind a checkpoint (a shard index: its shards too), for the memory and tensor bounds."""
    from .checkpoint import SHARD_INDEX_SUFFIX, shard_files

    try:
        size = path.stat().st_size
        if path.name.endswith(SHARD_INDEX_SUFFIX):
            size += sum(p.stat().st_size for p in shard_files(path))
        return size
    except (OSError, CheckpointError):
        return 0  # the child says what is wrong with it


def _no_core_dumps() -> None:  # pragma: no cover - runs in the child before exec
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _error(header: dict) -> DecreeError:
    message = str(header.get("message") or "checkpoint cannot be read")[:2000]
    if header.get("kind") == "LoadLimitError":
        return LoadLimitError(message)
    if header.get("kind") == "UnsafeCheckpointError":
        blocked = [str(b)[:200] for b in header.get("blocked") or []][:64]
        return UnsafeCheckpointError(message, blocked=blocked)
    return CheckpointError(message)


def _decode(node, tensors: list[torch.Tensor]):
    if not isinstance(node, dict):
        raise LoadLimitError("loader sent an invalid tree")
    if "t" in node:
        return tensors[int(node["t"])]
    out: dict = {}
    for k, v in node.get("d", []):
        key = k if isinstance(k, str) else _NonStr(str(k.get("k", "?")))
        out[key] = _decode(v, tensors)
    return out


class _NonStr:
    """A key that was not a string in the file: kept non-str so the strict key checks still refuse it."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def __hash__(self) -> int:
        return hash(("nonstr", self.text))

    def __eq__(self, other) -> bool:
        return isinstance(other, _NonStr) and other.text == self.text
