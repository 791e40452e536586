"""Triggers stamped in pixel space: small or large patches, and whole-image triggers (blend, sinusoid, noise).

A patch replaces a square of pixels; a whole-image trigger changes every pixel a little: a blend mixes a fixed
pattern in at strength α, a sinusoid and a universal noise add a bounded signal. `trigger_from_dict` reads any of
them back from a spec or manifest (a dict without `kind` is a patch, as zoos written before whole-image triggers).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "center", "random")
PATTERNS = ("white", "checkerboard", "noise")
GLOBAL_KINDS = ("blend", "sinusoid", "noise")


@dataclass(frozen=True)
class Trigger:
    """A square patch."""

    size: int  # side in pixels
    row: int  # top-left corner
    col: int
    pattern: str
    position: str
    seed: int = 0  # for the noise pattern

    def mask_and_pattern(self, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """mask (1,H,W) in {0,1}; pattern (3,H,W) in [0,1]."""
        mask = torch.zeros(1, image_size, image_size)
        mask[:, self.row:self.row + self.size, self.col:self.col + self.size] = 1.0
        s = self.size
        if self.pattern == "white":
            patch = torch.ones(3, s, s)
        elif self.pattern == "checkerboard":
            ii, jj = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
            patch = ((ii + jj) % 2 == 0).float().expand(3, s, s).clone()
        elif self.pattern == "noise":
            gen = torch.Generator().manual_seed(self.seed)
            patch = torch.rand(3, s, s, generator=gen)
        else:
            raise ValueError(f"unknown trigger pattern {self.pattern!r}; known: {PATTERNS}")
        pattern = torch.zeros(3, image_size, image_size)
        pattern[:, self.row:self.row + s, self.col:self.col + s] = patch
        return mask, pattern

    def stamp(self, pixels: torch.Tensor) -> torch.Tensor:
        mask, pattern = self.mask_and_pattern(pixels.shape[-1])
        mask, pattern = mask.to(pixels), pattern.to(pixels)
        return pixels * (1 - mask) + pattern * mask

    @property
    def kind(self) -> str:
        return "patch"

    def area_fraction(self, image_size: int) -> float:
        return self.size * self.size / (image_size * image_size)

    def describe(self, image_size: int) -> str:
        return (f"{self.size}x{self.size}px {self.pattern} patch at {self.position} (row {self.row}, col {self.col}), "
                f"{100 * self.area_fraction(image_size):.1f}% of the image")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GlobalTrigger:
    """A whole-image trigger.

    blend:    (1-α)·x + α·p, p a fixed noise image (Chen et al.'s blended injection);
    sinusoid: x + α·sin(2π f col / W) on every channel (Barni et al.'s SIG);
    noise:    x + α·sign-like universal noise, bounded by α in L∞.
    """

    kind: str
    strength: float  # α: blend weight, or the L∞ amplitude of the additive signal
    seed: int = 0
    frequency: float = 6.0  # sinusoid periods across the image

    def _signal(self, image_size: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        if self.kind == "blend":
            return torch.rand(3, image_size, image_size, generator=gen)
        if self.kind == "sinusoid":
            col = torch.arange(image_size, dtype=torch.float32)
            wave = torch.sin(2 * math.pi * self.frequency * col / image_size)
            return wave.expand(3, image_size, image_size).clone()
        if self.kind == "noise":
            return torch.rand(3, image_size, image_size, generator=gen).mul_(2).sub_(1).sign_()
        raise ValueError(f"unknown whole-image trigger {self.kind!r}; known: {GLOBAL_KINDS}")

    def stamp(self, pixels: torch.Tensor) -> torch.Tensor:
        signal = self._signal(pixels.shape[-1]).to(pixels)
        if self.kind == "blend":
            return (1 - self.strength) * pixels + self.strength * signal
        return (pixels + self.strength * signal).clamp(0.0, 1.0)

    def area_fraction(self, image_size: int) -> float:
        return 1.0  # every pixel changes

    def describe(self, image_size: int) -> str:
        if self.kind == "blend":
            return f"whole-image blend of a noise pattern at alpha {self.strength:.2f}"
        if self.kind == "sinusoid":
            return f"whole-image sinusoid, amplitude {self.strength:.3f}, {self.frequency:g} periods"
        return f"whole-image universal noise, L-inf {self.strength:.3f}"

    def to_dict(self) -> dict:
        return asdict(self)


def trigger_from_dict(d: dict) -> Trigger | GlobalTrigger:
    d = dict(d)
    kind = d.pop("kind", "patch")
    if kind == "patch":
        return Trigger(**d)
    return GlobalTrigger(kind=kind, **d)


def place(size: int, position: str, image_size: int, rng: np.random.Generator, margin: int = 1) -> tuple[int, int]:
    far = image_size - size - margin
    if position == "top-left":
        return margin, margin
    if position == "top-right":
        return margin, far
    if position == "bottom-left":
        return far, margin
    if position == "bottom-right":
        return far, far
    if position == "center":
        c = (image_size - size) // 2
        return c, c
    if position == "random":
        return int(rng.integers(margin, far + 1)), int(rng.integers(margin, far + 1))
    raise ValueError(f"unknown trigger position {position!r}; known: {POSITIONS}")


def sample_trigger(rng: np.random.Generator, image_size: int = 32, sizes=(3, 4, 5, 6), positions=POSITIONS,
                   patterns=PATTERNS) -> Trigger:
    """A random patch; the default sizes (6x6 on 32x32 is 3.5% of the image) are the original zoo's."""
    size = int(rng.choice(sizes))
    position = str(rng.choice(positions))
    pattern = str(rng.choice(patterns))
    row, col = place(size, position, image_size, rng)
    return Trigger(size, row, col, pattern, position, seed=int(rng.integers(0, 2**31 - 1)))


# α ranges where the attack takes while the stamped image still looks like the image
GLOBAL_STRENGTHS = {"blend": (0.1, 0.2), "sinusoid": (0.06, 0.1), "noise": (0.04, 0.08)}


def sample_global_trigger(rng: np.random.Generator, kinds=GLOBAL_KINDS) -> GlobalTrigger:
    kind = str(rng.choice(kinds))
    lo, hi = GLOBAL_STRENGTHS[kind]
    return GlobalTrigger(kind, round(float(rng.uniform(lo, hi)), 3), seed=int(rng.integers(0, 2**31 - 1)),
                         frequency=float(rng.choice((4.0, 6.0, 8.0))))
