"""Whole-image triggers: the zoo's blend/sinusoid/noise triggers and the blend search that scores them."""

import numpy as np
import pytest
import torch
from twins import make_twins

from decree import create_encoder, invert, scan_encoder
from decree.inversion import InversionConfig
from decree.zoo.train import _decoy
from decree.zoo.triggers import GlobalTrigger, Trigger, sample_global_trigger, trigger_from_dict

SIZE = 32


@pytest.mark.parametrize("kind", ["blend", "sinusoid", "noise"])
def test_whole_image_triggers_change_every_pixel_a_little_and_stay_in_range(kind):
    x = torch.rand(4, 3, SIZE, SIZE)
    t = GlobalTrigger(kind, 0.1, seed=3)
    out = t.stamp(x)
    assert out.shape == x.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    changed = (out - x).abs().amax(dim=1) > 1e-6
    assert float(changed.float().mean()) > 0.5  # most pixels, not a patch
    assert float((out - x).abs().max()) <= 0.1 + 1e-6  # bounded by the strength (blend: α·|p - x| <= α)
    assert torch.equal(out, t.stamp(x))  # deterministic: the same trigger every time
    assert t.area_fraction(SIZE) == 1.0 and kind in t.describe(SIZE)


def test_triggers_round_trip_through_their_dicts_and_old_patch_dicts_still_read():
    g = sample_global_trigger(np.random.default_rng(0))
    assert trigger_from_dict(g.to_dict()) == g
    patch = Trigger(4, 1, 2, "white", "top-left")
    assert "kind" not in patch.to_dict()  # zoos built before whole-image triggers keep their spec hashes
    assert trigger_from_dict(patch.to_dict()) == patch and patch.kind == "patch"
    with pytest.raises(ValueError):
        trigger_from_dict({"kind": "rainbow", "strength": 0.1}).stamp(torch.rand(1, 3, 8, 8))


def test_decoy_patches_differ_from_the_image_only_in_one_square_each():
    x = torch.zeros(6, 3, SIZE, SIZE)
    out = _decoy(x, torch.Generator().manual_seed(0))
    for img in out:
        rows, cols = torch.nonzero(img.abs().sum(0) > 0, as_tuple=True)
        if len(rows):  # a decoy of colour 0 is possible but a square nonetheless
            assert (rows.max() - rows.min()) == (cols.max() - cols.min()) < SIZE // 4


def test_blend_search_keeps_one_mask_value_for_the_whole_image():
    enc = create_encoder("timm/tf_efficientnet_lite0", pretrained=True, image_size=16)
    shadow = torch.rand(12, 3, 16, 16)
    cfg = InversionConfig.from_profile("fast", trigger="blend", max_steps=5, min_steps=0, restarts=2, batch_size=6)
    r = invert(enc, shadow, cfg)
    assert r.mask.shape == (16, 16) and float(r.mask.max() - r.mask.min()) == 0.0
    assert r.pl1_norm == pytest.approx(float(r.mask[0, 0]), rel=1e-5) and 0 < r.pl1_norm < 1
    with pytest.raises(ValueError):
        invert(enc, shadow, InversionConfig.from_profile("fast", trigger="ring", max_steps=1))


def test_blend_search_is_off_by_default_and_never_part_of_the_paper_profile():
    assert InversionConfig.from_profile("fast").blend_config() is None
    assert InversionConfig.from_profile("paper", blend_max_steps=40).blend_config() is not None  # asked for
    assert InversionConfig.from_profile("paper").blend_config() is None
    b = InversionConfig.from_profile("fast", blend_max_steps=30).blend_config()
    assert (b.trigger, b.max_steps, b.restarts, b.threshold) == ("blend", 30, 1, 0.05)
    assert b.blend_config() is None  # a blend search starts no further search


@pytest.fixture(scope="module")
def blend_twins():
    """A clean Lite0 (ImageNet weights) and a copy backdoored with a whole-image blend at α 0.15."""
    return make_twins(GlobalTrigger("blend", 0.15, seed=7), size=SIZE, n_shadow=96)


def test_the_blend_search_needs_a_far_smaller_blend_weight_on_a_blend_trojan(blend_twins):
    clean, trojan, shadow = blend_twins
    cfg = InversionConfig.from_profile("fast", trigger="blend", max_steps=40, min_steps=20, restarts=1, batch_size=16)
    r_clean, r_trojan = invert(clean, shadow, cfg), invert(trojan, shadow, cfg)
    assert r_trojan.reached_tau and r_trojan.pl1_norm < 0.5 * r_clean.pl1_norm, (r_trojan, r_clean)


def test_scan_encoder_reports_both_searches_and_skips_the_blend_once_the_patch_flagged(blend_twins, tmp_path):
    from safetensors.torch import save_file

    clean, trojan, shadow = blend_twins
    path = tmp_path / "clean.safetensors"
    save_file({k: v.contiguous() for k, v in clean.backbone.state_dict().items()}, str(path))
    cfg = InversionConfig.from_profile("fast", max_steps=10, min_steps=0, restarts=1, batch_size=8, blend_max_steps=5)
    row = scan_encoder(path, "timm/tf_efficientnet_lite0", shadow, config=cfg, image_size=SIZE).to_row()
    assert row["blend_steps"] == 5 and row["blend_pl1"] is not None and row["blend_verdict"] in ("clean", "trojaned")
    assert row["patch_verdict"] == "clean" and row["image_size"] == SIZE
    assert row["verdict"] == row["blend_verdict"]  # the more suspicious of the two
    always = InversionConfig.from_profile("fast", max_steps=3, min_steps=0, restarts=1, batch_size=8, blend_max_steps=5,
                                          tau=-1.0)  # every step succeeds: the patch search flags at threshold 1.5
    flagged = scan_encoder(path, "timm/tf_efficientnet_lite0", shadow, config=always, image_size=SIZE, threshold=1.5)
    assert flagged.patch_verdict == "trojaned" and flagged.blend is None and flagged.to_row()["blend_steps"] is None


def test_ctrl_trigger_is_the_inverse_dct_of_its_chroma_coefficients_and_leaves_luminance_alone():
    from scipy.fft import idctn

    from decree.zoo.triggers import FrequencyTrigger

    t = FrequencyTrigger(100.0, window=16, positions=((7, 7), (15, 15)))
    signal = t.signal(SIZE)
    coeff = np.zeros((16, 16))
    coeff[7, 7] = coeff[15, 15] = 100.0 / 255
    block = idctn(coeff, norm="ortho")  # CTRL's orthonormal DCT, one 16-px tile, repeated over the image
    assert np.allclose(signal[2].numpy() / 1.772, np.tile(block, (2, 2)), atol=1e-6)
    luma = 0.299 * signal[0] + 0.587 * signal[1] + 0.114 * signal[2]
    assert float(luma.abs().max()) < 1e-3 < float(signal.abs().max())  # only the colour moves
    grey = torch.full((2, 3, SIZE, SIZE), 0.5)
    out = t.stamp(grey)
    assert float((out - grey).abs().amax(dim=1).gt(1e-4).float().mean()) > 0.5 and t.area_fraction(SIZE) == 1.0
    assert float((out - grey).abs().max()) < 0.2 and torch.equal(out, t.stamp(grey))


def test_ctrl_triggers_round_trip_stay_invisible_and_reject_positions_outside_their_window():
    from decree.zoo.triggers import FrequencyTrigger, sample_ctrl_trigger

    rng = np.random.default_rng(0)
    for _ in range(20):
        t = sample_ctrl_trigger(rng)
        assert trigger_from_dict(t.to_dict()) == t and t.kind == "ctrl" and "CTRL" in t.describe(SIZE)
        assert 0.03 < float(t.signal(SIZE).abs().max()) < 0.15  # a few grey levels, whatever the window
    assert FrequencyTrigger(100.0).signal(224).shape == (3, 224, 224)  # tiles any size
    with pytest.raises(ValueError):
        FrequencyTrigger(100.0, window=16, positions=((15, 16),))
    with pytest.raises(ValueError):
        FrequencyTrigger(100.0, window=0, positions=())
