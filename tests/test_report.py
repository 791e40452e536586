"""ROC analysis on hand-made result rows with known answers (no Ray, no scans)."""

from __future__ import annotations

import pytest

from decree_ray.report import analyze, plot
from decree_ray.schema import new_row


def _row(i, pl1, label=None, *, status="ok", threshold=0.1, reached=True):
    if status != "ok":
        return new_row(id=f"e{i}", uri=f"/z/e{i}.pt", status=status, label=label, error="boom")
    verdict = "trojaned" if reached and pl1 < threshold else "clean"
    return new_row(
        id=f"e{i}",
        uri=f"/z/e{i}.pt",
        status="ok",
        label=label,
        pl1_norm=pl1,
        similarity=0.99,
        reached_tau=reached,
        threshold=threshold,
        verdict=verdict,
        arch="timm/x",
    )


def test_perfectly_separated_labels_give_auc_one_and_full_tpr_at_zero_fpr():
    rows = [_row(i, 0.01 + 0.01 * i, "trojaned") for i in range(3)] + [
        _row(10 + i, 0.3 + 0.1 * i, "clean") for i in range(5)
    ]
    rep = analyze(rows, fpr=0.05)
    assert rep.auc == pytest.approx(1.0)
    assert rep.tpr_at_fpr == 1.0 and rep.fpr_achieved == 0.0
    # the cut is on the suspicion (threshold / pl1 here): every trojan at or above it, every clean one below
    assert rep.auc_pl1 == pytest.approx(1.0)
    assert 0.1 / 0.3 < rep.threshold_at_fpr <= 0.1 / 0.03
    assert rep.confusion == {"tn": 5, "fp": 0, "fn": 0, "tp": 3}
    assert rep.threshold_source == "scan" and rep.flagged == 3


def test_overlapping_scores_give_the_textbook_auc_and_confusion_at_a_given_threshold():
    # trojaned pl1: 0.05, 0.2 ; clean pl1: 0.1, 0.4  -> pairs ranked right: (0.05<0.1),(0.05<0.4),(0.2<0.4) = 3/4
    rows = [_row(0, 0.05, "trojaned"), _row(1, 0.2, "trojaned"), _row(2, 0.1, "clean"), _row(3, 0.4, "clean")]
    rep = analyze(rows, fpr=0.5, threshold=0.15)
    assert rep.auc == pytest.approx(0.75)
    # four rows, no fleet: suspicion = 0.15 / pl1, so the cut that takes 0.2 in is 0.75
    assert rep.tpr_at_fpr == 1.0 and rep.fpr_achieved == 0.5 and rep.threshold_at_fpr == pytest.approx(0.75)
    assert rep.confusion == {"tn": 1, "fp": 1, "fn": 1, "tp": 1}  # flagged: 0.05 (trojaned), 0.1 (clean)
    assert rep.threshold_source == "--threshold"


def test_the_roc_ranks_by_the_suspicion_of_every_rule_not_by_pl1_alone():
    # natural triggers of two bases differ: PL1 mixes them, the specific score (against each one's base) does not
    rows = []
    for i, (pl1, specific, label) in enumerate([(0.02, 0.019, "clean"), (0.025, 0.024, "clean"),
                                                (0.04, 0.003, "trojaned"), (0.05, 0.004, "trojaned")]):
        rows.append(dict(_row(i, pl1, label, threshold=0.03), specific_pl1=specific, base_pl1=None,
                         specific_verdict="trojaned" if specific < 0.015 else "clean"))
    rep = analyze(rows)
    assert rep.auc == pytest.approx(1.0) and rep.auc_pl1 == pytest.approx(0.0)
    assert [r["id"] for r in rep.suspicious][:2] == ["e2", "e3"]


def test_another_threshold_rejudges_the_specific_verdict_whose_cut_is_half_of_it():
    row = dict(_row(0, 0.2, "trojaned", threshold=0.03), specific_pl1=0.02, base_pl1=None, specific_verdict="clean")
    rep = analyze([row, _row(1, 0.3, "clean", threshold=0.03)], threshold=0.06)
    assert rep.flagged == 1 and rep.confusion["tp"] == 1  # 0.02 < 0.06 / 2
    assert rep.suspicious[0]["suspicion"] == pytest.approx(0.03 / 0.02)
    # an encoder that drifted far from its base keeps no specific verdict at any threshold (decree.transfer)
    for distance in (0.05, "0.001"):  # a distance that is no number counts as far, as in decree.fleet
        far = dict(row, base_distance=distance)
        rep = analyze([far, _row(1, 0.3, "clean", threshold=0.03)], threshold=0.06)
        assert rep.flagged == 0 and rep.confusion["fn"] == 1


def test_without_labels_ranks_by_suspicion_and_reports_the_distribution(tmp_path):
    rows = [_row(i, pl1) for i, pl1 in enumerate([0.5, 0.02, 0.3, 0.07])] + [_row(9, None, status="error")]
    rep = analyze(rows, top=3)
    assert rep.auc is None and rep.confusion is None and rep.labeled == 0
    assert [r["id"] for r in rep.suspicious] == ["e1", "e3", "e2"]
    assert rep.errors == 1 and rep.ok == 4 and rep.flagged == 2
    assert rep.quantiles["p0"] == 0.02 and rep.quantiles["p100"] == 0.5
    png = plot(rep, rows, tmp_path / "roc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_small_mask_that_never_reached_tau_is_not_flagged_at_a_custom_threshold():
    rows = [_row(0, 0.01, "clean", reached=False), _row(1, 0.02, "trojaned")]
    rep = analyze(rows, threshold=0.05)
    assert rep.flagged == 1 and rep.confusion == {"tn": 1, "fp": 0, "fn": 0, "tp": 1}


def test_an_fpr_outside_zero_one_is_rejected():
    with pytest.raises(ValueError):
        analyze([_row(0, 0.1, "clean")], fpr=1.5)


def test_report_shows_hostile_ids_as_text_without_markup_or_terminal_escapes(tmp_path):
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from decree_ray.cli import app
    from decree_ray.schema import new_row, to_table

    ids = ["[red]FORGED[/red] clean", "\x1b]52;c;aGk=\x07osc", "\x1b[2J\x1b[Hcls", "bad\udcffsurrogate", "[/]"]
    rows = [new_row(id=i, uri=f"/f/{n}", status="ok", arch="timm/x", pl1_norm=0.2 + n / 100, reached_tau=True,
                    similarity=0.9, threshold=0.03, verdict="clean", patch_verdict="clean")
            for n, i in enumerate(ids)]
    path = tmp_path / "results.parquet"
    pq.write_table(to_table(rows), path)  # the surrogate no longer aborts the writer
    result = CliRunner().invoke(app, ["report", str(path), "--plot", str(tmp_path / "roc.png")])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "[red]FORGED" in result.output.replace("\n", "")
    assert "\\x1b]52" in result.output or "x1b]52" in result.output.replace("\n", "")


def test_report_warns_when_the_base_itself_needs_a_trigger_under_the_threshold(tmp_path):
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from decree_ray.cli import app
    from decree_ray.schema import new_row, to_table

    def rows(base_pl1):
        return [new_row(id=f"e{n}", uri=f"/f/e{n}", status="ok", arch="timm/tf_efficientnet_lite0", image_size=224,
                        pl1_norm=0.014, reached_tau=True, similarity=0.95, threshold=0.03, verdict="trojaned",
                        patch_verdict="trojaned", base_pl1=base_pl1, base_group="ab12cd34ef56ab78", shadow_sha256="s")
                for n in range(3)]

    for base_pl1, warned in ((0.0147, True), (0.19, False)):
        path = tmp_path / f"results-{warned}.parquet"
        pq.write_table(to_table(rows(base_pl1)), path)
        result = CliRunner().invoke(app, ["report", str(path), "--plot", str(tmp_path / "roc.png")])
        assert result.exit_code == 1, result.output  # flagged rows: the warning changes no verdict
        text = " ".join(result.output.split())
        assert ("warning: the base of timm/tf_efficientnet_lite0 at 224 px" in text) is warned, text
        if warned:
            assert "1.5% of the image" in text and "its 3 fine-tunes" in text and "--image-size" in text
    assert analyze(rows(0.0147)).collapsing_bases[0]["encoders"] == 3
