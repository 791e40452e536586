"""The unsafe-imports audit: which globals a pickle-based checkpoint would import, read from the opcode stream
with pickletools (nothing is ever executed). Bounded: at most AUDIT_BYTES of pickle per checkpoint and _MAX_OPS
opcodes per pickle; de-duplication is linear."""

from __future__ import annotations

import _compat_pickle
import io
import pickletools
import re
import tarfile
import zipfile
from pathlib import Path

# Globals a plain state dict legitimately needs; anything else is reported as unsafe.
_SAFE_GLOBAL = re.compile(
    r"^(collections\.OrderedDict|torch\._utils\._rebuild_\w+|torch\.\w+Storage|torch\.(float|bfloat|half|int|long|"
    r"bool|uint|double|complex)\w*|torch\.serialization\._get_layout|torch\.(strided|sparse_\w+)|torch\.Size|"
    r"torch\.device|torch\._tensor\._rebuild_from_type_v2|torch\.nn\.parameter\.Parameter|_codecs\.encode|"
    r"numpy\.core\.multiarray\._reconstruct|numpy\.dtype|numpy\.ndarray|builtins\.(set|frozenset|slice)|"
    r"argparse\.Namespace)$"
)
_MARK = object()  # a MARK on the simulated pickle stack
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_MAX_OPS = 2_000_000  # a state dict's pickle has a few ops per tensor; beyond this is not a checkpoint
AUDIT_BYTES = 64 << 20  # pickle bytes the unsafe-imports audit reads per checkpoint, all members together


def _py3_name(module: str, attr: str = "?") -> str:
    """The name Python 3 imports for a protocol 0-2 GLOBAL (pickle maps `commands.Popen` to `subprocess.Popen`)."""
    if (module, attr) in _compat_pickle.NAME_MAPPING:
        module, attr = _compat_pickle.NAME_MAPPING[(module, attr)]
    else:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{attr}"


def _stack_globals(stream: io.BytesIO, found: list[str]) -> bool:
    """Globals of one pickle, tracking the stack and memo so that names fetched back from the memo
    (BINGET ... STACK_GLOBAL) are reported correctly. Returns True if the pickle ended with STOP."""
    stack: list = []
    memo: dict = {}
    for n, (op, arg, _pos) in enumerate(pickletools.genops(stream)):
        name = op.name
        if n > _MAX_OPS:
            found.append("<pickle too long to audit>")
            return False
        if name in _STRING_OPS:
            stack.append(arg if isinstance(arg, str) else arg.decode("latin-1") if isinstance(arg, bytes) else None)
        elif name in _GET_OPS:
            stack.append(memo.get(arg))
        elif name in _PUT_OPS:
            memo[arg] = stack[-1] if stack else None
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else None
        elif name in ("GLOBAL", "INST"):
            found.append(_py3_name(*str(arg).split(" ", 1)))
            stack.append(None)
        elif name == "STACK_GLOBAL":
            top = [stack.pop() if stack else None for _ in range(2)]
            module, attr = top[1], top[0]
            found.append(f"{module if isinstance(module, str) else '?'}.{attr if isinstance(attr, str) else '?'}")
            stack.append(None)
        elif name == "STOP":
            return True
        else:
            before = op.stack_before
            if pickletools.markobject in before:
                while stack and stack.pop() is not _MARK:
                    pass
            else:
                del stack[len(stack) - min(len(before), len(stack)):]
            stack.extend(_MARK if item is pickletools.markobject else None for item in op.stack_after)
    return False


def _pickle_globals(data: bytes) -> list[str]:
    """Every GLOBAL/STACK_GLOBAL a pickle stream would import, without executing it.

    Reads consecutive pickles (torch's legacy format stores several back to back, then raw tensor bytes);
    a following pickle must start with a PROTO opcode, so tensor bytes are never parsed as opcodes.
    """
    found: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        if stream.tell() > 0 and data[stream.tell()] != 0x80:
            break
        try:
            if not _stack_globals(stream, found):
                break
        except Exception:  # noqa: BLE001 - a malformed stream simply ends the scan; the loader will refuse it
            break
    return found


def scan_unsafe_globals(path: str | Path) -> list[str]:
    """Imports in a pickle-based checkpoint that a weights-only load would block (data, for the audit)."""
    path = Path(path)
    streams: list[bytes] = []
    try:
        if zipfile.is_zipfile(path):
            budget = AUDIT_BYTES  # the audit reads at most this much pickle, however many members there are
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if info.filename.endswith(".pkl") and info.file_size <= budget:
                        with zf.open(info) as fh:
                            streams.append(fh.read(budget))
                        budget -= len(streams[-1])
        elif tarfile.is_tarfile(path):
            with tarfile.open(path) as tf:
                for member in tf.getmembers():
                    if member.isfile() and member.name in ("pickle", "tensors", "storages", "sys_info"):
                        fh = tf.extractfile(member)
                        if fh is not None:
                            streams.append(fh.read(64 << 20))
        else:
            streams.append(path.read_bytes()[: 64 << 20])
    except Exception:  # noqa: BLE001 - hostile bytes break zipfile/tarfile in many ways (bad names, lying sizes)
        return []
    unsafe: dict[str, None] = {}  # ordered and linear, where a list's `in` made the audit quadratic
    for stream in streams:
        for name in _pickle_globals(stream):
            if name not in unsafe and not _SAFE_GLOBAL.match(name):
                unsafe[name] = None
    return list(unsafe)


