"""The consensus base: the coordinate-wise median of fine-tunes votes out any one member's backdoor."""

import copy

import pytest
import torch
from twins import corner_twins

from decree.consensus import consensus_encoder, median_state_dict
from decree.errors import CheckpointError


def test_the_median_takes_the_majoritys_value_wherever_one_member_moved_alone():
    a = {"w": torch.tensor([1.0, 2.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([1.1, 2.1, 2.9]), "n": torch.tensor(7)}
    moved = {"w": torch.tensor([9.0, -9.0, 3.0]), "n": torch.tensor(100)}
    out = median_state_dict([a, moved, b])
    assert torch.allclose(out["w"], torch.tensor([1.1, 2.0, 3.0])) and out["n"].item() == 7
    assert out["n"].dtype == torch.int64 and out["w"].dtype == torch.float32


def test_members_with_other_keys_or_shapes_are_refused():
    a = {"w": torch.zeros(3)}
    with pytest.raises(CheckpointError):
        median_state_dict([a, {"w": torch.zeros(4)}, a])
    with pytest.raises(CheckpointError):
        median_state_dict([a, {"v": torch.zeros(3)}, a])


@pytest.fixture(scope="module")
def twins():
    return corner_twins()


def test_two_members_are_no_consensus(twins):
    clean, trojan, _ = twins
    with pytest.raises(ValueError):
        consensus_encoder([clean, trojan])


def test_a_consensus_that_holds_the_trojan_stands_in_for_its_base(twins, tmp_path):
    """The trojan is one of three members (the others: its clean base and a slightly moved copy of it, as two
    clean fine-tunes would be): its backdoor is voted out, so its trigger does not transfer to the consensus."""
    from decree.inversion import InversionConfig, invert
    from decree.transfer import transfer

    clean, trojan, shadow = twins
    other = copy.deepcopy(clean)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for p in other.backbone.parameters():
            p.add_(1e-3 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    before = {k: v.clone() for k, v in trojan.backbone.state_dict().items()}
    base = consensus_encoder([trojan, clean, other])
    assert all(torch.equal(v, before[k]) for k, v in trojan.backbone.state_dict().items())  # members untouched
    cfg = InversionConfig.from_profile("fast", max_steps=60, min_steps=30, batch_size=16)
    found = invert(trojan, shadow, cfg, device="cpu")
    via_consensus = transfer(trojan, base, shadow, found.mask, found.pattern, cfg.tau)
    via_base = transfer(trojan, clean, shadow, found.mask, found.pattern, cfg.tau)
    assert via_consensus.ratio > 2 and via_consensus.ratio > 0.5 * via_base.ratio, (via_consensus, via_base)


def test_a_worker_builds_the_consensus_of_its_members_and_a_broken_member_is_each_rows_error(zoo, tmp_path):
    import shutil

    from faults import harness
    from safetensors.torch import load_file, save_file
    from faults.zoo import TINY_ARCH, write_encoder

    from decree_ray.worker import ScanWorker

    first = write_encoder(tmp_path / "m0.safetensors", seed=1)  # enc1's weights, three times: the median is enc1
    members = [first] + [shutil.copy(first, tmp_path / f"m{i}.safetensors") for i in (1, 2)]
    bases = tuple((TINY_ARCH, str(m)) for m in members)
    worker = ScanWorker(harness.settings(zoo / "shadow.npz", tmp_path / "out", tmp_path / "cache", bases=bases))
    rows = {r["id"]: r for r in harness.scan_source(str(zoo / "manifest.jsonl"), worker)}
    worker.close()
    assert rows["enc1"]["status"] == "ok" and rows["enc1"]["specific_pl1"] == rows["enc1"]["pl1_norm"]
    assert all(r["base_similarity"] is not None for r in rows.values())
    assert all(r["base_members"] == 3 for r in rows.values())
    # members are the audited party's files: a broken one, or one holding a NaN, drops out while 3 others load
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    state = load_file(str(first))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].clone().fill_(float("nan"))
    save_file(state, str(tmp_path / "nan.safetensors"))
    (tmp_path / "huge.safetensors").write_bytes(b"\0" * (2 * first.stat().st_size))  # over the size limit
    bad = ((TINY_ARCH, str(tmp_path / "broken.safetensors")), (TINY_ARCH, str(tmp_path / "nan.safetensors")),
           (TINY_ARCH, str(tmp_path / "huge.safetensors")))
    limit = int(1.5 * first.stat().st_size)
    worker = ScanWorker(harness.settings(zoo / "shadow.npz", tmp_path / "out2", tmp_path / "cache2", bases=bases + bad,
                                         max_checkpoint_bytes=limit))
    rows = {r["id"]: r for r in harness.scan_source(str(zoo / "manifest.jsonl"), worker)}
    worker.close()
    assert all(r["status"] == "ok" and r["base_members"] == 3 for r in rows.values())
    assert rows["enc1"]["specific_pl1"] == rows["enc1"]["pl1_norm"]
    worker = ScanWorker(harness.settings(zoo / "shadow.npz", tmp_path / "out3", tmp_path / "cache3",
                                         bases=bases[:1] + bad, max_checkpoint_bytes=limit))  # fewer than 3 load: each row says why
    rows = harness.scan_source(str(zoo / "manifest.jsonl"), worker)
    worker.close()
    assert rows and all(r["status"] == "error" and "1 of 4 consensus members loaded" in r["error"]
                        and "broken.safetensors" in r["error"] and "NaN" in r["error"]
                        and "over --max-checkpoint-size" in r["error"] for r in rows), rows[0]["error"]


def test_consensus_members_spread_over_the_listing_and_every_task_still_comes_through():
    from decree_ray.bases import pick_members, resolve
    from decree_ray.sources import EncoderTask

    tasks = [EncoderTask(id=f"e{i}", uri=f"/f/e{i}.pt", arch="a" if i % 2 else "b") for i in range(30)]
    tasks += [EncoderTask(id="idx", uri="/f/x.safetensors.index.json", arch="a"),
              EncoderTask(id="bad", uri="/f/bad.pt", arch="a", status="error", error="unreadable")]
    it, picked = pick_members(iter(tasks), ["a"], members=5, window=20)
    assert list(it) == tasks  # none lost, none twice, in order
    assert picked == {"a": ["/f/e1.pt", "/f/e5.pt", "/f/e9.pt", "/f/e15.pt", "/f/e19.pt"]}  # within the window
    assert resolve((("a", "consensus"), ("b", "pretrained")), picked) == (
        *(("a", u) for u in picked["a"]), ("b", "pretrained"))


@pytest.mark.ray
def test_a_scan_with_a_consensus_base_picks_its_members_from_the_listing_and_refuses_too_few(zoo, tmp_path):
    import ray
    from conftest import FAST_OVERRIDES
    from faults.zoo import TINY_ARCH

    from decree_ray import results as results_mod
    from decree_ray.job import JobConfig, JobError, run_job

    def config(src, out):
        return JobConfig(source=str(src), shadow=str(zoo / "shadow.npz"), out=str(out), steps=3, arch=TINY_ARCH,
                         overrides=FAST_OVERRIDES, num_workers=1, bases=((TINY_ARCH, "consensus"),))

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_job(config(zoo / "encoders", tmp_path / "out"))
        members = summary.consensus[TINY_ARCH]
        assert len(members) == 4 and all(m.startswith(str(zoo / "encoders")) for m in members)
        rows = results_mod.load_rows(str(tmp_path / "out"))
        assert len(rows) == 4 and all(r["status"] == "ok" and r["base_similarity"] is not None for r in rows)
        again = run_job(config(zoo / "encoders", tmp_path / "out"))  # same listing, same members: all reused
        assert again.scanned == 0 and again.consensus == summary.consensus
        few = tmp_path / "few"
        few.mkdir()
        for name in ("enc1", "enc2"):
            (few / f"{name}.safetensors").write_bytes((zoo / "encoders" / f"{name}.safetensors").read_bytes())
        with pytest.raises(JobError, match="found .*: 2"):
            run_job(config(few, tmp_path / "out-few"))
    finally:
        ray.shutdown()
