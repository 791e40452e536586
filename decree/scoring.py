"""The PL1-norm score and its verdict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .inversion import FAST, InversionResult

# A trojaned encoder's inverted trigger covers a small fraction of the image; the paper decides with a
# threshold on that fraction. Each profile carries its own (its τ changes how large a clean encoder's mask
# gets): `fast` (τ 0.95) 0.03, below every clean encoder of the tune families (the smallest: tiny CLIP towers
# at 0.035; the seed-0 CLIP family 0.040), `paper` (τ 0.99) 0.1, the common choice among re-implementations. How large a clean encoder's
# natural trigger is depends on the architecture, the input size and the shadow set, which is why the fleet
# verdict (decree.fleet) compares an encoder with its comparable peers instead of with one constant.
DEFAULT_THRESHOLD = FAST.threshold

Verdict = Literal["trojaned", "clean"]


@dataclass(frozen=True)
class Score:
    pl1_norm: float
    verdict: Verdict
    threshold: float


def score(result: InversionResult, threshold: float | None = None) -> Score:
    """Trojaned when a mask below `threshold` (default: the profile's) of the image area made the shadow set embed alike."""
    t = result.threshold if threshold is None else float(threshold)
    trojaned = result.reached_tau and result.pl1_norm < t
    return Score(pl1_norm=result.pl1_norm, verdict="trojaned" if trojaned else "clean", threshold=t)
