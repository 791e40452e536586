"""`decree plan`: the listing it prices and the GPU-hour arithmetic (decree_ray/cli/plan.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from decree_ray.cli import plan as cli_plan
from decree_ray.cli.plan import EncoderRecord, Timings, iter_records, load_timings, make_plan

MiB = 1 << 20


def _touch(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)  # the plan never opens a checkpoint: any bytes will do
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "fleet"
    _touch(root / "a.safetensors", 3 * MiB)
    (root / "a.safetensors.json").write_text(json.dumps({"arch": "open_clip/ViT-B-32"}))
    _touch(root / "team" / "b.pt", 2 * MiB)
    _touch(root / "team" / "c.pth", 1 * MiB)
    (root / "team" / "c.json").write_text(json.dumps({"arch": "timm/resnet10t"}))  # <stem>.json sidecar
    (root / "README.txt").write_text("not a checkpoint")
    return root


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    root = tmp_path / "zoo"
    lines = []
    for i, (arch, size) in enumerate([("timm/resnet10t", 1000), ("timm/resnet10t", 3000), ("torchvision/resnet18", 500)]):
        _touch(root / "encoders" / f"e{i}.safetensors", size)
        lines.append({"id": f"e{i}", "uri": f"encoders/e{i}.safetensors", "arch": arch, "label": "clean"})
    lines.append({"id": "bad", "uri": "../outside.safetensors", "arch": "timm/resnet10t"})  # an error row, no GPU time
    path = root / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


# ------------------------------------------------------------------------------------ arithmetic (pure)


def test_plan_groups_by_arch_and_sums_gpu_seconds_from_measured_timings():
    records = [EncoderRecord(f"s3://b/{i}", "timm/resnet10t", 100) for i in range(6)]
    records += [EncoderRecord(f"s3://b/c{i}", "open_clip/ViT-B-32", 1000) for i in range(2)]
    timings = Timings({"timm/resnet10t": 30.0, "open_clip/ViT-B-32": 300.0}, "measured (test)")
    plan = make_plan(records, gpus=4, timings=timings)

    by_arch = {ln.arch: ln for ln in plan.lines}
    assert (by_arch["timm/resnet10t"].count, by_arch["timm/resnet10t"].total_bytes) == (6, 600)
    assert (by_arch["open_clip/ViT-B-32"].count, by_arch["open_clip/ViT-B-32"].total_bytes) == (2, 2000)
    assert plan.count == 8 and plan.total_bytes == 2600
    # 6 x 30 s + 2 x 300 s = 780 GPU-seconds; on 4 GPUs 195 s, but one CLIP alone takes 300 s.
    assert plan.gpu_hours == pytest.approx(780 / 3600)
    assert plan.wall_hours == pytest.approx(300 / 3600)
    assert {ln.seconds_source for ln in plan.lines} == {"measured (test)"}


def test_wall_time_divides_by_gpus_and_adds_startup_and_cost_bills_startup_per_gpu():
    records = [EncoderRecord(str(i), "timm/x", 1) for i in range(100)]
    plan = make_plan(records, gpus=10, seconds_per_encoder=36.0, startup_minutes=6.0, dollars_per_gpu_hour=2.0)
    assert plan.gpu_hours == pytest.approx(1.0)  # 100 x 36 s
    assert plan.wall_hours == pytest.approx(0.1 + 0.1)  # 3600 s / 10 GPUs + 6 min
    assert plan.billed_gpu_hours == pytest.approx(1.0 + 10 * 0.1)
    assert plan.dollars == pytest.approx(4.0)


def test_unmeasured_arches_use_labelled_placeholders():
    plan = make_plan(
        [EncoderRecord("a", "open_clip/ViT-L-14", 1), EncoderRecord("b", "weird/net", 1), EncoderRecord("c", None, 1)],
        gpus=1, timings=Timings({"timm/resnet10t": 5.0}, "measured"),
    )
    by_arch = {ln.arch: ln for ln in plan.lines}
    assert by_arch["open_clip/ViT-L-14"].seconds_per_encoder == cli_plan.PLACEHOLDER_SECONDS["open_clip"]
    assert by_arch["weird/net"].seconds_per_encoder == cli_plan.PLACEHOLDER_UNKNOWN_ARCH
    assert cli_plan.UNKNOWN_ARCH in by_arch
    assert all(ln.seconds_source.startswith("placeholder") for ln in plan.lines)
    assert "placeholder seconds are not measurements" in cli_plan.render(plan)


def test_unknown_sizes_are_counted_apart_not_as_zero_bytes():
    plan = make_plan([EncoderRecord("a", "timm/x", 10), EncoderRecord("b", "timm/x", None)], gpus=1)
    (line,) = plan.lines
    assert (line.count, line.total_bytes, line.unknown_size) == (2, 10, 1)


@pytest.mark.parametrize("kwargs", [{"gpus": 0}, {"gpus": 2, "seconds_per_encoder": 0.0}])
def test_invalid_plan_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        make_plan([EncoderRecord("a", "timm/x", 1)], **kwargs)


# ----------------------------------------------------------------------------------------- timings file


def test_timings_from_a_seconds_per_encoder_table(tmp_path: Path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"device": "cuda:0 (A10G)", "seconds_per_encoder": {"timm/resnet10t": 12.5}}))
    timings = load_timings(path)
    assert timings.seconds == {"timm/resnet10t": 12.5}
    assert "A10G" in timings.source


def test_timings_from_rows_take_the_median_of_ok_gpu_rows(tmp_path: Path):
    rows = [
        {"arch": "timm/a", "seconds": 10.0, "device": "cuda:0", "status": "ok"},
        {"arch": "timm/a", "seconds": 30.0, "device": "cuda:0", "status": "ok"},
        {"arch": "timm/a", "seconds": 20.0, "device": "cuda:0", "status": "ok"},
        {"arch": "timm/a", "seconds": 999.0, "device": "cuda:0", "status": "error"},
        {"arch": "timm/a", "seconds": 500.0, "device": "cpu", "status": "ok"},  # CPU rows lose to GPU rows
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"rows": rows}))
    timings = load_timings(path)
    assert timings.seconds == {"timm/a": 20.0}
    assert "cuda" in timings.source


def test_missing_timings_file_means_no_measurements(tmp_path: Path):
    assert load_timings(tmp_path / "nope.json") is None


# --------------------------------------------------------------------------------------------- listing


def test_folder_listing_counts_checkpoints_with_sizes_and_sidecar_arches(folder: Path):
    records = sorted(iter_records(str(folder), arch="torchvision/resnet18"), key=lambda r: r.uri)
    assert [Path(r.uri).name for r in records] == ["a.safetensors", "b.pt", "c.pth"]
    assert [r.size_bytes for r in records] == [3 * MiB, 2 * MiB, 1 * MiB]
    # sidecars win over --arch; --arch fills the one without a sidecar
    assert [r.arch for r in records] == ["open_clip/ViT-B-32", "torchvision/resnet18", "timm/resnet10t"]


def test_manifest_listing_takes_arch_from_the_manifest_and_sizes_from_the_files(manifest: Path):
    records = list(iter_records(str(manifest)))
    assert sorted((Path(r.uri).name, r.arch, r.size_bytes) for r in records) == [
        ("e0.safetensors", "timm/resnet10t", 1000),
        ("e1.safetensors", "timm/resnet10t", 3000),
        ("e2.safetensors", "torchvision/resnet18", 500),
    ]


@pytest.mark.s3
def test_s3_manifest_sizes_come_from_one_listing_of_its_folder(monkeypatch):
    moto = pytest.importorskip("moto")
    from decree_ray import storage

    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    storage.s3_client.cache_clear()
    try:
        with moto.mock_aws():
            s3 = storage.s3_client()
            s3.create_bucket(Bucket="fleet")
            s3.put_object(Bucket="fleet", Key="zoo/encoders/e0.safetensors", Body=b"\0" * 700)
            s3.put_object(Bucket="fleet", Key="zoo/encoders/e1.safetensors", Body=b"\0" * 300)
            manifest = "\n".join(
                json.dumps({"id": f"e{i}", "uri": f"encoders/e{i}.safetensors", "arch": "timm/resnet10t"}) for i in range(2)
            )
            s3.put_object(Bucket="fleet", Key="zoo/manifest.jsonl", Body=manifest.encode())
            plan = make_plan(iter_records("s3://fleet/zoo/manifest.jsonl"), gpus=1)
    finally:
        storage.s3_client.cache_clear()
    (line,) = plan.lines
    assert (line.arch, line.count, line.total_bytes, line.unknown_size) == ("timm/resnet10t", 2, 1000, 0)


# ------------------------------------------------------------------------------------------------- CLI


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("plan")(cli_plan.plan_command)
    app.command("noop")(lambda: None)  # two commands, so "plan" stays a subcommand as in `decree`
    return app


def test_plan_command_prints_json_plan_for_a_manifest(manifest: Path, tmp_path: Path):
    timings = tmp_path / "t.json"
    timings.write_text(json.dumps({"seconds_per_encoder": {"timm/resnet10t": 36.0, "torchvision/resnet18": 72.0}}))
    result = CliRunner().invoke(
        _app(), ["plan", str(manifest), "--gpus", "2", "--timings", str(timings), "--startup-minutes", "0", "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["encoders"] == 3 and out["total_bytes"] == 4500
    assert out["gpu_hours"] == pytest.approx((2 * 36 + 72) / 3600)
    assert out["wall_hours"] == pytest.approx(72 / 3600)  # 144 s / 2 GPUs = 72 s = the slowest encoder
    assert {a["arch"]: a["count"] for a in out["by_arch"]} == {"timm/resnet10t": 2, "torchvision/resnet18": 1}


def test_plan_command_table_names_where_the_seconds_came_from(folder: Path, tmp_path: Path):
    result = CliRunner().invoke(
        _app(), ["plan", str(folder), "--gpus", "3", "--timings", str(tmp_path / "absent.json"), "--dollars-per-gpu-hour", "1.5"]
    )
    assert result.exit_code == 0, result.output
    assert "placeholder (open_clip, not measured)" in result.output
    assert "wall time on 3 GPU(s)" in result.output and "$1.5/GPU-h" in result.output


def test_plan_command_exits_2_with_a_message_for_a_missing_source(tmp_path: Path):
    result = CliRunner().invoke(_app(), ["plan", str(tmp_path / "nowhere")])
    assert result.exit_code == 2, result.output
    assert "source not found" in result.output


def test_decree_cli_mounts_plan():
    cli = pytest.importorskip("decree_ray.cli", reason="decree_ray/cli (scale layer) not written yet")
    result = CliRunner().invoke(cli.app, ["plan", "--help"])
    assert result.exit_code == 0, result.output
    assert "--seconds-per-encoder" in result.output
