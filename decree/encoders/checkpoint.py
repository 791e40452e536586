"""Safe checkpoint reading and strict key matching.

Untrusted files load only through safetensors or `torch.load(weights_only=True)`; there is no fallback.
A pickle that needs code is refused, and the globals it asked for are reported (read from the opcode
stream with pickletools, which never executes anything).
"""

from __future__ import annotations

import argparse
import re
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError, UnsafeCheckpointError
from .audit import scan_unsafe_globals

# Names that are checkpoints by convention (`.tar`: MoCo/SimCLR releases and timm's model_best.pth.tar). The
# loader itself decides by content (`sniff`), so a manifest entry or a local file with another name still loads.
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar"}
SAFETENSORS_SUFFIXES = {".safetensors"}
CHECKPOINT_SUFFIXES = PICKLE_SUFFIXES | SAFETENSORS_SUFFIXES
# Where the weights sit, first match wins: DINO's teacher before its student, the trained weights before EMA ones
# (timm saves both), BYOL's online network (never its target network).
WRAPPER_KEYS = ("state_dict", "model", "encoder", "model_state_dict", "module", "teacher", "online_network",
                "state_dict_ema", "model_ema", "ema", "student")
# MoCo v3 keeps its query encoder as base_encoder. (and a momentum_encoder. that is never mixed in)
STRIP_PREFIXES = ("module.", "encoder_q.", "base_encoder.", "backbone.", "visual.", "f.", "encoder.", "model.",
                  "_orig_mod.")
HEAD_PREFIXES = ("fc.", "head.", "heads.", "classifier.", "projection_head.", "projector.", "proj_head.", "g.")
# Plain data that training scripts store next to the weights (DINO, timm, DeiT, MAE save their `args`); allowed
# for the one load call only (torch.serialization.safe_globals is a context), never process-wide.
PLAIN_DATA_GLOBALS = (argparse.Namespace,)
MAX_BLOCKED_SHOWN = 12  # a TorchScript-like pickle names thousands of globals: an error shows this many


# safetensors' own cap on the JSON header; checked here first so a lying length gets a clear message.
MAX_SAFETENSORS_HEADER = 100 << 20


def _check_safetensors_header(path: Path, size: int) -> None:
    """The 8-byte header length must fit in the file and under the cap (before safetensors maps anything)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8:
        raise CheckpointError(f"corrupt safetensors file {path.name}: {size} bytes, too short for a header")
    n = int.from_bytes(head, "little")
    if n > MAX_SAFETENSORS_HEADER:
        raise CheckpointError(f"corrupt safetensors file {path.name}: header claims {n} bytes (cap {MAX_SAFETENSORS_HEADER})")
    if n > size - 8:
        raise CheckpointError(f"corrupt safetensors file {path.name}: header claims {n} bytes but the file has {size}")


def sniff(head: bytes) -> str | None:
    """The container format from a file's first bytes: safetensors, zip (torch >= 1.6), pickle (torch's legacy
    format), tar (torch's oldest format), or None for anything else."""
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= MAX_SAFETENSORS_HEADER:
        return "safetensors"
    if head[257:262] == b"ustar":
        return "tar"
    return None


SNIFF_BYTES = 512


MAX_INFLATION = 4  # a torch zip stores its members uncompressed: declared sizes near the file's own
MAX_ZIP_MEMBERS = 200_000


def _check_zip(path: Path, size: int) -> str | None:
    """Refuse a zip whose members would inflate far past the file's size (torch inflates compressed members
    when it loads them: a 1 MB file could claim gigabytes) or that holds an absurd number of members. Returns
    the member that marks a TorchScript archive (`code/__torch__/...`, `constants.pkl`), if any."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt zip checkpoint {path.name}: {type(e).__name__}") from e
    if len(infos) > MAX_ZIP_MEMBERS:
        raise CheckpointError(f"zip checkpoint {path.name} has {len(infos)} members (cap {MAX_ZIP_MEMBERS})")
    declared = sum(i.file_size for i in infos)
    if declared > MAX_INFLATION * size + (1 << 20):
        biggest = max(infos, key=lambda i: i.file_size)
        raise CheckpointError(f"zip checkpoint {path.name} declares {declared} bytes inflated from {size} "
                              f"(member {biggest.filename[:80]!r}: {biggest.file_size}); refused before inflating")
    for info in infos:
        tail = info.filename.split("/", 1)[-1]
        if tail == "constants.pkl" or tail.startswith("code/__torch__"):
            return info.filename
    return None


def _names(blocked: list[str]) -> str:
    shown = ", ".join(blocked[:MAX_BLOCKED_SHOWN])
    return shown + (f" and {len(blocked) - MAX_BLOCKED_SHOWN} more" if len(blocked) > MAX_BLOCKED_SHOWN else "")


SHARD_INDEX_SUFFIX = ".safetensors.index.json"


def shard_files(index: Path) -> list[Path]:
    """The shards a `*.safetensors.index.json` names: plain .safetensors file names beside it, nothing else."""
    import json

    if index.stat().st_size > 64 << 20:
        raise CheckpointError(f"shard index {index.name} is over 64 MiB")
    try:
        data = json.loads(index.read_bytes())
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"shard index {index.name} is not JSON: {type(e).__name__}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"shard index {index.name} has no weight_map")
    names = sorted({v for v in weight_map.values() if isinstance(v, str)})
    bad = [n for n in names if "/" in n or "\\" in n or n in (".", "..") or not n.endswith(".safetensors")]
    if bad or not names:
        raise CheckpointError(f"shard index {index.name} names shards that are not .safetensors files beside it: "
                              f"{[n[:80] for n in bad[:3]]}")
    return [index.parent / n for n in names]


def _read_sharded(index: Path, max_bytes: int | None) -> dict[str, torch.Tensor]:
    shards = shard_files(index)
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise CheckpointError(f"shard index {index.name}: missing shards {missing[:3]}")
    total = sum(p.stat().st_size for p in shards)
    if max_bytes is not None and total > max_bytes:
        raise CheckpointError(f"sharded checkpoint {index.name} is {total} bytes, over the limit of {max_bytes} bytes")
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = read_state_dict(shard)
        clash = set(part) & set(merged)
        if clash:
            raise CheckpointError(f"shards of {index.name} both hold {sorted(clash)[:3]}")
        merged.update(part)
    return merged


def read_state_dict(path: str | Path, *, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Read tensors from a checkpoint file, safely. Returns the raw (possibly wrapped) mapping.

    The format is decided by content, not by name (`model_best.pth.tar` is a zip, a `.bin` may be anything);
    a `*.safetensors.index.json` loads its shards as one checkpoint.
    `max_bytes` refuses bigger files before reading them (None: no limit).
    """
    path = Path(path)
    if path.name.endswith(SHARD_INDEX_SUFFIX) and path.is_file():
        return _read_sharded(path, max_bytes)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path.name}")
    if max_bytes is not None and size > max_bytes:
        raise CheckpointError(f"checkpoint {path.name} is {size} bytes, over the limit of {max_bytes} bytes")
    with open(path, "rb") as fh:
        kind = sniff(fh.read(SNIFF_BYTES))
    if kind is None and path.suffix.lower() in CHECKPOINT_SUFFIXES:
        # a checkpoint by name with odd bytes: its own loader says what is wrong (protocol-0 pickles have no magic)
        kind = "safetensors" if path.suffix.lower() in SAFETENSORS_SUFFIXES else "pickle"
    if kind is None:
        raise CheckpointError(f"not a checkpoint: {path.name} is neither safetensors nor a torch zip/pickle/tar file")
    if kind == "safetensors":
        from safetensors import SafetensorError

        _check_safetensors_header(path, size)
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"corrupt safetensors file {path.name}: {e}") from e
    if kind == "zip" and (member := _check_zip(path, size)):
        raise CheckpointError(
            f"TorchScript archive {path.name} ({member}): decree never runs TorchScript. Save its weights with "
            "torch.jit.load(f).state_dict() and safetensors in a sandbox you trust, then scan that file.")
    try:
        with torch.serialization.safe_globals(list(PLAIN_DATA_GLOBALS)):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        blocked = scan_unsafe_globals(path)
        msg = str(e)
        # torch words every weights-only failure alike ("Weights only load failed"); only an import makes it
        # unsafe, anything else (garbage, a bad opcode, a truncated zip) is a corrupt file.
        blocked += [g for g in re.findall(r"GLOBAL ([\w.]+)", msg) if g not in blocked]
        if blocked or "Unsupported global" in msg:
            names = _names(blocked) if blocked else _torch_reason(msg)
            raise UnsafeCheckpointError(
                f"unsafe checkpoint {path.name}: it needs code to unpickle (blocked: {names}); nothing in it was run. "
                "Convert it to safetensors in a sandbox you trust.",
                blocked=blocked,
            ) from e
        raise CheckpointError(f"corrupt or truncated checkpoint {path.name}: {_torch_reason(msg) or type(e).__name__}") from e
    return obj


def _torch_reason(msg: str) -> str:
    """The specific part of a torch.load error (after torch's generic weights_only preamble)."""
    if "WeightsUnpickler error:" in msg:
        msg = msg.split("WeightsUnpickler error:", 1)[1]
    line = next((ln.strip() for ln in msg.splitlines() if ln.strip()), "")
    return line[:300]


def _unwrap(obj) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
        elif isinstance(obj, dict):
            # A dict mixing tensors and a wrapper (e.g. {"epoch": t, "state_dict": {...}}) unwraps too.
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        nested = _tensor_dicts(obj)
        where = "; nested dicts that hold tensors: " + ", ".join(f"{k} ({n})" for k, n in nested[:8]) if nested else ""
        raise CheckpointError(f"checkpoint holds no tensors at the top level{where}")
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"checkpoint has non-string keys: {bad[:5]}")
    return tensors


def _tensor_dicts(obj, prefix: str = "", depth: int = 3) -> list[tuple[str, int]]:
    """(path, tensor count) of the nested dicts that hold tensors, for an error that says where to look."""
    out: list[tuple[str, int]] = []
    if depth == 0 or not isinstance(obj, dict):
        return out
    for key, value in list(obj.items())[:1000]:
        if isinstance(value, dict):
            path = f"{prefix}{key}"
            n = sum(isinstance(v, torch.Tensor) for v in value.values())
            if n:
                out.append((path, n))
            out.extend(_tensor_dicts(value, path + ".", depth - 1))
    return out


def _select_subtree(sd: dict[str, torch.Tensor], model_keys: set[str], depth: int = 3) -> dict[str, torch.Tensor]:
    """The wrapper subtree that matches the model best (MoCo's module.encoder_q., CLIP's visual., ...).

    Searches prefix chains up to `depth` long; keys outside the chosen subtree (a MoCo key encoder, a
    CLIP text tower, a projection head) are dropped. Stripping happens only when it matches more keys.
    """
    best, best_hits = sd, len(model_keys.intersection(sd))
    if depth == 0 or best_hits == len(model_keys):
        return best
    for prefix in STRIP_PREFIXES:
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sub:
            continue
        cand = _select_subtree(sub, model_keys, depth - 1)
        hits = len(model_keys.intersection(cand))
        if hits > best_hits:
            best, best_hits = cand, hits
    return best


def match_state_dict(obj, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unwrap, strip prefixes, drop heads, then check the keys strictly against the model."""
    ref = model.state_dict()
    model_keys = set(ref)
    sd = _select_subtree(_unwrap(obj), model_keys)
    sd = {k: v for k, v in sd.items() if k in model_keys or not k.startswith(HEAD_PREFIXES)}
    # BatchNorm counters are bookkeeping, not weights; old checkpoints lack them.
    missing = sorted(k for k in model_keys - set(sd) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(sd) - model_keys)
    if missing or unexpected:
        raise CheckpointError(
            "checkpoint does not match the architecture: "
            f"{len(missing)} missing keys {_preview(missing)}, {len(unexpected)} unexpected keys {_preview(unexpected)}"
        )
    for key, tensor in sd.items():
        want = ref[key]
        if tuple(tensor.shape) != tuple(want.shape):
            raise CheckpointError(f"shape mismatch for {key}: checkpoint {tuple(tensor.shape)}, model {tuple(want.shape)}")
        if want.is_floating_point():
            if not tensor.is_floating_point():
                raise CheckpointError(f"wrong dtype for {key}: {tensor.dtype}, expected a floating type")
            if not torch.isfinite(tensor).all():
                raise CheckpointError(f"non-finite weights (NaN/Inf) in {key}")
    return sd


def _preview(keys: list[str], n: int = 8) -> str:
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"


def load_into(model: torch.nn.Module, checkpoint: str | Path | dict, *, max_bytes: int | None = None) -> None:
    obj = checkpoint if isinstance(checkpoint, dict) else read_state_dict(checkpoint, max_bytes=max_bytes)
    sd = match_state_dict(obj, model)
    try:
        model.load_state_dict(sd, strict=False)  # strictness already enforced above, counters aside
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint does not load: {str(e)[:500]}") from e
