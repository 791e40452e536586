"""The Ray job on a real local Ray: one row per encoder, errors as rows, S3 in and out, resume, timeouts."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from conftest import FAST_OVERRIDES, TINY_ARCH, TINY_SIZE, upload_folder, write_unsafe_pickle
from safetensors.torch import load_file, save_file

from decree_ray import results as results_mod
from decree_ray.job import JobConfig, JobError, init_local_ray, run_job
from decree_ray.progress import Reporter
from decree_ray.schema import VOLATILE_COLUMNS

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def local_ray(moto_server):
    import ray

    init_local_ray(2)
    yield
    ray.shutdown()


def _config(source, shadow, out, **kw) -> JobConfig:
    base = dict(steps=3, overrides=FAST_OVERRIDES, num_workers=2, flush_every=2, timeout=120.0)
    base.update(kw)
    return JobConfig(source=str(source), shadow=str(shadow), out=str(out), **base)


def _rerun_config(source, shadow, out, **kw) -> JobConfig:
    """One actor: these tests check what the driver keeps, reuses or rescans across runs, not concurrency (a second
    actor on two cores costs each of their jobs about 2 s of start-up)."""
    return _config(source, shadow, out, **{"num_workers": 1, **kw})


def _by_id(rows):
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"duplicate rows: {ids}"
    return {r["id"]: r for r in rows}


@pytest.mark.s3
def test_s3_manifest_scan_writes_one_row_per_entry_and_turns_failures_into_rows(local_ray, s3, zoo, tmp_path):
    client, bucket, endpoint = s3
    src = upload_folder(client, bucket, zoo, "zoo")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "garbage.pt").write_bytes(b"not a checkpoint at all")
    write_unsafe_pickle(bad / "evil.pt")
    sd = load_file(str(zoo / "encoders" / "enc1.safetensors"))
    key = next(k for k, v in sd.items() if v.is_floating_point())
    sd[key] = torch.full_like(sd[key], float("nan"))
    save_file(sd, str(bad / "nan.safetensors"))
    for path in bad.iterdir():
        client.upload_file(str(path), bucket, f"zoo/encoders/{path.name}")
    extra = [
        ("garbage", "encoders/garbage.pt"),
        ("evil", "encoders/evil.pt"),
        ("nan", "encoders/nan.safetensors"),
        ("missing", "encoders/missing.safetensors"),
        ("escape", "../secrets/x.safetensors"),
        ("absolute", "/etc/passwd.pt"),
    ]
    manifest = (zoo / "manifest.jsonl").read_text() + "".join(
        json.dumps({"id": i, "uri": u, "arch": TINY_ARCH, "image_size": TINY_SIZE}) + "\n" for i, u in extra
    )
    client.put_object(Bucket=bucket, Key="zoo/manifest.jsonl", Body=manifest.encode())
    out = f"s3://{bucket}/out"

    summary = run_job(_config(f"{src}/manifest.jsonl", f"{src}/shadow.npz", out, endpoint_url=endpoint))

    rows = _by_id(results_mod.load_rows(out, _config("", "", out, endpoint_url=endpoint).s3))
    assert set(rows) == {"enc0", "enc1", "enc2", "copy-of-enc0", *(i for i, _ in extra)}
    for name in ("enc0", "enc1", "enc2", "copy-of-enc0"):
        assert rows[name]["status"] == "ok", rows[name]["error"]
        assert rows[name]["verdict"] in ("trojaned", "clean") and math.isfinite(rows[name]["pl1_norm"])
    want_sha = hashlib.sha256((zoo / "encoders" / "enc0.safetensors").read_bytes()).hexdigest()
    assert rows["enc0"]["sha256"] == rows["copy-of-enc0"]["sha256"] == want_sha
    assert rows["enc0"]["pl1_norm"] == rows["copy-of-enc0"]["pl1_norm"]
    # the compacted table carries the fleet statistics: 4 comparable encoders are too few, the threshold decides
    assert {rows[n]["verdict_basis"] for n in ("enc0", "enc1", "enc2")} == {"threshold"}
    assert rows["enc0"]["fleet_peers"] == 4 and rows["enc0"]["image_size"] == TINY_SIZE
    assert rows["enc0"]["shadow_sha256"] and rows["enc0"]["patch_verdict"] == rows["enc0"]["verdict"]
    assert summary.flagged == sum(r["verdict"] == "trojaned" for r in rows.values())
    assert rows["enc0"]["label"] == "trojaned" and rows["enc1"]["label"] == "clean"
    # identical content is scanned once; missing/escape/absolute never reach a scan
    assert summary.scanned == 6 and summary.reused == 1
    assert summary.total == 10 and summary.errors == 6
    for name in ("garbage", "evil", "nan", "missing", "escape", "absolute"):
        assert rows[name]["status"] == "error" and rows[name]["error"], name
        assert rows[name]["verdict"] is None
    assert any(g.endswith("system") for g in rows["evil"]["unsafe_globals"])
    assert "escapes" in rows["escape"]["error"] and "absolute" in rows["absolute"]["error"]
    assert "non-finite" in rows["nan"]["error"].lower() or "nan" in rows["nan"]["error"].lower()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    assert "out/results.parquet" in keys and not any(k.startswith("out/parts/") for k in keys)
    mask = rows["enc1"]["evidence_mask"]
    assert mask.startswith(f"s3://{bucket}/out/evidence/") and mask[len(f"s3://{bucket}/") :] in keys


class _Interrupt(Reporter):
    """Ctrl-C on the driver after `after` rows."""

    def __init__(self, after: int):
        self.after = after

    def update(self, counts) -> None:
        if counts.done >= self.after:
            raise KeyboardInterrupt


def _stable(rows):
    out = {}
    for r in rows:
        out[r["id"]] = {
            k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items() if k not in VOLATILE_COLUMNS
        }
    return out


def test_resume_after_interrupt_scans_only_unfinished_encoders_and_matches_a_clean_run(local_ray, zoo, tmp_path):
    manifest, shadow = zoo / "manifest.jsonl", zoo / "shadow.npz"
    clean = run_job(_config(manifest, shadow, tmp_path / "clean"))
    assert clean.scanned == 3 and clean.total == 4

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_job(_config(manifest, shadow, out, flush_every=1), _Interrupt(after=2))
    partial = results_mod.load_rows(str(out))
    assert 2 <= len(partial) < 4
    done = {r["sha256"] for r in partial if r["status"] == "ok"}
    all_shas = {r["sha256"] for r in results_mod.load_rows(str(tmp_path / "clean"))}

    resumed = run_job(_config(manifest, shadow, out))

    assert resumed.scanned == len(all_shas - done)  # finished content is never scanned again
    assert resumed.total == 4 and resumed.errors == 0
    assert _stable(results_mod.load_rows(str(out))) == _stable(results_mod.load_rows(str(tmp_path / "clean")))


def test_a_rerun_with_other_settings_rescans_instead_of_keeping_the_earlier_verdicts(local_ray, zoo, tmp_path):
    manifest, shadow, out = zoo / "manifest.jsonl", zoo / "shadow.npz", tmp_path / "out"
    smoke = run_job(_rerun_config(manifest, shadow, out, steps=1))
    assert smoke.scanned == 3 and smoke.other_settings == 0
    same = run_job(_rerun_config(manifest, shadow, out, steps=1))
    assert same.scanned == 0 and same.reused_unchanged == 4  # identical settings, unchanged files: nothing to do
    real = run_job(_rerun_config(manifest, shadow, out, steps=3))
    assert real.scanned == 3 and real.other_settings == 4  # the smoke run's rows did not decide this one
    rows = results_mod.load_rows(str(out))
    assert len(rows) == 4 and all(r["steps"] > 1 or r["steps"] == 3 for r in rows if r["status"] == "ok")
    threshold = run_job(_rerun_config(manifest, shadow, out, steps=3, threshold=0.5))
    assert threshold.scanned == 3  # the threshold changes verdicts (and where settling stops): rescanned


NEVER_ENDING = FAST_OVERRIDES + (("min_steps", 10**7), ("early_stop_patience", 10**7), ("settle_fraction", 0.0))


def test_timeout_records_an_error_row_and_a_fresh_actor_takes_the_next_encoder(local_ray, zoo, tmp_path):
    config = _config(
        zoo / "encoders",
        zoo / "shadow.npz",
        tmp_path / "out",
        arch=TINY_ARCH,
        steps=10**7,
        overrides=NEVER_ENDING,
        timeout=4.0,
        num_workers=1,
        max_encoders=2,
    )

    summary = run_job(config)

    rows = results_mod.load_rows(str(tmp_path / "out"))
    assert len(rows) == 2 and summary.errors == 2
    assert all(r["status"] == "error" and "timed out after 4s" in r["error"] for r in rows)


class _KillWorkers(Reporter):
    """SIGKILLs this test's own ScanWorker processes (descendants of this process) while they hold an encoder."""

    def __init__(self):
        self.killed: set[int] = set()

    def update(self, counts) -> None:
        import psutil

        if counts.running < 1:
            return
        for proc in psutil.Process().children(recursive=True):
            try:
                title = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if title.startswith("ray::ScanWorker") and proc.pid not in self.killed:
                self.killed.add(proc.pid)
                proc.kill()


def test_an_encoder_whose_worker_keeps_dying_is_retried_then_recorded_as_an_error(local_ray, zoo, tmp_path):
    killer = _KillWorkers()
    config = _config(
        zoo / "encoders" / "enc1.safetensors",
        zoo / "shadow.npz",
        tmp_path / "out",
        arch=TINY_ARCH,
        steps=10**7,
        overrides=NEVER_ENDING,
        num_workers=1,
        max_retries=1,
    )

    summary = run_job(config, killer)

    rows = results_mod.load_rows(str(tmp_path / "out"))
    assert len(rows) == 1 and rows[0]["status"] == "error"
    assert "worker died 2 times" in rows[0]["error"]
    assert summary.retried == 1 and len(killer.killed) == 2


def test_asking_for_gpus_on_a_cluster_without_any_fails_fast(local_ray, zoo, tmp_path):
    config = _config(zoo / "manifest.jsonl", zoo / "shadow.npz", tmp_path / "out", gpus_per_encoder=0.5)
    with pytest.raises(JobError, match="GPU"):
        run_job(config)


def test_a_corrupt_part_file_is_skipped_and_set_aside_by_compaction(tmp_path):
    import pyarrow.parquet as pq

    from decree_ray.schema import new_row, to_table

    (tmp_path / "parts").mkdir()
    pq.write_table(to_table([new_row(id="a", uri="u", status="ok")]), tmp_path / "parts" / "part-1.parquet")
    (tmp_path / "parts" / "part-2.parquet").write_bytes(b"PAR1 truncated")
    with pytest.warns(UserWarning, match="part-2"):
        assert [r["uri"] for r in results_mod.load_rows(str(tmp_path))] == ["u"]
    with pytest.warns(UserWarning):
        results_mod.compact(str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["part-2.parquet.corrupt"]
    assert [r["uri"] for r in results_mod.load_rows(str(tmp_path))] == ["u"]


def test_content_key_separates_what_changes_a_scan_and_only_that():
    from decree_ray.sources import EncoderTask

    base = EncoderTask(id="a", uri="s3://b/x/a.safetensors", arch=TINY_ARCH, image_size=32)
    key = results_mod.task_content_key("f" * 64, base, "fast")
    same = EncoderTask(id="other", uri="/elsewhere/copy.SAFETENSORS", arch=TINY_ARCH, image_size=32, label="clean")
    assert results_mod.task_content_key("f" * 64, same, "fast") == key  # id, location, label, suffix case: same scan
    variants = [
        EncoderTask(id="a", uri="s3://b/x/a.safetensors", arch=TINY_ARCH, image_size=16),
        EncoderTask(id="a", uri="s3://b/x/a.safetensors", arch=TINY_ARCH, image_size=32, mean=(0.5, 0.5, 0.5)),
        EncoderTask(id="a", uri="s3://b/x/a.safetensors", arch=TINY_ARCH, image_size=32, std=(0.2, 0.2, 0.2)),
        EncoderTask(id="a", uri="s3://b/x/a.pt", arch=TINY_ARCH, image_size=32),
        EncoderTask(id="a", uri="s3://b/x/a.safetensors", arch="timm/resnet18", image_size=32),
    ]
    keys = {results_mod.task_content_key("f" * 64, t, "fast") for t in variants}
    keys |= {results_mod.task_content_key("e" * 64, base, "fast"), results_mod.task_content_key("f" * 64, base, "paper")}
    keys |= {results_mod.task_content_key("f" * 64, base, "fast", results_mod.settings_key(profile="fast", steps=5))}
    assert key not in keys and len(keys) == len(variants) + 3
    a = results_mod.settings_key(profile="fast", overrides=(("tau", 0.9),), shadow_sha256="s")
    assert a != results_mod.settings_key(profile="fast", overrides=(("tau", 0.8),), shadow_sha256="s")
    assert a != results_mod.settings_key(profile="fast", overrides=(("tau", 0.9),), shadow_sha256="t")
    assert results_mod.made_with(results_mod.task_content_key("f" * 64, base, "fast", a), lambda _arch: a) is True


def test_a_table_from_before_the_content_key_column_still_resumes_its_own_uris_only(local_ray, zoo, tmp_path):
    """Old ok rows (content_key null) are reused for the same uri; an identical copy elsewhere is scanned."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(zoo / "encoders" / "enc1.safetensors", src / "a.safetensors")
    out = tmp_path / "out"
    run_job(_rerun_config(src, zoo / "shadow.npz", out, arch=TINY_ARCH))
    table = pq.read_table(out / "results.parquet")
    old = table.set_column(table.schema.get_field_index("content_key"), "content_key", pa.nulls(table.num_rows, pa.string()))
    pq.write_table(old, out / "results.parquet")
    shutil.copy(src / "a.safetensors", src / "b.safetensors")

    summary = run_job(_rerun_config(src, zoo / "shadow.npz", out, arch=TINY_ARCH))

    assert (summary.reused, summary.scanned) == (1, 1)
    rows = _by_id(results_mod.load_rows(str(out)))
    assert rows["a.safetensors"]["content_key"] == rows["b.safetensors"]["content_key"] is not None


def _folder_with_sidecars(zoo, folder):
    folder.mkdir()
    for path in sorted((zoo / "encoders").iterdir()):
        (folder / path.name).write_bytes(path.read_bytes())
        (folder / f"{path.name}.json").write_text(json.dumps({"arch": TINY_ARCH, "image_size": TINY_SIZE}))
    return folder


def test_a_rerun_reuses_unchanged_entries_without_downloading_and_refetches_changed_ones(local_ray, zoo, tmp_path):
    folder = _folder_with_sidecars(zoo, tmp_path / "fleet")
    shadow, out = zoo / "shadow.npz", tmp_path / "out"
    first = run_job(_rerun_config(folder, shadow, out))
    assert first.scanned == 3 and first.reused == 1 and first.reused_unchanged == 0

    again = run_job(_rerun_config(folder, shadow, out))
    assert (again.scanned, again.reused, again.reused_unchanged) == (0, 0, 4)  # nothing fetched at all
    assert again.workers == 0  # nothing to fetch: no actor started, so a cluster is asked for no GPU node

    # the same bytes rewritten: a new ctime, so fetched and hashed again, then reused by content
    (folder / "enc1.safetensors").write_bytes((folder / "enc1.safetensors").read_bytes())
    # another preprocessing in the sidecar: the key changes, so it is scanned again
    (folder / "enc2.safetensors.json").write_text(json.dumps({"arch": TINY_ARCH, "image_size": TINY_SIZE + 8}))
    third = run_job(_rerun_config(folder, shadow, out))
    assert (third.scanned, third.reused, third.reused_unchanged) == (1, 1, 2)
    rows = _by_id(results_mod.load_rows(str(out)))
    assert rows["enc2.safetensors"]["image_size"] == TINY_SIZE + 8
    assert all(r["source_identity"].startswith("file:") for r in rows.values())


def test_a_listing_of_one_encoder_starts_one_actor_however_many_are_allowed(local_ray, zoo, tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "enc1.safetensors").write_bytes((zoo / "encoders" / "enc1.safetensors").read_bytes())
    summary = run_job(_config(folder, zoo / "shadow.npz", tmp_path / "out", arch=TINY_ARCH, num_workers=2))
    assert (summary.scanned, summary.workers) == (1, 1)


def test_other_settings_never_reuse_an_unchanged_entry(local_ray, zoo, tmp_path):
    folder = _folder_with_sidecars(zoo, tmp_path / "fleet")
    shadow, out = zoo / "shadow.npz", tmp_path / "out"
    run_job(_rerun_config(folder, shadow, out, steps=1))
    real = run_job(_rerun_config(folder, shadow, out, steps=3))
    assert real.reused_unchanged == 0 and real.scanned == 3


@pytest.mark.s3
def test_an_s3_rerun_of_a_finished_scan_downloads_no_checkpoint(local_ray, s3, zoo, tmp_path, caplog):
    import logging

    client, bucket, endpoint = s3
    src = upload_folder(client, bucket, _folder_with_sidecars(zoo, tmp_path / "fleet"), "fleet")
    out = f"s3://{bucket}/scan"
    shadow = upload_folder(client, bucket, zoo, "z") + "/shadow.npz"
    run_job(_rerun_config(src, shadow, out, endpoint_url=endpoint))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        again = run_job(_rerun_config(src, shadow, out, endpoint_url=endpoint))
    assert again.reused_unchanged == 4 and again.scanned == 0
    gets = [r.getMessage() for r in caplog.records if '"GET /' in r.getMessage()]
    assert gets and not [g for g in gets if ".safetensors " in g or ".safetensors?" in g], gets
