"""A multi-node Ray cluster (ray.cluster_utils.Cluster) losing a node mid-scan: nothing lost, nothing twice."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import FAST_OVERRIDES, TINY_ARCH, write_encoder
from raycluster import free_ports, stop_head

from decree_ray import results as results_mod
from decree_ray.job import JobConfig, run_job
from decree_ray.progress import Reporter

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture()
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=c.address, log_to_driver=False)
    yield c, workers
    ray.shutdown()
    c.shutdown()


class _KillNodeWhenBusy(Reporter):
    """Removes one worker node as soon as every actor is busy and at least one row is written."""

    def __init__(self, cluster, node, actors: int):
        self.cluster, self.node, self.actors, self.removed = cluster, node, actors, False

    def update(self, counts) -> None:
        if not self.removed and counts.done >= 1 and counts.running >= self.actors:
            self.cluster.remove_node(self.node, allow_graceful=False)
            self.removed = True


def test_removing_a_node_mid_scan_retries_its_encoder_and_every_encoder_gets_exactly_one_row(cluster, zoo, tmp_path):
    c, workers = cluster
    folder = tmp_path / "encoders"
    for i in range(6):
        write_encoder(folder / f"m{i}.safetensors", seed=100 + i)
    killer = _KillNodeWhenBusy(c, workers[0], actors=3)
    config = JobConfig(
        source=str(folder),
        shadow=str(zoo / "shadow.npz"),
        out=str(tmp_path / "out"),
        arch=TINY_ARCH,
        steps=40,
        overrides=FAST_OVERRIDES,
        num_workers=3,
        timeout=120.0,
        max_retries=2,
    )

    summary = run_job(config, killer)

    assert killer.removed
    rows = results_mod.load_rows(str(tmp_path / "out"))
    assert sorted(r["id"] for r in rows) == [f"m{i}.safetensors" for i in range(6)]
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert summary.total == 6 and summary.retried >= 1


def test_a_local_out_on_a_multi_node_cluster_gets_every_evidence_png_from_the_driver(cluster, zoo, tmp_path):
    """Workers on other nodes have their own disks: they hand the PNGs back and the driver writes them under
    OUT, so every evidence path in the table is a file the driver (and the report) can open."""
    folder = tmp_path / "encoders"
    for i in range(3):
        write_encoder(folder / f"e{i}.safetensors", seed=200 + i)
    out = tmp_path / "out"
    config = JobConfig(source=str(folder), shadow=str(zoo / "shadow.npz"), out=str(out), arch=TINY_ARCH, steps=20,
                       overrides=FAST_OVERRIDES, num_workers=2, timeout=120.0)

    run_job(config)

    rows = results_mod.load_rows(str(out))
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        for column in ("evidence_mask", "evidence_pattern", "evidence_stamp", "evidence_grid"):
            path = r[column]
            assert path and path.startswith(str(out / "evidence")), (column, path)
            assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_scan_without_an_address_starts_its_own_ray_beside_a_running_ray_start_head(zoo, tmp_path):
    """`ray start --head` leaves its address in $RAY_TMPDIR/ray/ray_current_cluster (a head node, a dev box with a
    local cluster), and a bare ray.init() joins that cluster and refuses num_cpus there. `decree scan` without
    --address promises an embedded Ray: it must start its own and scan, not fail or use someone else's cluster."""
    venv_bin = Path(sys.executable).parent
    ray_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    (port,) = free_ports(1)
    head = subprocess.Popen(  # stopped in the finally below, with its whole session
        [str(venv_bin / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
         "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        address_file = Path(ray_tmp) / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + 120
        while not address_file.is_file():
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        out = tmp_path / "out"
        scan = subprocess.run(
            [sys.executable, "-m", "decree_ray.cli", "scan", str(zoo / "manifest.jsonl"), "--shadow",
             str(zoo / "shadow.npz"), "--out", str(out), "--steps", "3", "--local-cpus", "1", "--no-consensus"],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )
        assert scan.returncode in (0, 1), scan.stdout[-2000:] + scan.stderr[-2000:]
        assert "Connecting to existing Ray cluster" not in scan.stderr
        rows = results_mod.load_rows(str(out))
        assert len(rows) == len(zoo.joinpath("manifest.jsonl").read_text().splitlines())
        assert head.poll() is None  # the user's cluster is left running
    finally:
        stop_head(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)
