"""The scale benchmark runs end to end on a tiny fleet and writes coherent numbers (not a speed check)."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray]


def test_scale_benchmark_scans_every_encoder_in_each_mode_and_lists_every_key(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "decree_ray.bench_scale", "--out", str(out), "--n", "3", "--keys", "25"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = json.loads((out / "scale.json").read_text())
    assert result["plain_loop"]["encoders"] == 3 and result["plain_loop"]["per_encoder_ms"] > 0
    runs = result["ray"]
    assert [(r["workers"], r["prefetch"]) for r in runs] == [(1, 1), (1, 0), (2, 1)]
    assert all(r["ok"] == r["rows"] == 3 and r["errors"] == 0 for r in runs)
    assert all(r["seconds"] > 0 and "overhead_vs_plain" in r for r in runs)
    rerun = runs[0]["rerun"]  # the finished scan again: every row kept, no checkpoint downloaded
    assert (rerun["reused_unchanged"], rerun["downloaded"], rerun["scanned"]) == (3, 0, 0)
    listing = result["listing"]
    assert listing["stream"]["keys"] == listing["materialize"]["keys"] == 25
    md = (out / "SCALE.md").read_text()
    assert "Ray job, 1 actor, prefetch 1" in md and "Listing 25 keys" in md
    assert "Re-running a finished 3-encoder scan" in md


def test_driver_benchmark_runs_the_real_driver_over_every_encoder(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "decree_ray.bench_driver", "--out", str(out), "--n", "40", "80"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "driver.json").read_text())
    assert [(r["encoders"], r["ok"], r["total"]) for r in results] == [(40, 40, 40), (80, 80, 80)]
    assert all(r["peak_rss_mib"] > 0 and r["encoders_per_second"] > 0 for r in results)
    assert "A million-encoder scan would need" in (out / "DRIVER.md").read_text()
