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


def test_pruning_a_restart_carries_its_adam_moments_so_its_trajectory_continues_unchanged():
    from decree.inversion import _keep_restart

    torch.manual_seed(0)
    target = torch.randn(3, 1, 4, 4)
    params = [torch.randn(3, 1, 4, 4, requires_grad=True), torch.randn(3, 3, 4, 4, requires_grad=True)]
    opt = torch.optim.Adam(params, lr=0.1, betas=(0.5, 0.9))

    def step(ps, o, t):
        loss = ((ps[0] - t) ** 2).sum() + (ps[1] ** 2).sum()  # separable over restarts, like the real loss
        o.zero_grad()
        loss.backward()
        o.step()

    for _ in range(4):
        step(params, opt, target)
    kept, kept_opt = _keep_restart(opt, params, 1)
    for _ in range(3):
        step(params, opt, target)
        step(kept, kept_opt, target[1:2])
    assert kept[0].shape == (1, 1, 4, 4) and kept[1].shape == (1, 3, 4, 4)
    assert torch.allclose(kept[0], params[0][1:2], atol=1e-6) and torch.allclose(kept[1], params[1][1:2], atol=1e-6)


def test_fast_prunes_to_one_restart_and_settles_once_the_verdict_cannot_change(small_setup):
    from decree.inversion import _should_stop

    cfg = InversionConfig.from_profile("fast", threshold=0.1, settle_fraction=0.5, min_steps=50)
    area = 100.0
    assert _should_stop(cfg, 3, 3, torch.tensor([4.9, float("inf")]), area)  # 0.049 < 0.05: before min_steps
    assert not _should_stop(cfg, 3, 3, torch.tensor([5.1]), area)
    assert not _should_stop(InversionConfig.from_profile("fast", threshold=0.1, settle_fraction=0), 3, 3,
                            torch.tensor([0.0]), area)  # 0 turns it off
    assert not _should_stop(cfg, 3, 3, torch.tensor([float("inf")]), area)  # nothing reached τ yet

    enc, shadow = small_setup
    r = invert(enc, shadow, InversionConfig.from_profile("fast", max_steps=6, min_steps=6, restarts=3, batch_size=4,
                                                          prune_at=2, settle_fraction=0))
    assert r.steps == 6 and r.restart == 0 and r.mask.shape == (16, 16)  # one restart left: index 0
    p = InversionConfig.from_profile("paper")
    assert p.prune_at is None and p.settle_fraction is None


def test_scan_threshold_reaches_the_inversion_so_settling_stops_against_it(small_setup, tmp_path):
    from safetensors.torch import save_file

    from decree.scan import scan_encoder

    enc, shadow = small_setup
    path = tmp_path / "e.safetensors"
    save_file({k: v.contiguous() for k, v in enc.backbone.state_dict().items()}, str(path))
    cfg = InversionConfig.from_profile("fast", max_steps=2, min_steps=0, restarts=1, batch_size=4)
    res = scan_encoder(path, "timm/tf_efficientnet_lite0", shadow, config=cfg, image_size=16, threshold=0.003)
    assert res.threshold == 0.003 and res.result.threshold == 0.003
