"""Manifest lines and sidecars are the audited party's: values that once aborted a whole scan are now one
entry's error row, and the entries around them are scanned as usual (the worker path, without Ray)."""

from __future__ import annotations

import json
import shutil

import pytest
from faults import harness
from faults.zoo import TINY_ARCH, TINY_SIZE, make_zoo

from decree_ray.metadata import MAX_IMAGE_SIZE, MetadataError, floats, image_size, preprocessing
from decree_ray.results import _table_bytes
from decree_ray.schema import to_table
from decree_ray.worker import ScanWorker


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_zoo(tmp_path_factory.mktemp("zoo"))


def _box(zoo, tmp_path):
    (tmp_path / "zoo" / "encoders").mkdir(parents=True)
    for name in ("enc0", "enc1"):
        shutil.copyfile(zoo / "encoders" / f"{name}.safetensors", tmp_path / "zoo" / "encoders" / f"{name}.safetensors")
    shutil.copyfile(zoo / "shadow.npz", tmp_path / "zoo" / "shadow.npz")
    return tmp_path / "zoo"


def _scan(box, source, tmp_path):
    worker = ScanWorker(harness.settings(box / "shadow.npz", tmp_path / "out", tmp_path / "cache", steps=1))
    try:
        rows = harness.scan_source(str(source), worker)
    finally:
        worker.close()
    _table_bytes(to_table(rows))  # every row must still be writable as Parquet
    return rows


GOOD = {"uri": "encoders/enc0.safetensors", "arch": TINY_ARCH, "image_size": TINY_SIZE}
HOSTILE_LINES = [
    ('{"id": "inf", "uri": "encoders/enc1.safetensors", "arch": "%s", "image_size": 1e400}' % TINY_ARCH, "image_size"),
    (json.dumps({"id": "huge", "uri": "encoders/enc1.safetensors", "arch": TINY_ARCH, "image_size": 10**30}), "image_size"),
    ('{"id": "long-int", "uri": "encoders/enc1.safetensors", "image_size": %s}' % ("9" * 5000), "not JSON"),
    ('{"id": "deep", "x": ' + "[" * 100000 + "]" * 100000 + "}", "not JSON"),
    (json.dumps({"id": "big-size", "uri": "encoders/enc1.safetensors", "arch": TINY_ARCH, "image_size": 4096}), "1024"),
    (json.dumps({"id": "list-arch", "uri": "encoders/enc1.safetensors", "arch": ["timm/x"]}), "arch must be a string"),
    (json.dumps({"id": "str-mean", "uri": "encoders/enc1.safetensors", "arch": TINY_ARCH, "mean": ["a", "b", "c"]}), "mean"),
    (json.dumps({"id": "nan-std", "uri": "encoders/enc1.safetensors", "arch": TINY_ARCH, "std": "[NaN, 1, 1]"}), "std"),
    (json.dumps({"id": "zero-std", "uri": "encoders/enc1.safetensors", "arch": TINY_ARCH, "std": [0, 0, 0]}), "std"),
    (json.dumps({"id": "dict-uri", "uri": {"a": 1}, "arch": TINY_ARCH}), "uri must be a string"),
    (json.dumps({"id": "surrogate\udcff", **GOOD, "uri": "encoders/enc1.safetensors"}), None),  # ok, id escaped
]


def test_hostile_manifest_lines_are_error_rows_and_the_rest_is_scanned(zoo, tmp_path):
    box = _box(zoo, tmp_path)
    manifest = box / "manifest.jsonl"
    shutil.copyfile(box / "encoders" / "enc1.safetensors", box / "encoders" / "after.safetensors")
    # one row per uri: every hostile line names a file of its own (validation fails before any read)
    hostile = [line.replace("encoders/enc1.safetensors", f"encoders/h{n}.safetensors")
               for n, (line, frag) in enumerate(HOSTILE_LINES) if frag is not None]
    hostile += [line for line, frag in HOSTILE_LINES if frag is None]
    lines = [json.dumps({"id": "before", **GOOD})] + hostile
    manifest.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
                         + b'{"id": "bad-byte-\xff", "uri": "encoders/hbad.safetensors"}\n'
                         + (json.dumps({"id": "after", **GOOD, "uri": "encoders/after.safetensors"}) + "\n").encode())
    rows = {r["id"]: r for r in _scan(box, manifest, tmp_path)}
    assert len(rows) == len(lines) + 2
    assert rows["before"]["status"] == "ok" and rows["after"]["status"] == "ok"
    for line, fragment in HOSTILE_LINES:
        if fragment is None:
            continue
        row = next(r for r in rows.values() if fragment in (r["error"] or "") and r["status"] == "error"
                   and (r["id"] in line or r["id"].startswith("line-")))
        assert row["verdict"] is None
    assert rows[next(k for k in rows if k.startswith("surrogate\\udcff [raw:"))]["status"] == "ok"  # lone surrogate: escaped in the row, not a writer crash
    # the invalid byte did not end the manifest: its line is a row of its own and "after" was still read
    assert any(r["id"].startswith("bad-byte-") for r in rows.values())


@pytest.mark.parametrize("sidecar, fragment", [
    ({"arch": ["timm/x"]}, "arch must be a string"),
    ({"arch": TINY_ARCH, "mean": ["a", "b", "c"]}, "mean must hold numbers"),
    ({"arch": TINY_ARCH, "image_size": 1e300}, "image_size"),
    ({"arch": TINY_ARCH, "image_size": True}, "image_size"),
    ({"arch": TINY_ARCH, "label": {"x": 1}}, "label must be a string"),
])
def test_a_hostile_sidecar_is_its_encoders_error_row_not_the_scans(zoo, tmp_path, sidecar, fragment):
    box = _box(zoo, tmp_path)
    folder = box / "encoders"
    (folder / "enc0.safetensors.json").write_text(json.dumps(sidecar))
    (folder / "enc1.safetensors.json").write_text(json.dumps({"arch": TINY_ARCH, "image_size": TINY_SIZE}))
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in _scan(box, folder, tmp_path)}
    assert rows["enc0.safetensors"]["status"] == "error" and fragment in rows["enc0.safetensors"]["error"]
    assert rows["enc1.safetensors"]["status"] == "ok", rows["enc1.safetensors"]["error"]


def test_metadata_values_are_typed_and_bounded():
    assert image_size("224") == 224 and image_size(32.0) == 32 and image_size(None) is None
    for bad in (7, MAX_IMAGE_SIZE + 1, 1e400, 1.5, "1e3", "-5", [32], True, 10**400):
        with pytest.raises(MetadataError):
            image_size(bad)
    assert floats("0.5, 0.4, 0.3", "mean") == (0.5, 0.4, 0.3) and floats(0.5, "std") == (0.5,)
    for bad in ([1, 2], [float("inf")] * 3, "[[[[", {"a": 1}, [True, 1, 1]):
        with pytest.raises(MetadataError):
            floats(bad, "mean")
    with pytest.raises(MetadataError):
        preprocessing({"arch": "x" * 10_000})


def test_a_sidecars_input_size_is_a_claim_scanned_against_the_auditors_and_recorded(zoo, tmp_path):
    box = _box(zoo, tmp_path)
    enc = box / "encoders"
    (enc / "enc0.safetensors.json").write_text(json.dumps({"arch": TINY_ARCH, "image_size": 16}))
    (enc / "enc1.safetensors.json").write_text(json.dumps({"arch": TINY_ARCH}))
    rows = {}
    for trust in (False, True):
        worker = ScanWorker(harness.settings(box / "shadow.npz", tmp_path / f"out{trust}", tmp_path / "cache", steps=1,
                                             image_size=TINY_SIZE, trust_sidecar_preprocessing=trust))
        try:
            rows[trust] = {r["id"]: r for r in harness.scan_source(str(enc), worker)}
        finally:
            worker.close()
    claimed, trusted = rows[False]["enc0.safetensors"], rows[True]["enc0.safetensors"]
    assert claimed["status"] == "ok" and claimed["preprocess_source"] == "sidecar"
    assert claimed["preprocess_decided"] in ("claimed", "reference")  # both sizes were scanned
    assert claimed["image_size"] == (16 if claimed["preprocess_decided"] == "claimed" else TINY_SIZE)
    assert trusted["preprocess_decided"] is None and trusted["image_size"] == 16
    assert claimed["content_key"] != trusted["content_key"]  # a trusted run's verdict is never reused unchecked
    plain = rows[False]["enc1.safetensors"]  # no preprocessing claimed: the auditor's --image-size, one scan
    assert (plain["preprocess_source"], plain["preprocess_decided"], plain["image_size"]) == ("default", None, TINY_SIZE)


def test_a_manifest_lines_preprocessing_wins_over_the_sidecars(zoo, tmp_path):
    from decree_ray.sources import apply_sidecar, iter_tasks

    box = _box(zoo, tmp_path)
    (box / "encoders" / "enc0.safetensors.json").write_text(json.dumps({"arch": TINY_ARCH, "image_size": 16,
                                                                        "mean": [0.1, 0.1, 0.1]}))
    manifest = box / "m.jsonl"
    manifest.write_text(json.dumps({"id": "e", "uri": "encoders/enc0.safetensors", "image_size": 32}) + "\n")
    (task,) = list(iter_tasks(str(manifest)))
    task = apply_sidecar(task)
    assert (task.arch, task.image_size, task.mean, task.preprocess_source) == (TINY_ARCH, 32, None, "manifest")
