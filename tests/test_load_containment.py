"""Checkpoints whose cost cannot be bounded ahead are read in a child process that is killed past a bound.

Each case is a real hostile file: a pickle of only allowed opcodes that would hash for 2^60 steps, a view that
expands 4 bytes of storage to 40 GB, a load that outgrows its memory bound, a loader that dies. The row (or error)
names the cause, and the next checkpoint reads normally in a fresh child.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from faults import harness
from faults.fixtures import rec, record  # noqa: F401 - fixtures
from faults.zoo import TINY_ARCH, TINY_SIZE
from safetensors.torch import save_file

from decree.encoders import create_encoder
from decree.encoders.contained import SPAWN_EXIT, ContainedReader, LoadLimitError
from decree.errors import CheckpointError, UnsafeCheckpointError
from decree_ray.worker import ScanWorker


def memo_dag_bomb(levels: int = 60) -> bytes:
    """t0 = (), t[i+1] = (t[i], t[i]) through the memo: 120 bytes of pickle, a dict key whose hash visits 2^60
    tuples. Every opcode is one torch's weights-only unpickler allows."""
    b = bytearray(b"\x80\x02}(")  # PROTO 2, EMPTY_DICT, MARK
    b += b")q\x00"  # EMPTY_TUPLE, BINPUT 0
    for i in range(levels):
        b += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1])  # BINGET i ×2, TUPLE2, BINPUT i+1
    if (levels + 1) % 2:
        b += b"K\x01"
    b += b"u."  # SETITEMS (hashes every key), STOP
    return bytes(b)


@pytest.fixture(scope="module")
def reader():
    r = ContainedReader(timeout=3)
    r.start()
    yield r
    r.close()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in create_encoder(TINY_ARCH, image_size=TINY_SIZE).backbone.state_dict().items()}
    save_file(sd, path)
    return path, sd


def test_a_pickle_of_allowed_opcodes_that_would_hash_for_hours_is_killed_at_the_load_timeout(reader, good, tmp_path,
                                                                                           record):
    bomb = tmp_path / "bomb.pt"
    bomb.write_bytes(memo_dag_bomb())
    t0 = time.monotonic()
    with pytest.raises(LoadLimitError, match=r"checkpoint load exceeded 3 s reading bomb.pt"):
        reader.read(bomb)
    took = time.monotonic() - t0
    assert took < 15
    out = reader.read(good[0])  # a fresh child reads the next checkpoint
    assert set(out) == set(good[1]) and all(torch.equal(out[k], good[1][k]) for k in out)
    record("hostile checkpoint", "120-byte pickle of allowed opcodes whose dict key is a memo DAG (hash visits 2^60 "
           "tuples)", 1, f"killed at the 3-s load timeout ({took:.1f} s), named in the error; next file read normally")


def test_a_view_that_expands_a_few_bytes_into_gigabytes_is_refused_before_it_is_copied(reader, tmp_path, record):
    path = tmp_path / "stride0.pt"
    torch.save({"conv_stem.weight": torch.zeros(1).expand(100_000, 100_000)}, path)  # 40 GB of float32 from 4 B
    assert path.stat().st_size < 10_000
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match="declare 40000000000 bytes, far more than its file holds"):
        reader.read(path)
    took = time.monotonic() - t0
    assert took < 10
    record("hostile checkpoint", "1.3 KB file whose stride-0 tensor declares 40 GB", 1,
           f"refused before any copy ({took:.1f} s)")


def test_a_load_that_outgrows_its_memory_bound_is_killed_and_named(tmp_path, record):
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.ones(64 << 20, dtype=torch.uint8) * 3}, path)  # 64 MiB of real tensor data
    small = ContainedReader(timeout=30, min_memory=16 << 20, memory_factor=0)
    try:
        with pytest.raises(LoadLimitError, match=r"checkpoint load exceeded 0\.0 GB of memory reading big"):
            small.read(path)
    finally:
        small.close()
    record("hostile checkpoint", "a load past the loader's memory bound (bound lowered to 16 MiB, 64 MiB file)", 1,
           "loader killed, error names the memory bound")


def test_a_loader_that_dies_mid_load_is_a_named_crash_and_the_next_read_works(good, tmp_path, record):
    r = ContainedReader(timeout=30)
    r.start()
    bomb = tmp_path / "hang.pt"
    bomb.write_bytes(memo_dag_bomb())
    killer = threading.Timer(2.0, lambda: os.kill(r._proc.pid, signal.SIGSEGV))  # a native crash in the loader
    killer.start()
    try:
        with pytest.raises(LoadLimitError, match=r"loader crashed reading hang.pt \(killed by SIGSEGV\)"):
            r.read(bomb)
        assert set(r.read(good[0])) == set(good[1])
    finally:
        killer.cancel()
        r.close()
    record("hostile checkpoint", "loader process dies mid-load (SIGSEGV, as a native crash)", 1,
           "error 'loader crashed ... (killed by SIGSEGV)'; a fresh loader reads the next file")


def test_the_loader_process_stops_before_it_starts_any_process():
    code = ("import os, sys; from decree.encoders.contained import _refuse_spawns; sys.addaudithook(_refuse_spawns); "
            "os.system('echo ran > /dev/null'); print('not reached')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == SPAWN_EXIT and "not reached" not in done.stdout


def test_errors_keep_their_type_across_the_process_boundary(reader, tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"w": Evil()}, protocol=2))
    with pytest.raises(UnsafeCheckpointError) as err:
        reader.read(path)
    assert "posix.system" in err.value.blocked or "os.system" in err.value.blocked
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        reader.read(tmp_path / "empty.pt")


def test_the_worker_turns_a_load_bomb_into_one_named_error_row_and_scans_the_rest(good, tmp_path, record):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a_bomb.pt").write_bytes(memo_dag_bomb())
    (src / "b_good.safetensors").write_bytes(good[0].read_bytes())
    shadow = tmp_path / "shadow.npz"
    import numpy as np

    np.savez(shadow, x=np.random.default_rng(0).integers(0, 256, (8, TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8))
    worker = ScanWorker(harness.settings(shadow, tmp_path / "out", tmp_path / "cache", steps=2, load_timeout=3))
    worker.ready()
    t0 = time.monotonic()
    rows = harness.scan_source(str(src), worker, arch=TINY_ARCH)
    worker.close()
    assert [r["status"] for r in rows] == ["error", "ok"], rows
    assert "checkpoint load exceeded 3 s reading a_bomb.pt (killed)" in rows[0]["error"] and rows[0]["sha256"]
    assert time.monotonic() - t0 < 60
    record("hostile checkpoint", "memo-DAG load bomb beside a good encoder (worker path)", 2,
           "one error row 'checkpoint load exceeded 3 s', the good encoder scanned")


def test_many_small_tensors_and_large_ones_come_through_the_pipe_exactly(reader, tmp_path):
    """Frames are read ahead in 64 KiB reads: tensors smaller than, at and past that size, one of several MiB, an
    empty one and a pure-pickle .pt, read in a row, each arrive bit for bit and nothing spills into the next file."""
    g = torch.Generator().manual_seed(0)
    sizes = [0, 1, 3, 1000, 16383, 16384, 16385, 40000, 3_000_000] + [7] * 300
    sd = {f"t{i:03d}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}
    sd["ints"] = torch.arange(70000, dtype=torch.int64)
    save_file(sd, tmp_path / "mixed.safetensors")
    torch.save({"w": torch.randn(5, 5, generator=g), "nested": {"b": torch.ones(3)}}, tmp_path / "small.pt")
    for _ in range(2):
        got = reader.read(tmp_path / "mixed.safetensors")
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
        pt = reader.read(tmp_path / "small.pt")
        assert pt["w"].shape == (5, 5) and torch.equal(pt["nested"]["b"], torch.ones(3))
