"""Shadow data: a few hundred clean, unlabeled images, kept on the device once loaded."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ShadowError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
# What PIL may decode a shadow image as, whatever its name says: an "image" that is really EPS would otherwise
# make PIL start Ghostscript. And at most this many pixels: a decompression bomb is refused before decoding.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_SIDE = 1024  # mixed sizes are brought to the most common size, never above this
_BYTES_COLUMNS = ("image", "image_bytes", "bytes", "img", "png", "jpeg")


def _decode(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ShadowError(f"shadow image {name} is {im.width}x{im.height}: over {MAX_IMAGE_PIXELS} pixels")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ShadowError(f"corrupt image in shadow set (PNG, JPEG, BMP or WEBP only): {name}: {e}") from e


def _from_array(x, where: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ShadowError(f"shadow images must be uint8 (got {x.dtype}) in {where}")
    if x.ndim == 3:  # N,H,W grayscale
        x = np.repeat(x[..., None], 3, axis=-1)
    elif x.ndim == 4 and x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ShadowError(f"shadow array must be N,H,W,3 or N,H,W; got shape {x.shape} in {where}")
    if x.shape[0] == 0 or x.shape[1] < 2 or x.shape[2] < 2:
        raise ShadowError(f"shadow set is empty or degenerate (shape {x.shape}) in {where}")
    return x


def _stack(images: list[np.ndarray], where: str) -> np.ndarray:
    if not images:
        raise ShadowError(f"shadow set is empty: {where}")
    from collections import Counter

    # the most common size (not the largest: one huge image must not upscale all the others), capped
    (h, w), _ = Counter(im.shape[:2] for im in images).most_common(1)[0]
    scale = min(1.0, MAX_SIDE / max(h, w))
    h, w = max(2, round(h * scale)), max(2, round(w * scale))
    if all(im.shape[:2] == (h, w) for im in images):
        return np.stack(images)
    from PIL import Image  # mixed sizes: bring all to the largest before the encoder-size resize

    return np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR)) for im in images])


def read_images(source) -> np.ndarray:
    """Read a shadow set as uint8 (N,H,W,3) from a folder, .npz, .parquet, or an array."""
    if isinstance(source, np.ndarray):
        return _from_array(source, "array")
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        return _stack([_decode(p.read_bytes(), p.name) for p in files], str(path))
    if not path.is_file():
        raise ShadowError(f"shadow set not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                if "x" not in data.files:
                    raise ShadowError(f"{path.name} has no array 'x' (found {data.files})")
                return _from_array(data["x"], path.name)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise ShadowError(f"corrupt shadow file {path.name}: {e}") from e
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # optional format; decree itself never needs pyarrow

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types for bad files
            raise ShadowError(f"corrupt parquet shadow file {path.name}: {e}") from e
        col = next((c for c in _BYTES_COLUMNS if c in table.column_names), None)
        if col is None:
            raise ShadowError(f"{path.name} has no image-bytes column (one of {_BYTES_COLUMNS})")
        values = table.column(col).to_pylist()
        values = [v["bytes"] if isinstance(v, dict) else v for v in values]  # HF datasets' {"bytes":..} struct
        return _stack([_decode(v, f"{path.name}[{i}]") for i, v in enumerate(values) if v is not None], path.name)
    if suffix in IMAGE_SUFFIXES:
        return _stack([_decode(path.read_bytes(), path.name)], path.name)
    raise ShadowError(f"unsupported shadow source {path.name}: use a folder of images, .npz or .parquet")


def to_pixels(images: np.ndarray, image_size: int, device=None) -> torch.Tensor:
    """uint8 (N,H,W,3) -> float (N,3,S,S) in [0,1] on the device."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)
    return x.to(device) if device is not None else x


def load_shadow(source, image_size: int, *, device=None, limit: int | None = None, seed: int = 0) -> torch.Tensor:
    """Load a shadow set as pixels in [0,1], resized to the encoder's input size, on `device`.

    `limit` keeps a seeded random subset so large shadow sets cost a bounded amount of memory.
    """
    return ShadowSet(source, limit=limit, seed=seed).pixels(image_size, device)


class ShadowSet:
    """Shadow images read once; pixel tensors cached per (image size, device) for repeated scans.

    The cache keeps the CACHE_SIZES most recently used sizes: an encoder that claims a huge input size costs its
    own scan that memory, not every later encoder on the worker (a 4096-px set of 300 images is 60 GB)."""

    CACHE_SIZES = 3

    def __init__(self, source, *, limit: int | None = None, seed: int = 0):
        images = read_images(source)
        if images.shape[0] < 2:
            raise ShadowError(f"shadow set needs at least 2 images for a pairwise similarity, got {images.shape[0]}")
        if limit is not None and images.shape[0] > limit:
            idx = np.random.default_rng(seed).choice(images.shape[0], size=limit, replace=False)
            images = images[np.sort(idx)]
        self.images = images
        self._cache: dict[tuple[int, str], torch.Tensor] = {}
        self._digest: str | None = None

    @property
    def digest(self) -> str:
        """SHA-256 of the decoded images (shape and pixels): which shadow set a score was measured on."""
        if self._digest is None:
            import hashlib

            h = hashlib.sha256(repr(self.images.shape).encode())
            h.update(np.ascontiguousarray(self.images).tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def pixels(self, image_size: int, device=None) -> torch.Tensor:
        key = (int(image_size), str(torch.device(device) if device is not None else "cpu"))
        hit = self._cache.pop(key, None)
        if hit is None:
            while len(self._cache) >= self.CACHE_SIZES:
                self._cache.pop(next(iter(self._cache)))  # least recently used first (dicts keep order)
            hit = to_pixels(self.images, int(image_size), key[1])
        self._cache[key] = hit
        return hit
