"""Hostile and broken checkpoints, built in the test (nothing downloaded).

Every hostile payload, if it ever ran, would leave a file in `marker_dir` (or delete `victim`); the tests check
that nothing of the sort happened.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import struct
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class Case:
    name: str  # file name, suffix included
    expect: str  # fragment the error text must contain
    blocked: tuple[str, ...] = ()  # names one of which unsafe_globals must contain (hostile cases)
    arch: str | None = None  # None: the good arch


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Popen:
    def __init__(self, argv):
        self.argv = argv

    def __reduce__(self):
        return (subprocess.Popen, (self.argv,))


class _CheckOutput:
    def __init__(self, argv):
        self.argv = argv

    def __reduce__(self):
        return (subprocess.check_output, (self.argv,))


class _Exec:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


class _Rmtree:
    def __init__(self, victim):
        self.victim = victim

    def __reduce__(self):
        import shutil

        return (shutil.rmtree, (self.victim,))


def _touch_code(path: Path) -> str:
    return f"open({str(path)!r}, 'w').close()"


def _memo_obfuscated_system(cmd: str) -> bytes:
    """Protocol 4: pushes 'system' then 'posix', memoizes both and fetches them back in swapped order,
    so a scanner that only looks at the last two strings names the wrong global."""
    c = cmd.encode()
    return (
        b"\x80\x04\x8c\x06system\x94\x8c\x05posix\x94h\x01h\x00\x93"
        + b"\x8c" + bytes([len(c)]) + c + b"\x85R."
    )


def _legacy_tar(payload: bytes) -> bytes:
    """torch's pre-1.0 tar format: members pickle/storages/tensors/sys_info."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (("sys_info", pickle.dumps({"protocol_version": 1000})), ("pickle", payload),
                           ("storages", pickle.dumps(0)), ("tensors", pickle.dumps(0))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_hostile(folder: Path, marker_dir: Path, victim: Path, state_dict: dict) -> list[Case]:
    """Pickles that would run code, in every container torch reads. Returns the cases."""
    folder.mkdir(parents=True, exist_ok=True)
    m = lambda name: str(marker_dir / name)
    cases = []

    torch.save({"state_dict": state_dict, "payload": _System(f"touch {m('zip_system')}")}, folder / "zip_system.pt")
    cases.append(Case("zip_system.pt", "unsafe checkpoint", ("posix.system", "os.system")))

    torch.save({"w": _Popen(["touch", m("legacy_popen")])}, folder / "legacy_popen.pth",
               _use_new_zipfile_serialization=False)
    cases.append(Case("legacy_popen.pth", "unsafe checkpoint", ("subprocess.Popen",)))

    (folder / "raw_exec.bin").write_bytes(pickle.dumps({"x": _Exec(_touch_code(marker_dir / "raw_exec"))}, protocol=2))
    cases.append(Case("raw_exec.bin", "unsafe checkpoint", ("builtins.exec",)))

    code = _touch_code(marker_dir / "global_eval").encode()
    (folder / "global_eval.ckpt").write_bytes(b"cbuiltins\neval\n(S'" + code.replace(b"'", b"\\'") + b"'\ntR.")
    cases.append(Case("global_eval.ckpt", "unsafe checkpoint", ("builtins.eval",)))

    (folder / "memo_stack_global.pkl").write_bytes(_memo_obfuscated_system(f"touch {m('memo')}"))
    cases.append(Case("memo_stack_global.pkl", "unsafe checkpoint", ("posix.system",)))

    (folder / "legacy_tar.pt").write_bytes(_legacy_tar(pickle.dumps({"w": _System(f"touch {m('tar')}")}, protocol=2)))
    cases.append(Case("legacy_tar.pt", "unsafe checkpoint", ("posix.system", "os.system")))

    # The payload hides where a tensor belongs, next to real weights.
    hidden = dict(state_dict)
    hidden[next(iter(hidden))] = _CheckOutput(["touch", m("hidden")])
    torch.save({"model": hidden}, folder / "hidden_in_weights.bin")
    cases.append(Case("hidden_in_weights.bin", "unsafe checkpoint", ("subprocess.check_output",)))

    torch.save({"w": _Rmtree(str(victim))}, folder / "rmtree.pth")
    cases.append(Case("rmtree.pth", "unsafe checkpoint", ("shutil.rmtree",)))
    return cases


def _safetensors_bytes(header: dict, data: bytes, claimed: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if claimed is None else claimed) + h + data


def build_broken(folder: Path, good: Path, state_dict: dict, other_arch_state: dict) -> list[Case]:
    """Truncated, corrupt, lying, mistyped, misshapen, non-finite and mismatched checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = good.read_bytes()
    cases = []

    def put(name, data, expect, arch=None):
        (folder / name).write_bytes(data)
        cases.append(Case(name, expect, arch=arch))

    put("zero.safetensors", b"", "empty")
    put("zero.pt", b"", "empty")
    put("truncated.safetensors", raw[: len(raw) // 2], "corrupt safetensors")
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    put("truncated.pt", buf.getvalue()[: len(buf.getvalue()) // 2], "corrupt")
    # seeded, and led by a byte that is no pickle opcode: os.urandom once in a while began with a valid opcode
    # stream naming a global, and the file was (rightly) refused as unsafe instead of corrupt: a flaky test
    put("garbage.pth", b"\xff" + random.Random(4096).randbytes(4095), "corrupt")
    put("lying_sizes.safetensors", _safetensors_bytes({"w": {"dtype": "F32", "shape": [4000, 4000],
                                                             "data_offsets": [0, 64_000_000]}}, b"\0" * 64),
        "corrupt safetensors")
    put("huge_header.safetensors", _safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                                                      b"\0" * 16, claimed=1 << 40), "header claims")
    put("header_past_end.safetensors", _safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                                                          b"\0" * 16, claimed=4096), "header claims")

    def save_variant(name, expect, change, arch=None):
        sd = {k: v.clone() for k, v in state_dict.items()}
        change(sd)
        save_file(sd, str(folder / name))
        cases.append(Case(name, expect, arch=arch))

    float_key = next(k for k, v in state_dict.items() if v.is_floating_point() and v.ndim == 4)
    save_variant("wrong_dtype.safetensors", "wrong dtype",
                 lambda sd: sd.__setitem__(float_key, sd[float_key].to(torch.int64)))
    save_variant("wrong_shape.safetensors", "shape mismatch",
                 lambda sd: sd.__setitem__(float_key, torch.zeros(sd[float_key].shape[0] + 1, *sd[float_key].shape[1:])))
    save_variant("nan.safetensors", "non-finite", lambda sd: sd[float_key].view(-1).__setitem__(0, float("nan")))
    save_variant("inf.safetensors", "non-finite", lambda sd: sd[float_key].view(-1).__setitem__(3, float("inf")))
    save_file({k: v.contiguous() for k, v in other_arch_state.items()}, str(folder / "other_arch.safetensors"))
    cases.append(Case("other_arch.safetensors", "does not match the architecture"))
    (folder / "unknown_arch.safetensors").write_bytes(raw)
    cases.append(Case("unknown_arch.safetensors", "unknown timm model", arch="timm/no_such_model_xyz"))
    return cases
