"""Sources against a real S3 API (moto server over HTTP): listing, manifests, sidecars, path safety."""

from __future__ import annotations

import io
import json
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from decree_ray import storage
from decree_ray.sources import SourceStats, iter_tasks, resolve_manifest_uri
from decree_ray.storage import S3Options


@pytest.mark.s3
def test_s3_prefix_listing_streams_checkpoints_and_counts_other_keys(s3):
    client, bucket, endpoint = s3
    for key in ("p/a.safetensors", "p/sub/b.pt", "p/a.safetensors.json", "p/readme.md", "other/c.pt"):
        client.put_object(Bucket=bucket, Key=key, Body=b"x" * 7)
    stats = SourceStats()

    tasks = iter_tasks(f"s3://{bucket}/p", options=S3Options(endpoint), stats=stats, arch="timm/test_resnet")

    assert isinstance(tasks, types.GeneratorType)  # streamed, not materialized
    got = {t.id: t for t in tasks}
    assert set(got) == {"a.safetensors", "sub/b.pt", "readme.md"}
    assert got["sub/b.pt"].uri == f"s3://{bucket}/p/sub/b.pt" and got["sub/b.pt"].size_bytes == 7
    # the sidecar belongs to its checkpoint; the readme is a row that says why it was not scanned
    assert got["readme.md"].status == "skipped" and "not a checkpoint" in got["readme.md"].error
    assert all(t.sidecar and t.arch == "timm/test_resnet" for k, t in got.items() if k != "readme.md")
    assert stats.skipped_keys == 1 and stats.sidecars == 1 and stats.listed == 4
    assert stats.skipped_examples == [f"s3://{bucket}/p/readme.md"]


@pytest.mark.s3
def test_s3_listing_follows_pagination(s3):
    client, bucket, endpoint = s3
    for i in range(5):
        client.put_object(Bucket=bucket, Key=f"k/{i}.pt", Body=b"")
    pages = []
    orig = storage.s3_client(S3Options(endpoint)).get_paginator("list_objects_v2").paginate

    def small_pages(**kw):
        for page in orig(**kw, PaginationConfig={"PageSize": 2}):
            pages.append(page.get("KeyCount"))
            yield page

    client.get_paginator = lambda name: types.SimpleNamespace(paginate=small_pages)
    try:
        uris = [u for u, _ in storage.iter_s3_objects(f"s3://{bucket}/k/", S3Options(endpoint))]
    finally:
        del client.get_paginator
    assert uris == [f"s3://{bucket}/k/{i}.pt" for i in range(5)]
    assert pages == [2, 2, 1]


@pytest.mark.s3
def test_manifest_on_s3_resolves_relative_uris_and_rejects_escapes(s3):
    client, bucket, endpoint = s3
    lines = [
        {
            "id": "a",
            "uri": "encoders/a.safetensors",
            "arch": "timm/x",
            "image_size": 32,
            "mean": [0.5] * 3,
            "label": "clean",
        },
        {"id": "up", "uri": "../other/b.pt", "arch": "timm/x"},
        {"id": "abs", "uri": "/etc/c.pt", "arch": "timm/x"},
        {"id": "foreign", "uri": f"s3://{bucket}/elsewhere/d.pt", "arch": "timm/x"},
        {"id": "inside", "uri": f"s3://{bucket}/zoo/sub/e.pt"},
        {"id": "notckpt", "uri": "notes.txt", "arch": "timm/x"},
    ]
    body = "\n".join(json.dumps(x) for x in lines) + "\n{broken\n"
    client.put_object(Bucket=bucket, Key="zoo/manifest.jsonl", Body=body.encode())

    tasks = {
        t.id: t
        for t in iter_tasks(f"s3://{bucket}/zoo/manifest.jsonl", options=S3Options(endpoint), arch="timm/fallback")
    }

    assert tasks["a"].uri == f"s3://{bucket}/zoo/encoders/a.safetensors" and tasks["a"].status == "pending"
    assert tasks["a"].image_size == 32 and tasks["a"].mean == (0.5, 0.5, 0.5) and tasks["a"].label == "clean"
    assert tasks["a"].sidecar is False  # the manifest names the arch
    for bad in ("up", "abs", "foreign"):
        assert tasks[bad].status == "error", bad
    assert "escapes" in tasks["up"].error and "absolute" in tasks["abs"].error
    assert tasks["inside"].uri == f"s3://{bucket}/zoo/sub/e.pt" and tasks["inside"].arch == "timm/fallback"
    # a manifest entry is always scanned or an error, never skipped: the loader decides by content
    assert tasks["notckpt"].status == "pending"
    assert tasks["line-7"].status == "error" and "not JSON" in tasks["line-7"].error


def test_csv_and_parquet_manifests_give_the_same_tasks(tmp_path):
    rows = [
        {
            "id": "a",
            "uri": "m/a.pt",
            "arch": "timm/x",
            "image_size": 64,
            "mean": "0.1,0.2,0.3",
            "std": "",
            "label": "trojaned",
        },
        {
            "id": "b",
            "uri": "m/b.safetensors",
            "arch": "torchvision/resnet18",
            "image_size": None,
            "mean": None,
            "std": None,
            "label": None,
        },
    ]
    csv_lines = [
        "id,uri,arch,image_size,mean,std,label",
        'a,m/a.pt,timm/x,64,"0.1,0.2,0.3",,trojaned',
        "b,m/b.safetensors,torchvision/resnet18,,,,",
    ]
    (tmp_path / "m.csv").write_text("\n".join(csv_lines) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")

    from_csv = list(iter_tasks(str(tmp_path / "m.csv")))
    from_parquet = list(iter_tasks(str(tmp_path / "m.parquet")))

    assert from_csv == from_parquet
    assert from_csv[0].uri == str(tmp_path / "m" / "a.pt") and from_csv[0].mean == (0.1, 0.2, 0.3)
    assert from_csv[0].image_size == 64 and from_csv[1].image_size is None and from_csv[1].label is None


def test_local_folder_lists_checkpoints_recursively_and_skips_the_rest(tmp_path):
    (tmp_path / "x").mkdir()
    for name in ("x/a.pth", "b.bin", "b.bin.json", "shadow.npz", "c.ckpt"):
        (tmp_path / name).write_bytes(b"1")
    stats = SourceStats()
    tasks = list(iter_tasks(str(tmp_path), stats=stats))
    assert [t.id for t in tasks if t.status == "pending"] == ["b.bin", "c.ckpt", "x/a.pth"]
    assert [(t.id, t.status) for t in tasks if t.status != "pending"] == [("shadow.npz", "skipped")]
    assert stats.skipped_keys == 1 and stats.sidecars == 1


@pytest.mark.parametrize("uri", ["../x.pt", "a/../../x.pt", "/abs/x.pt", "C:\\w\\x.pt", "s3://b/outside/x.pt", ""])
def test_resolve_manifest_uri_rejects_anything_outside_the_manifest_folder(uri):
    with pytest.raises(ValueError):
        resolve_manifest_uri("s3://b/zoo/manifest.jsonl", uri)


@pytest.mark.parametrize("key", ["../../etc/passwd.pt", "a/b/..", "/abs.pt", "we ird\x00name?.pt", "." * 300 + ".pt"])
def test_cache_name_never_leaves_the_cache_folder(key, tmp_path):
    name = storage.cache_name(f"s3://bucket/{key}")
    assert "/" not in name and "\x00" not in name and not name.startswith(".")
    assert len(name) < 120
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()


def test_s3_client_uses_botocore_retries_and_the_endpoint(moto_server):
    client = storage.s3_client(S3Options(moto_server, retry_mode="standard", max_attempts=5))
    # botocore stores max_attempts (retries) as total_max_attempts = retries + the first call
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 6}
    assert client.meta.endpoint_url == moto_server


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "out" / "part.parquet"
    storage.write_bytes(str(target), b"abc")
    storage.write_bytes(str(target), b"defg")
    assert target.read_bytes() == b"defg"
    assert [p.name for p in target.parent.iterdir()] == ["part.parquet"]
    assert storage.sha256_file(target)[1] == 4 and io.BytesIO(target.read_bytes()).read() == b"defg"


@pytest.mark.s3
def test_worker_takes_arch_from_the_sidecar_downloads_hashes_and_deletes_its_copy(s3, zoo, tmp_path):
    import hashlib

    from conftest import FAST_OVERRIDES, TINY_ARCH

    from decree_ray.worker import ScanSettings, ScanWorker

    client, bucket, endpoint = s3
    ckpt = zoo / "encoders" / "enc1.safetensors"
    client.upload_file(str(ckpt), bucket, "p/enc1.safetensors")
    sidecar = {"arch": TINY_ARCH, "image_size": 32, "label": "clean"}
    client.put_object(Bucket=bucket, Key="p/enc1.safetensors.json", Body=json.dumps(sidecar).encode())
    client.upload_file(str(zoo / "shadow.npz"), bucket, "shadow.npz")
    options = S3Options(endpoint)
    [task] = iter_tasks(f"s3://{bucket}/p/", options=options, arch="torchvision/resnet18")
    worker = ScanWorker(
        ScanSettings(
            shadow=f"s3://{bucket}/shadow.npz", cache_dir=str(tmp_path), steps=2, overrides=FAST_OVERRIDES, s3=options
        )
    )

    fetched = worker.fetch(task)
    cached = list(tmp_path.rglob("*.safetensors"))
    row = worker.scan()

    assert (fetched["task"].arch, fetched["task"].image_size, fetched["task"].label) == (TINY_ARCH, 32, "clean")
    assert fetched["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert len(cached) == 1 and cached[0].is_relative_to(tmp_path)
    assert row["status"] == "ok" and row["arch"] == TINY_ARCH and row["sha256"] == fetched["sha256"]
    assert not list(tmp_path.rglob("*.safetensors"))  # the downloaded copy is gone after the scan


def test_a_folder_listing_never_follows_links_out_and_reports_what_it_cannot_read(tmp_path):
    import os

    from decree_ray.sources import iter_tasks

    root = tmp_path / "fleet"
    (root / "sub").mkdir(parents=True)
    (root / "real.safetensors").write_bytes(b"x" * 10)
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"private")
    os.symlink(secret, root / "leak.safetensors")  # out of the scanned folder
    os.symlink(root / "real.safetensors", root / "sub" / "inside.safetensors")  # a cache's blob link: followed
    os.symlink(tmp_path / "nowhere", root / "dangling.pt")
    os.symlink("missing.pt", root / "dangling-inside.pt")
    os.mkfifo(root / "pipe.pt")
    tasks = {t.id: t for t in iter_tasks(str(root))}
    assert tasks["real.safetensors"].status == "pending" and tasks["sub/inside.safetensors"].status == "pending"
    assert tasks["sub/inside.safetensors"].size_bytes == 10
    assert tasks["leak.safetensors"].status == "skipped" and "out of the scanned folder" in tasks["leak.safetensors"].error
    assert tasks["leak.safetensors"].size_bytes is None  # nothing about the target leaks into the row
    assert tasks["dangling.pt"].status == "skipped"
    assert tasks["dangling-inside.pt"].error == "dangling symlink"
    assert tasks["pipe.pt"].status == "skipped" and "not a regular file" in tasks["pipe.pt"].error


def test_a_worker_never_writes_evidence_into_a_local_out_itself(zoo, tmp_path):
    """On a multi-node cluster the worker's disk is not the driver's: for a local --out the PNG bytes travel
    with the row, and only the driver (write_evidence) puts them under OUT."""
    from pathlib import Path

    from conftest import FAST_OVERRIDES

    from decree_ray.worker import EVIDENCE_BYTES, ScanSettings, ScanWorker, write_evidence

    out = tmp_path / "out"
    worker = ScanWorker(ScanSettings(shadow=str(zoo / "shadow.npz"), out=str(out), cache_dir=str(tmp_path / "c"),
                                     steps=2, overrides=FAST_OVERRIDES))
    [task] = [t for t in iter_tasks(str(zoo / "manifest.jsonl")) if t.id == "enc1"]
    worker.fetch(task)
    row = worker.scan()
    worker.close()
    assert not out.exists()  # nothing written by the worker
    files = row[EVIDENCE_BYTES]
    assert set(files) == {"evidence_mask", "evidence_pattern", "evidence_stamp", "evidence_grid"}
    assert all(data.startswith(b"\x89PNG") for _, data in files.values())
    written = write_evidence(row, str(out))
    assert EVIDENCE_BYTES not in written and all(Path(written[c]).is_file() for c in files)
