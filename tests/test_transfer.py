"""The base-model transfer score: a trigger the base shares keeps its area, a trigger only this encoder answers shrinks."""

import math

import pytest
from twins import corner_twins

from decree.inversion import InversionConfig
from decree.transfer import SPECIFIC_FRACTION, Transfer


def test_a_specific_area_small_against_the_bases_own_trigger_is_flagged_though_above_half_the_threshold():
    from decree.transfer import RELATIVE_FRACTION, specific_verdict

    assert specific_verdict(True, 0.02, 0.03) == "clean"  # 0.02 > half of 0.03: one constant cannot call it
    assert specific_verdict(True, 0.02, 0.03, base_pl1=0.3) == "trojaned"  # the base needs 15x that area
    assert specific_verdict(True, 0.02, 0.03, base_pl1=0.02 / RELATIVE_FRACTION) == "clean"  # at the edge: not below
    assert specific_verdict(True, 0.001, 0.03, base_pl1=0.005) == "trojaned"  # the constant still flags alone
    assert specific_verdict(False, 0.001, 0.03, base_pl1=0.3) == "clean"  # never reached tau: no trigger found


def test_the_specific_verdict_holds_only_while_the_encoder_is_near_its_base():
    from decree.transfer import DRIFT_LIMIT, specific_cut, specific_verdict

    assert specific_verdict(True, 0.001, 0.03, 0.3, distance=DRIFT_LIMIT) == "trojaned"
    assert specific_verdict(True, 0.001, 0.03, 0.3, distance=None) == "trojaned"  # no distance known: as before
    assert specific_verdict(True, 0.001, 0.03, 0.3, distance=DRIFT_LIMIT * 1.01) == "clean"
    assert specific_verdict(True, 0.001, 0.03, 0.3, distance=math.nan) == "clean"
    assert specific_cut(0.03, 0.3, 0.5) is None and specific_cut(0.03, 0.3, 0.0) == pytest.approx(0.03)


def test_the_cut_relative_to_the_bases_own_trigger_holds_only_for_gentle_fine_tunes():
    from decree.transfer import DRIFT_LIMIT, RELATIVE_DRIFT_LIMIT, specific_cut, specific_verdict

    assert RELATIVE_DRIFT_LIMIT < DRIFT_LIMIT
    assert specific_verdict(True, 0.02, 0.03, 0.3, distance=RELATIVE_DRIFT_LIMIT) == "trojaned"  # 0.02 < 0.1 x 0.3
    assert specific_verdict(True, 0.02, 0.03, 0.3, distance=None) == "trojaned"  # no distance known: as before
    # drifted farther: its own natural triggers are no longer the base's, so only half the threshold judges it
    assert specific_verdict(True, 0.02, 0.03, 0.3, distance=RELATIVE_DRIFT_LIMIT * 1.5) == "clean"
    assert specific_verdict(True, 0.01, 0.03, 0.3, distance=RELATIVE_DRIFT_LIMIT * 1.5) == "trojaned"
    assert specific_cut(0.03, 0.3, RELATIVE_DRIFT_LIMIT * 1.5) == pytest.approx(0.015)
    assert specific_cut(None, 0.3, RELATIVE_DRIFT_LIMIT * 1.5) is None


def test_a_trigger_that_collapses_the_base_as_well_keeps_its_area():
    t = Transfer(base_similarity=0.96, own_similarity=0.95, tau=0.95)
    assert t.ratio == 1.0 and t.specific_pl1(0.2) == 0.2


def test_the_ratio_is_how_much_farther_from_collapse_the_base_stays_with_the_encoders_side_capped_at_tau():
    assert math.isclose(Transfer(0.80, 0.95, 0.95).ratio, 4.0)
    # a search that overshot τ (0.99) is judged as if it had stopped at τ: overshoot must not inflate the ratio
    assert math.isclose(Transfer(0.80, 0.99, 0.95).ratio, 4.0)
    # never reached τ: the encoder's own gap counts
    assert math.isclose(Transfer(0.80, 0.90, 0.95).ratio, 2.0)
    assert Transfer(0.999999, 0.999999, 1.0).ratio == 1.0  # no division by zero


@pytest.fixture(scope="module")
def twins():
    return corner_twins()


def _scan(encoder, base, shadow, tmp_path, name):
    from safetensors.torch import save_file

    from decree import scan_encoder

    ckpt = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.backbone.state_dict().items()}, str(ckpt))
    cfg = InversionConfig.from_profile("fast", max_steps=60, min_steps=30, batch_size=16)
    return scan_encoder(ckpt, "timm/tf_efficientnet_lite0", shadow, config=cfg, image_size=32, device="cpu",
                        base=base).to_row()


def test_a_backdoor_trigger_does_not_collapse_the_base_and_its_specific_area_shrinks(twins, tmp_path):
    clean, trojan, shadow = twins  # the clean twin is the ImageNet Lite0 itself: the trojan's base
    t = _scan(trojan, clean, shadow, tmp_path, "trojan")
    assert t["base_similarity"] < t["similarity"] - 0.2, t
    assert t["specific_pl1"] < 0.5 * t["pl1_norm"], t
    assert t["specific_verdict"] == "trojaned" and t["verdict"] == "trojaned"
    c = _scan(clean, clean, shadow, tmp_path, "clean")  # an encoder identical to its base: nothing is its own
    assert c["specific_pl1"] == c["pl1_norm"] and c["specific_verdict"] == "clean", c
    assert c["specific_pl1"] > SPECIFIC_FRACTION * c["threshold"]


def test_without_a_base_the_transfer_columns_stay_empty(twins, tmp_path):
    clean, _, shadow = twins
    row = _scan(clean, None, shadow, tmp_path, "alone")
    assert row["base_similarity"] is None and row["specific_pl1"] is None and row["specific_verdict"] is None


def test_a_worker_with_a_base_fills_the_columns_and_a_broken_base_is_each_rows_error(zoo, tmp_path):
    from faults import harness
    from faults.zoo import TINY_ARCH, write_encoder

    from decree_ray.worker import ScanWorker

    base = write_encoder(tmp_path / "base.safetensors", seed=1)  # enc1's own weights: its trigger is the base's
    settings = harness.settings(zoo / "shadow.npz", tmp_path / "out", tmp_path / "cache", bases=((TINY_ARCH, str(base)),))
    worker = ScanWorker(settings)
    rows = {r["id"]: r for r in harness.scan_source(str(zoo / "manifest.jsonl"), worker)}
    worker.close()
    assert rows["enc1"]["status"] == "ok" and rows["enc1"]["specific_pl1"] == rows["enc1"]["pl1_norm"]
    assert all(r["base_similarity"] is not None for r in rows.values())
    # the base's own trigger, searched once for the whole shadow set: enc1 is the base, so it is enc1's own PL1
    assert {r["base_pl1"] for r in rows.values()} == {rows["enc1"]["pl1_norm"]}
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    settings = harness.settings(zoo / "shadow.npz", tmp_path / "out2", tmp_path / "cache2",
                                bases=((TINY_ARCH, str(tmp_path / "broken.safetensors")),))
    worker = ScanWorker(settings)
    rows = harness.scan_source(str(zoo / "manifest.jsonl"), worker)
    worker.close()
    assert rows and all(r["status"] == "error" and "cannot load the base model" in r["error"] for r in rows)


def test_the_transfer_benchmark_tables_count_verdicts_with_the_base_and_with_the_consensus():
    from decree.transfer_bench import markdown

    def row(i, label, pl1, specific, consensus):
        near = consensus is not None
        return {"zoo": "z", "split": "report", "family": "clip", "id": f"e{i}", "label": label, "arch": "a",
                "condition": "photos", "pl1_norm": pl1, "reached_tau": True, "patch_verdict": "clean",
                "specific_pl1": specific, "specific_verdict": "trojaned" if specific < 0.015 else "clean",
                **{f"{p}specific_pl1": consensus for p in ("consensus_", "mixed_")},
                **{f"{p}specific_verdict": None if not near else "trojaned" if consensus < 0.015 else "clean"
                   for p in ("consensus_", "mixed_")},
                **{f"{p}members": "z:e0 z:e3 z:e7" if near else "" for p in ("consensus_", "mixed_")},
                **{f"{p}group": "g1" if near else None for p in ("consensus_", "mixed_")},
                "seconds": 1.0, "transfer_seconds": 0.05}

    rows = [row(i, "clean", 0.035 + i / 1000, 0.033, 0.034) for i in range(6)]
    rows += [row(6 + i, "trojaned", 0.045, 0.005, 0.02 if i == 0 else 0.006) for i in range(3)]
    rows.append(row(9, "trojaned", 0.045, 0.005, None))  # near no group: judged by its PL1 alone
    text = markdown(rows)
    base_line, consensus_line, mixed_line = [line for line in text.splitlines() if line.startswith("| report |")]
    cells = [c.strip() for c in base_line.split("|")[1:-1]]
    assert cells[5:9] == ["0.000", "1.000", "0/0", "4/0"]  # AUC −PL1, −specific, threshold PL1, specific
    cells = [c.strip() for c in consensus_line.split("|")[1:-1]]
    # its group, near one (clean/trojaned), AUC −PL1, AUC −effective (e9: its PL1, above every clean one)
    assert cells[3] == "z:e0 z:e3 z:e7(t)" and cells[4] == "6/3" and cells[5:7] == ["0.000", "0.750"]
    assert cells[7] == "2/0" and cells == [c.strip() for c in mixed_line.split("|")[1:-1]]


def test_a_base_whose_own_trigger_is_under_the_threshold_is_named_once_per_lineage_and_shadow_set():
    from decree.transfer import collapsing_bases

    def row(base_pl1, group="g1", size=32, shadow="s1", status="ok"):
        return {"status": status, "arch": "timm/x", "image_size": size, "shadow_sha256": shadow, "base_group": group,
                "base_pl1": base_pl1, "threshold": 0.03}

    rows = [row(0.0147), row(0.0147), row(0.0147, shadow="s2"), row(0.19, group="g2"), row(None, group="g3"),
            row(0.01, status="error"), {"status": "ok", "arch": "timm/x", "threshold": 0.03}]
    found = collapsing_bases(rows)
    assert [b["encoders"] for b in found] == [2, 1]  # shadow sets s1 and s2 of lineage g1, each once
    assert {b["base_group"] for b in found} == {"g1"} and all(b["base_pl1"] == 0.0147 for b in found)
    assert collapsing_bases([row(0.19), row(None)]) == []  # a base that needs a large trigger, or never reached τ


def test_the_transfer_benchmark_rejudges_its_table_at_the_distance_each_base_was_compared_at(tmp_path):
    from decree.transfer_bench import FIELDS, rejudge, write

    def row(i, label, specific, distance, consensus_distance):
        return dict({k: None for k in FIELDS}, zoo="zoo-x", split="tune", family="f", id=f"e{i}", label=label,
                    arch="a", condition="photos", pl1_norm=0.2, reached_tau=True, patch_verdict="clean",
                    threshold=0.03, seconds=1.0, transfer_seconds=0.1, specific_pl1=specific, base_pl1=0.3,
                    base_distance=distance, specific_verdict="clean", consensus_specific_pl1=specific,
                    consensus_base_pl1=0.3, consensus_distance=consensus_distance, consensus_members="zoo-x:e3",
                    consensus_group="g", consensus_specific_verdict="clean")

    # 0.02: under a tenth of the base's 0.3, over half the threshold: flagged only by the relative cut
    rows = [row(0, "trojaned", 0.02, 0.0005, 0.0003), row(1, "trojaned", 0.02, 0.003, 0.0003),
            row(2, "trojaned", 0.02, None, 0.003), row(3, "clean", 0.2, 0.0002, 0.0)]
    write(rows, tmp_path)
    out = {r["id"]: r for r in rejudge(tmp_path)}
    # e2: no distance recorded (a table from before the column): the verdict its scan wrote stands
    assert [out[f"e{i}"]["specific_verdict"] for i in range(4)] == ["trojaned", "clean", "clean", "clean"]
    assert [out[f"e{i}"]["consensus_specific_verdict"] for i in range(4)] == ["trojaned", "trojaned", "clean", "clean"]
    assert out["e0"]["mixed_specific_verdict"] is None and out["e0"]["reached_tau"] is True  # never compared
    text = (tmp_path / "TRANSFER.md").read_text()
    assert "--zoo zoo-x" in text and "| 0.0030 / 0.0002 |" in text  # the zoos, the farthest trojan / nearest clean
    assert rejudge(tmp_path) == list(out.values())  # what it writes reads back the same
