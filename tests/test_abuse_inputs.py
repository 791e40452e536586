"""Abusive inputs around the checkpoints: manifests, S3 keys and shadow sets.

Each bad manifest entry ends as exactly one row that says why; the good entries are scanned as usual; nothing is
written outside the output and cache folders. Runs the job's worker path (sources -> ScanWorker) without Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faults import harness
from faults.fixtures import gap, rec, record  # noqa: F401 - fixtures
from faults.zoo import TINY_ARCH, TINY_SIZE, make_zoo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decree.errors import ShadowError
from decree.shadow import ShadowSet, load_shadow
from decree_ray.storage import S3Options
from decree_ray.worker import ScanWorker


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """This module's own tiny zoo (conftest's layout)."""
    return make_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture()
def sandbox(tmp_path, monkeypatch):
    """A folder holding everything the scan may touch; cwd and tempfile point inside it."""
    for name in ("zoo/encoders", "out", "cache", "tmp", "cwd"):
        (tmp_path / name).mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return tmp_path


def _copy_zoo(zoo, box, names=("enc0", "enc1", "enc2")):
    for name in names:
        shutil.copyfile(zoo / "encoders" / f"{name}.safetensors", box / "zoo" / "encoders" / f"{name}.safetensors")
    shutil.copyfile(zoo / "shadow.npz", box / "zoo" / "shadow.npz")


# (manifest line, expected status, fragment of the error) - one line per abuse
_GOOD = {"arch": TINY_ARCH, "image_size": TINY_SIZE}
ABUSE = [
    (json.dumps({"id": "good", "uri": "encoders/enc1.safetensors", **_GOOD}), "ok", None),
    (json.dumps({"id": "good", "uri": "encoders/enc2.safetensors", **_GOOD}), "ok", None),  # duplicate id
    (json.dumps({"id": "again", "uri": "encoders/enc1.safetensors", **_GOOD}), None, None),  # same uri: no 2nd row
    (json.dumps({"uri": "encoders/noid.safetensors", **_GOOD}), "error", "cannot read"),  # no id, missing file
    (json.dumps({"id": "no-uri", **_GOOD}), "error", "no uri"),
    (json.dumps({"id": "no-arch", "uri": "encoders/./enc0.safetensors"}), "error", "no architecture"),
    (json.dumps({"id": "int-arch", "uri": "encoders/x1.safetensors", "arch": 5}), "error", "arch must look like"),
    (json.dumps({"id": "unknown-arch", "uri": "encoders/enc1.safetensors#", "arch": "timm/nope"}), "error", "cannot read"),
    (json.dumps({"id": "size-str", "uri": "encoders/enc2.safetensors", "arch": TINY_ARCH, "image_size": "big"}), None, None),
    (json.dumps({"id": "size-list", "uri": "encoders/e3.safetensors", "arch": TINY_ARCH, "image_size": [32]}), "error", "bad manifest entry"),
    (json.dumps({"id": "size-word", "uri": "encoders/e4.safetensors", "arch": TINY_ARCH, "image_size": "big"}), "error", "bad manifest entry"),
    (json.dumps({"id": "mean-text", "uri": "encoders/e5.safetensors", "arch": TINY_ARCH, "mean": "a,b"}), "error", "bad manifest entry"),
    (json.dumps({"id": "mean-2", "uri": "encoders/e6.safetensors", "arch": TINY_ARCH, "mean": [0.5, 0.5]}), "error", "mean must be 1 or 3"),
    (json.dumps({"id": "dotdot", "uri": "../secrets/x.safetensors", **_GOOD}), "error", "escapes"),
    (json.dumps({"id": "dotdot-deep", "uri": "encoders/../../x.safetensors", **_GOOD}), "error", "escapes"),
    (json.dumps({"id": "absolute", "uri": "/etc/passwd.pt", **_GOOD}), "error", "absolute"),
    (json.dumps({"id": "windows", "uri": "C:\\Windows\\x.pt", **_GOOD}), "error", "absolute"),
    (json.dumps({"id": "file-scheme", "uri": "file:///etc/x.pt", **_GOOD}), "error", "unsupported uri scheme"),
    (json.dumps({"id": "nul", "uri": "encoders/a\u0000b.pt", **_GOOD}), "error", "cannot read"),
    (json.dumps({"id": "long", "uri": "encoders/" + "a" * 5000 + ".pt", **_GOOD}), "error", "cannot read"),
    (json.dumps(["a", "list"]), "error", "not a JSON object"),
    ("{not json", "error", "not JSON"),
    ("", None, None),
]


def test_manifest_abuse_gives_one_row_per_encoder_with_the_reason(zoo, sandbox, record):
    _copy_zoo(zoo, sandbox)
    for name in ("x1", "e6"):  # entries whose problem shows only once the file is read
        shutil.copyfile(zoo / "encoders" / "enc1.safetensors", sandbox / "zoo" / "encoders" / f"{name}.safetensors")
    manifest = sandbox / "zoo" / "manifest.jsonl"
    manifest.write_text("\n".join(line for line, *_ in ABUSE) + "\n")
    before = harness.tree(sandbox)
    worker = ScanWorker(harness.settings(sandbox / "zoo" / "shadow.npz", sandbox / "out", sandbox / "cache"))

    rows = harness.scan_source(str(manifest), worker)
    worker.close()

    expected = [(line, status, frag) for line, status, frag in ABUSE if status is not None]
    assert len(rows) == len(expected), [r["id"] for r in rows]
    for row, (line, status, frag) in zip(rows, expected):
        assert row["status"] == status, (line[:80], row["status"], row["error"])
        if frag:
            assert frag in row["error"], (line[:80], row["error"])
        if status != "ok":
            assert row["verdict"] is None
    assert [r["id"] for r in rows][:2] == ["good", "good"] and rows[0]["uri"] != rows[1]["uri"]
    assert len({r["uri"] for r in rows}) == len(rows)
    assert harness.written_outside(before, harness.tree(sandbox), ("out", "cache")) == []
    record("broken input", "manifest abuse: duplicate ids and uris, missing uri/id/arch, bad types (arch int, "
           "image_size list/word, mean text or 2 values), `..`, absolute, Windows and file:// uris, NUL byte, "
           "5000-char uri, non-object and non-JSON lines", len(ABUSE),
           f"{len(rows)} rows (one per distinct uri), each error says why; good entries scanned; "
           "nothing written outside out/ and cache/")


def test_csv_and_parquet_manifests_with_missing_columns_or_wrong_types_become_error_rows(zoo, sandbox, record):
    _copy_zoo(zoo, sandbox)
    (sandbox / "zoo" / "nouri.csv").write_text("name,path\nfoo,encoders/enc1.safetensors\nbar,encoders/enc2.safetensors\n")
    pq.write_table(pa.table({"id": ["a", "b"], "uri": ["encoders/enc1.safetensors", "encoders/enc2.safetensors"],
                             "arch": [TINY_ARCH, TINY_ARCH], "image_size": ["32", "huge"]}), sandbox / "zoo" / "types.parquet")
    worker = ScanWorker(harness.settings(sandbox / "zoo" / "shadow.npz", sandbox / "out", sandbox / "cache"))

    csv_rows = harness.scan_source(str(sandbox / "zoo" / "nouri.csv"), worker)
    pq_rows = harness.scan_source(str(sandbox / "zoo" / "types.parquet"), worker)
    worker.close()

    assert [r["status"] for r in csv_rows] == ["error", "error"] and all("no uri" in r["error"] for r in csv_rows)
    assert [r["status"] for r in pq_rows] == ["ok", "error"] and "bad manifest entry" in pq_rows[1]["error"]
    record("broken input", "CSV manifest without a uri column; Parquet manifest with image_size as text", 4,
           "one error row per line saying what is missing or wrong; valid line scanned")


def test_every_manifest_entry_without_a_uri_gets_its_own_row(zoo, sandbox):
    _copy_zoo(zoo, sandbox)
    (sandbox / "zoo" / "m.jsonl").write_text(json.dumps({"id": "a", "arch": TINY_ARCH}) + "\n"
                                             + json.dumps({"id": "b", "uri": None}) + "\n")
    worker = ScanWorker(harness.settings(sandbox / "zoo" / "shadow.npz", sandbox / "out", sandbox / "cache"))
    rows = harness.scan_source(str(sandbox / "zoo" / "m.jsonl"), worker)
    worker.close()
    assert sorted(r["id"] for r in rows) == ["a", "b"]
    assert all(r["status"] == "error" and "no uri" in r["error"] for r in rows)


def test_degenerate_preprocessing_from_a_manifest_is_an_error_not_a_verdict(zoo, sandbox, record):
    _copy_zoo(zoo, sandbox)
    lines = [{"id": "inf-std", "uri": "encoders/enc1.safetensors", "arch": TINY_ARCH, "std": [float("inf")] * 3},
             {"id": "one-pixel", "uri": "encoders/enc2.safetensors", "arch": TINY_ARCH, "image_size": 1}]
    (sandbox / "zoo" / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    worker = ScanWorker(harness.settings(sandbox / "zoo" / "shadow.npz", sandbox / "out", sandbox / "cache"))
    rows = harness.scan_source(str(sandbox / "zoo" / "m.jsonl"), worker)
    worker.close()
    assert [r["status"] for r in rows] == ["error", "error"], [(r["status"], r["verdict"]) for r in rows]
    assert all("image_size" in r["error"] or "std" in r["error"] for r in rows), [r["error"] for r in rows]
    record("broken input", "degenerate preprocessing in a manifest (std=inf, image_size=1)", 2,
           "error row naming the bad value; no verdict")


@pytest.mark.s3
def test_s3_keys_that_would_escape_the_cache_are_downloaded_inside_it(zoo, sandbox, s3, record):
    client, bucket, endpoint = s3
    _copy_zoo(zoo, sandbox, names=("enc1",))
    body = (sandbox / "zoo" / "encoders" / "enc1.safetensors").read_bytes()
    keys = ["zoo/../../../escape.safetensors", "zoo/./a/../../up.safetensors", "zoo/..%2f..%2fenc.safetensors",
            "zoo//abs.safetensors", "zoo/.hidden.safetensors", "zoo/\u202eevil.safetensors", "zoo/" + "d" * 900 + ".safetensors"]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=body)
    opts = S3Options(endpoint)
    before = harness.tree(sandbox)
    worker = ScanWorker(harness.settings(f"s3://{bucket}/shadow.npz", sandbox / "out", sandbox / "cache", s3=opts))
    client.upload_file(str(sandbox / "zoo" / "shadow.npz"), bucket, "shadow.npz")
    fetched = []
    real_fetch = worker.fetch

    def spy(task):
        result = real_fetch(task)
        if task.uri in worker._held:
            fetched.append(worker._held[task.uri].path)
        return result

    worker.fetch = spy
    rows = harness.scan_source(f"s3://{bucket}/zoo/", worker, arch=TINY_ARCH, s3=opts)
    worker.close()

    assert sorted(r["uri"] for r in rows) == sorted(f"s3://{bucket}/{k}" for k in keys)
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    flat = worker.cache.resolve()  # one flat folder per worker under the cache folder
    assert flat.is_relative_to((sandbox / "cache").resolve())
    assert len(fetched) == len(keys) and all(p.resolve().parent == flat for p in fetched), fetched
    assert harness.written_outside(before, harness.tree(sandbox), ("out", "cache")) == []
    assert not (sandbox.parent / "escape.safetensors").exists()
    record("broken input", "S3 keys with `..`, `./`, encoded slashes, `//`, leading dot, RTL override, 900 chars",
           len(keys), "each downloaded to a flat name inside the cache folder and scanned; nothing written elsewhere")


# ------------------------------------------------------------------------------------------------ shadow sets


def _png(path, size=(8, 8)):
    from PIL import Image

    Image.fromarray(np.zeros((*size, 3), dtype=np.uint8)).save(path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _shadow_cases(root):
    """name -> (source, fragment of the ShadowError)"""
    cases = {}
    (root / "empty").mkdir()
    cases["empty folder"] = (root / "empty", "empty")
    (root / "one").mkdir()
    _png(root / "one" / "a.png")
    cases["one image"] = (root / "one", "at least 2")
    (root / "corrupt").mkdir()
    _png(root / "corrupt" / "a.png")
    (root / "corrupt" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    cases["corrupt png"] = (root / "corrupt", "corrupt image")
    np.savez(root / "rgba.npz", x=np.zeros((4, 8, 8, 4), dtype=np.uint8))
    cases["4 channels"] = (root / "rgba.npz", "N,H,W,3")
    np.savez(root / "float.npz", x=np.zeros((4, 8, 8, 3), dtype=np.float32))
    cases["float pixels"] = (root / "float.npz", "uint8")
    np.savez(root / "noarr.npz", y=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    cases["no x array"] = (root / "noarr.npz", "no array 'x'")
    np.savez(root / "zero.npz", x=np.zeros((0, 8, 8, 3), dtype=np.uint8))
    cases["zero images"] = (root / "zero.npz", "empty")
    np.savez(root / "flat.npz", x=np.zeros((4, 1, 1, 3), dtype=np.uint8))
    cases["1x1 images"] = (root / "flat.npz", "degenerate")
    np.savez(root / "5d.npz", x=np.zeros((2, 2, 8, 8, 3), dtype=np.uint8))
    cases["5-D array"] = (root / "5d.npz", "N,H,W,3")
    np.savez(root / "pickled.npz", x=np.array([_Payload(root / "pwned")], dtype=object))
    cases["object array with a code-running pickle"] = (root / "pickled.npz", "corrupt shadow")
    (root / "trunc.npz").write_bytes(b"PK\x03\x04" + b"\0" * 20)
    cases["truncated npz"] = (root / "trunc.npz", "corrupt shadow")
    (root / "shadow.txt").write_text("hello")
    cases["unsupported type"] = (root / "shadow.txt", "unsupported shadow")
    return cases


def test_bad_shadow_sets_are_refused_with_a_reason_before_any_encoder_is_scanned(sandbox, record):
    cases = _shadow_cases(sandbox / "zoo")
    for source, fragment in cases.values():
        with pytest.raises(ShadowError, match=fragment):
            load_shadow(source, TINY_SIZE)
        worker = ScanWorker(harness.settings(source, sandbox / "out", sandbox / "cache"))
        with pytest.raises(ShadowError, match=fragment):  # the job turns this into "scan worker failed to start"
            worker.ready()
        worker.close()
    assert not (sandbox / "zoo" / "pwned").exists()
    assert ShadowSet(_shadow_ok(sandbox)).pixels(TINY_SIZE, "cpu").shape == (2, 3, TINY_SIZE, TINY_SIZE)
    record("broken input", "shadow sets: " + ", ".join(cases), len(cases),
           "ShadowError naming the problem when the worker starts (the job stops with exit 2 before any verdict); "
           "the pickled payload never ran")


def _shadow_ok(box):
    (box / "two").mkdir()
    _png(box / "two" / "a.png")
    _png(box / "two" / "b.png", size=(12, 10))  # mixed sizes are fine
    return box / "two"


# ------------------------------------------------------------------------------------------- property-based

_uris = st.one_of(
    st.sampled_from(["encoders/enc1.safetensors", "encoders/enc2.safetensors", "encoders/../enc1.safetensors",
                     "../x.pt", "/abs.pt", "s3://b/k.pt", "encoders/missing.pt", "encoders/enc1.safetensors.txt", ""]),
    st.text(max_size=30), st.none(), st.integers(),
)
_record = st.fixed_dictionaries({}, optional={
    "id": st.one_of(st.sampled_from(["a", "a", "b"]), st.text(max_size=10), st.integers(), st.none()),
    "uri": _uris,
    "arch": st.one_of(st.just(TINY_ARCH), st.sampled_from(["timm/nope", "x", ""]), st.integers(), st.none()),
    "image_size": st.one_of(st.sampled_from([16, 32, 0, -3]), st.text(max_size=4), st.none(), st.lists(st.integers(), max_size=2)),
    "mean": st.one_of(st.none(), st.lists(st.floats(0, 1), max_size=4), st.text(max_size=6)),
    "label": st.one_of(st.none(), st.text(max_size=5)),
})
_lines = st.lists(st.one_of(_record.map(json.dumps), st.text(max_size=20).filter(lambda s: "\n" not in s and "\r" not in s)),
                  min_size=1, max_size=6)
_EXAMPLES: list[int] = []


@given(lines=_lines)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_any_manifest_gives_one_row_per_distinct_entry_and_writes_only_to_out_and_cache(zoo, tmp_path_factory, lines):
    box = tmp_path_factory.mktemp("prop")
    for name in ("zoo/encoders", "out", "cache"):
        (box / name).mkdir(parents=True)
    _copy_zoo(zoo, box)
    manifest = box / "zoo" / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    from decree_ray.schema import row_name
    from decree_ray.sources import iter_tasks

    want_uris = {row_name(t.uri) for t in iter_tasks(str(manifest))}  # rows carry untrusted text sanitized
    before = harness.tree(box)
    worker = ScanWorker(harness.settings(box / "zoo" / "shadow.npz", box / "out", box / "cache", steps=1))
    rows = harness.scan_source(str(manifest), worker)
    worker.close()

    assert sorted(r["uri"] for r in rows) == sorted(want_uris)
    n_entries = sum(1 for line in lines if line.strip())
    assert len(rows) <= n_entries
    for r in rows:
        assert r["status"] in ("ok", "error", "skipped")
        assert (r["status"] == "ok") == (r["verdict"] is not None)
        assert r["status"] == "ok" or r["error"]
    assert harness.written_outside(before, harness.tree(box), ("out", "cache")) == []
    _EXAMPLES.append(len(rows))


def test_manifest_property_is_recorded(record):
    if not _EXAMPLES:
        pytest.skip("property test did not run in this session")
    record("broken input", "random manifests (hypothesis): ids, uris, archs, image sizes, means, labels, non-JSON lines",
           len(_EXAMPLES), f"{sum(_EXAMPLES)} rows in all, exactly one per distinct entry; never an exception; "
           "nothing written outside out/ and cache/")


def test_a_failed_evidence_upload_keeps_the_ok_row_without_evidence(zoo, sandbox, monkeypatch, caplog, record):
    """Evidence PNGs are a by-product: losing them (output store down) must not turn a finished scan into an error."""
    import logging

    _copy_zoo(zoo, sandbox, names=("enc1",))
    (sandbox / "out").mkdir(exist_ok=True)
    (sandbox / "out" / "evidence").write_text("a file where the evidence folder goes: every write fails")
    worker = ScanWorker(harness.settings(sandbox / "zoo" / "shadow.npz", sandbox / "out", sandbox / "cache"))
    with caplog.at_level(logging.WARNING, logger="decree_ray.worker"):
        rows = harness.scan_source(str(sandbox / "zoo" / "encoders" / "enc1.safetensors"), worker, arch=TINY_ARCH)
    worker.close()
    assert [r["status"] for r in rows] == ["ok"], rows[0]["error"]
    assert rows[0]["verdict"] in ("clean", "trojaned") and rows[0]["error"] is None
    assert [rows[0][k] for k in ("evidence_mask", "evidence_pattern", "evidence_stamp")] == [None, None, None]
    assert "not written" in caplog.text
    record("infrastructure", "evidence write failing after a finished scan", 1,
           "ok row kept (verdict intact, evidence columns null); the failure is logged")
