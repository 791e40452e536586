"""Inversion mechanics: the objective, the profiles, reproducibility, and that only the trigger learns."""

import pytest
import torch

from decree import create_encoder
from decree.errors import InversionError
from decree.inversion import PAPER, InversionConfig, invert, mean_pairwise_cosine, stamp


def test_mean_pairwise_cosine_excludes_the_diagonal():
    e = torch.nn.functional.normalize(torch.randn(2, 6, 5), dim=-1)
    ref = []
    for g in e:
        sim = g @ g.T
        ref.append((sim.sum() - sim.diagonal().sum()) / (6 * 5))
    assert torch.allclose(mean_pairwise_cosine(e), torch.stack(ref), atol=1e-6)
    same = torch.ones(1, 4, 3)
    assert torch.allclose(mean_pairwise_cosine(same), torch.ones(1))


def test_stamp_blends_in_pixel_space_per_restart():
    x = torch.zeros(3, 3, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[1, :, :2, :2] = 1.0
    pattern = torch.ones(2, 3, 4, 4)
    out = stamp(x, mask, pattern).view(2, 3, 3, 4, 4)
    assert out[0].sum() == 0
    assert torch.all(out[1][:, :, :2, :2] == 1) and out[1][:, :, 2:, :].sum() == 0


def test_paper_profile_keeps_the_published_hyperparameters():
    p = InversionConfig.from_profile("paper")
    assert (p.lr, p.betas, p.tau, p.lambda_init, p.lambda_factor, p.patience) == (0.5, (0.5, 0.9), 0.99, 1e-3, 5.0, 5)
    assert p.mask_init == "random" and p.restarts == 1 and p.l1_channels == 3 and not p.l1_per_area
    assert p.lr_drops == ((30, 0.1), (50, 0.05)) and p.max_epochs == 1000 and p.early_stop_per_epoch
    assert InversionConfig.from_profile("paper", max_steps=None) == PAPER


def test_profile_overrides_ignore_none_and_reject_unknown_profiles():
    assert InversionConfig.from_profile("fast", tau=None).tau == InversionConfig().tau
    with pytest.raises(ValueError):
        InversionConfig.from_profile("slow")


@pytest.fixture(scope="module")
def small_setup():
    torch.manual_seed(0)
    enc = create_encoder("timm/tf_efficientnet_lite0", pretrained=True, image_size=16)
    shadow = torch.rand(12, 3, 16, 16)
    return enc, shadow


def test_inversion_is_seeded_and_reproducible_on_cpu(small_setup):
    enc, shadow = small_setup
    cfg = InversionConfig.from_profile("fast", max_steps=6, min_steps=0, restarts=2, batch_size=6, seed=3)
    a, b = invert(enc, shadow, cfg), invert(enc, shadow, cfg)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.pattern, b.pattern)
    assert a.similarity == b.similarity and a.steps == b.steps == 6
    c = invert(enc, shadow, InversionConfig.from_profile("fast", max_steps=6, min_steps=0, restarts=2, batch_size=6, seed=4))
    assert not torch.equal(a.mask, c.mask)


def test_only_the_trigger_receives_gradients(small_setup):
    enc, shadow = small_setup
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    r = invert(enc, shadow, InversionConfig.from_profile("fast", max_steps=3, min_steps=0, restarts=1, batch_size=6))
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert r.mask.shape == (16, 16) and r.pattern.shape == (3, 16, 16)
    assert 0.0 <= float(r.mask.min()) and float(r.mask.max()) <= 1.0
    assert r.pl1_norm == pytest.approx(r.l1_norm / 256)


def test_nan_producing_encoder_is_an_inversion_error(small_setup):
    enc, shadow = small_setup
    broken = create_encoder("timm/tf_efficientnet_lite0", image_size=16)
    with torch.no_grad():
        broken.backbone.conv_stem.weight.fill_(float("nan"))
    with pytest.raises(InversionError, match="NaN"):
        invert(broken, shadow, InversionConfig.from_profile("fast", max_steps=3, min_steps=0, restarts=1, batch_size=6))
