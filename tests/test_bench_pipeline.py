"""The quality/speed benchmark end to end on a tiny real zoo (Lite0 ImageNet weights, BadEncoder trojans).

Reduced: 2 clean + 2 trojaned encoders, a few dozen inversion steps per profile. Checks the files and their
schema, that trojans get smaller inverted triggers than clean encoders, and that a rerun resumes.
"""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from decree.benchmark import (
    CSV_FIELDS,
    families_of,
    read_zoos,
    roc_metrics,
    run_benchmark,
    select_entries,
    summarize,
)
from decree.errors import InversionError
from decree.zoo import ZooConfig, build_zoo

# A real attack that leaves clean images apart (a stronger one collapses the whole encoder, which would make
# the PL1 ordering trivial); strong enough for the inversion to find the trigger in a few dozen steps.
ZOO = ZooConfig.tiny(n_train=64, n_eval=16, n_shadow=32, batch_size=8, attack_steps=(20,), attack_lrs=(3e-4,),
                     utility_weights=(1.0,))
FAST = {"max_steps": 30, "min_steps": 0, "restarts": 2, "batch_size": 16, "eval_images": 32}
PAPER = {"batch_size": 16, "eval_images": 32}
PAPER_STEPS = 20
SUMMARY_KEYS = {
    "auc_fast", "auc_paper", "tpr_at_5fpr_fast", "tpr_at_5fpr_paper", "seconds_per_encoder_fast",
    "seconds_per_encoder_paper", "speedup", "verdict_agreement", "n_clean", "n_trojaned", "device", "torch",
    "cpu_count", "configs", "families", "paper_max_steps", "zoo_hash",
}


def _bench(zoo, out, **kw):
    args = {"fast_overrides": FAST, "paper_overrides": PAPER, "paper_max_steps": PAPER_STEPS, "device": "cpu",
                "profile_steps": 2, "log": lambda m: None}
    args.update(kw)
    return run_benchmark(zoo, out, **args)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("bench-zoo")
        build_zoo(out, clean=2, trojaned=2, families=("image-on-image",), seed=3, config=ZOO)
        yield out
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench(tiny_zoo, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("bench-out")
        results = _bench(tiny_zoo, out)
        yield out, results
    finally:
        torch.set_num_threads(threads)


def _rows(out):
    with open(out / "encoders.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_results_json_has_summary_per_family_and_environment(bench):
    out, _ = bench
    saved = json.loads((out / "results.json").read_text())
    assert SUMMARY_KEYS <= set(saved), SUMMARY_KEYS - set(saved)
    assert (saved["n_clean"], saved["n_trojaned"]) == (2, 2)
    fam = saved["families"]["image-on-image"]
    assert {"auc_fast", "auc_paper", "tpr_at_5fpr_fast", "tpr_at_5fpr_paper"} <= set(fam)
    assert set(saved["families"]) == {"image-on-image"}  # no CLIP encoders in this zoo
    assert saved["paper_max_steps"] == PAPER_STEPS and saved["configs"]["paper"]["max_steps"] == PAPER_STEPS
    assert saved["configs"]["fast"]["max_steps"] == FAST["max_steps"]
    assert saved["speedup"] == pytest.approx(saved["seconds_per_encoder_paper"] / saved["seconds_per_encoder_fast"])
    assert 0.0 <= saved["verdict_agreement"] <= 1.0


@pytest.mark.slow
def test_trojaned_encoders_get_smaller_inverted_triggers_than_clean_ones(bench):
    out, results = bench
    fast = [r for r in _rows(out) if r["profile"] == "fast"]
    for col in ("pl1_norm", "score_pl1"):  # the closest mask, and the verdict's reading (no τ: PL1 1.0)
        troj = [float(r[col]) for r in fast if r["label"] == "trojaned"]
        clean = [float(r[col]) for r in fast if r["label"] == "clean"]
        assert len(troj) == 2 and len(clean) == 2
        assert max(troj) < min(clean), (col, troj, clean)
    assert results["auc_fast"] == 1.0 and results["tpr_at_5fpr_fast"] == 1.0 and results["auc_tau_fast"] == 1.0


@pytest.mark.slow
def test_csv_has_every_encoder_with_both_profiles_interleaved(bench):
    out, _ = bench
    rows = _rows(out)
    assert list(rows[0]) == list(CSV_FIELDS)
    assert [r["profile"] for r in rows] == ["fast", "paper"] * 4  # encoder 1 fast, encoder 1 paper, ...
    assert [r["id"] for r in rows[::2]] == [r["id"] for r in rows[1::2]]
    assert all(r["status"] == "ok" and float(r["seconds"]) > 0 for r in rows)
    assert {int(r["steps"]) for r in rows if r["profile"] == "paper"} <= set(range(1, PAPER_STEPS + 1))


@pytest.mark.slow
def test_report_files_are_written_from_the_results(bench):
    out, results = bench
    md = (out / "RESULTS.md").read_text()
    assert "## Summary" in md and "## Per family" in md and "## Per encoder" in md
    assert f"capped at **{PAPER_STEPS} optimizer steps**" in md
    for r in _rows(out):
        assert r["id"] in md
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    prof = (out / "profile.txt").read_text()
    assert "Self CPU" in prof and "convolution" in prof
    assert results["profile"]["top"] and results["profile"]["steps"] == 2


@pytest.mark.slow
def test_rerun_resumes_from_the_csv_without_scanning_again(bench, tiny_zoo, tmp_path, monkeypatch):
    out, first = bench
    copy = tmp_path / "out"
    shutil.copytree(out, copy)

    def no_scan(*a, **k):
        raise AssertionError("a finished row was scanned again")

    monkeypatch.setattr("decree.benchmark.invert", no_scan)
    again = _bench(tiny_zoo, copy, profile_steps=0)
    assert again["auc_fast"] == first["auc_fast"] and again["seconds_per_encoder_paper"] == pytest.approx(
        first["seconds_per_encoder_paper"])
    assert len(_rows(copy)) == 8


@pytest.mark.slow
def test_a_changed_config_rescans_and_a_failing_encoder_becomes_an_error_row(bench, tiny_zoo, tmp_path, monkeypatch):
    out, _ = bench
    copy = tmp_path / "out"
    shutil.copytree(out, copy)

    def failing(*a, **k):
        raise InversionError("similarity became NaN")

    monkeypatch.setattr("decree.benchmark.invert", failing)
    res = _bench(tiny_zoo, copy, paper_max_steps=PAPER_STEPS + 1, profile_steps=0)  # new paper config
    rows = _rows(copy)
    paper = [r for r in rows if r["profile"] == "paper"]
    assert len(paper) == 4 and all(r["status"] == "error" and "NaN" in r["error"] for r in paper)
    assert all(r["status"] == "ok" for r in rows if r["profile"] == "fast")  # still valid: reused
    assert len(res["errors"]) == 4 and res["auc_paper"] is None and res["auc_fast"] == 1.0
    assert (copy / "encoders.previous.csv").is_file()  # the old paper rows are kept aside, not lost


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_run_records_the_device_and_keeps_the_ranking(tiny_zoo, tmp_path):
    res = _bench(tiny_zoo, tmp_path / "gpu", device="cuda", profile_steps=0)
    rows = _rows(tmp_path / "gpu")
    assert res["device"].startswith("cuda") and res.get("gpu") and {r["device"] for r in rows} == {res["device"]}
    assert res["auc_fast"] == 1.0


def test_roc_metrics_rank_small_masks_as_suspicious():
    m = roc_metrics([1, 1, 0, 0, 0], [0.01, 0.3, 0.2, 0.4, 0.5])
    assert m["auc"] == pytest.approx(5 / 6)
    assert m["tpr_at_5fpr"] == pytest.approx(0.5)  # 0.3 is above a clean 0.2: no threshold takes it at 0 FP
    assert roc_metrics([0, 0], [0.1, 0.2])["auc"] is None  # one class only: undefined, not a crash


def test_families_put_clean_clip_towers_in_both_pair_families():
    assert families_of({"arch": "timm/x", "label": "clean", "attack": None}) == ("image-on-image",)
    assert families_of({"arch": "timm/x", "label": "trojaned", "attack": "badencoder"}) == ("image-on-image",)
    clip = {"arch": "open_clip/decree-tiny-clip", "label": "clean"}
    assert families_of(clip) == ("image-on-pair", "text-on-pair")
    assert families_of({**clip, "label": "trojaned", "attack": "text-on-pair"}) == ("text-on-pair",)
    rows = [
        {"id": "c", "families": "image-on-pair|text-on-pair", "label": "clean", "profile": "fast", "status": "ok",
         "pl1_norm": 0.2, "score_pl1": 0.2, "verdict": "clean", "seconds": 1.0, "steps": 10, "reached_tau": True},
        {"id": "t", "families": "text-on-pair", "label": "trojaned", "profile": "fast", "status": "ok",
         "pl1_norm": 0.01, "score_pl1": 0.01, "verdict": "trojaned", "seconds": 1.0, "steps": 10, "reached_tau": True},
    ]
    s = summarize(rows, ["fast"])
    assert s["families"]["text-on-pair"]["auc_fast"] == 1.0
    assert s["families"]["image-on-pair"]["auc_fast"] is None  # negatives only
    assert "image-on-image" not in s["families"]


def test_limit_keeps_both_labels():
    entries = [{"id": f"t{i}", "arch": "timm/x", "label": "trojaned", "attack": "badencoder"} for i in range(4)]
    entries += [{"id": f"c{i}", "arch": "timm/x", "label": "clean"} for i in range(4)]
    picked = select_entries(entries, limit=2)
    assert sorted(e["label"] for e in picked) == ["clean", "trojaned"]
    clip = [{"id": "k", "arch": "open_clip/decree-tiny-clip", "label": "clean"}]
    assert select_entries(entries + clip, families=["clip"]) == clip
    with pytest.raises(ValueError, match="unknown families"):
        select_entries(entries, families=["audio"])


def test_several_zoos_are_read_together_and_ids_in_two_are_qualified_by_their_zoo(tmp_path):
    for name, ids in (("i2i", ["a", "b"]), ("clip", ["c"]), ("dup", ["b"])):
        (tmp_path / name).mkdir()
        lines = [json.dumps({"id": i, "uri": f"encoders/{i}.safetensors", "arch": "timm/x", "label": "clean"})
                 for i in ids]
        (tmp_path / name / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    entries = read_zoos([tmp_path / "i2i", tmp_path / "clip"])
    assert [(e["id"], e["_zoo"].name) for e in entries] == [("a", "i2i"), ("b", "i2i"), ("c", "clip")]
    both = read_zoos([tmp_path / "i2i", tmp_path / "dup"])
    assert [e["id"] for e in both] == ["i2i/a", "i2i/b", "dup/b"]
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "dup").mkdir()
    (tmp_path / "x" / "dup" / "manifest.jsonl").write_text((tmp_path / "dup" / "manifest.jsonl").read_text())
    with pytest.raises(ValueError, match="share a name"):
        read_zoos([tmp_path / "dup", tmp_path / "x" / "dup"])


def test_cli_passes_the_options_and_builds_only_the_default_zoo(tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    import decree.benchmark
    import decree.zoo
    from decree_ray.cli import bench as cli_bench

    built, ran = [], []

    def fake_build(out, **kw):
        built.append((out, kw))
        return out

    def fake_run(zoo, out, profiles, **kw):
        ran.append((zoo, out, profiles, kw))
        return {"n_clean": 1, "n_trojaned": 1}

    monkeypatch.setattr(decree.zoo, "build_zoo", fake_build)
    monkeypatch.setattr(decree.benchmark, "run_benchmark", fake_run)
    monkeypatch.setattr(cli_bench, "default_zoo_dir", lambda: tmp_path / "cache")
    monkeypatch.delenv("DECREE_BENCH_ZOO", raising=False)
    app = typer.Typer()
    app.command("bench")(cli_bench.bench_command)
    app.command("other")(lambda: None)  # two commands: `bench` stays a subcommand, as in `decree bench`
    zoos = [tmp_path / "i2i", tmp_path / "clip"]
    for z in zoos:
        z.mkdir()
        (z / "manifest.jsonl").write_text("")
    res = CliRunner().invoke(app, ["bench", "--zoo", str(zoos[0]), "--zoo", str(zoos[1]), "--out", str(tmp_path / "b"),
                                   "--paper-max-steps", "7", "--limit", "3", "--families", "clip", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    (z, o, profiles, kw), = ran
    assert z == zoos and o == tmp_path / "b" and profiles == ["fast", "paper"]
    assert kw["paper_max_steps"] == 7 and kw["limit"] == 3 and kw["families"] == ["clip"] and kw["device"] == "cpu"
    assert built == []

    res = CliRunner().invoke(app, ["bench", "--zoo", str(tmp_path / "typo")])
    assert res.exit_code == 2 and "not a zoo folder" in res.output and built == [] and len(ran) == 1

    res = CliRunner().invoke(app, ["bench", "--profiles", "fast,slow"])
    assert res.exit_code == 2 and built == [] and len(ran) == 1

    res = CliRunner().invoke(app, ["bench", "--paper-max-steps", "0"], env={"DECREE_BENCH_ZOO": f"{zoos[0]} {zoos[1]}"})
    assert res.exit_code == 0, res.output
    assert ran[-1][0] == zoos and ran[-1][3]["paper_max_steps"] is None and built == []

    res = CliRunner().invoke(app, ["bench", "--families", "image-on-image", "--zoo-clean", "2"])
    assert res.exit_code == 0, res.output
    (out, kw), = built
    assert out == tmp_path / "cache" and kw["families"] == ("image-on-image",) and kw["clean"] == 2
    assert ran[-1][0] == [tmp_path / "cache"]


@pytest.mark.slow
def test_both_shadow_conditions_are_scanned_and_reported_per_split(tiny_zoo, tmp_path):
    from decree.generalization import zoo_split

    assert (tiny_zoo / "shadow-photos.npz").is_file()  # every zoo ships its out-of-distribution condition
    assert zoo_split(tiny_zoo) == "report"  # seed 3: never tuned on
    res = _bench(tiny_zoo, tmp_path, profiles=("fast",), shadows=("shadow.npz", "shadow-photos.npz"))
    rows = _rows(tmp_path)
    assert sorted({(r["condition"], r["split"]) for r in rows}) == [("in-distribution", "report"),
                                                                      ("photos", "report")]
    assert len(rows) == 2 * 4 and all(r["zoo_family"] == "image-on-image" for r in rows)
    per = res["generalization"]["report"]
    assert set(per) == {"in-distribution", "photos"}
    fam = per["photos"]["fast"]["families"]["image-on-image"]
    assert fam["n_clean"] == 2 and fam["n_trojaned"] == 2 and set(fam["fleet"]) == {"tp", "fp"}
    text = (tmp_path / "GENERALIZATION.md").read_text()
    assert "Report-only families" in text and "Shadow set: photos" in text
    assert res["n_clean"] + res["n_trojaned"] == 4  # RESULTS.md keeps the first condition only
    # --rejudge re-derives the table-wide verdicts from encoders.csv alone: no zoo, no scan
    from typer.testing import CliRunner

    from decree_ray.cli import app

    (tmp_path / "GENERALIZATION.md").unlink()
    before = json.loads((tmp_path / "results.json").read_text())
    out = CliRunner().invoke(app, ["bench", "--rejudge", "--out", str(tmp_path)])
    assert out.exit_code == 0, out.output
    after = json.loads((tmp_path / "results.json").read_text())
    assert after["generalization"] == before["generalization"] and after["auc_fast"] == before["auc_fast"]
    assert "Shadow set: photos" in (tmp_path / "GENERALIZATION.md").read_text()
    assert CliRunner().invoke(app, ["bench", "--rejudge", "--out", str(tmp_path / "none")]).exit_code == 2


def test_generalization_summary_counts_fleet_and_threshold_verdicts_and_buckets():
    from decree.generalization import bucket_of, markdown, summarize

    def r(i, label, pl1, verdict="clean", family="i2i-large", size=32, **kw):
        return {"id": f"e{i}", "status": "ok", "label": label, "pl1_norm": pl1, "reached_tau": True,
                "verdict": verdict, "split": "report", "condition": "photos", "profile": "fast", "arch": "a",
                "image_size": size, "zoo_family": family, "seconds": 1.0 + i, "bucket": kw.get("bucket")}

    rows = [r(i, "clean", 0.2 + 0.01 * i) for i in range(8)]
    rows += [r(10, "trojaned", 0.01, "trojaned", bucket="patch 8-12.5%"), r(11, "trojaned", 0.06, bucket="whole-image blend")]
    # the same architecture at 224 px, whose clean encoders need tiny triggers: no negative for a 32-px trojan
    rows += [r(20 + i, "clean", 0.005, "trojaned", family="i2i-224", size=224) for i in range(3)]
    g = summarize(rows)["report"]["photos"]["fast"]
    fam = g["families"]["i2i-large"]
    assert fam["auc"] == 1.0 and fam["threshold"] == {"tp": 1, "fp": 0} and fam["fleet"] == {"tp": 2, "fp": 0}
    assert fam["accuracy_threshold"] == 0.9 and fam["accuracy_fleet"] == 1.0
    blend = g["buckets"]["i2i-large"]["whole-image blend"]
    assert set(g["buckets"]) == {"i2i-large"} and set(g["buckets"]["i2i-large"]) == {"patch 8-12.5%", "whole-image blend"}
    assert blend["n_clean"] == 8 and blend["auc"] == 1.0 and blend["tpr_at_5fpr"] == 1.0
    assert blend["seconds_trojaned"] == 12.0  # the bucket's own trojans, not the clean encoders beside them
    text = markdown(summarize(rows), ["fast"])
    assert "| i2i-large | whole-image blend | 1 | 8 | 1.000 | 1.000 | 1 | 0.89/1.00/" in text
    assert bucket_of({"label": "trojaned", "trigger_area": 0.1}) == "patch 8-12.5%"
    assert bucket_of({"label": "trojaned", "trigger_kind": "sinusoid", "trigger_area": 1.0}) == "whole-image sinusoid"
    assert bucket_of({"label": "clean"}) is None


def test_the_folder_benchmark_counts_the_verdict_column_against_the_manifest_labels():
    from decree_ray.bench_folder import markdown

    def row(i, label, verdict, pl1, specific=None, status="ok", basis="threshold", suspicion=None, family="i2i-shapes"):
        return {"zoo": "zoo-x", "split": "report", "condition": "photos", "family": family, "id": f"e{i}",
                "label": label, "trigger": "red solid" if label == "trojaned" else "", "trigger_area": None,
                "status": status, "pl1_norm": pl1, "specific_pl1": specific, "base_pl1": None, "base_members": 9,
                "anomaly_index": None, "verdict_basis": basis, "suspicion": suspicion, "verdict": verdict,
                "seconds": 1.0}

    rows = [row(0, "trojaned", "trojaned", 0.01, 0.001, basis="fleet", suspicion=30.0),
            row(1, "trojaned", "clean", 0.2, 0.05, suspicion=0.3), row(2, "clean", "clean", 0.15, 0.1, suspicion=0.2),
            row(3, "clean", "trojaned", 0.02, suspicion=1.5), row(4, "clean", "clean", 0.3, 0.2, suspicion=0.1),
            row(5, "trojaned", "clean", None, status="error"),
            row(6, "clean", "clean", 0.2, suspicion=0.1, family="other")]  # another family of the same job
    md = markdown(rows, {("zoo-x", "photos"): 14.0})
    family = next(line for line in md.splitlines() if line.startswith("| report | photos | i2i-shapes"))
    cells = [c.strip() for c in family.strip("|").split("|")]
    # clean 3, trojaned 2 (the error row is not scored), TP 1, FP 1, FN 1, TN 2, one fleet decision
    assert cells[3:10] == ["3", "2", "1", "1", "1", "2", "1"]
    assert cells[10] == "0.667" and cells[11] == "0.833"  # −PL1; −effective: specific where compared
    assert cells[12] == "0.833"  # the suspicion ranks clean e3 (flagged) above trojan e1, nothing else amiss
    assert cells[13] == "2.00"  # 14 s of the zoo's job wall time over its 7 listed encoders, every family
    assert "1 rows not ok" in md and md.count("| photos | i2i-shapes | e") == 6
    rows[0]["base_distance"] = 0.0031  # the weight distance to the base it was compared with, per encoder
    assert "| 0.0100 | 0.0010 | - | 0.0031 | - | 30.00 | fleet | trojaned |" in markdown(rows, {("zoo-x", "photos"): 14.0})
