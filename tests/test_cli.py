"""The Typer layer: arguments reach the job as given, documented exit codes (0 clean, 1 found, 2 errors)."""

from __future__ import annotations

import shlex

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from decree_ray import job
from decree_ray.cli import app
from decree_ray.schema import new_row, to_table

runner = CliRunner()


@pytest.fixture()
def fake_job(monkeypatch):
    """Replaces the one job entry point the CLI calls; records the config it got."""
    calls: list[job.JobConfig] = []
    outcome = {"trojaned": 0, "errors": 0, "raise": None}

    def fake_run_job(config, reporter=None):
        calls.append(config)
        if outcome["raise"]:
            raise outcome["raise"]
        return job.JobSummary(
            results=f"{config.out}/results.parquet",
            total=3,
            ok=3 - outcome["errors"],
            errors=outcome["errors"],
            trojaned=outcome["trojaned"],
        )

    monkeypatch.setattr(job, "run_job", fake_run_job)
    return calls, outcome


SCAN = ["scan", "s3://b/zoo/manifest.jsonl", "--shadow", "s3://b/zoo/shadow.npz", "--out", "/tmp/o"]


def test_scan_passes_every_option_to_the_job_config(fake_job):
    calls, _ = fake_job
    result = runner.invoke(
        app,
        SCAN
        + [
            "--address",
            "ray://head:10001",
            "--profile",
            "paper",
            "--threshold",
            "0.07",
            "--gpus-per-encoder",
            "0.25",
            "--cpus-per-encoder",
            "2",
            "--max-encoders",
            "9",
            "--endpoint-url",
            "http://127.0.0.1:9000",
            "--arch",
            "timm/resnet50",
            "--steps",
            "12",
            "--timeout",
            "30",
            "--max-retries",
            "4",
            "--workers",
            "5",
            "--prefetch",
            "3",
            "--set",
            "max_steps=40",
            "--set",
            "lr_drops=[[10, 0.1]]",
            "--set",
            "settle-fraction=0",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert calls == [
        job.JobConfig(
            source="s3://b/zoo/manifest.jsonl",
            shadow="s3://b/zoo/shadow.npz",
            out="/tmp/o",
            address="ray://head:10001",
            profile="paper",
            threshold=0.07,
            gpus_per_encoder=0.25,
            cpus_per_encoder=2.0,
            max_encoders=9,
            endpoint_url="http://127.0.0.1:9000",
            arch="timm/resnet50",
            steps=12,
            timeout=30.0,
            max_retries=4,
            num_workers=5,
            prefetch=3,
            overrides=(("max_steps", 40), ("lr_drops", ((10, 0.1),)), ("settle_fraction", 0)),
        )
    ]


def test_scan_defaults_leave_settings_to_the_encoder_and_cluster(fake_job):
    calls, _ = fake_job
    assert runner.invoke(app, SCAN + ["--quiet"]).exit_code == 0
    cfg = calls[0]
    assert cfg.address is None and cfg.threshold is None and cfg.gpus_per_encoder is None and cfg.steps is None


@pytest.mark.parametrize(("trojaned", "errors", "code"), [(0, 0, 0), (2, 0, 1), (1, 1, 1), (0, 1, 2)])
def test_scan_exit_code_says_clean_found_or_errors(fake_job, trojaned, errors, code):
    _, outcome = fake_job
    outcome.update(trojaned=trojaned, errors=errors)
    result = runner.invoke(app, SCAN + ["--quiet"])
    assert result.exit_code == code, result.output


def test_a_job_error_exits_2_with_its_message(fake_job):
    _, outcome = fake_job
    outcome["raise"] = job.JobError("no scan worker could start")
    result = runner.invoke(app, SCAN + ["--quiet"])
    assert result.exit_code == 2
    assert "no scan worker could start" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(("given", "expected"), [("1000", 1000), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
                                                ("10kib", 10 * 1024)])
def test_max_checkpoint_size_reaches_the_job_config_in_bytes(fake_job, given, expected):
    calls, _ = fake_job
    result = runner.invoke(app, SCAN + ["--quiet", "--max-checkpoint-size", given])
    assert result.exit_code == 0, result.output
    assert calls[0].max_checkpoint_bytes == expected


def test_max_checkpoint_size_defaults_to_16_gib_and_none_lifts_it(fake_job):
    calls, _ = fake_job
    assert runner.invoke(app, SCAN + ["--quiet"]).exit_code == 0
    assert runner.invoke(app, SCAN + ["--quiet", "--max-checkpoint-size", "none"]).exit_code == 0
    assert [c.max_checkpoint_bytes for c in calls] == [16 << 30, None]
    assert calls[0].load_timeout == 120.0


def test_submit_carries_an_unlimited_size_and_the_load_timeout_to_the_cluster(fake_job):
    from decree_ray.cli.commands import scan_args

    cfg = job.JobConfig(source="s3://b/enc/", shadow="s3://b/shadow.npz", out="s3://b/out/",
                        max_checkpoint_bytes=None, load_timeout=30.0)
    calls, _ = fake_job
    assert runner.invoke(app, scan_args(cfg)[1:]).exit_code == 0
    assert calls[0].max_checkpoint_bytes is None and calls[0].load_timeout == 30.0


def test_scan_and_submit_carry_the_fleet_cluster_setting_and_refuse_one_out_of_range(fake_job):
    from decree_ray.cli.commands import scan_args

    calls, _ = fake_job
    assert runner.invoke(app, SCAN + ["--quiet", "--fleet-cluster", "0"]).exit_code == 0
    cfg = job.JobConfig(source="s3://b/enc/", shadow="s3://b/shadow.npz", out="s3://b/out/", fleet_cluster=0.5)
    assert runner.invoke(app, scan_args(cfg)[1:]).exit_code == 0
    assert [c.fleet_cluster for c in calls] == [0.0, 0.5]
    assert runner.invoke(app, SCAN + ["--quiet", "--fleet-cluster", "2"]).exit_code == 2


def test_scan_and_submit_carry_the_base_models_and_refuse_a_malformed_or_missing_one(fake_job, tmp_path):
    from decree_ray.cli.commands import scan_args

    calls, _ = fake_job
    ckpt = tmp_path / "base.safetensors"
    ckpt.write_bytes(b"x")
    args = ["--base", "timm/tf_efficientnet_lite0=pretrained", "--base", f"timm/test_resnet={ckpt}"]
    assert runner.invoke(app, SCAN + ["--quiet", *args]).exit_code == 0
    assert calls[0].bases == (("timm/tf_efficientnet_lite0", "pretrained"), ("timm/test_resnet", str(ckpt)))
    assert runner.invoke(app, scan_args(calls[0])[1:]).exit_code == 0
    assert calls[1].bases == calls[0].bases
    members = []
    for i in range(16):
        (tmp_path / f"m{i}.pt").write_bytes(b"x")
        members += ["--base", f"timm/a={tmp_path / f'm{i}.pt'}"]
    for bad in (["--base", "pretrained"], ["--base", f"timm/a={tmp_path / 'typo.pt'}"],
                ["--base", "timm/a=pretrained", "--base", "timm/a=pretrained"],
                members[:4], members):  # two consensus members, sixteen
        result = runner.invoke(app, SCAN + ["--quiet", *bad])
        assert result.exit_code == 2 and len(calls) == 2, (bad, result.output)
    assert runner.invoke(app, SCAN + ["--quiet", *members[:6]]).exit_code == 0  # three members: a consensus base
    assert len(calls[2].bases) == 3 and scan_args(calls[2]).count("--base") == 3


def test_the_cli_checks_the_consensus_bounds_of_the_core():
    from decree.consensus import MAX_MEMBERS, MIN_MEMBERS
    from decree_ray.config import CONSENSUS_MEMBERS

    assert CONSENSUS_MEMBERS == (MIN_MEMBERS, MAX_MEMBERS)


@pytest.mark.parametrize("given", ["lots", "5XB", "0", "-1"])
def test_an_unreadable_or_zero_max_checkpoint_size_exits_2_before_any_job_runs(fake_job, given):
    calls, _ = fake_job
    result = runner.invoke(app, SCAN + ["--quiet", "--max-checkpoint-size", given])
    assert result.exit_code == 2 and calls == [], result.output


def test_invalid_options_exit_2_before_any_job_runs(fake_job):
    calls, _ = fake_job
    result = runner.invoke(app, SCAN + ["--timeout", "0"])
    assert result.exit_code == 2 and calls == []


@pytest.mark.parametrize("given", ["max_stepz=3", "no-equals-sign", "profile=paper", "betas=[0.5]]"])
def test_an_unknown_or_malformed_set_exits_2_before_any_job_runs(fake_job, given):
    calls, _ = fake_job
    result = runner.invoke(app, SCAN + ["--quiet", "--set", given])
    assert result.exit_code == 2 and calls == [], result.output


class _FakeClient:
    instances: list["_FakeClient"] = []
    driver_exit_code: int | None = 2

    def __init__(self, address):
        self.address, self.submitted = address, []
        _FakeClient.instances.append(self)

    def submit_job(self, *, entrypoint, runtime_env=None):
        self.submitted.append((entrypoint, runtime_env))
        return "raysubmit_123"

    def get_job_logs(self, job_id):
        return f"logs of {job_id}\n"

    def get_job_info(self, job_id):
        from ray.job_submission import JobDetails, JobStatus, JobType

        return JobDetails(type=JobType.SUBMISSION, job_id=job_id, entrypoint="decree scan", status=JobStatus.FAILED,
                          driver_exit_code=self.driver_exit_code)

    async def tail_job_logs(self, job_id):
        for chunk in ("line 1\n", "line 2\n"):
            yield chunk


def test_submit_sends_the_same_scan_as_a_ray_job(monkeypatch, fake_job):
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _FakeClient)
    _FakeClient.instances.clear()
    result = runner.invoke(
        app,
        [
            "submit",
            *SCAN[1:],
            "--address",
            "http://head:8265",
            "--steps",
            "7",
            "--set",
            "lr_drops=[[10, 0.1]]",
            "--prefetch",
            "0",
            "--max-checkpoint-size",
            "2GiB",
            "--working-dir",
            ".",
            "--pip",
            "decree-ray==0.1.0",
            "--env",
            "AWS_REGION=eu-west-1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "raysubmit_123" in result.output
    client = _FakeClient.instances[0]
    entrypoint, runtime_env = client.submitted[0]
    assert client.address == "http://head:8265"
    assert runtime_env == {"working_dir": ".", "pip": ["decree-ray==0.1.0"], "env_vars": {"AWS_REGION": "eu-west-1"}}
    # the entrypoint, run through the CLI, builds the config `submit` was given
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["decree", "scan"]
    calls, _ = fake_job
    assert runner.invoke(app, argv[1:]).exit_code == 0
    assert calls[0] == job.JobConfig(source=SCAN[1], shadow=SCAN[3], out=SCAN[5], steps=7, prefetch=0,
                                     overrides=(("lr_drops", ((10, 0.1),)),), max_checkpoint_bytes=2 * 2**30)


@pytest.mark.parametrize("follow", [False, True])
def test_status_prints_logs_and_exits_2_for_a_failed_job(monkeypatch, follow):
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _FakeClient)
    result = runner.invoke(
        app, ["status", "raysubmit_123", "--address", "http://h:8265"] + (["--follow"] if follow else [])
    )
    assert result.exit_code == 2
    assert ("line 2" if follow else "logs of raysubmit_123") in result.output and "FAILED" in result.output


def test_status_passes_on_the_scans_exit_code_when_ray_calls_a_finding_a_failure(monkeypatch):
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _FakeClient)
    monkeypatch.setattr(_FakeClient, "driver_exit_code", 1)
    result = runner.invoke(app, ["status", "raysubmit_123", "--address", "http://h:8265"])
    assert result.exit_code == 1, result.output


def _results(tmp_path, pl1s):
    rows = [
        new_row(
            id=f"e{i}",
            uri=f"/e{i}.pt",
            status="ok",
            pl1_norm=p,
            reached_tau=True,
            threshold=0.1,
            verdict="trojaned" if p < 0.1 else "clean",
            label="trojaned" if p < 0.1 else "clean",
        )
        for i, p in enumerate(pl1s)
    ]
    path = tmp_path / "results.parquet"
    pq.write_table(to_table(rows), path)
    return path


@pytest.mark.parametrize(("pl1s", "code"), [([0.02, 0.5, 0.6], 1), ([0.3, 0.5], 0)])
def test_report_exits_1_when_the_table_flags_encoders_and_writes_roc_png(tmp_path, pl1s, code):
    path = _results(tmp_path, pl1s)
    result = runner.invoke(app, ["report", str(path), "--fpr", "0.1", "--json", str(tmp_path / "m.json")])
    assert result.exit_code == code, result.output
    assert (tmp_path / "roc.png").is_file() and (tmp_path / "m.json").is_file()
    assert "most suspicious" in result.output


def test_report_on_a_missing_file_exits_2(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path / "nope.parquet")])
    assert result.exit_code == 2


@pytest.mark.parametrize("command", ["plan", "zoo", "bench"])
def test_the_other_helpers_commands_are_mounted(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
@pytest.mark.s3
def test_demo_scans_a_zoo_from_s3_through_the_real_cli_and_reports(zoo, tmp_path):
    import shutil

    from decree_ray import demo

    shutil.copytree(zoo, tmp_path / "zoo")
    code = demo.run(tmp_path, steps=2, build=False)  # the tiny test zoo, not a trained one
    assert code == 0
    rows = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert sorted(r["id"] for r in rows) == ["copy-of-enc0", "enc0", "enc1", "enc2"]
    assert all(r["status"] == "ok" and r["uri"].startswith("s3://decree-demo/zoo/") for r in rows)
    assert (tmp_path / "out" / "roc.png").is_file()
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("class='card") >= 1 and "data:image/png;base64," in page  # evidence grids inlined


def test_an_unexpected_exception_exits_2_with_one_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    import decree_ray.cli as cli
    from decree_ray import report as report_mod

    def boom(*a, **k):
        raise KeyError("\\x1b]52;c;aGk=\\x07 password=hunter2")  # not one of the errors the command expects

    monkeypatch.setattr(report_mod, "load_rows", boom)
    monkeypatch.setattr("sys.argv", ["decree", "report", str(tmp_path / "r.parquet")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unexpected failure: KeyError" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_the_readme_schema_table_is_the_schema():
    from pathlib import Path

    from decree_ray.schema import SCHEMA_MARKDOWN

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert SCHEMA_MARKDOWN.strip() in readme  # regenerate the README's table from decree_ray.schema if this fails
