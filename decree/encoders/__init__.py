"""Encoders: `create_encoder(arch, checkpoint=None, **overrides)` looks up the family and delegates."""

from __future__ import annotations

from pathlib import Path

from . import families as _families  # noqa: F401 - registers the families
from .checkpoint import CHECKPOINT_SUFFIXES, load_into, read_state_dict, scan_unsafe_globals
from .families import lite0_imagenet_state_dict, open_clip_model
from .registry import (
    Encoder,
    Preprocess,
    build_backbone,
    families,
    has_pretrained,
    pretrained_state_dict,
    register_family,
)

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "Encoder",
    "Preprocess",
    "create_encoder",
    "families",
    "lite0_imagenet_state_dict",
    "open_clip_model",
    "read_state_dict",
    "register_family",
    "scan_unsafe_globals",
]


def create_encoder(
    arch: str,
    checkpoint: str | Path | dict | None = None,
    *,
    pretrained: bool = False,
    image_size: int | None = None,
    mean=None,
    std=None,
    max_bytes: int | None = None,
) -> Encoder:
    """Build `arch` ("timm/tf_efficientnet_lite0", "torchvision/resnet18", "open_clip/ViT-B-32", ...).

    `checkpoint` (a path or a state dict) loads strictly; `pretrained=True` loads the offline weights
    registered for the arch. Without either, the encoder has random weights: only for building zoos.
    `max_bytes` refuses a bigger checkpoint file before reading it (CheckpointError).
    The result is in eval mode with frozen parameters: the inverter needs gradients for the input only.
    """
    backbone, preprocess = build_backbone(arch)
    if checkpoint is not None and pretrained:
        raise ValueError("pass either checkpoint or pretrained=True, not both")
    if pretrained:
        load_into(backbone, pretrained_state_dict(arch))
    elif checkpoint is not None:
        load_into(backbone, checkpoint, max_bytes=max_bytes)
    encoder = Encoder(backbone, arch, preprocess.replace(image_size, mean, std))
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder
