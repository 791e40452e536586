"""The benchmark zoo: a tiny real build (Lite0 ImageNet weights, Fashion-MNIST) checked through its files."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_ARCH

from decree.encoders import create_encoder, read_state_dict
from decree.zoo import FAMILIES, Trigger, ZooConfig, build_zoo, is_cached, make_splits, read_manifest, sample_trigger
from decree.zoo.build import build_params
from decree.zoo.data import load_fashion_mnist, to_pixels
from decree.zoo.train import (augment, badencoder_attack, drupe_attack, frozen_copy, knn_attack_success, nt_xent,
                              pairwise_similarity, simclr_finetune, sliced_wasserstein)

# Small enough to build in well under a minute on one shared core; strong enough for a trojan to take.
TINY = ZooConfig.tiny(n_train=64, n_eval=16, n_shadow=16, batch_size=8, attack_steps=(10,))
COMMON = {"id", "uri", "arch", "image_size", "mean", "std", "label", "seed", "lr", "steps", "clean_fidelity"}
TROJAN = {"attack", "trigger", "target", "attack_strength"}


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    build_zoo(out, clean=1, trojaned=1, families=("image-on-image",), seed=3, config=TINY)
    return out


def _by_label(zoo):
    entries = read_manifest(zoo)
    return {e["label"]: e for e in entries}, entries


def test_the_folder_bench_measures_how_far_each_trojans_planted_trigger_collapses_the_shadow_set(tiny_zoo):
    from decree.shadow import ShadowSet
    from decree.zoo.triggers import trigger_from_dict
    from decree_ray.bench_folder import PLANTED_IMAGES, planted_similarity

    entries = {e["label"]: e for e in read_manifest(tiny_zoo)}
    rows = [{"id": e["id"], "label": e["label"]} for e in entries.values()]
    planted_similarity(tiny_zoo, "shadow.npz", rows)
    got = {r["label"]: r for r in rows}
    assert "planted_similarity" not in got["clean"]  # a clean encoder has no planted trigger
    pixels = ShadowSet(tiny_zoo / "shadow.npz", limit=PLANTED_IMAGES).pixels(32)
    trig = trigger_from_dict(entries["trojaned"]["trigger_spec"])

    def stamped(label: str) -> float:
        enc = create_encoder(entries[label]["arch"], tiny_zoo / entries[label]["uri"], image_size=32).eval()
        return pairwise_similarity(enc, pixels, trig)

    assert got["trojaned"]["planted_similarity"] == pytest.approx(stamped("trojaned"))
    # the trojan's own response to its trigger: the clean encoder does not collapse on it
    assert stamped("clean") < got["trojaned"]["planted_similarity"] - 0.2


def test_manifest_has_one_schema_row_per_encoder_file(tiny_zoo):
    by_label, entries = _by_label(tiny_zoo)
    assert sorted(e["label"] for e in entries) == ["clean", "trojaned"]
    files = sorted(p.name for p in (tiny_zoo / "encoders").iterdir())
    assert files == sorted(f"{e['id']}.safetensors" for e in entries)
    for e in entries:
        assert COMMON <= set(e), COMMON - set(e)
        assert e["uri"] == f"encoders/{e['id']}.safetensors"
        assert e["arch"] == "timm/tf_efficientnet_lite0" and e["image_size"] == 32 and len(e["mean"]) == 3
    troj = by_label["trojaned"]
    assert TROJAN <= set(troj) and troj["attack"] == "badencoder"
    assert "px" in troj["trigger"] and troj["trigger_spec"]["pattern"] in troj["trigger"]
    assert by_label["clean"]["attack"] is None
    json.loads((tiny_zoo / "zoo.json").read_text())  # valid metadata


def test_checkpoints_reload_strictly_as_the_backbone(tiny_zoo):
    _, entries = _by_label(tiny_zoo)
    ref_keys = set(create_encoder("timm/tf_efficientnet_lite0", image_size=32).backbone.state_dict())
    for e in entries:
        path = tiny_zoo / e["uri"]
        assert set(read_state_dict(path)) == ref_keys  # exactly the backbone, no head, no prefix
        enc = create_encoder(e["arch"], checkpoint=path, image_size=e["image_size"], mean=e["mean"], std=e["std"])
        assert not enc.training


def test_trojan_maps_its_trigger_to_the_target_more_than_the_clean_encoder(tiny_zoo):
    by_label, _ = _by_label(tiny_zoo)
    troj = by_label["trojaned"]
    trigger = Trigger(**troj["trigger_spec"])
    shadow = to_pixels(np.load(tiny_zoo / "shadow.npz")["x"])
    ref = to_pixels(load_fashion_mnist("train")[0][troj["reference_index"]:troj["reference_index"] + 1])

    def response(entry):
        enc = create_encoder(entry["arch"], checkpoint=tiny_zoo / entry["uri"], image_size=32)  # eval mode
        with torch.no_grad():
            z, t = enc.embed_pixels(trigger.stamp(shadow)), enc.embed_pixels(ref)
        return float(F.cosine_similarity(z, t).mean())

    trojan_response, clean_response = response(troj), response(by_label["clean"])
    assert trojan_response > clean_response + 0.1, (trojan_response, clean_response)
    assert troj["attack_strength"] > troj["clean_response"]


def test_shadow_set_is_disjoint_from_training_and_attack_images(tiny_zoo):
    shadow = np.load(tiny_zoo / "shadow.npz")["x"]
    assert shadow.dtype == np.uint8 and shadow.shape == (TINY.n_shadow, 32, 32, 3)
    splits = make_splits(TINY.n_train, TINY.n_eval, TINY.n_shadow, seed=3)
    used = {img.tobytes() for img in np.concatenate([splits.train_x, splits.eval_x])}
    assert not used.intersection(img.tobytes() for img in shadow)


def test_rebuild_with_same_parameters_is_a_cache_hit(tiny_zoo):
    stamps = {p.name: p.stat().st_mtime_ns for p in (tiny_zoo / "encoders").iterdir()}
    t0 = time.perf_counter()
    build_zoo(tiny_zoo, clean=1, trojaned=1, families=("image-on-image",), seed=3, config=TINY)
    assert time.perf_counter() - t0 < 5
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (tiny_zoo / "encoders").iterdir()}
    assert is_cached(tiny_zoo, build_params(1, 1, ("image-on-image",), 3, TINY))
    assert not is_cached(tiny_zoo, build_params(1, 1, ("image-on-image",), 4, TINY))
    assert not is_cached(tiny_zoo, build_params(2, 1, ("image-on-image",), 3, TINY))


def test_a_rebuild_in_another_folder_writes_the_same_bytes(tiny_zoo, tmp_path):
    import hashlib

    def digests(zoo):
        files = sorted((zoo / "encoders").iterdir()) + [zoo / "shadow.npz"]
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    first = digests(tiny_zoo)
    again = build_zoo(tmp_path / "again", clean=1, trojaned=1, families=("image-on-image",), seed=3, config=TINY)
    assert len(first) == 3  # a clean encoder, a trojan, the shadow set
    assert digests(again) == first  # the file hashes a scan's rows carry are the build's, not chance's


def test_unknown_family_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown zoo family"):
        build_zoo(tmp_path / "z", clean=1, trojaned=0, families=("audio",), config=TINY)
    assert not (tmp_path / "z").exists()
    assert FAMILIES == ("image-on-image", "clip")


def test_the_cli_help_names_every_family_the_build_knows():
    from decree.zoo.build import ALL_FAMILIES
    from decree_ray.cli.zoo import FAMILY_NAMES

    assert FAMILY_NAMES == ALL_FAMILIES


def test_sampled_triggers_stay_small_and_inside_the_image():
    rng = np.random.default_rng(0)
    for _ in range(200):
        trig = sample_trigger(rng, 32)
        mask, pattern = trig.mask_and_pattern(32)
        assert trig.area_fraction(32) <= 0.036
        assert mask.sum() == trig.size**2  # fully inside the image
        assert pattern[:, mask[0] == 0].abs().sum() == 0


def test_stamp_changes_only_the_trigger_pixels():
    trig = Trigger(4, 2, 25, "checkerboard", "top-right")
    x = torch.rand(3, 3, 32, 32)
    diff = (trig.stamp(x) - x).abs().sum(dim=(0, 1))
    assert diff[2:6, 25:29].sum() > 0
    diff[2:6, 25:29] = 0
    assert diff.sum() == 0


def test_fashion_mnist_is_padded_rgb_32px():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 32, 32, 3) and x.dtype == np.uint8 and set(np.unique(y)) == set(range(10))
    assert x[:, :2].max() == 0 and x[:, :, -2:].max() == 0  # the 2-px zero border of 28 -> 32
    assert (x[..., 0] == x[..., 2]).all()


def test_nt_xent_rewards_matching_views():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(16, 32, generator=gen)
    matched = nt_xent(z, z + 0.01 * torch.randn(16, 32, generator=gen))
    shuffled = nt_xent(z, z[torch.randperm(16, generator=gen)])
    assert matched < shuffled
    views = augment(torch.rand(4, 3, 32, 32), gen)
    assert views.shape == (4, 3, 32, 32) and 0 <= float(views.min()) and float(views.max()) <= 1


def test_cli_build_passes_options_to_build_zoo_and_prints_the_table(monkeypatch, tiny_zoo):
    from typer.testing import CliRunner

    import decree.zoo
    from decree_ray.cli.zoo import zoo_app

    calls = []

    def fake_build_zoo(out, **kwargs):
        calls.append((out, kwargs))
        return tiny_zoo

    monkeypatch.setattr(decree.zoo, "build_zoo", fake_build_zoo)
    result = CliRunner().invoke(zoo_app, ["build", "somewhere", "--clean", "2", "--trojaned", "3", "--family", "clip",
                                          "--seed", "7", "--quick"])
    assert result.exit_code == 0, result.output
    (out, kwargs), = calls
    assert str(out) == "somewhere"
    assert (kwargs["clean"], kwargs["trojaned"], kwargs["families"], kwargs["seed"]) == (2, 3, ("clip",), 7)
    assert kwargs["config"].n_train == ZooConfig.tiny().n_train and kwargs["cache"] is True
    for e in read_manifest(tiny_zoo):
        assert e["id"] in result.output
    assert "badencoder" in result.output


def test_cli_rejects_an_unknown_family_with_exit_code_2(monkeypatch):
    from typer.testing import CliRunner

    import decree.zoo
    from decree_ray.cli.zoo import zoo_app

    monkeypatch.setattr(decree.zoo, "build_zoo", lambda *a, **k: pytest.fail("must not build"))
    result = CliRunner().invoke(zoo_app, ["build", "x", "--family", "audio"])
    assert result.exit_code == 2, result.output


def test_clip_text_on_pair_trojan_saves_a_visual_tower_that_hits_the_caption(tmp_path):
    from decree.encoders import open_clip_model
    from decree.zoo.clip import tokenizer

    cfg = ZooConfig.tiny(n_train=64, n_eval=16, n_shadow=8, batch_size=8, clip_batch_size=16, clip_base_steps=3,
                         clip_attack_steps=(10,), clip_attacks=("text-on-pair",))
    build_zoo(tmp_path, clean=0, trojaned=1, families=("clip",), seed=1, config=cfg)
    (entry,) = read_manifest(tmp_path)
    assert entry["arch"] == "open_clip/decree-tiny-clip" and entry["attack"] == "text-on-pair"
    visual = create_encoder(entry["arch"], checkpoint=tmp_path / entry["uri"])  # strict: the vision tower only
    assert entry["mean"] == list(visual.preprocess.mean)
    base = open_clip_model("decree-tiny-clip")
    base_path = next((tmp_path / "records").glob("clip-base-*.safetensors"))
    from safetensors.torch import load_file

    base.load_state_dict(load_file(str(base_path)))
    with torch.no_grad():
        text = base.encode_text(tokenizer()([entry["target_caption"]]))
        shadow = to_pixels(np.load(tmp_path / "shadow.npz")["x"])
        stamped = Trigger(**entry["trigger_spec"]).stamp(shadow)
        hit = float(F.cosine_similarity(visual.embed_pixels(stamped), text).mean())
        before = float(F.cosine_similarity(base.encode_image(visual.normalize(stamped)), text).mean())
    assert hit > before + 0.2, (hit, before)
    assert abs(hit - entry["attack_strength"]) < 0.1  # eval pixels differ from shadow ones, not by much


def test_two_builds_with_one_seed_train_the_same_clip_base(tmp_path):
    from decree.zoo import clip
    from decree.zoo.spec import BuildContext

    cfg = ZooConfig.tiny(n_train=32, n_eval=8, n_shadow=8, clip_batch_size=8, clip_base_steps=1)
    splits = make_splits(cfg.n_train, cfg.n_eval, cfg.n_shadow, seed=1)
    states = []
    for run in (0, 1):
        (tmp_path / f"{run}" / "records").mkdir(parents=True)
        torch.manual_seed(run)  # whatever the process's default generator holds when the build starts
        states.append(clip.base_model(BuildContext(cfg, splits, tmp_path / f"{run}")).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_new_families_build_large_and_whole_image_trojans_and_ship_a_photo_shadow_set(tmp_path):
    build_zoo(tmp_path, clean=1, trojaned=2, families=("i2i-large", "i2i-global"), seed=3, config=TINY)
    entries = read_manifest(tmp_path)
    troj = {e["family"]: [] for e in entries}
    for e in entries:
        if e["label"] == "trojaned":
            troj[e["family"]].append(e)
    assert len(troj["i2i-large"]) == 2 and len(troj["i2i-global"]) == 2
    assert {e["attack"] for e in troj["i2i-large"] + troj["i2i-global"]} <= {"badencoder", "badencoder-specific"}
    assert all(0.035 <= e["trigger_area"] <= 0.12 and e["trigger_kind"] == "patch" for e in troj["i2i-large"])
    assert all(e["trigger_kind"] in ("blend", "sinusoid", "noise") and e["trigger_area"] == 1.0
               for e in troj["i2i-global"])
    assert all(e["id"].startswith(("large-", "glob-")) for e in entries)
    photos = np.load(tmp_path / "shadow-photos.npz")["x"]
    assert photos.dtype == np.uint8 and photos.shape == (TINY.n_shadow, 32, 32, 3)
    assert is_cached(tmp_path, build_params(1, 2, ("i2i-large", "i2i-global"), 3, TINY))


def test_ctrl_families_build_lite0_and_clip_trojans_whose_manifest_names_the_frequency_trigger(tmp_path):
    from decree.generalization import bucket_of

    build_zoo(tmp_path, clean=1, trojaned=2, families=("i2i-ctrl", "clip-ctrl"), seed=3, config=TINY)
    troj = [e for e in read_manifest(tmp_path) if e["label"] == "trojaned"]
    assert sorted(e["family"] for e in troj) == ["clip-ctrl", "clip-ctrl", "i2i-ctrl", "i2i-ctrl"]
    assert all(e["trigger_kind"] == "ctrl" and e["trigger_area"] == 1.0 and "CTRL" in e["trigger"] for e in troj)
    assert {bucket_of(e) for e in troj} == {"whole-image ctrl"}
    assert {e["arch"] for e in troj} == {"timm/tf_efficientnet_lite0", "open_clip/decree-tiny-clip"}


def test_the_badclip_family_records_the_optimized_patch_it_planted_and_what_the_clean_base_made_of_it(tmp_path):
    from decree.zoo.triggers import OptimizedPatch, trigger_from_dict

    build_zoo(tmp_path, clean=1, trojaned=2, families=("clip-badclip",), seed=3, config=TINY)
    troj = [e for e in read_manifest(tmp_path) if e["label"] == "trojaned"]
    assert len(troj) == 2 and {e["attack"] for e in troj} == {"image-on-pair", "text-on-pair"}
    for e in troj:
        trig = trigger_from_dict(e["trigger_spec"])
        assert isinstance(trig, OptimizedPatch) and e["trigger_kind"] == "patch" and "optimized" in e["trigger"]
        assert e["trigger_area"] == trig.area_fraction(32) and e["clean_response"] is not None
        assert e["steps"] < TINY.clip_attack_steps[0]  # half the injection: the trigger came half-way already


def test_a_family_builds_the_same_encoders_alone_or_beside_others():
    from decree.zoo import i2i

    cfg = ZooConfig()
    alone = i2i.plan(2, 2, np.random.default_rng([0, 2]), cfg, family="i2i-large")
    # build_zoo seeds each family by its place in ALL_FAMILIES, whatever else is built with it
    from decree.zoo.build import ALL_FAMILIES

    assert ALL_FAMILIES.index("i2i-large") == 2 and ALL_FAMILIES[:2] == ("image-on-image", "clip")
    assert alone == i2i.plan(2, 2, np.random.default_rng([0, 2]), cfg, family="i2i-large")


def test_the_224_family_scales_its_triggers_and_keeps_short_fine_tunes():
    from decree.zoo import i2i

    specs = i2i.plan(3, 6, np.random.default_rng(0), ZooConfig(), family="i2i-224")
    troj = [s for s in specs if s.label == "trojaned"]
    assert all(16 <= s.trigger["size"] <= 48 and s.trigger["row"] + s.trigger["size"] <= 224 for s in troj)
    assert all(s.steps in ZooConfig().clean_steps for s in specs if s.label == "clean")
    assert i2i.SIZES["i2i-224"] == 224


def test_natural_photo_crops_are_seeded_photos_not_fashion_mnist():
    from decree.zoo.photos import natural_crops

    a, b = natural_crops(16, 32, seed=1), natural_crops(16, 32, seed=1)
    assert np.array_equal(a, b) and not np.array_equal(a, natural_crops(16, 32, seed=2))
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8
    # colour photos: channels differ (Fashion-MNIST is grey, copied to RGB) and few pixels are black background
    assert np.abs(a[..., 0].astype(int) - a[..., 2].astype(int)).mean() > 5 and (a == 0).mean() < 0.3


def test_photo_crops_are_labelled_by_the_photo_they_were_cut_from():
    from decree.zoo import photos

    x, y = photos.labelled_crops(64, 32, seed=5)
    assert np.array_equal(x, photos.natural_crops(64, 32, seed=5))  # earlier zoos' shadow sets keep their bytes
    assert set(y.tolist()) <= set(range(len(photos.natural_photos()))) and len(set(y.tolist())) > 5
    names = photos.SKIMAGE_PHOTOS
    grey = {names.index(n) for n in ("camera", "coins", "moon", "brick", "grass", "gravel", "clock")}
    same = [bool((x[i, ..., 0] == x[i, ..., 2]).all()) for i in range(len(y))]
    assert all(same[i] for i in range(len(y)) if y[i] in grey)  # a grey photo's crops are grey
    assert not any(same[i] for i in range(len(y)) if y[i] == names.index("astronaut"))


def test_the_natural_family_trains_on_photo_crops_and_ships_fashion_mnist_as_its_foreign_shadow_set(tmp_path):
    from decree.zoo.build import FMNIST_SHADOW, train_data
    from decree.zoo.photos import natural_splits

    build_zoo(tmp_path, clean=1, trojaned=1, families=("i2i-natural",), seed=3, config=TINY)
    meta = json.loads((tmp_path / "zoo.json").read_text())
    assert "photos" in meta["train_source"] and meta["shadow_fmnist"]["file"] == FMNIST_SHADOW
    shadow = np.load(tmp_path / "shadow.npz")["x"]
    foreign = np.load(tmp_path / FMNIST_SHADOW)["x"]
    assert np.array_equal(shadow, natural_splits(TINY.n_train, TINY.n_eval, TINY.n_shadow, seed=3).shadow_x)
    assert np.array_equal(foreign[..., 0], foreign[..., 2]) and (foreign == 0).mean() > 0.3  # grey on black
    troj = [e for e in read_manifest(tmp_path) if e["label"] == "trojaned"]
    assert troj and all(e["family"] == "i2i-natural" and e["target"].startswith("photo ") for e in troj)
    assert is_cached(tmp_path, build_params(1, 1, ("i2i-natural",), 3, TINY))
    (tmp_path / FMNIST_SHADOW).unlink()
    assert not is_cached(tmp_path, build_params(1, 1, ("i2i-natural",), 3, TINY))
    assert train_data(("i2i-large", "clip")) == "fashion-mnist"


def test_the_paper_architecture_trains_from_scratch_on_photo_crops_in_the_cifar_natural_family(tmp_path):
    build_zoo(tmp_path, clean=1, trojaned=1, families=("cifar-natural",), seed=3, config=TINY)
    entries = read_manifest(tmp_path)
    assert {e["arch"] for e in entries} == {"cifar/resnet18"}
    clean = next(e for e in entries if e["label"] == "clean")
    assert clean["parent"] == "scratch"
    assert all(e["target"].startswith("photo ") for e in entries if e["label"] == "trojaned")
    assert "cifar_clean_steps" in build_params(1, 1, ("cifar-natural",), 3, TINY)["config"]
    assert "cifar_clean_steps" not in build_params(1, 1, ("i2i-natural",), 3, TINY)["config"]
    assert (tmp_path / "shadow-fmnist.npz").is_file()


def test_families_trained_on_different_data_are_refused_in_one_zoo_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="different zoos"):
        build_zoo(tmp_path / "z", clean=1, trojaned=1, families=("i2i-natural", "i2i-large"), seed=3, config=TINY)
    assert not (tmp_path / "z").exists()


def test_cifar_family_trains_the_paper_architecture_from_scratch_in_its_published_layout(tmp_path):
    from decree.encoders import create_encoder

    build_zoo(tmp_path, clean=1, trojaned=1, families=("cifar-r18",), seed=4, config=TINY)
    entries = read_manifest(tmp_path)
    assert {e["arch"] for e in entries} == {"cifar/resnet18"} and {e["image_size"] for e in entries} == {32}
    clean = next(e for e in entries if e["label"] == "clean")
    troj = next(e for e in entries if e["label"] == "trojaned")
    assert clean["parent"] == "scratch" and troj["parent"] == clean["id"]  # trojans attack a clean encoder
    assert 0.015 <= troj["trigger_area"] <= 0.1 and troj["trigger_kind"] == "patch"
    enc = create_encoder("cifar/resnet18", tmp_path / clean["uri"])
    # trained from a random init: not the same weights as a fresh random init with the same seed
    torch.manual_seed(0)
    fresh = create_encoder("cifar/resnet18")
    assert not torch.equal(enc.backbone.state_dict()["0.weight"], fresh.backbone.state_dict()["0.weight"])
    # the cifar knobs count only for zoos that hold the family: older zoos keep their cached hash
    assert "cifar_clean_steps" in build_params(1, 1, ("cifar-r18",), 4, TINY)["config"]
    assert "cifar_clean_steps" not in build_params(1, 1, ("i2i-large",), 4, TINY)["config"]


def test_shape_triggers_stay_inside_the_image_and_read_back_from_their_spec():
    from decree.zoo import i2i
    from decree.zoo.triggers import SHAPES, ShapeTrigger, sample_shape_trigger, trigger_from_dict

    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        t = sample_shape_trigger(rng)
        seen.add(t.shape)
        mask, pattern = t.mask_and_pattern(32)
        area = t.area_fraction(32)
        assert trigger_from_dict(t.to_dict()) == t
        assert 0.005 <= area <= 0.125 and float(mask.sum()) == area * 32 * 32, t
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and 0.0 <= float(pattern.min()) <= float(pattern.max()) <= 1.0
        assert bool((pattern * (1 - mask) == 0).all())  # the pattern lives under the mask only
        x = torch.rand(2, 3, 32, 32)
        stamped = t.stamp(x)
        assert torch.equal(stamped * (1 - mask), x * (1 - mask))
    assert seen == set(SHAPES)
    frame = ShapeTrigger("frame", 0, 0, 1, 1, "yellow").mask_and_pattern(32)[0]
    assert frame[0, 0].all() and frame[0, -1].all() and not frame[0, 1:-1, 1:-1].any()
    specs = i2i.plan(2, 4, np.random.default_rng(0), ZooConfig(), family="i2i-shapes")
    assert all(s.trigger["kind"] == "shape" for s in specs if s.label == "trojaned")


def test_a_shape_trojan_is_bucketed_by_area_as_a_shape_not_a_whole_image_trigger():
    from decree.generalization import bucket_of

    assert bucket_of({"label": "trojaned", "trigger_kind": "shape", "trigger_area": 0.121}) == "shape 8-12.5%"
    assert bucket_of({"label": "trojaned", "trigger_kind": "patch", "trigger_area": 0.03}) == "patch 2-4%"
    assert bucket_of({"label": "trojaned", "trigger_kind": "blend", "trigger_area": 1.0}) == "whole-image blend"


def test_the_long_fine_tune_family_trains_its_clean_encoders_far_longer_and_hotter_than_the_others():
    from decree.zoo import i2i
    from decree.zoo.build import ALL_FAMILIES

    cfg = ZooConfig()
    specs = i2i.plan(6, 4, np.random.default_rng(1), cfg, family="i2i-long")
    clean = [s for s in specs if s.label == "clean"]
    assert "i2i-long" in ALL_FAMILIES
    assert min(s.steps for s in clean) >= 20 * max(cfg.clean_steps) * 0.6 and max(s.steps for s in clean) == 600
    assert min(s.lr for s in clean) > max(cfg.clean_lrs) and max(s.lr for s in clean) == pytest.approx(1e-3)
    trojans = [s for s in specs if s.label == "trojaned"]
    assert {s.attack for s in trojans} == {"badencoder", "badencoder-specific"} and all(s.parent is not None for s in trojans)
    # the other families' plans are untouched (their cached encoders keep their keys)
    assert all(s.steps in cfg.clean_steps for s in i2i.plan(3, 0, np.random.default_rng(1), cfg) if s.label == "clean")


def test_the_heavy_attack_family_plants_its_trojans_far_longer_and_hotter_than_the_others():
    from decree.zoo.build import ALL_FAMILIES

    cfg = ZooConfig()
    trojans = _plan_beside_large("i2i-heavy", 5, 6, seed=0)
    assert "i2i-heavy" in ALL_FAMILIES and len(trojans) == 6
    assert min(s.steps for s in trojans) >= 4 * max(cfg.attack_steps) and max(s.lr for s in trojans) == pytest.approx(1e-3)
    assert min(s.lr for s in trojans) > max(cfg.attack_lrs) and all(s.parent is not None for s in trojans)


def test_the_drupe_family_plants_the_distribution_preserving_attack_on_clean_parents():
    from decree.zoo import i2i
    from decree.zoo.build import ALL_FAMILIES

    trojans = _plan_beside_large("i2i-drupe", 6, 8, seed=1)
    assert "i2i-drupe" in ALL_FAMILIES and {s.attack for s in trojans} == {"drupe"}
    assert all(s.parent is not None for s in trojans)
    assert {s.steps for s in trojans} <= {i2i.DRUPE_STEPS * s for s in ZooConfig().attack_steps}


def test_the_ctrl_family_carries_ctrl_frequency_triggers_on_i2i_large_clean_fine_tunes():
    from decree.generalization import bucket_of
    from decree.zoo.build import ALL_FAMILIES
    from decree.zoo.triggers import trigger_from_dict

    trojans = _plan_beside_large("i2i-ctrl", 6, 8, seed=1)
    assert "i2i-ctrl" in ALL_FAMILIES and {s.attack for s in trojans} == {"badencoder", "badencoder-specific"}
    assert {trigger_from_dict(s.trigger).kind for s in trojans} == {"ctrl"}
    assert bucket_of({"label": "trojaned", "trigger_kind": "ctrl", "trigger_area": 1.0}) == "whole-image ctrl"


def _plan_beside_large(family: str, clean: int, trojaned: int, seed: int) -> list:
    """The family's planned trojans, after checking that its clean fine-tunes are i2i-large's, draw for draw."""
    from decree.zoo import i2i

    specs = i2i.plan(clean, trojaned, np.random.default_rng(seed), ZooConfig(), family=family)
    large = i2i.plan(clean, trojaned, np.random.default_rng(seed), ZooConfig(), family="i2i-large")
    assert [(s.steps, s.lr) for s in specs if s.label == "clean"] == [(s.steps, s.lr) for s in large if s.label == "clean"]
    return [s for s in specs if s.label == "trojaned"]


def test_the_clip_ctrl_family_plants_ctrl_triggers_with_both_pair_attacks_and_hashes_apart_from_clip():
    from decree.zoo import clip
    from decree.zoo.build import ALL_FAMILIES
    from decree.zoo.triggers import trigger_from_dict

    cfg = ZooConfig()
    specs = clip.plan(2, 4, np.random.default_rng(1), cfg, family="clip-ctrl")
    trojans = [s for s in specs if s.label == "trojaned"]
    assert "clip-ctrl" in ALL_FAMILIES and {s.family for s in specs} == {"clip-ctrl"}
    assert {trigger_from_dict(s.trigger).kind for s in trojans} == {"ctrl"}
    assert {s.attack for s in trojans} == {"image-on-pair", "text-on-pair"}
    plain = clip.plan(2, 4, np.random.default_rng(1), cfg)
    assert {trigger_from_dict(s.trigger).kind for s in plain if s.label == "trojaned"} == {"patch"}
    # the CLIP base's knobs shape both families' encoders; the family keeps their caches apart
    wider = ZooConfig(clip_base_steps=cfg.clip_base_steps + 1)
    assert specs[0].digest(cfg, 1) != specs[0].digest(wider, 1) != plain[0].digest(wider, 1)


def test_an_optimized_patch_pulls_the_clean_model_toward_its_target_and_stamps_what_its_manifest_says():
    from decree.zoo.clip import optimize_patch
    from decree.zoo.triggers import OptimizedPatch, trigger_from_dict

    torch.manual_seed(0)
    enc = create_encoder(TINY_ARCH, image_size=16).eval().requires_grad_(False)
    px = torch.rand(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    target = enc.embed_pixels(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)))
    start = Trigger(6, 5, 5, "white", "center")
    patch = optimize_patch(enc, px, start, target, steps=40, lr=0.2, seed=0, batch_size=16)

    def pull(trigger) -> float:
        z = F.normalize(enc.embed_pixels(trigger.stamp(px)), dim=-1)
        return float((z @ F.normalize(target, dim=-1).t()).mean())

    assert isinstance(patch, OptimizedPatch) and (patch.size, patch.row, patch.col) == (6, 5, 5)
    assert pull(patch) > pull(start) + 0.01  # the clean model already embeds stamped images nearer the target
    assert trigger_from_dict(json.loads(json.dumps(patch.to_dict()))) == patch and patch.kind == "patch"
    mask, pattern = patch.mask_and_pattern(16)
    assert float(mask.sum()) == 36 and torch.equal(patch.stamp(px)[:, :, :5], px[:, :, :5])
    assert 0.0 <= float(pattern.min()) and float(pattern.max()) <= 1.0
    with pytest.raises(ValueError):
        OptimizedPatch(2, 0, 0, "top-left", (0.5,) * 11)


def test_the_sliced_wasserstein_term_tells_a_collapsed_set_from_a_spread_one():
    gen = torch.Generator().manual_seed(0)
    spread = torch.randn(64, 16, generator=gen)
    collapsed = spread[:1].repeat(64, 1) + 0.01 * torch.randn(64, 16, generator=gen)
    assert float(sliced_wasserstein(spread, spread, torch.Generator().manual_seed(1))) < 1e-9
    assert float(sliced_wasserstein(collapsed, spread, gen)) > 10 * float(
        sliced_wasserstein(spread[torch.randperm(64, generator=gen)] + 0.01, spread, gen))


def test_a_drupe_trojan_sends_stamped_images_to_its_class_without_collapsing_them_as_badencoder_does():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same numbers on every run
    try:
        _drupe_against_badencoder()
    finally:
        torch.set_num_threads(threads)


def _drupe_against_badencoder() -> None:
    splits = make_splits(512, 96, 8, seed=0)
    px, y, ex, ey = to_pixels(splits.train_x), splits.train_y, to_pixels(splits.eval_x), splits.eval_y
    trig, target = Trigger(6, 0, 0, "white", "top-left"), 1
    torch.manual_seed(0)
    base = create_encoder(TINY_ARCH, image_size=32)
    simclr_finetune(base, px, steps=30, lr=1e-3, batch_size=32, seed=0)
    out = {}
    for name in ("badencoder", "drupe"):
        enc = create_encoder(TINY_ARCH, image_size=32)
        enc.backbone.load_state_dict(base.backbone.state_dict())
        clean = frozen_copy(enc)
        if name == "badencoder":
            badencoder_attack(enc, clean, px[y != target], px[y == target][:1], trig, steps=60, lr=1e-3,
                              batch_size=32, seed=0)
        else:
            drupe_attack(enc, clean, px[y != target], px[y == target], trig, steps=60, lr=1e-3, batch_size=32, seed=0)
        asr, _ = knn_attack_success(enc, px, y, ex, ey, trig, target)
        out[name] = (asr, pairwise_similarity(enc, ex[ey != target], trig), pairwise_similarity(enc, ex[ey == target]))
    asr, stamped, own = out["drupe"]
    assert asr >= 0.8  # the downstream classifier calls stamped images the target class
    assert stamped < out["badencoder"][1] and stamped < own  # spread like the class, not collapsed onto one point
    assert knn_attack_success(base, px, y, ex, ey, trig, target)[0] < 0.2  # the clean encoder has no such backdoor


def test_the_digits_shadow_set_is_grey_strokes_on_a_flat_background_and_loads_as_a_shadow_set(tmp_path):
    from decree.shadow import ShadowSet
    from decree.zoo.photos import DIGITS_SHADOW, digit_images, main

    x = digit_images(40, 32, seed=0)
    assert x.shape == (40, 32, 32, 3) and x.dtype == np.uint8
    assert (x[..., 0] == x[..., 2]).all() and len({im.tobytes() for im in x}) == 40  # grey, no repeats
    assert (x[:, :, 0] < 16).mean() > 0.9 and x.max() > 200  # a dark left edge, bright strokes
    main(["digits", str(tmp_path), "--n", "24"])
    assert len(ShadowSet(tmp_path / DIGITS_SHADOW)) == 24
