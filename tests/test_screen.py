"""The screen that seeds one restart: it finds a square trigger the gradient cannot see; paper and one-restart
searches stay unseeded, and out-of-range settings are refused."""

import pytest
import torch
from torch import nn

from decree.encoders.registry import Encoder, Preprocess
from decree.inversion import InversionConfig, invert
from decree.screen import best_square, candidates


class _SharpBackdoor(nn.Module):
    """Diverse embeddings, except that a bright square at rows/cols 11-14 sends every image to one point.

    The trap is a hard threshold, so it has no gradient: from a random pattern the search cannot find it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x):
        feats = torch.relu(self.conv(x)).flatten(1)[:, :64]
        trap = (x[:, :, 11:15, 11:15].mean(dim=(1, 2, 3)) > 0.8).float()[:, None]
        return feats * (1 - trap) + 100.0 * trap


def _encoder():
    return Encoder(_SharpBackdoor(), "toy/sharp", Preprocess(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))


def test_candidates_cover_corners_edges_and_centre_in_three_patterns():
    masks, patterns = candidates(16, 16, 0.25)
    assert masks.shape == (27, 1, 16, 16) and patterns.shape == (27, 3, 16, 16)
    assert torch.all(masks.sum(dim=(1, 2, 3)) == 16)  # 4×4 squares
    corners = {(int(m[0].nonzero()[0, 0]), int(m[0].nonzero()[0, 1])) for m in masks}
    assert corners == {(r, c) for r in (1, 6, 11) for c in (1, 6, 11)}


def test_screen_picks_the_square_that_trips_a_gradient_free_backdoor():
    enc = _encoder().eval()
    shadow = torch.rand(16, 3, 16, 16)
    mask, fill, sim = best_square(enc, shadow, side_fraction=0.25, images=16, seed=0, autocast=torch.no_grad)
    assert sim > 0.99
    assert mask[0, 11:15, 11:15].all() and mask.sum() == 16
    assert torch.all(fill[:, 11:15, 11:15] == 1.0)  # white


def test_the_seeded_restart_finds_a_small_trigger_the_unseeded_search_misses():
    enc = _encoder()
    shadow = torch.rand(32, 3, 16, 16)
    base = dict(max_steps=40, min_steps=40, settle_fraction=0, batch_size=8)
    seeded = invert(enc, shadow, InversionConfig.from_profile("fast", **base))
    plain = invert(enc, shadow, InversionConfig.from_profile("fast", screen_images=0, **base))
    assert seeded.reached_tau and seeded.pl1_norm < 0.12
    assert not plain.reached_tau or plain.pl1_norm > 2 * seeded.pl1_norm
    assert seeded.mask[11:15, 11:15].mean() > 0.5  # the trigger it reports is the trap's square


def test_paper_profile_and_single_restart_searches_are_not_seeded():
    assert InversionConfig.from_profile("paper").screen_images == 0
    enc = _encoder()
    shadow = torch.rand(16, 3, 16, 16)
    one = invert(enc, shadow, InversionConfig.from_profile("fast", restarts=1, max_steps=5, min_steps=0, batch_size=8))
    off = invert(enc, shadow, InversionConfig.from_profile("fast", restarts=1, screen_images=0, max_steps=5, min_steps=0, batch_size=8))
    assert torch.equal(one.mask, off.mask)


@pytest.mark.parametrize("bad", [{"screen_images": -3}, {"screen_side": 0.0}, {"screen_side": 1.5}])
def test_screen_settings_out_of_range_are_refused_before_a_scan(bad):
    with pytest.raises(ValueError, match="screen"):
        InversionConfig.from_profile("fast", **bad)
