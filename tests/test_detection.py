"""The core detects a backdoor it has never seen: a BadEncoder-style trojan built here vs its clean twin."""

from dataclasses import replace

import pytest
from twins import CORNER, corner_twins

from decree import invert, scan_encoder
from decree.inversion import InversionConfig
from decree.zoo.triggers import Trigger

SIZE = 32
TRIGGER = Trigger(**CORNER)


@pytest.fixture(scope="module")
def twins():
    """A clean Lite0 (real ImageNet weights) and a copy with a 4x4 white-patch backdoor (1.6% of the image)."""
    return corner_twins(n_shadow=128)


CFG = InversionConfig.from_profile("fast", max_steps=80, min_steps=40, restarts=2, batch_size=24)


def test_trojaned_encoder_needs_a_much_smaller_mask_than_its_clean_twin(twins):
    clean, trojan, shadow = twins
    r_clean, r_trojan = invert(clean, shadow, CFG), invert(trojan, shadow, CFG)
    assert r_trojan.reached_tau, r_trojan
    assert r_trojan.pl1_norm < 0.5 * r_clean.pl1_norm, (r_trojan.pl1_norm, r_clean.pl1_norm)


def test_recovered_mask_concentrates_on_the_true_trigger(twins):
    _, trojan, shadow = twins
    # converged, not settled: a search that stops once the verdict is sure (below half the threshold) returns an
    # upper bound of the mask, whose shape is not what this test is about
    mask = invert(trojan, shadow, replace(CFG, settle_fraction=None)).mask
    region = mask[TRIGGER.row - 2 : TRIGGER.row + TRIGGER.size + 2, TRIGGER.col - 2 : TRIGGER.col + TRIGGER.size + 2]
    # the window is 8x8 = 6% of the image; a mask spread evenly would put 6% of its mass there
    assert float(region.sum() / mask.sum()) > 0.3, float(region.sum() / mask.sum())


def test_scan_encoder_flags_the_trojan_and_writes_evidence(twins, tmp_path):
    clean, trojan, shadow = twins
    ckpt = tmp_path / "trojan.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in trojan.backbone.state_dict().items()}, str(ckpt))
    res = scan_encoder(ckpt, "timm/tf_efficientnet_lite0", shadow, config=CFG, image_size=SIZE, mean=(0.5,) * 3,
                       std=(0.5,) * 3, evidence_dir=tmp_path / "ev", device="cpu")
    row = res.to_row()
    assert row["verdict"] == "trojaned" and row["pl1_norm"] < row["threshold"], row
    for key in ("evidence_mask", "evidence_pattern", "evidence_stamp"):
        assert (tmp_path / "ev").joinpath(row[key]).exists() and row[key].endswith(".png")


def test_claimed_preprocessing_is_checked_against_the_reference_and_the_more_suspicious_verdict_stands(twins, tmp_path):
    """A sidecar's input size is the audited party's claim. This clean encoder is clean at 32 px and (a natural
    trigger) flagged at 16 px: whichever side claims 32, the 16-px scan decides, so a size cannot buy a verdict."""
    from safetensors.torch import save_file

    clean, _, shadow = twins
    ckpt = tmp_path / "clean.safetensors"
    save_file({k: v.contiguous() for k, v in clean.backbone.state_dict().items()}, str(ckpt))
    kw = dict(config=CFG, mean=(0.5,) * 3, std=(0.5,) * 3, device="cpu")
    ref = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    alone = {size: scan_encoder(ckpt, "timm/tf_efficientnet_lite0", shadow, image_size=size, **kw) for size in (16, 32)}
    assert alone[32].verdict == "clean" and alone[16].verdict == "trojaned", (alone[32].result, alone[16].result)
    checked = scan_encoder(ckpt, "timm/tf_efficientnet_lite0", shadow, image_size=32, reference={**ref, "image_size": 16}, **kw)
    assert (checked.verdict, checked.preprocess_decided, checked.image_size) == ("trojaned", "reference", 16)
    kept = scan_encoder(ckpt, "timm/tf_efficientnet_lite0", shadow, image_size=16, reference={**ref, "image_size": 32}, **kw)
    assert (kept.verdict, kept.preprocess_decided, kept.image_size) == ("trojaned", "claimed", 16)
    same = scan_encoder(ckpt, "timm/tf_efficientnet_lite0", shadow, image_size=32, reference={**ref, "image_size": 32}, **kw)
    assert same.preprocess_decided is None and same.to_row()["preprocess_decided"] is None
