"""A forward-only screen that seeds one restart of the patch search with a promising square.

Some backdoors respond only to a pattern close to their own trigger: from a random pattern and a faint flat
mask, the gradient never reaches them (measured on the tune `cifar-r18` family: a 6×6 white square that
collapses the shadow set to 0.97 is never found, while a search started on that square shrinks it to 1.6% of
the image). Solid and checkered squares are the common patch triggers (BadEncoder's default is a white square),
so before the search this stamps white, black and checkerboard squares of a quarter of the image side at nine
positions (corners, edge centres, centre) on a few shadow images, forward only, and starts the last restart from
the square that made them embed most alike. The other restarts start as before, and the usual pruning keeps
whichever restart found the smaller trigger (or collapsed more, if none reached τ yet). Noise-pattern triggers
are left to the gradient search. SECURITY.md says what a decoy aimed at these public squares can do.
"""

from __future__ import annotations

import torch

from .encoders import Encoder

PATTERNS = ("white", "black", "checkerboard")
SEED_MASK = 0.9  # the seeded square's opacity; the rest of the mask starts nearly off
SEED_FLOOR = 0.02


def candidates(h: int, w: int, side_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(K,1,H,W) square masks and (K,3,H,W) patterns: every pattern at nine positions."""
    s = max(2, min(h, w, round(side_fraction * min(h, w))))
    rows = sorted({min(1, h - s), (h - s) // 2, max(0, h - s - 1)})
    cols = sorted({min(1, w - s), (w - s) // 2, max(0, w - s - 1)})
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    fills = {"white": torch.ones(h, w), "black": torch.zeros(h, w), "checkerboard": ((ii + jj) % 2 == 0).float()}
    masks, patterns = [], []
    for r0 in rows:
        for c0 in cols:
            m = torch.zeros(1, h, w)
            m[:, r0 : r0 + s, c0 : c0 + s] = 1.0
            for name in PATTERNS:
                masks.append(m)
                patterns.append(fills[name].expand(3, h, w))
    return torch.stack(masks), torch.stack(patterns)


@torch.no_grad()
def best_square(encoder: Encoder, shadow: torch.Tensor, *, side_fraction: float, images: int, seed: int,
                autocast) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The candidate square whose stamped shadow images embed most alike: (mask (1,H,W), pattern (3,H,W), similarity)."""
    from .inversion import mean_pairwise_cosine, stamp  # inversion imports this module

    n = min(images, shadow.shape[0])
    idx = torch.randperm(shadow.shape[0], generator=torch.Generator().manual_seed(seed))[:n].to(shadow.device)
    x = shadow[idx]
    masks, patterns = (t.to(shadow.device, shadow.dtype) for t in candidates(*shadow.shape[-2:], side_fraction))
    sims = []
    for m, p in zip(masks.split(4), patterns.split(4)):  # a few candidates per forward: memory stays ~one step's
        with autocast():
            emb = encoder(encoder.normalize(stamp(x, m, p)))
        sims.append(mean_pairwise_cosine(emb.view(m.shape[0], n, -1)))
    sims = torch.cat(sims)
    k = int(torch.argmax(sims))
    return masks[k], patterns[k], float(sims[k])


def seed_restart(pattern: torch.Tensor, square: torch.Tensor, fill: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A restart's (mask (1,H,W), pattern (3,H,W)) in [0,1], started on `square` stamped with `fill`; the
    pattern keeps its random start outside the square."""
    seeded_mask = square * SEED_MASK + (1 - square) * SEED_FLOOR
    seeded_pattern = torch.where(square.bool(), fill * 0.96 + 0.02, pattern)  # inside (0,1): tanh stays invertible
    return seeded_mask, seeded_pattern
