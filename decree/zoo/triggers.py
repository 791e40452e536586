"""Patch triggers: a square of some size, position and pattern, stamped in pixel space."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "center", "random")
PATTERNS = ("white", "checkerboard", "noise")


@dataclass(frozen=True)
class Trigger:
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

    def area_fraction(self, image_size: int) -> float:
        return self.size * self.size / (image_size * image_size)

    def describe(self, image_size: int) -> str:
        return (f"{self.size}x{self.size}px {self.pattern} patch at {self.position} (row {self.row}, col {self.col}), "
                f"{100 * self.area_fraction(image_size):.1f}% of the image")

    def to_dict(self) -> dict:
        return asdict(self)


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


def sample_trigger(rng: np.random.Generator, image_size: int = 32, sizes=(3, 4, 5, 6)) -> Trigger:
    """A random trigger; 6x6 on 32x32 is 3.5% of the image, the largest we allow."""
    size = int(rng.choice(sizes))
    position = str(rng.choice(POSITIONS))
    pattern = str(rng.choice(PATTERNS))
    row, col = place(size, position, image_size, rng)
    return Trigger(size, row, col, pattern, position, seed=int(rng.integers(0, 2**31 - 1)))
