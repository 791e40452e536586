"""A Hugging Face cache scans as it is: no --arch, no manifest. The cache is written here file by file in the
hub's own layout (models--org--name/{blobs,refs,snapshots/<rev>}, snapshot files symlinked to blobs), since no
machine here can download one."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from conftest import TINY_ARCH, TINY_SIZE
from faults import harness
from safetensors.torch import save_file

from decree.encoders import create_encoder, open_clip_model
from decree_ray.sources import SourceStats, iter_tasks
from decree_ray.worker import ScanWorker

REV = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"


def _blob(repo: Path, name: str, data: bytes) -> None:
    """A snapshot file as the hub writes it: the bytes in blobs/<sha256>, a relative symlink in the snapshot."""
    digest = hashlib.sha256(data).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "blobs" / digest).write_bytes(data)
    link = repo / "snapshots" / REV / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(repo / "blobs" / digest, link.parent))


def _safetensors_bytes(tmp: Path, sd: dict) -> bytes:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
    return tmp.read_bytes()


def _timm_config(arch: str) -> bytes:
    return json.dumps({"architecture": arch, "num_classes": 0, "pretrained_cfg": {
        "input_size": [3, TINY_SIZE, TINY_SIZE], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}).encode()


def make_cache(root: Path, tmp: Path) -> dict:
    torch.manual_seed(0)
    timm_sd = create_encoder(TINY_ARCH, image_size=TINY_SIZE).backbone.state_dict()
    name = TINY_ARCH.split("/", 1)[1]
    timm_repo = root / f"models--timm--{name}.tiny_in1k"
    _blob(timm_repo, "model.safetensors", _safetensors_bytes(tmp / "a.safetensors", timm_sd))
    torch.save(timm_sd, tmp / "a.bin")
    _blob(timm_repo, "pytorch_model.bin", (tmp / "a.bin").read_bytes())  # its twin: not scanned twice
    _blob(timm_repo, "config.json", _timm_config(name))
    _blob(timm_repo, "README.md", b"# a model card")
    (timm_repo / "refs").mkdir()
    (timm_repo / "refs" / "main").write_text(REV)

    clip = open_clip_model("decree-tiny-clip")  # open_clip hub files hold both towers
    import open_clip

    clip_repo = root / "models--laion--decree-tiny-clip"
    _blob(clip_repo, "open_clip_model.safetensors", _safetensors_bytes(tmp / "c.safetensors", clip.state_dict()))
    _blob(clip_repo, "open_clip_config.json", json.dumps({
        "model_cfg": open_clip.get_model_config("decree-tiny-clip"),
        "preprocess_cfg": {"mean": [0.48, 0.45, 0.4], "std": [0.26, 0.26, 0.27]}}).encode())

    torch.manual_seed(1)
    sharded_sd = create_encoder(TINY_ARCH, image_size=TINY_SIZE).backbone.state_dict()
    keys = sorted(sharded_sd)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    sharded_repo = root / "models--org--sharded"
    for shard, names in halves.items():
        _blob(sharded_repo, shard, _safetensors_bytes(tmp / shard, {k: sharded_sd[k] for k in names}))
    _blob(sharded_repo, "model.safetensors.index.json", json.dumps(
        {"metadata": {"total_size": 1}, "weight_map": {k: s for s, names in halves.items() for k in names}}).encode())
    _blob(sharded_repo, "config.json", _timm_config(name))

    outside = tmp / "outside.safetensors"  # a snapshot link that points out of its repo: never followed
    outside.write_bytes((tmp / "a.safetensors").read_bytes())
    (timm_repo / "snapshots" / REV / "escape.safetensors").symlink_to(outside)
    return {"timm": timm_sd, "clip": clip, "sharded": sharded_sd}


def test_a_hub_cache_lists_one_encoder_per_snapshot_weights_by_repo_and_revision(tmp_path):
    root = tmp_path / "hub"
    (tmp_path / "t").mkdir()
    make_cache(root, tmp_path / "t")
    stats = SourceStats()
    tasks = {t.id: t for t in iter_tasks(str(root), stats=stats)}
    name = TINY_ARCH.split("/", 1)[1]
    pending = {k for k, t in tasks.items() if t.status == "pending"}
    assert pending == {f"timm/{name}.tiny_in1k@{REV}", f"laion/decree-tiny-clip@{REV}", f"org/sharded@{REV}"}
    skipped = {k: t.error for k, t in tasks.items() if t.status == "skipped"}
    assert "same weights as model.safetensors" in skipped[f"timm/{name}.tiny_in1k@{REV}/pytorch_model.bin"]
    assert all("shard of model.safetensors.index.json" in skipped[f"org/sharded@{REV}/model-0000{i}-of-00002.safetensors"]
               for i in (1, 2))
    assert "symlink out" in skipped[f"timm/{name}.tiny_in1k@{REV}/escape.safetensors"]
    assert not any("/blobs/" in t.uri for t in tasks.values())  # blobs are reached through snapshots only
    assert stats.skipped_keys == 0  # config.json, README.md: the snapshot's own companions, not gaps


def test_a_hub_cache_scans_with_no_arch_and_no_manifest_and_says_where_the_arch_came_from(tmp_path, zoo):
    root = tmp_path / "hub"
    (tmp_path / "t").mkdir()
    make_cache(root, tmp_path / "t")
    worker = ScanWorker(harness.settings(zoo / "shadow.npz", tmp_path / "out", tmp_path / "cache", evidence=False))
    rows = {r["id"]: r for r in harness.scan_source(str(root), worker)}
    worker.close()
    name = TINY_ARCH.split("/", 1)[1]
    timm_row, clip_row = rows[f"timm/{name}.tiny_in1k@{REV}"], rows[f"laion/decree-tiny-clip@{REV}"]
    sharded = rows[f"org/sharded@{REV}"]
    for row in (timm_row, clip_row, sharded):
        assert row["status"] == "ok", row["error"]
        assert row["arch_source"] == "hub config"
    assert timm_row["arch"] == TINY_ARCH and timm_row["image_size"] == TINY_SIZE
    assert clip_row["arch"] == "open_clip/decree-tiny-clip"


def test_sharded_safetensors_load_as_one_checkpoint_and_hash_over_every_shard(tmp_path):
    from decree_ray.worker import _digest

    root = tmp_path / "hub"
    (tmp_path / "t").mkdir()
    refs = make_cache(root, tmp_path / "t")
    index = root / "models--org--sharded" / "snapshots" / REV / "model.safetensors.index.json"
    enc = create_encoder(TINY_ARCH, index, image_size=TINY_SIZE)
    got = enc.backbone.state_dict()
    assert all(torch.equal(got[k], refs["sharded"][k]) for k in refs["sharded"])
    before, _ = _digest(index)
    shard = index.parent / "model-00002-of-00002.safetensors"
    blob = shard.resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1  # one bit of one shard: the checkpoint's digest must change though the index did not
    blob.write_bytes(bytes(data))
    assert _digest(index)[0] != before


def test_a_shard_index_that_names_files_outside_its_folder_is_refused(tmp_path):
    import pytest

    from decree.errors import CheckpointError

    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../../etc/passwd.safetensors"}}))
    with pytest.raises(CheckpointError, match="not .safetensors files beside it"):
        create_encoder(TINY_ARCH, index)


def test_a_manifest_entry_gets_its_identity_from_the_worker_except_a_shard_index(tmp_path, zoo):
    """A shard index's shards change without it: it never gets a listing identity, so it is always hashed."""
    from decree_ray.sources import EncoderTask

    root = tmp_path / "hub"
    (tmp_path / "t").mkdir()
    make_cache(root, tmp_path / "t")
    index = root / "models--org--sharded" / "snapshots" / REV / "model.safetensors.index.json"
    plain = root / "models--timm--test_resnet.tiny_in1k" / "snapshots" / REV / "model.safetensors"
    worker = ScanWorker(harness.settings(zoo / "shadow.npz", tmp_path / "out", tmp_path / "cache", evidence=False))
    got = {p.name: worker.fetch(EncoderTask(id=p.name, uri=str(p), arch=TINY_ARCH))["task"].identity
           for p in (index, plain)}
    worker.close()
    assert got["model.safetensors.index.json"] is None
    assert got["model.safetensors"].startswith("file:")
