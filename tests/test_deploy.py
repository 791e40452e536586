"""The deployment files say what the code does: cluster.yaml passes Ray's own validation, the KubeRay
manifest's `decree scan` is a command the real CLI accepts, and `decree submit` runs a scan on a real
Ray head through the Job Submission API (the last test)."""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import typer.main
import yaml
from typer.testing import CliRunner
from raycluster import Head
from raycluster import free_ports as _free_ports
from raycluster import stop_head

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
RAYJOB = ROOT / "deploy" / "kuberay" / "rayjob.yaml"
RUNTIME_ENV = ROOT / "deploy" / "runtime_env.yaml"


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    return job


def _pin(pyproject: dict, name: str) -> str:
    (dep,) = [d for d in pyproject["project"]["dependencies"] if re.match(rf"{name}\s*==", d)]
    return dep.replace(" ", "")


def _ray_validate(config: dict) -> dict:
    # What `ray up` runs before touching AWS: fill defaults, then check against ray-schema.json.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _node_types(cluster: dict) -> tuple[dict, dict[str, dict]]:
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    return head, {name: t for name, t in types.items() if name != cluster["head_node_type"]}


def _dockerfile_image_tag() -> str:
    (tag,) = re.findall(r"docker build -f deploy/Dockerfile -t (\S+) \.", DOCKERFILE.read_text())
    return tag


# --------------------------------------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_passes_rays_own_schema_validation(cluster):
    prepared = _ray_validate(cluster)
    assert prepared["provider"]["type"] == "aws"


def test_rays_validation_rejects_a_broken_cluster_config(cluster):
    # The check above can fail: Ray's schema wants integer resources and a known head type.
    broken = copy.deepcopy(cluster)
    _, workers = _node_types(broken)
    next(iter(workers.values()))["resources"]["GPU"] = 0.5
    with pytest.raises(Exception, match="0.5"):
        _ray_validate(broken)
    broken = copy.deepcopy(cluster)
    broken["head_node_type"] = "no.such.type"
    with pytest.raises(Exception):
        _ray_validate(broken)


def test_head_node_advertises_no_cpu_so_no_scan_is_scheduled_on_it(cluster):
    head, _ = _node_types(cluster)
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--num-cpus=0" in start and "--head" in start


def test_gpu_worker_types_scale_from_zero_and_advertise_gpus(cluster):
    _, workers = _node_types(cluster)
    assert workers, "no worker node types"
    for name, t in workers.items():
        assert t["min_workers"] == 0, f"{name} must scale to zero"
        assert t["resources"]["GPU"] >= 1, f"{name} advertises no GPU: scans request 'GPU'"
        assert 1 <= t["max_workers"] <= cluster["max_workers"]
        assert re.match(r"(g\d|p\d)", t["node_config"]["InstanceType"]), f"{name} is not a GPU instance"
    assert cluster["idle_timeout_minutes"] > 0


def test_every_node_gets_an_instance_profile_for_s3(cluster):
    for name, t in cluster["available_node_types"].items():
        profile = t["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Name") or profile.get("Arn"), f"{name} has no IAM instance profile (S3 access)"


def test_cluster_runs_with_ray_token_auth_on_every_node(cluster):
    # The job API runs any code it is sent on nodes holding S3 credentials: one token, on all nodes.
    assert "~/.ray/auth_token" in cluster["file_mounts"].values()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in cluster[key] if "ray start" in c]
        assert "RAY_AUTH_MODE=token" in start, key


def test_setup_installs_this_package_at_its_version_with_the_torch_pin(cluster, pyproject):
    setup = "\n".join(cluster["setup_commands"])
    version = pyproject["project"]["version"]
    wheel = f"decree_ray-{version}-py3-none-any.whl"
    assert wheel in setup, "setup must install the wheel of this exact version"
    (remote_dir,) = [r for r, local in cluster["file_mounts"].items() if local.rstrip("/") in ("./dist", "dist")]
    assert f"{remote_dir}/{wheel}" in setup
    assert _pin(pyproject, "torch") in setup and _pin(pyproject, "torchvision") in setup
    # The setup order matters: the pinned torch goes in before the package can pull another one.
    assert setup.index(_pin(pyproject, "torch")) < setup.index(wheel)


# ------------------------------------------------------------------------------------------ image and job


def test_dockerfile_builds_on_a_cuda_image_and_runs_decree(pyproject):
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert base.startswith("rayproject/ray:") and re.search(r"-(gpu|cu\d+)$", base), base
    assert re.search(r'^ENTRYPOINT \["decree"\]', text, flags=re.M)
    assert pyproject["project"]["scripts"]["decree"] == "decree_ray.cli:main"
    assert f"RUN pip install --no-cache-dir {_pin(pyproject, 'torch')} {_pin(pyproject, 'torchvision')}" in text


def test_ray_version_is_the_same_in_image_cluster_and_kuberay(cluster, rayjob):
    # Ray refuses to join nodes of different versions; these three must move together.
    (image_ray,) = re.findall(r"^ARG RAY_VERSION=(\S+)", DOCKERFILE.read_text(), flags=re.M)
    (cluster_ray,) = re.findall(r"ray\[default\]==([\w.]+)", "\n".join(cluster["setup_commands"]))
    assert image_ray == cluster_ray == rayjob["spec"]["rayClusterSpec"]["rayVersion"]


def test_rayjob_runs_decree_scan_on_the_documented_image(rayjob):
    spec = rayjob["spec"]
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert shlex.split(spec["entrypoint"])[:2] == ["decree", "scan"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    pods.append(spec["submitterPodTemplate"])
    images = {c["image"] for p in pods for c in p["spec"]["containers"]}
    assert images == {_dockerfile_image_tag()}


def test_rayjob_autoscales_gpu_workers_from_zero_and_keeps_scans_off_the_head(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert str(cluster["headGroupSpec"]["rayStartParams"]["num-cpus"]) == "0"
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["replicas"] == 0 and group["maxReplicas"] >= 1
        (worker,) = group["template"]["spec"]["containers"]
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_runtime_env_is_one_ray_accepts(rayjob):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(RUNTIME_ENV.read_text())
    # RuntimeEnv type-checks known fields but lets unknown keys through as plugins: check the names too.
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    RuntimeEnv(**env)
    RuntimeEnv(**yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"]))


# ----------------------------------------------------------------------------- the manifest vs the real CLI


def _scan_args(rayjob: dict) -> list[str]:
    return shlex.split(rayjob["spec"]["entrypoint"])[2:]


def test_rayjob_entrypoint_options_exist_in_decree_scan(rayjob):
    from decree_ray.cli import app

    # --help after the options: click rejects an unknown option before it prints help.
    result = CliRunner().invoke(app, ["scan", *_scan_args(rayjob), "--help"])
    assert result.exit_code == 0, result.output
    bogus = CliRunner().invoke(app, ["scan", *_scan_args(rayjob), "--no-such-option", "1", "--help"])
    assert bogus.exit_code != 0


def test_rayjob_entrypoint_values_parse_and_ask_for_the_gpus_the_cluster_can_add(rayjob):
    from decree_ray.cli import app

    # make_context converts every value and checks required arguments without running the scan.
    scan = typer.main.get_command(app).commands["scan"]
    params = scan.make_context("scan", _scan_args(rayjob)).params
    assert params["source"].startswith("s3://") and params["out"].startswith("s3://")
    assert params["shadow"].startswith("s3://")
    # The cluster starts without GPUs: the scan must name its GPU share and actor count, and the
    # worker group must be able to hold that many actors.
    assert params["gpus_per_encoder"] and params["workers"]
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    max_gpus = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                   for g in groups)
    assert params["workers"] * params["gpus_per_encoder"] <= max_gpus


def test_docker_cmd_is_a_working_decree_invocation():
    from decree_ray.cli import app

    (cmd,) = re.findall(r"^CMD \[(.*)\]", DOCKERFILE.read_text(), flags=re.M)
    args = [a.strip().strip('"') for a in cmd.split(",")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "scan" in result.output and "submit" in result.output


# ------------------------------------------------------------------------- decree submit on a real Ray head


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real single-node Ray head with the dashboard (Job Submission API), like `ray up`'s head.

    Token authentication is on, as Ray enables it by default for clusters that have a token; the token
    is private to this head (RAY_AUTH_TOKEN), never the user's ~/.ray/auth_token.
    """
    venv_bin = Path(sys.executable).parent
    bin_dir = tmp_path_factory.mktemp("bin")
    # The job's entrypoint is `decree scan ...`: a `decree` for this working tree, whether or not the
    # package is pip-installed (what `pip install -e .` would generate).
    shim = bin_dir / "decree"
    shim.write_text(f"#!{sys.executable}\nfrom decree_ray.cli import main\nmain()\n")
    shim.chmod(0o755)
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix sockets live under it
    gcs, dash, client, agent = _free_ports(4)
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{bin_dir}:{venv_bin}:{env.get('PATH', '')}", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
        RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
    )
    log = open(tmp_path_factory.mktemp("ray") / "ray-start.log", "w+")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(venv_bin / "ray"), "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=2", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    head = Head(f"http://127.0.0.1:{dash}", env, token)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                head.get("/api/version")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"ray start --head did not bring up the dashboard:\n{log.read()[-3000:]}")
                time.sleep(1)
        yield head
    finally:
        stop_head(proc, wait=60)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _tiny_zoo(root: Path) -> tuple[Path, Path]:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from decree.encoders import create_encoder

    torch.manual_seed(0)
    (root / "encoders").mkdir(parents=True)
    lines = []
    for i in range(2):
        enc = create_encoder("timm/resnet10t", image_size=32)  # random init: a stand-in checkpoint
        save_file(enc.backbone.state_dict(), str(root / "encoders" / f"e{i}.safetensors"))
        lines.append({"id": f"e{i}", "uri": f"encoders/e{i}.safetensors", "arch": "timm/resnet10t", "image_size": 32})
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rng = np.random.default_rng(0)
    np.savez(root / "shadow.npz", x=rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8))
    return root / "manifest.jsonl", root / "shadow.npz"


@pytest.mark.ray
@pytest.mark.slow
def test_decree_submit_runs_a_scan_on_a_ray_head_and_results_land_in_out(ray_head, tmp_path):
    import pyarrow.parquet as pq

    manifest, shadow = _tiny_zoo(tmp_path / "zoo")
    out = tmp_path / "scan-out"
    # `decree submit` as a user runs it: its own process, Ray's auth settings from the environment.
    submit = subprocess.run(
        ["decree", "submit", str(manifest), "--shadow", str(shadow), "--out", str(out), "--address", ray_head.url,
         "--steps", "3", "--workers", "1", "--timeout", "300", "--env", "OMP_NUM_THREADS=1"],
        env=ray_head.env, capture_output=True, text=True, timeout=120,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    (job_id,) = re.findall(r"raysubmit_\w+", submit.stdout)

    with pytest.raises(urllib.error.HTTPError) as unauthenticated:  # the head really checks the token
        ray_head.get(f"/api/jobs/{job_id}", auth=False)
    assert unauthenticated.value.code == 401

    deadline = time.monotonic() + 300
    while (job := ray_head.get(f"/api/jobs/{job_id}"))["status"] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job still {job['status']}"
        time.sleep(2)
    logs = ray_head.get(f"/api/jobs/{job_id}/logs")["logs"]
    # `decree scan` exits 0 (nothing found) or 1 (backdoors found: random-init encoders often look
    # trojaned); Ray reports a non-zero driver as FAILED, so the exit code is what tells them apart.
    assert job["driver_exit_code"] in (0, 1), logs[-3000:]
    assert job["status"] == ("SUCCEEDED" if job["driver_exit_code"] == 0 else "FAILED")
    assert shlex.split(job["entrypoint"])[:2] == ["decree", "scan"]

    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert sorted(r["id"] for r in rows) == ["e0", "e1"]
    assert all(r["status"] == "ok" and r["steps"] == 3 and r["pl1_norm"] is not None for r in rows), rows
