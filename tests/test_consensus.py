"""The consensus base: the coordinate-wise median of fine-tunes votes out any one member's backdoor."""

import copy

import pytest
import torch
from twins import corner_twins

from decree.consensus import (
    FINETUNE_DISTANCE,
    clusters,
    consensus_encoder,
    median_state_dict,
    weight_distance,
)
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


def _moved(state, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * v.abs().mean() * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in state.items()}


def test_fine_tunes_of_one_model_are_near_and_models_trained_apart_are_far():
    gen = torch.Generator().manual_seed(0)
    a = {"conv": torch.randn(8, 3, 3, 3, generator=gen), "fc": torch.randn(4, 8, generator=gen), "bias": torch.randn(4)}
    b = {k: torch.randn(v.shape, generator=gen) for k, v in a.items()}
    assert weight_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert weight_distance(a, _moved(a, 0.05, 1)) < 0.01
    assert weight_distance(a, {k: 7.0 * v for k, v in a.items()}) == pytest.approx(0.0, abs=1e-9)  # a rescaled layer
    assert weight_distance(a, b) > 0.5
    assert weight_distance(a, {k: torch.full_like(v, float("nan")) for k, v in a.items()}) == 1.0
    assert weight_distance({"bias": a["bias"]}, {"bias": a["bias"]}) == 1.0  # no kernel in common: nothing to say


def test_members_group_by_the_model_they_were_fine_tuned_from_and_a_chain_cannot_join_two_bases():
    gen = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(64, 64, generator=gen)}
    b = {"w": torch.randn(64, 64, generator=gen)}
    fleet = [_moved(a, 0.1, i) for i in range(4)] + [_moved(b, 0.1, 10 + i) for i in range(3)]
    fleet.append({"w": torch.randn(64, 64, generator=gen)})  # trained apart from both
    groups = clusters(fleet)
    assert groups == [[0, 1, 2, 3], [4, 5, 6], [7]]
    # in-between models, each near the next: complete linkage keeps the two ends apart
    chain = [{"w": torch.lerp(a["w"], b["w"], t / 10)} for t in range(11)]
    assert all(weight_distance(chain[i], chain[i + 1]) < FINETUNE_DISTANCE for i in range(10))
    assert not any(0 in g and 10 in g for g in clusters(chain))


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
    from faults.zoo import TINY_ARCH, write_encoder
    from safetensors.torch import load_file, save_file

    from decree_ray.worker import ScanWorker

    first = write_encoder(tmp_path / "m0.safetensors", seed=1)  # enc1's weights, three times: the median is enc1
    members = [first] + [shutil.copy(first, tmp_path / f"m{i}.safetensors") for i in (1, 2)]
    bases = tuple((TINY_ARCH, str(m)) for m in members)
    worker = ScanWorker(harness.settings(zoo / "shadow.npz", tmp_path / "out", tmp_path / "cache", bases=bases))
    rows = {r["id"]: r for r in harness.scan_source(str(zoo / "manifest.jsonl"), worker)}
    worker.close()
    assert rows["enc1"]["status"] == "ok" and rows["enc1"]["specific_pl1"] == rows["enc1"]["pl1_norm"]
    assert rows["enc1"]["base_members"] == 3 and rows["enc1"]["base_distance"] == pytest.approx(0.0, abs=1e-6)
    # the other tiny encoders were trained apart from enc1: no transfer score against a model they do not descend from
    others = [r for k, r in rows.items() if k != "enc1"]
    assert others and all(r["status"] == "ok" and r["base_members"] == 0 and r["specific_pl1"] is None
                          and r["base_distance"] > FINETUNE_DISTANCE for r in others)
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
    assert all(r["status"] == "ok" for r in rows.values()) and rows["enc1"]["base_members"] == 3
    assert rows["enc1"]["specific_pl1"] == rows["enc1"]["pl1_norm"]
    worker = ScanWorker(harness.settings(zoo / "shadow.npz", tmp_path / "out3", tmp_path / "cache3",
                                         bases=bases[:1] + bad, max_checkpoint_bytes=limit))  # fewer than 3 load: each row says why
    rows = harness.scan_source(str(zoo / "manifest.jsonl"), worker)
    worker.close()
    assert rows and all(r["status"] == "error" and "1 of 4 consensus members loaded" in r["error"]
                        and "broken.safetensors" in r["error"] and "NaN" in r["error"]
                        and "over --max-checkpoint-size" in r["error"] for r in rows), rows[0]["error"]


def test_consensus_members_are_picked_by_digest_and_a_grown_listing_keeps_them():
    import hashlib

    from decree_ray.bases import pick_members, resolve
    from decree_ray.sources import EncoderTask

    tasks = [EncoderTask(id=f"e{i}", uri=f"/f/e{i}.pt", arch="a" if i % 2 else "b") for i in range(30)]
    tasks += [EncoderTask(id="idx", uri="/f/x.safetensors.index.json", arch="a"),
              EncoderTask(id="bad", uri="/f/bad.pt", arch="a", status="error", error="unreadable")]
    it, picked, auto = pick_members(iter(tasks), ["a"], members=5, window=20)
    assert list(it) == tasks  # none lost, none twice, in order
    listed = [f"/f/e{i}.pt" for i in range(1, 20, 2)]  # the window's single-file, pending encoders of a
    by_digest = sorted(listed, key=lambda u: hashlib.sha256(u.encode()).hexdigest())
    assert picked == {"a": by_digest[:5]} and auto == []
    assert picked["a"] != listed[:5] and picked["a"] != listed[::2]  # not the listing order's first or its spread
    assert resolve((("a", "consensus"), ("b", "pretrained")), picked) == (
        *(("a", u) for u in picked["a"]), ("b", "pretrained"))
    # a listing grown by encoders that sort after the members keeps them (the settings key, and so the rows)
    grown = tasks[:10] + [EncoderTask(id=f"n{i}", uri=f"/f/n{i}.pt", arch="a") for i in range(40)] + tasks[10:]
    late = [t.uri for t in grown[10:50]
            if hashlib.sha256(t.uri.encode()).hexdigest() < hashlib.sha256(by_digest[4].encode()).hexdigest()]
    _, again, _ = pick_members(iter(grown), ["a"], members=5, window=len(grown))
    assert again["a"] == sorted(by_digest[:5] + late, key=lambda u: hashlib.sha256(u.encode()).hexdigest())[:5]
    # by default, every architecture no --base names gets its consensus too; one with fewer than 3 encoders none
    tasks.append(EncoderTask(id="lone", uri="/f/lone.pt", arch="c"))
    it, picked, auto = pick_members(iter(tasks), [], members=5, window=40, auto_except={"b"})
    assert list(it) == tasks and auto == ["a"] and list(picked) == ["a"] and len(picked["a"]) == 5
    assert resolve((("b", "pretrained"),), picked) == (("b", "pretrained"), *(("a", u) for u in picked["a"]))


def _fleet(zoo, folder):
    """enc1, three fine-tunes of it (its weights slightly moved), and enc2, trained apart."""
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    state = load_file(str(zoo / "encoders" / "enc1.safetensors"))
    for name in ("enc1", "enc2"):
        (folder / f"{name}.safetensors").write_bytes((zoo / "encoders" / f"{name}.safetensors").read_bytes())
    for i in range(3):
        save_file({k: v.contiguous() for k, v in _moved(state, 0.05, i).items()}, str(folder / f"ft{i}.safetensors"))
    return folder


@pytest.mark.ray
def test_a_scan_builds_a_consensus_by_default_and_compares_only_the_fine_tunes_of_it(zoo, tmp_path):
    import ray
    from conftest import FAST_OVERRIDES
    from faults.zoo import TINY_ARCH

    from decree_ray import results as results_mod
    from decree_ray.job import JobConfig, JobError, init_local_ray, run_job

    def config(src, out, **kw):
        return JobConfig(source=str(src), shadow=str(zoo / "shadow.npz"), out=str(out), steps=3, arch=TINY_ARCH,
                         overrides=FAST_OVERRIDES, num_workers=1, **kw)

    fleet = _fleet(zoo, tmp_path / "fleet")
    init_local_ray(2)
    try:
        summary = run_job(config(fleet, tmp_path / "out"))
        assert len(summary.consensus[TINY_ARCH]) == 5  # every listed encoder (up to 9) is a candidate
        rows = {r["id"].removesuffix(".safetensors"): r for r in results_mod.load_rows(str(tmp_path / "out"))}
        assert len(rows) == 5 and all(r["status"] == "ok" for r in rows.values())
        near = {k for k, r in rows.items() if r["base_members"] == 4 and r["base_similarity"] is not None}
        assert near == {"enc1", "ft0", "ft1", "ft2"}
        assert rows["enc2"]["base_members"] == 0 and rows["enc2"]["specific_pl1"] is None
        again = run_job(config(fleet, tmp_path / "out"))  # same listing, same members: all reused
        assert again.scanned == 0 and again.consensus == summary.consensus
        off = run_job(config(fleet, tmp_path / "off", consensus=False))
        assert off.consensus == {} and all(r["base_members"] is None and r["specific_pl1"] is None
                                           for r in results_mod.load_rows(str(tmp_path / "off")))
        # named explicitly, a consensus needs 3 candidates; by default, fewer only means none
        few = tmp_path / "few"
        few.mkdir()
        for name in ("enc1", "enc2"):
            (few / f"{name}.safetensors").write_bytes((zoo / "encoders" / f"{name}.safetensors").read_bytes())
        with pytest.raises(JobError, match="found .*: 2"):
            run_job(config(few, tmp_path / "out-few", bases=((TINY_ARCH, "consensus"),)))
        assert run_job(config(few, tmp_path / "out-few2")).ok == 2
    finally:
        ray.shutdown()


def test_members_that_load_slowly_cannot_spend_more_than_twice_the_load_timeout(tmp_path):
    """Members are the audited party's files: ones that hang until --load-timeout would each cost it again; all
    of them together get twice that, then the rest are skipped (and a default consensus is simply none)."""
    import time

    from faults.zoo import TINY_ARCH, write_encoder
    from safetensors.torch import load_file

    from decree_ray.base_models import BaseModels
    from decree_ray.worker import ScanSettings, error_text

    class SlowReader:
        calls = 0

        def read(self, path, **_):
            SlowReader.calls += 1
            time.sleep(0.6)  # over the 0.5 s load timeout, and leaves 0.4 s of slack for the rest of a load
            return load_file(str(path))

    paths = [str(write_encoder(tmp_path / f"m{i}.safetensors", seed=1)) for i in range(6)]
    for auto in ((TINY_ARCH,), ()):
        SlowReader.calls = 0
        settings = ScanSettings(shadow="unused", load_timeout=0.5, bases=tuple((TINY_ARCH, p) for p in paths),
                                auto_bases=auto)
        bases = BaseModels(settings, SlowReader(), tmp_path / "cache", "cpu", error_text)
        if auto:
            assert bases.get(TINY_ARCH, None) == [] and SlowReader.calls == 2  # the 1 s budget spent after two
        else:
            with pytest.raises(RuntimeError, match="2 of 6 consensus members loaded.*load budget"):
                bases.get(TINY_ARCH, None)
            assert SlowReader.calls == 2


def test_members_kept_on_disk_give_the_same_groups_and_median_as_members_in_memory(tmp_path):
    """SavedState is the worker's way to hold members (one tensor at a time); it must change nothing but memory,
    for tied weights and channels-last kernels too (safetensors refuses both as they come)."""
    from decree.consensus import SavedState, consensus_from_states, distance_matrix

    gen = torch.Generator().manual_seed(0)
    a = {"conv": torch.randn(8, 3, 3, 3, generator=gen).to(memory_format=torch.channels_last),
         "fc": torch.randn(4, 8, generator=gen), "n": torch.tensor(3)}
    a["tied"] = a["fc"]
    b = {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in a.items()}
    fleet = [_moved(a, 0.05, i) for i in range(4)] + [_moved(b, 0.05, 10 + i) for i in range(3)]
    fleet[0]["tied"] = fleet[0]["fc"]
    saved = [SavedState.save(sd, tmp_path / f"{i}.safetensors") for i, sd in enumerate(fleet)]
    assert sorted(saved[0]) == sorted(fleet[0]) and torch.equal(saved[0]["conv"], fleet[0]["conv"])
    flat = [d for row in distance_matrix(saved) for d in row]
    assert flat == pytest.approx([d for row in distance_matrix(fleet) for d in row])
    assert clusters(saved) == clusters(fleet) == [[0, 1, 2, 3], [4, 5, 6]]

    class Holder(torch.nn.Module):  # an "encoder" whose backbone holds exactly these tensors
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Module()
            for k, v in fleet[0].items():
                self.backbone.register_buffer(k, torch.zeros_like(v))

    names = [f"m{i}" for i in range(7)]
    on_disk = consensus_from_states(saved, names, lambda _first: Holder())
    in_memory = consensus_from_states(fleet, names, lambda _first: Holder())
    assert [c.indices for c in on_disk] == [c.indices for c in in_memory] == [(0, 1, 2, 3), (4, 5, 6)]
    for x, y, group in zip(on_disk, in_memory, ((0, 1, 2, 3), (4, 5, 6))):
        want = median_state_dict([fleet[i] for i in group])
        got, also = x.encoder.backbone.state_dict(), y.encoder.backbone.state_dict()
        assert all(torch.equal(got[k], want[k]) and torch.equal(also[k], want[k]) for k in want)


def test_a_worker_holds_about_one_member_at_a_time_while_it_builds_a_consensus(tmp_path, monkeypatch):
    """A worker that held every member as a model needed 9 models of memory for the default consensus (11 GB for
    ViT-L/14 towers): it keeps each member on disk once checked, so at most one is alive at a time."""
    import gc
    import shutil
    import weakref

    from faults.zoo import TINY_ARCH, write_encoder
    from safetensors.torch import load_file

    import decree.encoders
    from decree_ray.base_models import BaseModels
    from decree_ray.worker import ScanSettings, error_text

    first = write_encoder(tmp_path / "m0.safetensors", seed=1)
    paths = [first] + [shutil.copy(first, tmp_path / f"m{i}.safetensors") for i in range(1, 9)]
    alive, most = weakref.WeakSet(), [0]
    real = decree.encoders.create_encoder

    def counting(*args, **kwargs):
        gc.collect()
        most[0] = max(most[0], len(alive))
        encoder = real(*args, **kwargs)
        alive.add(encoder)
        return encoder

    monkeypatch.setattr(decree.encoders, "create_encoder", counting)

    class Reader:
        def read(self, path, **_):
            return load_file(str(path))

    settings = ScanSettings(shadow="unused", bases=tuple((TINY_ARCH, str(p)) for p in paths))
    bases = BaseModels(settings, Reader(), tmp_path / "cache", "cpu", error_text).get(TINY_ARCH, None)
    assert len(bases) == 1 and bases[0].members == 9
    assert most[0] <= 1, f"{most[0]} members alive at once"
    assert not any((tmp_path / "cache").rglob("*.safetensors"))  # the members' copies are gone


def test_a_worker_whose_cache_disk_is_full_keeps_the_members_in_memory_and_builds_the_same_consensus(tmp_path,
                                                                                                   monkeypatch):
    import shutil
    from collections import namedtuple

    from faults.zoo import TINY_ARCH, write_encoder
    from safetensors.torch import load_file

    from decree.consensus import SavedState
    from decree_ray import base_models
    from decree_ray.worker import ScanSettings, error_text

    paths = [write_encoder(tmp_path / f"m{i}.safetensors", seed=1) for i in range(3)]

    class Reader:
        def read(self, path, **_):
            return load_file(str(path))

    settings = ScanSettings(shadow="unused", bases=tuple((TINY_ARCH, str(p)) for p in paths))
    on_disk = base_models.BaseModels(settings, Reader(), tmp_path / "c1", "cpu", error_text).get(TINY_ARCH, None)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(1 << 30, 1 << 30, 0))

    def no_space(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SavedState, "save", no_space)  # what writing would do on a full disk
    in_memory = base_models.BaseModels(settings, Reader(), tmp_path / "c2", "cpu", error_text).get(TINY_ARCH, None)
    a, b = on_disk[0].encoder.backbone.state_dict(), in_memory[0].encoder.backbone.state_dict()
    assert in_memory[0].members == 3 and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_memory_benchmark_builds_the_same_median_both_ways(tmp_path):
    from faults.zoo import TINY_ARCH

    from decree_ray.bench_memory import run

    result = run(TINY_ARCH, tmp_path, repeats=1)
    assert result["same_median"] and [r["groups"] for r in result["runs"]] == [[9], [9]]
    assert (tmp_path / "MEMORY.md").read_text().count("| one tensor at a time |") == 1


def test_the_median_goes_into_an_encoders_own_channels_last_kernels_not_into_copies_of_them():
    """An Encoder's state_dict hands out contiguous copies of its channels-last kernels: a median written into
    those would leave the model's weights unchanged."""
    from faults.zoo import TINY_ARCH, TINY_SIZE

    from decree.consensus import median_into
    from decree.encoders import create_encoder

    members = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        members.append(create_encoder(TINY_ARCH, image_size=TINY_SIZE))
    states = [m.backbone.state_dict() for m in members]
    want = median_state_dict(states)
    target = copy.deepcopy(members[0])
    median_into(states, target.backbone)
    got = target.backbone.state_dict()
    assert any(v.dim() == 4 for v in want.values()) and all(torch.equal(got[k], want[k]) for k in want)
