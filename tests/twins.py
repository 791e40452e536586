"""A clean Lite0 (real ImageNet weights) and a BadEncoder copy of it with a given trigger, built in seconds."""

from __future__ import annotations

import functools

import torch

from decree import create_encoder
from decree.zoo.data import load_fashion_mnist, to_pixels
from decree.zoo.train import badencoder_attack, frozen_copy


def make_twins(trigger, *, size: int = 32, n_shadow: int = 128, steps: int = 40):
    """(clean, trojan, shadow pixels): 256 Fashion-MNIST test images attack, `n_shadow` others are the shadow set."""
    torch.manual_seed(0)
    x, y = load_fashion_mnist("test")
    train, shadow = to_pixels(x[:256]), to_pixels(x[5000:5000 + n_shadow])
    clean = create_encoder("timm/tf_efficientnet_lite0", pretrained=True, image_size=size)
    trojan = frozen_copy(clean)
    badencoder_attack(trojan, clean, train[y[:256] != 0], train[y[:256] == 0][:1], trigger, steps=steps, lr=3e-4,
                      batch_size=32, seed=0)
    return clean, trojan, shadow


CORNER = dict(size=4, row=24, col=24, pattern="white", position="bottom-right")


@functools.cache
def _corner_twins():
    from decree.zoo.triggers import Trigger

    return make_twins(Trigger(**CORNER), size=32, n_shadow=128)


def corner_twins(n_shadow: int = 96):
    """A 4-px white bottom-right patch at 32 px (1.6% of the image), the first `n_shadow` (at most 128) shadow
    images: trained once per session for every module that needs it (test_detection, test_transfer,
    test_consensus). Callers must not change the encoders in place."""
    clean, trojan, shadow = _corner_twins()
    if n_shadow > len(shadow):
        raise ValueError(f"corner_twins has {len(shadow)} shadow images, not {n_shadow}")
    return clean, trojan, shadow[:n_shadow]
