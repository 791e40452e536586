"""Scale from zero: a scan on a Ray cluster whose autoscaler starts with no GPU worker, adds nodes for the
scan's pending actors, survives losing one, and scales back to zero once the scan lets go.

Ray's own fake autoscaler (the `fake_multinode` provider that `ray.cluster_utils.AutoscalingCluster` uses)
launches worker nodes as local raylets; the fake GPUs are Ray resources, so the actors on them run on CPU.
The head is started here like test_deploy's (its own session, its own ports), never with `ray stop`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import FAST_OVERRIDES, TINY_ARCH, write_encoder
from raycluster import free_ports, kill_node_processes, ray_auth_mode, stop_head

from decree_ray import results as results_mod
from decree_ray.job import JobConfig, JobError, run_job
from decree_ray.progress import Reporter

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
IDLE_MINUTES = 0.1  # the autoscaler removes a node idle for 6 s
WORKER_TYPE = "gpu-worker"


def _autoscaling_config(gcs_address: str) -> dict:
    """The cluster config the monitor reads: a head that offers no scan resources and one GPU node type."""
    return {
        "cluster_name": "decree-autoscaling-test",
        "max_workers": 2,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 150_000_000}, "node_config": {},
                          "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_MINUTES,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "rsync_exclude": [], "rsync_filter": [],
    }


class AutoscalingHead:
    def __init__(self, proc, gcs: str, dashboard: str, env: dict):
        self.proc, self.gcs, self.dashboard, self.env = proc, gcs, dashboard, env

    def worker_nodes(self) -> list[dict]:
        import ray

        return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]

    def kill_node(self, node_id: str) -> list[str]:
        """Kill one autoscaled node's processes (a spot reclaim, as the scan sees it)."""
        return kill_node_processes(self.proc.pid, node_id)


@pytest.fixture()
def autoscaling_head(tmp_path):
    import ray
    from ray._private.services import get_node_ip_address

    ray.shutdown()
    venv_bin = Path(sys.executable).parent
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "decree"  # the Job Submission entrypoint runs `decree scan`: this working tree's
    shim.write_text(f"#!{sys.executable}\nfrom decree_ray.cli import main\nmain()\n")
    shim.chmod(0o755)
    gcs_port, dash_port, client_port, agent_port = free_ports(4)
    gcs = f"{get_node_ip_address()}:{gcs_port}"
    config = tmp_path / "autoscaling.json"
    config.write_text(json.dumps(_autoscaling_config(gcs)))
    temp_dir = tempfile.mkdtemp(prefix="ra", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{bin_dir}:{venv_bin}:{env.get('PATH', '')}", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               RAY_USAGE_STATS_ENABLED="0", RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
               RAY_AUTH_MODE="disabled")
    log = open(tmp_path / "ray-start.log", "w+")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(venv_bin / "ray"), "start", "--head", "--block", f"--port={gcs_port}", f"--autoscaling-config={config}",
         "--num-cpus=0", "--num-gpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         "--include-dashboard=true", f"--ray-client-server-port={client_port}",
         f"--dashboard-agent-listen-port={agent_port}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # a killed node is declared dead after ~5-10 s instead of the default's tens of seconds
         "--system-config=" + json.dumps({"health_check_period_ms": 1000, "health_check_timeout_ms": 2000,
                                          "health_check_failure_threshold": 5})],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    head = AutoscalingHead(proc, gcs, f"http://127.0.0.1:{dash_port}", env)
    try:
        with ray_auth_mode("disabled"):
            deadline = time.monotonic() + 120
            while True:
                try:
                    ray.init(address=gcs, log_to_driver=False)
                    break
                except Exception:  # noqa: BLE001 - not up yet
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        pytest.fail(f"autoscaling head did not start:\n{log.read()[-3000:]}")
                    time.sleep(1)
            yield head
    finally:
        ray.shutdown()
        stop_head(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


class _Watch(Reporter):
    """Records the autoscaled nodes seen while the scan runs; optionally kills one once both actors work."""

    def __init__(self, head: AutoscalingHead, kill_one: bool = False):
        self.head, self.kill_one = head, kill_one
        self.max_nodes, self.killed, self.first_wait, self._last = 0, None, None, 0.0

    def update(self, counts) -> None:
        if counts.workers and counts.workers_ready == 0 and self.first_wait is None:
            self.first_wait = (counts.workers_ready, counts.workers)
        now = time.monotonic()
        if now - self._last < 0.5:
            return
        self._last = now
        nodes = self.head.worker_nodes()
        self.max_nodes = max(self.max_nodes, len(nodes))
        if self.kill_one and self.killed is None and counts.done >= 1 and counts.running >= 2 and nodes:
            self.killed = nodes[0]["NodeID"]
            killed = self.head.kill_node(self.killed)
            assert any("ScanWorker" in c for c in killed), killed  # the actor went down with its node


def _encoders(folder: Path, n: int) -> Path:
    for i in range(n):
        write_encoder(folder / f"m{i}.safetensors", seed=300 + i)
    return folder


def _scan_actors() -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "ScanWorker" in a.class_name]


def _wait_for_zero_workers(head: AutoscalingHead, seconds: float = 120) -> float:
    """Idle nodes leave after the 6-s idle timeout (and the autoscaler's next cycles)."""
    t0 = time.monotonic()
    while nodes := head.worker_nodes():
        held = _scan_actors()
        assert not held, f"scan actors still alive after the scan: {held}"
        assert time.monotonic() - t0 < seconds, f"still {len(nodes)} worker nodes: {[n['NodeID'][-5:] for n in nodes]}"
        time.sleep(1)
    return time.monotonic() - t0


def _config(zoo, tmp_path, n: int, **kw) -> JobConfig:
    return JobConfig(source=str(_encoders(tmp_path / "enc", n)), shadow=str(zoo / "shadow.npz"),
                     out=str(tmp_path / "out"), arch=TINY_ARCH, steps=30, overrides=FAST_OVERRIDES,
                     gpus_per_encoder=1, num_workers=2, cpus_per_encoder=1, timeout=120, startup_timeout=120, **kw)


def test_scan_grows_a_cluster_from_zero_gpus_to_two_and_it_scales_back_to_zero(autoscaling_head, zoo, tmp_path):
    import ray

    assert ray.cluster_resources().get("GPU", 0) == 0 and not autoscaling_head.worker_nodes()
    watch = _Watch(autoscaling_head)

    config = _config(zoo, tmp_path, 6)
    summary = run_job(config, watch)

    rows = results_mod.load_rows(str(tmp_path / "out"))
    assert sorted(r["id"] for r in rows) == [f"m{i}.safetensors" for i in range(6)]
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert summary.workers == 2 and watch.first_wait == (0, 2)  # it asked before any GPU existed
    assert watch.max_nodes >= 1  # the autoscaler launched GPU nodes for the scan's actors
    _wait_for_zero_workers(autoscaling_head)  # nothing held: idle nodes go away

    # the finished scan again (a nightly rerun): every entry unchanged, so no actor is asked for, no GPU node
    again = run_job(config, _Watch(autoscaling_head))
    assert (again.reused_unchanged, again.scanned, again.workers) == (6, 0, 0)
    assert not autoscaling_head.worker_nodes()


def test_losing_an_autoscaled_node_mid_scan_requeues_its_encoder_and_the_pool_recovers(autoscaling_head, zoo,
                                                                                     tmp_path):
    watch = _Watch(autoscaling_head, kill_one=True)
    summary = run_job(_config(zoo, tmp_path, 8, max_retries=3), watch)

    assert watch.killed is not None
    rows = results_mod.load_rows(str(tmp_path / "out"))
    assert sorted(r["id"] for r in rows) == [f"m{i}.safetensors" for i in range(8)]
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert summary.retried >= 1
    # nothing held afterwards, so the autoscaler may scale down (the fake provider takes minutes to forget a
    # node killed behind its back: the scale-down itself is asserted in the test above)
    assert not _scan_actors()


def test_a_request_no_node_type_can_meet_fails_after_the_startup_timeout_naming_ask_and_offer(autoscaling_head, zoo,
                                                                                            tmp_path):
    config = _config(zoo, tmp_path, 1)
    config = JobConfig(**{**config.__dict__, "gpus_per_encoder": 4, "startup_timeout": 8})
    with pytest.raises(JobError, match=r"within 8s.*2 actors of 1 CPU, 4 GPU.*offers"):
        run_job(config)


def test_decree_submit_on_the_autoscaling_head_scales_from_zero(autoscaling_head, zoo, tmp_path):
    import pyarrow.parquet as pq

    source = _encoders(tmp_path / "enc", 3)
    out = tmp_path / "out"
    submit = subprocess.run(
        ["decree", "submit", str(source), "--shadow", str(zoo / "shadow.npz"), "--out", str(out), "--address",
         autoscaling_head.dashboard, "--arch", TINY_ARCH, "--steps", "30", "--gpus-per-encoder", "1", "--workers", "2",
         "--startup-timeout", "120", *sum((["--set", f"{k}={v}"] for k, v in FAST_OVERRIDES), [])],
        env=autoscaling_head.env, capture_output=True, text=True, timeout=120,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    (job_id,) = re.findall(r"raysubmit_\w+", submit.stdout)
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(autoscaling_head.dashboard)
    deadline = time.monotonic() + 240
    while (status := str(client.get_job_status(job_id))) not in ("JobStatus.SUCCEEDED", "JobStatus.FAILED",
                                                                  "JobStatus.STOPPED", "SUCCEEDED", "FAILED"):
        assert time.monotonic() < deadline, status
        time.sleep(2)
    info = client.get_job_info(job_id)
    assert info.driver_exit_code in (0, 1), client.get_job_logs(job_id)[-3000:]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert sorted(r["id"] for r in rows) == [f"m{i}.safetensors" for i in range(3)]
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    _wait_for_zero_workers(autoscaling_head)
