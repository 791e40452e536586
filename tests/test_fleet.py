"""Fleet-relative verdicts: outliers among comparable encoders, references, fallbacks, re-derivation in the report."""

import math

import pytest

from decree.fleet import DEFAULT_CUTOFF, FleetConfig, assign, robust_index
from decree_ray.config import DEFAULT_CUTOFF as CLI_CUTOFF
from decree_ray.report import analyze


def row(i, pl1, *, arch="timm/a", size=32, label=None, reached=True, patch="clean", shadow="s1", **kw):
    return {"id": f"e{i}", "uri": f"/f/e{i}", "status": "ok", "arch": arch, "image_size": size,
            "shadow_sha256": shadow, "profile": "fast", "pl1_norm": pl1, "reached_tau": reached, "threshold": 0.03,
            "patch_verdict": patch, "verdict": patch, "similarity": 0.95, "label": label, **kw}


def clean_fleet(n=10, arch="timm/a", start=0):
    # natural triggers of clean encoders: 15-24% of the image, spread like the zoo's
    return [row(start + i, 0.15 + 0.01 * i, arch=arch, label="clean") for i in range(n)]


def test_cli_default_cutoff_is_the_cores():
    assert CLI_CUTOFF == DEFAULT_CUTOFF


def test_robust_index_is_positive_below_the_population_and_floored_spread():
    pop = [math.log(0.2)] * 8
    assert robust_index(math.log(0.2), pop) == 0.0
    # identical peers: the MAD is 0, the floor keeps a 5% difference from becoming an outlier
    assert robust_index(math.log(0.19), pop) < 1.0
    assert robust_index(math.log(0.02), pop) > DEFAULT_CUTOFF


def test_a_low_outlier_among_comparable_encoders_is_flagged_by_the_fleet():
    rows = clean_fleet() + [row(99, 0.05, label="trojaned")]  # above the threshold: the threshold misses it
    out = {r["id"]: r for r in assign(rows)}
    assert out["e99"]["verdict"] == "trojaned" and out["e99"]["verdict_basis"] == "fleet"
    assert out["e99"]["anomaly_index"] > DEFAULT_CUTOFF and out["e99"]["fleet_peers"] == 11
    assert all(out[f"e{i}"]["verdict"] == "clean" for i in range(10))
    assert all(abs(out[f"e{i}"]["anomaly_index"]) < DEFAULT_CUTOFF for i in range(10))


def test_too_few_peers_fall_back_to_the_threshold_and_say_so():
    rows = clean_fleet(3) + [row(99, 0.05), row(98, 0.01, patch="trojaned")]
    out = {r["id"]: r for r in assign(rows)}
    assert {r["verdict_basis"] for r in out.values()} == {"threshold"}
    assert all(r["anomaly_index"] is None for r in out.values())
    assert out["e99"]["verdict"] == "clean" and out["e98"]["verdict"] == "trojaned"


def test_groups_do_not_mix_architectures_sizes_or_shadow_sets():
    # CLIP towers need far smaller natural triggers than Lite0: mixed, every CLIP tower would look trojaned
    small = [row(100 + i, 0.035 + 0.001 * i, arch="open_clip/t", label="clean") for i in range(8)]
    other_size = [row(200 + i, 0.04, size=224) for i in range(3)]
    other_shadow = [dict(r, id="x" + r["id"], uri="x" + r["uri"], shadow_sha256="s2", pl1_norm=0.01)
                    for r in clean_fleet(2)]
    out = assign(clean_fleet() + small + other_size + other_shadow)
    assert all(r["verdict"] == "clean" for r in out)
    peers = {r["id"]: r["fleet_peers"] for r in out}
    assert peers["e0"] == 10 and peers["e100"] == 8 and peers["e200"] == 3 and peers["xe0"] == 2


def test_each_lineage_is_judged_among_itself_and_an_encoder_of_none_against_the_whole_group():
    # two bases of one architecture: the second's clean fine-tunes need far smaller natural triggers
    first = [dict(r, base_group="A") for r in clean_fleet()]
    second = [row(100 + i, 0.035 + 0.001 * i, label="clean", base_group="B") for i in range(8)]
    trojan = row(99, 0.012, label="trojaned", base_group="B")  # small among its own lineage
    lone = row(98, 0.04, label="clean")  # near no lineage: judged against all of them
    small = [row(200 + i, 0.01, base_group="C") for i in range(2)]  # a lineage too small to be its own group
    out = {r["id"]: r for r in assign(first + second + [trojan, lone] + small)}
    assert all(out[f"e{100 + i}"]["verdict"] == "clean" and out[f"e{100 + i}"]["fleet_peers"] == 9 for i in range(8))
    assert out["e99"]["verdict"] == "trojaned" and out["e99"]["fleet_peers"] == 9
    assert out["e0"]["fleet_peers"] == 10 and out["e98"]["fleet_peers"] == 22 and out["e200"]["fleet_peers"] == 22
    pooled = {r["id"]: r for r in assign([{k: v for k, v in r.items() if k != "base_group"}
                                          for r in first + second + [trojan, lone]])}
    assert pooled["e100"]["verdict"] == "trojaned"  # without lineages the second base's clean towers stand out


def test_references_anchor_a_group_that_is_mostly_trojaned():
    refs = [row(i, 0.16 + 0.01 * i, label="clean") for i in range(3)]
    trojans = [row(10 + i, 0.05 + 0.002 * i, label="trojaned") for i in range(6)]
    unanchored = {r["id"]: r["verdict"] for r in assign(refs + trojans)}
    assert sum(v == "trojaned" for v in unanchored.values()) < 6  # the trojans are the group's majority
    anchored = {r["id"]: r["verdict"] for r in assign(refs + trojans, references=["e0", "/f/e1", "e2"])}
    assert all(anchored[f"e{10 + i}"] == "trojaned" for i in range(6))
    assert all(anchored[f"e{i}"] == "clean" for i in range(3))


def test_a_search_that_never_reached_tau_is_no_outlier():
    rows = clean_fleet() + [row(99, 0.001, reached=False)]
    out = {r["id"]: r for r in assign(rows)}
    assert out["e99"]["verdict"] == "clean" and out["e99"]["anomaly_index"] < 0


def test_the_blend_score_is_judged_against_its_own_peers():
    rows = [dict(r, blend_pl1=0.3 + 0.01 * i, blend_reached_tau=True, blend_verdict="clean")
            for i, r in enumerate(clean_fleet())]
    rows.append(row(99, 0.17, blend_pl1=0.08, blend_reached_tau=True, blend_verdict="clean"))
    out = {r["id"]: r for r in assign(rows)}
    assert out["e99"]["verdict"] == "trojaned" and out["e99"]["anomaly_index"] > DEFAULT_CUTOFF


def test_error_rows_are_left_alone_and_do_not_count_as_peers():
    rows = clean_fleet(6) + [{"id": "bad", "uri": "/f/bad", "status": "error", "arch": "timm/a", "verdict": None}]
    out = {r["id"]: r for r in assign(rows)}
    assert out["bad"].get("verdict_basis") is None and out["e0"]["fleet_peers"] == 6


@pytest.mark.parametrize("cutoff", [1.0, 100.0])
def test_the_cutoff_decides_how_far_out_an_outlier_must_be(cutoff):
    rows = clean_fleet() + [row(99, 0.08)]
    verdict = {r["id"]: r["verdict"] for r in assign(rows, config=FleetConfig(cutoff=cutoff))}["e99"]
    assert verdict == ("trojaned" if cutoff == 1.0 else "clean")


def test_report_rederives_fleet_verdicts_from_the_table_without_a_rescan():
    rows = clean_fleet() + [row(99, 0.05, label="trojaned")]
    rep = analyze(rows)
    assert rep.flagged == 1 and rep.fleet_outliers == 1 and rep.fleet_judged == 11
    assert rep.confusion == {"tn": 10, "fp": 0, "fn": 0, "tp": 1}
    strict = analyze(rows, fleet_cutoff=100.0)
    assert strict.flagged == 0 and strict.confusion["fn"] == 1
    # --threshold re-decides the patch verdicts too
    assert analyze(rows, threshold=0.06, fleet_cutoff=100.0).flagged == 1


def test_report_reads_tables_from_before_the_fleet_columns():
    old = [{k: v for k, v in r.items() if k != "patch_verdict"} for r in clean_fleet()]
    old.append({k: v for k, v in row(99, 0.01, patch="trojaned").items() if k != "patch_verdict"})
    rep = analyze(old)
    assert rep.flagged == 1 and rep.fleet_outliers == 0


def test_a_row_from_before_the_patch_verdict_column_keeps_its_trojaned_verdict():
    rows = clean_fleet() + [dict(row(99, 0.01, patch="trojaned"), patch_verdict=None)]
    assert {r["id"]: r["verdict"] for r in assign(rows)}["e99"] == "trojaned"


def _half_trojaned_folder():
    # a scan of a benchmark family's folder: 8 clean encoders and 8 trojans spread from 1% up to the clean edge
    clean = [row(i, 0.27 + 0.01 * i, label="clean") for i in range(8)]
    troj = [row(50 + i, pl1, label="trojaned") for i, pl1 in enumerate((0.015, 0.03, 0.04, 0.06, 0.09, 0.16, 0.17, 0.18))]
    return clean, troj


def test_a_half_trojaned_folder_is_judged_against_its_clean_cluster():
    clean, troj = _half_trojaned_folder()
    out = {r["id"]: r for r in assign(clean + troj)}
    assert all(out[r["id"]]["verdict"] == "trojaned" for r in troj)
    assert all(out[r["id"]]["verdict"] == "clean" for r in clean)
    # without the cluster the trojans drag the median down and inflate the MAD: most hide in the group
    plain = {r["id"]: r for r in assign(clean + troj, config=FleetConfig(cluster_fraction=0))}
    assert sum(plain[r["id"]]["verdict"] == "trojaned" for r in troj) <= 3


def test_an_all_clean_fleet_with_a_smooth_spread_keeps_its_own_median_and_flags_nobody():
    # 40 clean encoders log-uniform over a factor of 2.5 (wider than any tune family's clean spread)
    rows = [row(i, 0.12 * 2.5 ** (i / 39), label="clean") for i in range(40)]
    assert all(r["verdict"] == "clean" for r in assign(rows))


def test_a_few_encoders_far_above_the_rest_cannot_anchor_the_group():
    # 4 encoders that never reach τ stand apart from 12 clean ones, but 4 is fewer than min_peers and a third
    rows = clean_fleet(12) + [row(90 + i, 1.0, reached=False) for i in range(4)]
    assert all(r["verdict"] == "clean" for r in assign(rows))


def test_a_fleet_larger_than_the_cluster_sample_still_finds_its_clean_cluster():
    clean = [row(i, 0.25 + 0.1 * (i % 97) / 97, label="clean") for i in range(2000)]
    troj = [row(5000 + i, 0.02 + 0.0001 * i, label="trojaned") for i in range(1500)]
    out = assign(clean + troj)
    flagged = {r["id"] for r in out if r["verdict"] == "trojaned"}
    assert flagged == {r["id"] for r in troj}


def test_cli_default_cluster_fraction_is_the_cores():
    from decree.fleet import CLUSTER_FRACTION
    from decree_ray.config import DEFAULT_CLUSTER

    assert DEFAULT_CLUSTER == CLUSTER_FRACTION


def test_report_rederives_the_half_trojaned_folder_with_and_without_the_clean_cluster():
    clean, troj = _half_trojaned_folder()
    assert analyze(clean + troj).flagged == len(troj)
    assert analyze(clean + troj, fleet_cluster=0.0).flagged <= 3
    with pytest.raises(ValueError, match="fleet-cluster"):
        analyze(clean + troj, fleet_cluster=1.5)


def test_two_clean_kinds_far_apart_are_told_apart_by_references_not_by_the_cluster():
    # the price of the clean cluster (README): 8 long-trained clean encoders at 0.30 and 10 short-trained at 0.15
    rows = [row(i, 0.30 + 0.002 * i, label="clean") for i in range(8)]
    rows += [row(20 + i, 0.15 + 0.002 * i, label="clean") for i in range(10)]
    assert sum(r["verdict"] == "trojaned" for r in assign(rows)) == 10
    refs = ["e0", "e1", "e20", "e21"]  # known-clean encoders of both kinds anchor the group instead
    assert all(r["verdict"] == "clean" for r in assign(rows, references=refs))


def _tower_fleet():
    # CLIP towers of another base model: clean natural triggers at 2.7-3.2%, under the 0.03 threshold
    clean = [row(i, pl1, arch="open_clip/t", label="clean", patch="trojaned" if pl1 < 0.03 else "clean")
             for i, pl1 in enumerate((0.0273, 0.0284, 0.0287, 0.0289, 0.0299, 0.0316, 0.0305))]
    troj = [row(50 + i, 0.0125 + 0.0004 * i, arch="open_clip/t", label="trojaned", patch="trojaned") for i in range(6)]
    return clean, troj


def test_a_threshold_does_not_flag_what_the_clean_cluster_itself_scores():
    clean, troj = _tower_fleet()
    out = {r["id"]: r for r in assign(clean + troj)}
    assert all(out[r["id"]]["verdict"] == "trojaned" for r in troj)
    assert all(out[r["id"]]["verdict"] == "clean" for r in clean)
    assert {out[r["id"]]["fleet_anchor"] for r in clean + troj} == {"cluster"}
    assert analyze(clean + troj).threshold_overruled == 5


def test_with_references_a_threshold_still_flags_below_every_reference():
    refs = [row(i, 0.020 + 0.001 * i, label="clean", patch="trojaned") for i in range(3)]
    peers = clean_fleet(6, start=10)
    just_below = row(99, 0.019, patch="trojaned")  # not an outlier against the references, but below all of them
    at_reference_level = row(98, 0.0205, patch="trojaned")
    out = {r["id"]: r for r in assign(refs + peers + [just_below, at_reference_level], references=["e0", "e1", "e2"])}
    assert out["e99"]["anomaly_index"] < DEFAULT_CUTOFF and out["e99"]["verdict"] == "trojaned"
    assert out["e98"]["verdict"] == "clean" and out["e98"]["fleet_anchor"] == "references"
    assert all(out[f"e{i}"]["verdict"] == "clean" for i in range(3))


def test_without_an_anchor_the_threshold_decides_as_before():
    # half trojaned, 4 clean: no 6-encoder clean cluster, so every threshold verdict stands (the README demo)
    clean = [row(i, 0.15 + 0.01 * i, label="clean") for i in range(4)]
    troj = [row(50 + i, 0.014 + 0.0003 * i, label="trojaned", patch="trojaned") for i in range(4)]
    out = {r["id"]: r for r in assign(clean + troj)}
    assert {out[r["id"]]["fleet_anchor"] for r in clean + troj} == {"group"}
    assert [out[r["id"]]["verdict"] for r in troj] == ["trojaned"] * 4
    few = {r["id"]: r for r in assign(troj)}
    assert {r["fleet_anchor"] for r in few.values()} == {None}


def _scanned_row(rng, i, lineage):
    """A row as a scan writes it: each search's verdict follows from its own score and cut."""
    from decree.transfer import specific_verdict

    pl1, reached = math.exp(rng.uniform(math.log(0.003), math.log(0.4))), rng.random() > 0.1
    r = row(i, pl1, reached=reached, patch="trojaned" if reached and pl1 < 0.03 else "clean",
            base_group=lineage if rng.random() > 0.3 else None)
    if rng.random() < 0.5:
        blend, blend_reached = math.exp(rng.uniform(math.log(0.01), math.log(0.5))), rng.random() > 0.2
        r.update(blend_pl1=blend, blend_reached_tau=blend_reached, blend_threshold=0.05,
                 blend_verdict="trojaned" if blend_reached and blend < 0.05 else "clean")
    if rng.random() < 0.6:
        specific, base = pl1 / rng.uniform(1, 20), rng.choice([None, rng.uniform(0.05, 0.3)])
        # gentle, near and drifted fine-tunes: both cuts, half the threshold alone, none (decree.transfer)
        distance = rng.choice([None, rng.uniform(0.0, 0.001), rng.uniform(0.001, 0.006), rng.uniform(0.006, 0.02)])
        r.update(specific_pl1=specific, base_pl1=base, base_distance=distance,
                 specific_verdict=specific_verdict(reached, specific, 0.03, base, distance))
    return r


@pytest.mark.parametrize("seed", range(40))
def test_the_suspicion_exceeds_one_exactly_when_the_verdict_is_trojaned(seed):
    import random

    rng = random.Random(seed)
    rows = [_scanned_row(rng, i, rng.choice(["L1", "L2"])) for i in range(rng.randint(2, 40))]
    refs = [r["id"] for r in rng.sample(rows, k=min(len(rows), rng.choice([0, 0, 3, 5])))]
    out = assign(rows, refs, FleetConfig(cluster_fraction=rng.choice([0.0, 1 / 3])))
    assert all(isinstance(r["suspicion"], float) and (r["suspicion"] > 1) == (r["verdict"] == "trojaned")
               for r in out)


def test_encoders_more_robust_than_their_peers_keep_their_order_in_the_suspicion():
    # above every peer's trigger: no rule flags them, yet the larger trigger still ranks as less suspicious
    rows = clean_fleet() + [row(50, 0.5, label="clean"), row(51, 0.8, label="clean")]
    for refs in ((), ("e0", "e1", "e2", "e3")):  # anchored by references, only the fleet index ranks them
        out = {r["id"]: r for r in assign(rows, refs)}
        assert out["e9"]["suspicion"] > out["e50"]["suspicion"] > out["e51"]["suspicion"]
    assert out["e51"]["suspicion"] < 0


def test_a_fine_tune_that_drifted_far_from_its_base_is_not_flagged_by_its_specific_score_alone():
    from decree.transfer import DRIFT_LIMIT, RELATIVE_DRIFT_LIMIT, specific_verdict

    # a long, hot clean fine-tune: a trigger the base ignores, and a weight distance no tune trojan reached
    def drifted(distance):
        return dict(row(0, 0.041, label="clean"), specific_pl1=0.0049, base_pl1=0.2, base_distance=distance,
                    specific_verdict=specific_verdict(True, 0.0049, 0.03, 0.2, distance))  # as the scan writes it
    far = assign([drifted(2 * DRIFT_LIMIT)])[0]
    assert far["verdict"] == "clean" and far["suspicion"] < 1
    near = assign([drifted(DRIFT_LIMIT / 2)])[0]  # the same scores near its base: flagged, against half the threshold
    assert near["verdict"] == "trojaned" and near["suspicion"] == pytest.approx(0.015 / 0.0049)
    gentle = assign([drifted(RELATIVE_DRIFT_LIMIT / 2)])[0]  # nearer still: against a tenth of the base's trigger
    assert gentle["verdict"] == "trojaned" and gentle["suspicion"] == pytest.approx(0.02 / 0.0049)
    garbage = assign([drifted(float("nan"))])[0]  # an unreadable distance counts as far, never as near
    assert garbage["verdict"] == "clean"
    # in a fleet the specific score still counts against its peers: a drifted trojan stands out among them
    peers = [dict(row(i, 0.2, label="clean"), specific_pl1=0.05 + 0.002 * i, base_pl1=0.2, base_distance=0.01)
             for i in range(8)]
    troj = dict(row(50, 0.2, label="trojaned"), specific_pl1=0.001, base_pl1=0.2, base_distance=0.01)
    assert {r["id"]: r for r in assign(peers + [troj])}["e50"]["verdict"] == "trojaned"
