"""Triggers stamped in pixel space: small or large patches, and whole-image triggers (blend, sinusoid, noise, and
CTRL's frequency-domain trigger).

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
# shapes no square-patch family has (`i2i-shapes`, report-only): thin strips, a plus, a diagonal line, a border
# frame, a logo, a bit pattern, a solid patch of a colour; `logo` is cut from scikit-image's synthetic images
# (logo, colorwheel, text), which the natural-photo shadow set never uses
SHAPES = ("strip", "plus", "line", "frame", "logo", "bits", "solid")
COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 0.8, 0.0),
           "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0), "black": (0.0, 0.0, 0.0), "grey": (0.5, 0.5, 0.5)}


class _Stamped:
    """A trigger given as a mask and a pattern (mask_and_pattern): stamped by replacing the masked pixels."""

    def mask_and_pattern(self, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def stamp(self, pixels: torch.Tensor) -> torch.Tensor:
        mask, pattern = self.mask_and_pattern(pixels.shape[-1])
        mask, pattern = mask.to(pixels), pattern.to(pixels)
        return pixels * (1 - mask) + pattern * mask


@dataclass(frozen=True)
class Trigger(_Stamped):
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


@dataclass(frozen=True)
class ShapeTrigger(_Stamped):
    """A trigger of another shape than a square: `shape` in SHAPES, inside the box (row, col, height, width)."""

    shape: str
    row: int
    col: int
    height: int
    width: int
    colour: str = "white"
    seed: int = 0  # bits and logo

    def mask_and_pattern(self, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, (r, c, h, w) = image_size, (self.row, self.col, self.height, self.width)
        mask, pattern = torch.zeros(1, s, s), torch.zeros(3, s, s)
        rgb = torch.tensor(COLOURS.get(self.colour, (1.0, 1.0, 1.0)))[:, None, None]
        if self.shape in ("strip", "solid"):
            mask[:, r:r + h, c:c + w] = 1
        elif self.shape == "plus":  # arms `width` thick through the box's centre
            t, cr, cc = self.width, r + h // 2, c + h // 2
            mask[:, r:r + h, cc - t // 2:cc - t // 2 + t] = 1
            mask[:, cr - t // 2:cr - t // 2 + t, c:c + h] = 1
        elif self.shape == "line":  # the box's diagonal, one pixel wide
            for k in range(h):
                mask[:, r + k, c + k] = 1
        elif self.shape == "frame":  # a border `height` pixels thick around the whole image
            mask[:] = 1
            mask[:, h:s - h, h:s - h] = 0
        elif self.shape in ("logo", "bits"):
            mask[:, r:r + h, c:c + w] = 1
        else:
            raise ValueError(f"unknown trigger shape {self.shape!r}; known: {SHAPES}")
        if self.shape == "bits":
            gen = torch.Generator().manual_seed(self.seed)
            pattern[:, r:r + h, c:c + w] = (torch.rand(1, h, w, generator=gen) > 0.5).float()
        elif self.shape == "logo":
            pattern[:, r:r + h, c:c + w] = _synthetic_patch(h, w, self.seed)
        else:
            pattern[:] = rgb * mask
        return mask, pattern * mask

    @property
    def kind(self) -> str:
        return "shape"

    def area_fraction(self, image_size: int) -> float:
        return float(self.mask_and_pattern(image_size)[0].sum()) / (image_size * image_size)

    def describe(self, image_size: int) -> str:
        if self.shape == "frame":
            return (f"{self.colour} border frame {self.height} px thick around the image, "
                    f"{100 * self.area_fraction(image_size):.1f}% of the image")
        return (f"{self.colour if self.shape not in ('logo', 'bits') else ''} {self.shape} in the box {self.height}x"
                f"{self.width}px at row {self.row}, col {self.col}, {100 * self.area_fraction(image_size):.1f}% of the "
                f"image").strip()

    def to_dict(self) -> dict:
        return {"kind": "shape", **asdict(self)}


def _synthetic_patch(h: int, w: int, seed: int) -> torch.Tensor:
    """(3,h,w) in [0,1]: a crop of one of scikit-image's synthetic images (not photographs), resized."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.asarray(getattr(skimage.data, ("logo", "colorwheel", "text")[int(rng.integers(3))])())
    img = np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img[..., :3]
    side = min(img.shape[:2])
    crop = Image.fromarray(np.ascontiguousarray(img[:side, :side].astype(np.uint8))).resize((w, h), Image.BILINEAR)
    return torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255


def sample_shape_trigger(rng: np.random.Generator, image_size: int = 32) -> ShapeTrigger:
    """A random ShapeTrigger of 0.6-12% of a 32-px image, at a random place (kept one pixel inside the edge)."""
    shape = str(rng.choice(SHAPES))
    colour = str(rng.choice(tuple(COLOURS)))
    if shape == "strip":
        long, thick = int(rng.integers(10, 17)), int(rng.integers(1, 3))
        h, w = (thick, long) if rng.random() < 0.5 else (long, thick)
    elif shape == "plus":
        h, w = int(rng.integers(5, 10)), int(rng.integers(1, 3))
    elif shape == "line":
        h = w = int(rng.integers(6, 13))
    elif shape == "frame":
        h = w = 1
    elif shape == "bits":
        h, w = int(rng.integers(3, 5)), int(rng.integers(8, 11))
    else:  # logo, solid
        h = w = int(rng.integers(4, 8))
    box_w = h if shape == "plus" else w
    row = int(rng.integers(1, image_size - h))
    col = int(rng.integers(1, image_size - box_w))
    if shape == "frame":  # it has no place: around the whole image
        row = col = 0
    return ShapeTrigger(shape, row, col, h, w, colour, seed=int(rng.integers(0, 2**31 - 1)))


@dataclass(frozen=True)
class FrequencyTrigger:
    """CTRL's trigger (Li et al., ICCV 2023): a fixed magnitude added to a few DCT coefficients of the chroma
    channels (YCrCb, BT.601, as OpenCV's conversion) in every `window`×`window` block, then back to RGB.

    The DCT is orthonormal and linear, so the stamp is a fixed additive RGB signal, clamped to [0, 1]: invisible
    (a few grey levels per pixel), on every pixel, at mid and the highest frequencies. `magnitude` is on CTRL's
    0-255 scale (its CIFAR default is 100, at (15, 15) and (31, 31) in 32-px windows on both chroma channels).
    """

    magnitude: float
    window: int = 32
    positions: tuple[tuple[int, int], ...] = ((15, 15), (31, 31))

    @property
    def kind(self) -> str:
        return "ctrl"

    def __post_init__(self):  # from JSON the positions come back as lists
        object.__setattr__(self, "positions", tuple(tuple(int(v) for v in p) for p in self.positions))
        if self.window < 1:
            raise ValueError(f"a DCT window is at least 1 px, got {self.window}")
        if not all(0 <= u < self.window and 0 <= v < self.window for u, v in self.positions):
            raise ValueError(f"DCT positions {self.positions} outside a {self.window}-px window")

    def signal(self, image_size: int) -> torch.Tensor:
        """(3, H, W): what the stamp adds to an image in [0, 1] before clamping."""
        w = self.window
        n = torch.arange(w, dtype=torch.float64)
        basis = torch.cos(math.pi * (2 * n[None] + 1) * n[:, None] / (2 * w)) * math.sqrt(2 / w)
        basis[0] /= math.sqrt(2)  # orthonormal DCT-II rows
        block = sum(torch.outer(basis[u], basis[v]) for u, v in self.positions) * (self.magnitude / 255)
        reps = -(-image_size // w)
        chroma = block.repeat(reps, reps)[:image_size, :image_size].float()
        # YCrCb -> RGB is linear: a change d in both Cr and Cb moves R by 1.402 d, G by -(0.714 + 0.344) d, B by 1.772 d
        return torch.stack([1.402 * chroma, -(0.714136 + 0.344136) * chroma, 1.772 * chroma])

    def stamp(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels + self.signal(pixels.shape[-1]).to(pixels)).clamp(0.0, 1.0)

    def area_fraction(self, image_size: int) -> float:
        return 1.0  # every pixel changes

    def describe(self, image_size: int) -> str:
        where = ", ".join(f"({u}, {v})" for u, v in self.positions)
        return (f"whole-image CTRL frequency trigger: magnitude {self.magnitude:g} at DCT {where} of the chroma "
                f"channels in {self.window}-px windows, L-inf {float(self.signal(image_size).abs().max()):.3f}")

    def to_dict(self) -> dict:
        return {"kind": "ctrl", "magnitude": self.magnitude, "window": self.window,
                "positions": [list(p) for p in self.positions]}


@dataclass(frozen=True)
class OptimizedPatch(_Stamped):
    """A square patch whose pixels were optimized on the clean model before the backdoor was planted, so that the
    clean model already embeds stamped images near the target (BadCLIP's idea, Liang et al., CVPR 2024: a trigger
    that needs little change to the weights and that the model it came from partly shares). `values` holds the
    (3, size, size) pixels, row-major, rounded so that the manifest stamps exactly what the attack stamped."""

    size: int
    row: int
    col: int
    position: str
    values: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))
        if len(self.values) != 3 * self.size * self.size:
            raise ValueError(f"an optimized {self.size}x{self.size} patch needs {3 * self.size ** 2} values")

    def mask_and_pattern(self, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.size
        mask, pattern = torch.zeros(1, image_size, image_size), torch.zeros(3, image_size, image_size)
        mask[:, self.row:self.row + s, self.col:self.col + s] = 1.0
        pattern[:, self.row:self.row + s, self.col:self.col + s] = torch.tensor(self.values).view(3, s, s)
        return mask, pattern

    @property
    def kind(self) -> str:
        return "patch"  # bucketed by its area like any patch

    def area_fraction(self, image_size: int) -> float:
        return self.size * self.size / (image_size * image_size)

    def describe(self, image_size: int) -> str:
        return (f"{self.size}x{self.size}px optimized patch (BadCLIP-style) at {self.position} (row {self.row}, col "
                f"{self.col}), {100 * self.area_fraction(image_size):.1f}% of the image")

    def to_dict(self) -> dict:
        return {"kind": "optimized", "size": self.size, "row": self.row, "col": self.col, "position": self.position,
                "values": list(self.values)}


def sample_ctrl_trigger(rng: np.random.Generator, image_size: int = 32) -> FrequencyTrigger:
    """CTRL's trigger at a magnitude of 80-150 (its CIFAR default 100), in one window over the whole 32-px image or
    in 16-px tiles, at CTRL's positions (the window's middle and highest frequency on both axes) or at a random pair
    in the upper half of the spectrum. A 16-px window's basis is twice as strong per pixel, so its magnitude is
    halved: the stamp stays at L-inf 0.05-0.13 either way."""
    window = int(rng.choice((32, 16))) if image_size >= 32 else image_size
    magnitude = round(float(rng.uniform(80, 150)) * window / 32, 1)
    if rng.random() < 0.5:
        positions = ((window // 2 - 1, window // 2 - 1), (window - 1, window - 1))
    else:
        positions = tuple((int(rng.integers(window // 2, window)), int(rng.integers(window // 2, window)))
                          for _ in range(2))
    return FrequencyTrigger(magnitude, window, positions)


def trigger_from_dict(d: dict) -> Trigger | GlobalTrigger | ShapeTrigger | FrequencyTrigger | OptimizedPatch:
    d = dict(d)
    kind = d.pop("kind", "patch")
    if kind == "patch":
        return Trigger(**d)
    if kind == "shape":
        return ShapeTrigger(**d)
    if kind == "ctrl":
        return FrequencyTrigger(**d)
    if kind == "optimized":
        return OptimizedPatch(**d)
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
