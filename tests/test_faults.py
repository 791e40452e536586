"""Failing infrastructure: the final table equals a fault-free run's rows (timing columns aside), no row lost.

The Ray tests share one local Ray (num_cpus=2); the driver-kill test runs `decree scan` as a separate driver
process connected to it (--address), the way a scan runs against a real cluster.
Node removal from a multi-node cluster is tests/test_cluster.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import FAST_OVERRIDES, upload_folder
from faults import harness
from faults.proxy import FaultProxy
from faults.ray_faults import Killer, kill_all, track_actors
from faults.fixtures import gap, rec, record  # noqa: F401 - fixtures
from faults.zoo import TINY_ARCH, TINY_SIZE, make_zoo, write_encoder

from decree_ray import job as job_mod
from decree_ray.bases import resolve
from decree_ray import results as results_mod
from decree_ray.job import JobConfig, JobError, init_local_ray, run_job
from decree_ray.storage import DEFAULT_S3, S3Options, s3_client
from decree_ray.worker import ScanWorker

pytestmark = [pytest.mark.ray]
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """This module's own tiny zoo (conftest's layout)."""
    return make_zoo(tmp_path_factory.mktemp("zoo"))


def _config(source, shadow, out, **kw) -> JobConfig:
    # no default consensus: these compare dispatch and retries against the worker path alone (the hostile-files
    # test below turns it on, where hostile members are the point)
    base = {"steps": 3, "overrides": FAST_OVERRIDES, "num_workers": 2, "flush_every": 2, "timeout": 120.0,
            "consensus": False}
    base.update(kw)
    return JobConfig(source=str(source), shadow=str(shadow), out=str(out), **base)


def _encoders(root: Path, n: int, seed: int) -> Path:
    for i in range(n):
        write_encoder(root / "encoders" / f"m{i}.safetensors", seed=seed + i)
    return root / "encoders"


@pytest.fixture(scope="module")
def folder(tmp_path_factory, zoo):
    """Four distinct tiny encoders in a local folder, the zoo's shadow set, and their fault-free rows."""
    root = tmp_path_factory.mktemp("faults")
    source = _encoders(root, 4, seed=200)
    return source, zoo / "shadow.npz", _reference(source, zoo / "shadow.npz", root, steps=KILL_STEPS)


KILL_STEPS = 8


def _reference(source, shadow, tmp, *, steps=3, arch=TINY_ARCH, s3=DEFAULT_S3):
    """Stable rows of a fault-free scan through the worker path (no Ray)."""
    worker = ScanWorker(harness.settings(shadow, tmp / "ref-out", tmp / "ref-cache", steps=steps, s3=s3))
    rows = harness.scan_source(str(source), worker, arch=arch, s3=s3)
    worker.close()
    return harness.stable(rows)


def _results_table(out: str, options: S3Options = DEFAULT_S3):
    """The raw results.parquet (not de-duplicated): what a reader gets."""
    return results_mod.read_table(results_mod.results_path(out), options).to_pylist()


def test_a_corrupt_part_file_is_skipped_and_does_not_stop_the_next_run(tmp_path, record):
    from decree_ray.schema import new_row, to_table

    (tmp_path / "parts").mkdir()
    pq.write_table(to_table([new_row(id="a", uri="u", status="ok")]), tmp_path / "parts" / "part-1.parquet")
    (tmp_path / "parts" / "part-2.parquet").write_bytes(b"PAR1 truncated")
    assert [r["uri"] for r in results_mod.load_rows(str(tmp_path))] == ["u"]
    results_mod.compact(str(tmp_path))
    assert [r["uri"] for r in _results_table(str(tmp_path))] == ["u"]
    record("infrastructure", "an unreadable part file in parts/ (external corruption)", 1,
           "skipped when reading and compacting; its encoders would simply be scanned again; valid rows kept")


# ------------------------------------------------------------------------------- output store failing mid-write


@pytest.fixture(scope="module")
def s3_zoo(moto_server, zoo):
    """A bucket with the conftest zoo (3 encoders + a byte-identical copy, manifest, shadow set)."""
    client = s3_client(S3Options(moto_server))
    bucket = f"f-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    src = upload_folder(client, bucket, zoo, "zoo")
    return client, bucket, src


def _objects(client, bucket, prefix):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o for page in pages for o in page.get("Contents", ())]


# ------------------------------------------------------------------------------------------ one shared Ray


@pytest.fixture(scope="module")
def local_ray(moto_server):
    import ray

    init_local_ray(2)
    yield ray
    ray.shutdown()


# ------------------------------------------------------------------------------- driver killed, then re-run


def _scan_cmd(source, shadow, out, steps, address):
    """`decree scan` as a separate driver process on the module's Ray cluster (as with --address on a real one);
    without the consensus, as _config, since the reference rows come from the worker path alone."""
    return [sys.executable, str(HERE / "faults" / "driver.py"), "scan", str(source), "--shadow", str(shadow),
            "--out", str(out), "--arch", TINY_ARCH, "--steps", str(steps), "--workers", "2", "--address", address,
            "--quiet", "--timeout", "300", "--no-consensus", *[a for k, v in FAST_OVERRIDES for a in ("--set", f"{k}={v}")]]


def _kill_group(proc):
    """The driver is gone; end what it started (its own session, created by us)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_driver_killed_mid_scan_resumes_with_no_duplicate_or_missing_rows(local_ray, folder, tmp_path, record):
    source, shadow, reference = folder
    out, steps = tmp_path / "out", KILL_STEPS
    address = local_ray.get_runtime_context().gcs_address
    proc = subprocess.Popen(_scan_cmd(source, shadow, out, steps, address), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if list((out / "parts").glob("part-*.parquet")):
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as an OOM killer or a lost laptop would
        proc.wait(timeout=30)
    finally:
        _kill_group(proc)
    before = results_mod.load_rows(str(out))
    assert 1 <= len(before) < 4 and not (out / "results.parquet").exists()
    # what a kill during a local write leaves behind: a temp file, never a *.parquet part
    (out / "parts" / ".part-killed.parquet.0123.tmp").write_bytes(b"PAR1 half a file")

    rerun = subprocess.run(_scan_cmd(source, shadow, out, steps, address), check=False, capture_output=True, text=True, timeout=300,
                           start_new_session=True)

    assert rerun.returncode in (0, 1), rerun.stdout[-3000:] + rerun.stderr[-3000:]
    scanned = int(re.search(r"scanned\D+(\d+)", rerun.stdout).group(1))
    assert scanned == 4 - len(before), rerun.stdout  # finished encoders were not scanned again
    rows = _results_table(str(out))
    assert sorted(r["uri"] for r in rows) == sorted(str(p) for p in source.iterdir())  # each once
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert not list((out / "parts").glob("part-*.parquet"))
    assert harness.stable(rows) == reference
    record("infrastructure", "driver SIGKILLed mid-scan (`decree scan` subprocess), command re-run; a killed "
           "write's temp file left in parts/", 1,
           f"re-run resumed: scanned only the {4 - len(before)} unfinished of 4; results.parquet has each uri once, "
           "rows equal a fault-free scan", rows_lost=4 - len(rows))


@pytest.mark.s3
def test_s3_errors_and_throttling_are_retried_and_the_table_equals_a_fault_free_run(local_ray, moto_server, s3_zoo, tmp_path, record):
    _client, bucket, src = s3_zoo
    faulty_out = f"s3://{bucket}/faulty"
    opts = S3Options(moto_server)
    worker = ScanWorker(harness.settings(f"{src}/shadow.npz", tmp_path / "ref-out", tmp_path / "ref-cache", s3=opts))
    clean = harness.scan_source(f"{src}/manifest.jsonl", worker, s3=opts)  # fault-free, same rows as the job's
    worker.close()
    proxy = FaultProxy(moto_server, rate=0.25, seed=7)
    endpoint = proxy.start()
    try:
        summary = run_job(_config(f"{src}/manifest.jsonl", f"{src}/shadow.npz", faulty_out, endpoint_url=endpoint,
                                  retry_mode="standard", max_attempts=4))
    finally:
        proxy.stop()
    faulty = _results_table(faulty_out, opts)
    assert summary.total == len(faulty) == len(clean) == 4
    assert harness.stable(faulty) == harness.stable(clean)
    assert all(r["status"] == "ok" for r in faulty)
    assert set(proxy.injected) == {"500", "503", "SlowDown", "reset"}, proxy.injected
    assert proxy.injected_methods["GET"] and proxy.injected_methods["PUT"], proxy.injected_methods
    n = sum(proxy.injected.values())
    record("infrastructure", "S3 answering 500 / 503 / SlowDown / dropped connections for 25% of requests "
           "(fault proxy in front of moto; reads, listings and writes)", n,
           f"{dict(proxy.injected)} over {proxy.requests} requests, all retried by botocore; table equals the "
           "fault-free run", rows_lost=4 - len(faulty))


def test_killed_workers_are_replaced_and_an_encoder_past_its_retry_budget_is_an_error_row(local_ray, folder, tmp_path, monkeypatch, record):
    source, shadow, reference = folder
    plan = {"m1.safetensors": ("ray.kill", 1), "m2.safetensors": ("sigkill", 1), "m3.safetensors": ("sigkill", 99)}
    killer = Killer(local_ray, plan)
    monkeypatch.setattr(job_mod._Job, "_submit", lambda job, *a: killer(job, *a))

    summary = run_job(_config(source, shadow, tmp_path / "out", arch=TINY_ARCH, steps=KILL_STEPS, max_retries=1))

    rows = {r["id"]: r for r in _results_table(str(tmp_path / "out"))}
    lost = 4 - len(rows)
    assert sorted(rows) == [f"m{i}.safetensors" for i in range(4)]
    assert killer.kills == {"ray.kill": 1, "sigkill": 3} and summary.retried == 3
    dead = rows.pop("m3.safetensors")  # killed on both attempts
    assert dead["status"] == "error" and "worker died 2 times" in dead["error"] and dead["verdict"] is None
    assert all(r["status"] == "ok" for r in rows.values()), [r["error"] for r in rows.values()]
    assert harness.stable(list(rows.values())) == {k: v for k, v in reference.items() if not k.endswith("m3.safetensors")}
    record("infrastructure", "actor killed mid-encoder (ray.kill)", 1,
           "encoder retried on a fresh actor; row ok and equal to a fault-free scan", rows_lost=lost)
    record("infrastructure", "worker process SIGKILLed mid-encoder (as the OOM killer does)", 1,
           "encoder retried on a fresh actor; row ok and equal to a fault-free scan", rows_lost=lost)
    record("infrastructure", "an encoder whose worker is SIGKILLed on every attempt (max_retries=1)", 2,
           "error row 'worker died 2 times'; the other rows of the run ok", rows_lost=lost)


def test_encoders_queued_behind_a_killed_one_are_requeued_without_spending_their_retry_budget(local_ray, folder, tmp_path, monkeypatch, record):
    source, shadow, reference = folder
    killer = Killer(local_ray, {"m0.safetensors": ("ray.kill", 1)})
    monkeypatch.setattr(job_mod._Job, "_submit", lambda job, *a: killer(job, *a))

    config = _config(source, shadow, tmp_path / "out", arch=TINY_ARCH, steps=KILL_STEPS, max_retries=0,
                     num_workers=1, prefetch=2)
    summary = run_job(config)

    rows = {r["id"]: r for r in _results_table(str(tmp_path / "out"))}
    assert sorted(rows) == [f"m{i}.safetensors" for i in range(4)] and killer.kills == {"ray.kill": 1}
    dead = rows.pop("m0.safetensors")  # the one the actor was running: no retries allowed
    assert dead["status"] == "error" and "worker died 1 times" in dead["error"] and summary.retried == 0
    assert harness.stable(list(rows.values())) == {k: v for k, v in reference.items() if not k.endswith("m0.safetensors")}
    record("infrastructure", "actor killed with encoders queued behind the one it runs (prefetch 2)", 1,
           "the running encoder is the error row; the queued ones rerun on a fresh actor, rows ok", rows_lost=4 - len(rows) - 1)


def test_ray_job_over_hostile_and_broken_files_gives_the_same_rows_as_the_worker_path(local_ray, zoo, tmp_path, record):
    import torch
    from faults.hostile import build_broken, build_hostile
    from safetensors.torch import save_file

    from decree.encoders import create_encoder

    torch.manual_seed(0)
    good = {k: v.contiguous() for k, v in create_encoder(TINY_ARCH, image_size=TINY_SIZE).backbone.state_dict().items()}
    enc = tmp_path / "zoo" / "encoders"
    enc.mkdir(parents=True)
    save_file(good, str(enc / "good.safetensors"))
    markers, victim = tmp_path / "markers", tmp_path / "victim"
    markers.mkdir()
    victim.mkdir()
    other = create_encoder("torchvision/resnet18").backbone.state_dict()
    cases = build_hostile(enc, markers, victim, good) + build_broken(enc, enc / "good.safetensors", good, other)
    # identical bytes under one arch are scanned once by design (zero.pt / zero.safetensors): keep one of each
    unique = {(hashlib.sha256((enc / c.name).read_bytes()).digest(), c.arch): c for c in reversed(cases)}
    cases = [c for c in cases if c in unique.values()]
    manifest = tmp_path / "zoo" / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"id": c.name, "uri": f"encoders/{c.name}", "arch": c.arch or TINY_ARCH}) + "\n"
                                for c in cases) + json.dumps({"id": "good", "uri": "encoders/good.safetensors", "arch": TINY_ARCH}) + "\n")

    # by default the job picks consensus members among these files: hostile and broken members must cost no more
    # than their own rows
    summary = run_job(_config(manifest, zoo / "shadow.npz", tmp_path / "out", consensus=True))

    rows = _results_table(str(tmp_path / "out"))
    assert summary.total == len(rows) == len(cases) + 1 and summary.errors == len(cases)
    assert list(markers.iterdir()) == [] and victim.is_dir()
    picked = summary.consensus[TINY_ARCH]
    assert 3 <= len(picked) <= 9 and all(uri.startswith(str(enc)) for uri in picked)
    worker = ScanWorker(harness.settings(zoo / "shadow.npz", tmp_path / "o2", tmp_path / "c2",
                                         bases=resolve((), summary.consensus), auto_bases=tuple(summary.consensus)))
    assert harness.stable(rows) == harness.stable(harness.scan_source(str(manifest), worker))
    worker.close()
    unsafe = [r for r in rows if r["unsafe_globals"]]
    assert len(unsafe) == sum(1 for c in cases if c.blocked)
    record("hostile checkpoint", "hostile + broken files through the Ray job (one Ray-level run)", len(rows),
           f"{summary.errors} error rows, {len(unsafe)} with unsafe_globals, 1 ok; identical to the worker path; "
           "no payload ran", rows_lost=len(cases) + 1 - len(rows))


def test_a_corrupt_shadow_set_stops_the_job_with_a_clear_error_and_no_verdict(local_ray, folder, tmp_path, record):
    source = folder[0]
    bad = tmp_path / "shadow.npz"
    bad.write_bytes(b"this is not an npz file")

    with pytest.raises(JobError, match="scan worker failed to start.*shadow"):
        run_job(_config(source, bad, tmp_path / "out", arch=TINY_ARCH))

    rows = results_mod.load_rows(str(tmp_path / "out"))
    assert all(r["verdict"] is None for r in rows)
    record("broken input", "corrupt shadow set given to the Ray job", 1,
           "JobError 'scan worker failed to start: ... shadow ...' (CLI exit 2); no verdict written")


@pytest.mark.s3
def test_output_prefix_failing_mid_write_leaves_nothing_half_written_and_a_rerun_completes(local_ray, moto_server, s3_zoo, monkeypatch, record):
    client, bucket, src = s3_zoo
    proxy = FaultProxy(moto_server)
    endpoint = proxy.start()
    actors = track_actors(monkeypatch)
    try:
        proxy.fail_writes_under = f"/{bucket}/bad-out/"
        proxy.writes_ok = 3  # a few evidence/part uploads get through, then every write dies mid-body
        out = f"s3://{bucket}/bad-out"
        cfg = _config(f"{src}/manifest.jsonl", f"{src}/shadow.npz", out, endpoint_url=endpoint, flush_every=1,
                      retry_mode="standard", max_attempts=2)
        with pytest.raises(Exception) as err:
            run_job(cfg)
        kill_all(local_ray, actors)  # see test_a_job_that_fails_to_write_releases_its_actors
        assert proxy.cut_writes > 0, "the fault never fired"
        written = _objects(client, bucket, "bad-out/")
        for obj in written:  # every object that exists is complete: parts and results parse with the schema
            if obj["Key"].endswith(".parquet"):
                results_mod.read_table(f"s3://{bucket}/{obj['Key']}", S3Options(moto_server))
        partial = results_mod.load_rows(out, S3Options(moto_server))
        assert all(r["status"] in ("ok", "error") for r in partial)

        proxy.fail_writes_under = None
        summary = run_job(_config(f"{src}/manifest.jsonl", f"{src}/shadow.npz", out, endpoint_url=endpoint))
    finally:
        proxy.stop()
        kill_all(local_ray, actors)
    rows = _results_table(out, S3Options(moto_server))
    assert summary.total == 4 and len(rows) == 4 and len({r["uri"] for r in rows}) == 4
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert not any(o["Key"].startswith("bad-out/parts/") for o in _objects(client, bucket, "bad-out/"))
    record("infrastructure", "S3 output prefix failing mid-write (uploads cut after half the body, beyond the "
           "retry budget)", proxy.cut_writes,
           f"job stopped with {type(err.value).__name__}; the {len(written)} objects that exist all parse; no "
           "half-written object; re-run completed all 4 rows", rows_lost=4 - len(rows))




@pytest.mark.s3
def test_a_job_that_fails_to_write_releases_its_actors(local_ray, moto_server, s3_zoo, monkeypatch, record):
    """The output store failing must not leave actors holding their CPUs/GPUs (long-lived drivers, clusters)."""
    _client, bucket, src = s3_zoo
    proxy = FaultProxy(moto_server)
    endpoint = proxy.start()
    proxy.fail_writes_under = f"/{bucket}/leak-out/"
    actors = track_actors(monkeypatch)
    try:
        with pytest.raises(Exception):  # noqa: B017
            run_job(_config(f"{src}/manifest.jsonl", f"{src}/shadow.npz", f"s3://{bucket}/leak-out",
                            endpoint_url=endpoint, flush_every=1, retry_mode="standard", max_attempts=1, max_encoders=1,
                            num_workers=1))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and local_ray.available_resources().get("CPU", 0) < 2:
            time.sleep(0.5)
        assert local_ray.available_resources().get("CPU", 0) == 2
    finally:
        proxy.stop()
        kill_all(local_ray, actors)
    record("infrastructure", "S3 output prefix refusing every write (job fails)", 1,
           "job raised; its actors were stopped and their CPUs returned to the cluster")


def test_an_infrastructure_error_from_the_job_exits_2_never_1(monkeypatch, record):
    """Exit 1 means "backdoors found": a storage failure must never read as that."""
    from botocore.exceptions import ConnectionClosedError
    from typer.testing import CliRunner

    from decree_ray.cli import app

    def failing_run_job(config, reporter=None):
        raise ConnectionClosedError(endpoint_url="http://127.0.0.1:9/b/out/results.parquet")

    monkeypatch.setattr(job_mod, "run_job", failing_run_job)
    result = CliRunner().invoke(app, ["scan", "s3://b/m.jsonl", "--shadow", "s3://b/s.npz", "--out", "s3://b/out", "--quiet"])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)


def test_identical_bytes_scanned_at_another_image_size_are_not_reused(local_ray, zoo, tmp_path, record):
    """The content key covers how the bytes are read and fed (image_size, mean, std, format), not just the bytes."""
    enc = tmp_path / "encoders"
    enc.mkdir()
    for name in ("a", "b", "c"):
        (enc / f"{name}.safetensors").write_bytes((zoo / "encoders" / "enc1.safetensors").read_bytes())
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"id": "a", "uri": "encoders/a.safetensors", "arch": TINY_ARCH, "image_size": 32}) + "\n")
    run_job(_config(manifest, zoo / "shadow.npz", tmp_path / "out"))
    with open(manifest, "a") as fh:
        fh.write(json.dumps({"id": "b", "uri": "encoders/b.safetensors", "arch": TINY_ARCH, "image_size": 16}) + "\n")
        # same bytes, same preprocessing as `a`: resume still reuses its row
        fh.write(json.dumps({"id": "c", "uri": "encoders/c.safetensors", "arch": TINY_ARCH, "image_size": 32}) + "\n")

    summary = run_job(_config(manifest, zoo / "shadow.npz", tmp_path / "out"))

    # a is unchanged (its row kept without a download), c reuses a's row by content, b is scanned
    assert (summary.reused_unchanged, summary.reused, summary.scanned) == (1, 1, 1)
    rows = {r["id"]: r for r in results_mod.load_rows(str(tmp_path / "out"))}
    assert rows["c"]["content_key"] == rows["a"]["content_key"] != rows["b"]["content_key"]
    assert rows["c"]["pl1_norm"] == rows["a"]["pl1_norm"] and rows["a"]["status"] == "ok"
    record("broken input", "identical checkpoint bytes listed at another image_size (and at the same one)", 3,
           "other preprocessing scanned on its own; identical preprocessing reused on resume")
