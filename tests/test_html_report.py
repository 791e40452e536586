"""`decree report --html` from a real scan of the tiny zoo, checked in a real browser (headless Chromium)."""

from __future__ import annotations

import re

import pyarrow.parquet as pq
import pytest
from browser import chromium, dump_dom, screenshot
from faults import harness
from typer.testing import CliRunner

from decree_ray.cli import app
from decree_ray.html_report import error_groups
from decree_ray.schema import new_row, to_table
from decree_ray.worker import ScanWorker

HOSTILE_ID = "<script>document.title='PWNED'</script><img src=x onerror=\"document.title='PWNED'\">[red]x[/red]"


@pytest.fixture(scope="module")
def results(zoo, tmp_path_factory):
    """A real scan of the tiny zoo (evidence on), a hostile id, and error rows: results.parquet."""
    box = tmp_path_factory.mktemp("html")
    worker = ScanWorker(harness.settings(zoo / "shadow.npz", box / "out", box / "cache", steps=3))
    try:
        rows = harness.scan_source(str(zoo / "manifest.jsonl"), worker)
    finally:
        worker.close()
    assert any(r["status"] == "ok" and r["evidence_grid"] for r in rows)
    ok = next(r for r in rows if r["status"] == "ok")
    # flag every scanned encoder so each gets a card; one of them carries the audited party's hostile id
    rows = [dict(r, verdict="trojaned", patch_verdict="trojaned", threshold=1.0) if r["status"] == "ok" else r
            for r in rows]
    rows.append(new_row(**{**{k: v for k, v in ok.items() if k not in ("id", "uri")}, "id": HOSTILE_ID,
                           "uri": "/f/<b>x</b>.pt", "verdict": "trojaned", "patch_verdict": "trojaned", "threshold": 1.0}))
    for i in range(3):
        rows.append(new_row(id=f"evil-{i}", uri=f"/f/evil-{i}.pt", status="error", error="unsafe checkpoint",
                            unsafe_globals=["posix.system"]))
    rows.append(new_row(id="corrupt", uri="/f/corrupt.pt", status="error", error="cannot read /f/corrupt.pt: bad zip"))
    path = box / "out" / "results.parquet"
    pq.write_table(to_table(rows), path)
    return path, rows


def test_errors_are_grouped_by_reason_with_counts_and_first_ids(results):
    _, rows = results
    groups = {reason: (n, ids) for reason, n, ids in error_groups(rows)}
    assert groups["unsafe checkpoint (posix.system)"] == (3, ["evil-0", "evil-1", "evil-2"])
    assert groups["cannot read <encoder>: bad zip"][0] == 1


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed (make install installs it)")
def test_html_report_renders_in_a_browser_with_cards_images_and_hostile_text_inert(results, tmp_path):
    path, rows = results
    page = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["report", str(path), "--html", str(page), "--plot", str(tmp_path / "roc.png")])
    assert res.exit_code == 1, res.output  # encoders are flagged
    text = page.read_text()
    assert "http://" not in text.replace("http-equiv", "") and "https://" not in text  # nothing to fetch
    assert "<script>document.title" not in text  # escaped in the file itself
    dom = dump_dom(page)
    assert re.search(r"<title>decree audit report</title>", dom) and "PWNED" not in dom.split("</title>")[0]
    n_flagged = sum(r.get("verdict") == "trojaned" for r in rows)
    assert dom.count("class=\"card flagged\"") == n_flagged
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images="(\d+)"', dom)
    assert loaded and total and int(loaded[1]) == int(total[1]) >= n_flagged + 1  # grids + score plot, all decoded
    assert "&lt;script&gt;document.title='PWNED'&lt;/script&gt;" in dom and "[red]x[/red]" in dom
    assert dom.count("<script>") == 1  # ours, allowed by hash; the hostile one is text
    assert "unsafe checkpoint (posix.system)" in dom
    png = screenshot(page, tmp_path / "report.png")
    assert png.stat().st_size > 20_000  # a rendered page, not a blank one


def test_cards_are_capped_and_paged_most_suspicious_first_for_a_big_fleet():
    from decree_ray.html_report import render
    from decree_ray.report import analyze, rejudge

    rows = [new_row(id=f"e{i}", uri=f"/f/e{i}.pt", status="ok", arch="timm/a", image_size=32, shadow_sha256="s",
                    profile="fast", pl1_norm=0.2 + 0.001 * i, reached_tau=True, threshold=0.03, similarity=0.95,
                    verdict="clean", patch_verdict="clean") for i in range(60)]
    rows += [new_row(id=f"t{i}", uri=f"/f/t{i}.pt", status="ok", arch="timm/a", image_size=32, shadow_sha256="s",
                     profile="fast", pl1_norm=0.001 * (i + 1), reached_tau=True, threshold=0.03, similarity=0.99,
                     verdict="trojaned", patch_verdict="trojaned") for i in range(45)]
    judged, _, _ = rejudge(rows)
    page = render(judged, analyze(rows), cards=41, page_size=20)
    assert page.count("<div class='card flagged'>") == 41  # capped
    assert [f"id='page-{k}'" in page for k in (1, 2, 3, 4)] == [True, True, True, False]
    cards = re.findall(r"<div class='card flagged'><h3>(\w+)</h3>", page)
    first_page = page.split("id='page-1'")[1]
    assert re.search(r"<h3>(\w+)</h3>", first_page)[1] == "t0"  # the smallest trigger leads page 1
    assert len(set(cards)) == 41 and "the first 41 shown" in page


def test_the_html_summary_warns_of_a_base_under_the_threshold_with_its_hostile_arch_escaped():
    from decree_ray.html_report import render
    from decree_ray.report import analyze, rejudge

    rows = [new_row(id=f"e{i}", uri=f"/f/e{i}.pt", status="ok", arch="<b>timm/a</b>", image_size=224,
                    shadow_sha256="s", profile="fast", pl1_norm=0.014, reached_tau=True, threshold=0.03,
                    similarity=0.95, verdict="trojaned", patch_verdict="trojaned", base_pl1=0.0147,
                    base_group="ab12cd34ef56ab78") for i in range(4)]
    judged, _, _ = rejudge(rows)
    page = render(judged, analyze(rows))
    assert "<th>warning</th>" in page and "needs only a trigger of 1.5% of the image" in page and "its 4 fine-tunes share" in page
    assert "&lt;b&gt;timm/a&lt;/b&gt; at 224 px" in page and "<b>timm/a</b>" not in page
    clean_base = [dict(r, base_pl1=0.2) for r in rows]
    assert "<th>warning</th>" not in render(rejudge(clean_base)[0], analyze(clean_base))
