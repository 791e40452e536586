"""Resource and integrity bounds an audited party could otherwise push past: zip members that inflate,
huge claimed input sizes, a file rewritten between hash and load, forged part files in the output."""

from __future__ import annotations

import datetime
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from decree.encoders import create_encoder, read_state_dict
from decree.errors import CheckpointError
from decree.shadow import ShadowSet
from decree_ray import results as results_mod
from decree_ray import storage
from decree_ray.schema import SCHEMA, new_row, to_table


def test_a_zip_whose_members_inflate_far_past_its_size_is_refused_before_inflating(tmp_path):
    path = tmp_path / "bomb.pt"
    torch.save({"w": torch.zeros(4)}, tmp_path / "real.pt")
    with zipfile.ZipFile(tmp_path / "real.pt") as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        dst.writestr("bomb/data/0", b"\0" * (64 << 20))  # 64 MiB of zeros deflate to ~64 KiB
    assert path.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match="declares .* bytes inflated from"):
        read_state_dict(path)


def test_the_unsafe_imports_audit_reads_a_bounded_amount_of_pickle(tmp_path, monkeypatch):
    from decree.encoders import audit

    monkeypatch.setattr(audit, "AUDIT_BYTES", 1000)
    path = tmp_path / "many.pt"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(50):
            zf.writestr(f"a/p{i}.pkl", b"\x80\x02cos\nsystem\n." + b"N" * 100)
    read = []
    real = zipfile.ZipExtFile.read
    monkeypatch.setattr(zipfile.ZipExtFile, "read", lambda self, n=-1: read.append(n) or real(self, n))
    assert audit.scan_unsafe_globals(path) == ["os.system"]
    assert len(read) <= 10  # members stop once the budget is spent


def test_the_shadow_cache_keeps_a_few_sizes_so_one_huge_claim_cannot_pin_memory():
    shadow = ShadowSet(np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    for size in (8, 16, 24, 32, 40):
        shadow.pixels(size)
    assert len(shadow._cache) == ShadowSet.CACHE_SIZES
    assert (8, "cpu") not in shadow._cache and (40, "cpu") in shadow._cache


def test_a_local_checkpoint_is_scanned_from_the_copy_that_was_hashed(tmp_path):
    """The audited party may rewrite the file after it was hashed: the scan reads the hashed copy."""
    import hashlib

    torch.manual_seed(0)
    src = tmp_path / "enc.pt"
    torch.save(create_encoder("cifar/resnet18").backbone.state_dict(), src)
    original = src.read_bytes()
    copy, sha, size = storage.snapshot_local(src, tmp_path / "cache")
    src.write_bytes(b"swapped after the hash")  # what a scan of the path would now read
    assert copy.read_bytes() == original and sha == hashlib.sha256(original).hexdigest() and size == len(original)
    create_encoder("cifar/resnet18", copy)
    with pytest.raises(storage.TooLarge):
        storage.snapshot_local(tmp_path / "enc.pt", tmp_path / "cache", max_bytes=4)


def _part(path, rows):
    """A part as a forger writes it: every column nullable, so pyarrow lets the nulls through."""
    loose = pa.schema([f.with_nullable(True) for f in SCHEMA])
    pq.write_table(pa.Table.from_pylist(rows, schema=loose), path)


def test_forged_part_files_cannot_win_the_merge_or_stop_it(tmp_path):
    (tmp_path / "parts").mkdir()
    honest = new_row(id="a", uri="u", status="ok", verdict="trojaned")
    pq.write_table(to_table([honest]), tmp_path / "parts" / "part-1.parquet")
    future = {**new_row(id="a", uri="u", status="ok", verdict="clean"),
              "scanned_at": datetime.datetime(2999, 1, 1, tzinfo=datetime.timezone.utc)}
    _part(tmp_path / "parts" / "part-2.parquet", [future])
    _part(tmp_path / "parts" / "part-3.parquet", [{**new_row(id="b", uri="v", status="ok"), "id": None}])
    with pytest.warns(UserWarning, match="setting aside"):
        rows = results_mod.load_rows(str(tmp_path))
    assert [(r["uri"], r["verdict"]) for r in rows] == [("u", "trojaned")]  # the forged "clean" did not win
    with pytest.warns(UserWarning):
        results_mod.compact(str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["part-2.parquet.corrupt",
                                                                      "part-3.parquet.corrupt"]


def test_a_small_checkpoint_that_names_a_huge_architecture_is_refused_before_the_model_is_built(tmp_path,
                                                                                                  monkeypatch):
    from decree.encoders import registry

    path = tmp_path / "tiny.safetensors"
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.zeros(8, 3, 3, 3)}, str(path))
    built = []
    real = registry.build_backbone
    monkeypatch.setattr("decree.encoders.build_backbone",
                        lambda arch: built.append(torch.get_default_device().type) or real(arch))
    with pytest.raises(CheckpointError, match="refused before building it"):
        create_encoder("torchvision/vit_l_16", path)  # 304M weights
    assert built == ["meta"]  # only counted on the meta device, never materialized


def test_names_that_escape_alike_stay_distinct_rows_through_the_scan_and_compaction(tmp_path):
    """A raw byte 0xff in a file name and the literal text `\\udcff` escape to the same text; a literal name built
    to look like a marked one is marked too. One row each survives compaction (the table keeps one per uri)."""
    import hashlib
    import os

    from faults import harness
    from faults.zoo import TINY_ARCH, make_zoo

    from decree_ray.schema import row_name
    from decree_ray.worker import ScanWorker

    zoo = make_zoo(tmp_path / "zoo")
    src = tmp_path / "src"
    src.mkdir()
    data = (zoo / "encoders" / "enc0.safetensors").read_bytes()
    raw = "enc\udcff.safetensors"
    forged_mark = f"enc\\udcff.safetensors [raw:{hashlib.sha256(raw.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}]"
    for name in (os.fsencode(raw), b"enc\\udcff.safetensors", os.fsencode(forged_mark)):
        (src / os.fsdecode(name)).write_bytes(data)
    worker = ScanWorker(harness.settings(zoo / "shadow.npz", tmp_path / "out", tmp_path / "cache", steps=1))
    try:
        rows = harness.scan_source(str(src), worker, arch=TINY_ARCH)
    finally:
        worker.close()
    assert len(rows) == 3 and len({r["uri"] for r in rows}) == 3 and len({r["id"] for r in rows}) == 3, rows
    assert all(r["status"] == "ok" for r in rows)
    assert row_name("plain.safetensors") == "plain.safetensors" and row_name(row_name(raw)) != row_name(raw)
    out = tmp_path / "table"
    (out / "parts").mkdir(parents=True)
    pq.write_table(to_table(rows), out / "parts" / "part-1.parquet")
    results_mod.compact(str(out))
    assert len(results_mod.load_rows(str(out))) == 3
