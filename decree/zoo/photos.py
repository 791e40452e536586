"""Out-of-distribution shadow sets: random crops of the natural photos scikit-image and scikit-learn ship, and
scikit-learn's handwritten digits.

An auditor rarely has the pre-training data; these photos (people, animals, objects, scenes, microscopy,
astronomy) share nothing with Fashion-MNIST and are never used to train or attack a zoo encoder, except by the one
family trained on natural images (`i2i-natural`, natural_splits), whose zoo then scans with Fashion-MNIST as its
out-of-distribution set. The digits are a
second, poorer choice an auditor might make: grey strokes on a flat black background, as Fashion-MNIST's.
`python -c "from decree.zoo.photos import main; main()" digits ZOO...` writes them into zoos (`shadow-digits.npz`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

# Photographs only: the synthetic images skimage also ships (checkerboard, logo, text, colorwheel) are left out.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "camera",
                  "coins", "moon", "brick", "grass", "gravel", "clock")


@lru_cache(maxsize=1)
def natural_photos() -> tuple[np.ndarray, ...]:
    """The photos as uint8 (H,W,3) arrays (grey ones copied to three channels)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS]
    photos += list(load_sample_images().images)  # china.jpg, flower.jpg
    out = []
    for p in photos:
        p = np.asarray(p)
        if p.ndim == 2:
            p = np.repeat(p[..., None], 3, axis=-1)
        out.append(np.ascontiguousarray(p[..., :3].astype(np.uint8)))
    return tuple(out)


def natural_crops(n: int, image_size: int, seed=0, min_fraction: float = 0.15,
                  max_fraction: float = 0.6) -> np.ndarray:
    """n random square crops (side a random fraction of the photo's short side), resized: uint8 (n,S,S,3)."""
    return labelled_crops(n, image_size, seed, min_fraction, max_fraction)[0]


def labelled_crops(n: int, image_size: int, seed=0, min_fraction: float = 0.15,
                   max_fraction: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """natural_crops and, per crop, the index of the photo it was cut from (its class): int64 (n,)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = natural_photos()
    out = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        labels[i] = int(rng.integers(len(photos)))
        p = photos[labels[i]]
        h, w = p.shape[:2]
        side = max(8, int(min(h, w) * rng.uniform(min_fraction, max_fraction)))
        r, c = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(p[r:r + side, c:c + side])
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(crop.resize((image_size, image_size), Image.BILINEAR))
    return out, labels


TRAINED_ON_PHOTOS = ("i2i-natural", "cifar-natural")  # zoo families trained on natural_splits, not Fashion-MNIST


def natural_splits(n_train: int, n_eval: int, n_shadow: int, seed: int = 0, image_size: int = 32):
    """Splits (decree.zoo.data) of photo crops, for families trained on natural images (`i2i-natural`): training,
    held-out and shadow crops drawn apart (other crops of the same photos: one distribution), labelled by photo."""
    from .data import Splits

    tx, ty = labelled_crops(n_train, image_size, seed=[seed, 1])
    ex, ey = labelled_crops(n_eval, image_size, seed=[seed, 2])
    sx, _ = labelled_crops(n_shadow, image_size, seed=[seed, 3])
    return Splits(tx, ty, ex, ey, sx)


def photo_name(index: int) -> str:
    """The name of photo `index` of natural_photos()."""
    names = SKIMAGE_PHOTOS + ("china", "flower")
    return names[index] if 0 <= index < len(names) else f"photo {index}"


DIGITS_SHADOW = "shadow-digits.npz"


def digit_images(n: int, image_size: int, seed: int = 0) -> np.ndarray:
    """n of scikit-learn's bundled 8x8 handwritten digits (17 grey levels), drawn without replacement and resized
    to image_size: uint8 (n,S,S,3)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    images = load_digits().images  # (1797, 8, 8), 0..16
    pick = np.random.default_rng(seed).choice(len(images), size=min(n, len(images)), replace=False)
    out = np.empty((len(pick), image_size, image_size, 3), dtype=np.uint8)
    for i, k in enumerate(pick):
        grey = Image.fromarray((images[k] * 255 / 16).round().astype(np.uint8))
        out[i] = np.asarray(grey.resize((image_size, image_size), Image.BILINEAR))[..., None]
    return out


def main(argv=None) -> None:
    import argparse
    import json
    from pathlib import Path

    p = argparse.ArgumentParser(description="write the digits shadow set into zoo folders")
    p.add_argument("kind", choices=["digits"])
    p.add_argument("zoo", nargs="+", type=Path)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--size", type=int, default=32)
    a = p.parse_args(argv)
    x = digit_images(a.n, a.size, seed=0)  # the same images in every zoo
    for zoo in a.zoo:
        np.savez_compressed(zoo / DIGITS_SHADOW, x=x)
    print(json.dumps({"wrote": [str(z / DIGITS_SHADOW) for z in a.zoo]}))


if __name__ == "__main__":
    main()
