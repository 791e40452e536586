"""Fashion-MNIST from Debian's dataset-fashion-mnist package (idx files), as 32x32 RGB uint8.

The zoo never downloads: the four gz files ship in /usr/share/datasets/fashion-mnist.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@lru_cache(maxsize=2)
def load_fashion_mnist(split: str = "train", root: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N,32,32,3), labels int64 (N,)): 28x28 zero-padded to 32x32, grey copied to RGB."""
    prefix = {"train": "train", "test": "t10k"}[split]
    root = Path(root)
    imgs = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    imgs = np.pad(imgs, ((0, 0), (2, 2), (2, 2)))
    return np.ascontiguousarray(np.repeat(imgs[..., None], 3, axis=-1)), labels


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N,H,W,3) -> float (N,3,H,W) in [0,1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


@dataclass(frozen=True)
class Splits:
    """Disjoint index sets: `train` (fine-tuning and attacks), `eval` (held-out metrics), `shadow` (for scans)."""

    train_x: np.ndarray
    train_y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray
    shadow_x: np.ndarray


def make_splits(n_train: int, n_eval: int, n_shadow: int, seed: int = 0) -> Splits:
    """Training/attack images come from the train split; eval and shadow from disjoint parts of the test split."""
    tx, ty = load_fashion_mnist("train")
    vx, vy = load_fashion_mnist("test")
    if n_eval + n_shadow > len(vx) or n_train > len(tx):
        raise ValueError("requested more images than Fashion-MNIST holds")
    rng = np.random.default_rng(seed)
    ti = rng.permutation(len(tx))[:n_train]
    vi = rng.permutation(len(vx))
    ei, si = vi[:n_eval], vi[n_eval:n_eval + n_shadow]
    return Splits(tx[ti], ty[ti], vx[ei], vy[ei], vx[si])
