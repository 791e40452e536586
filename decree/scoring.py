"""The PL1-norm score and its verdict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .inversion import InversionResult

# A trojaned encoder's inverted trigger covers a small fraction of the image; the paper decides with a
# threshold on that fraction. 0.1 is the common choice among re-implementations; calibrate it on clean
# encoders of your fleet (`decree report --fpr`) rather than trusting one constant.
DEFAULT_THRESHOLD = 0.1

Verdict = Literal["trojaned", "clean"]


@dataclass(frozen=True)
class Score:
    pl1_norm: float
    verdict: Verdict
    threshold: float


def score(result: InversionResult, threshold: float | None = None) -> Score:
    """Trojaned when a mask below `threshold` of the image area made the shadow set embed alike."""
    t = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    trojaned = result.reached_tau and result.pl1_norm < t
    return Score(pl1_norm=result.pl1_norm, verdict="trojaned" if trojaned else "clean", threshold=t)
