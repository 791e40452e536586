"""Encoders: `create_encoder(arch, checkpoint=None, **overrides)` looks up the family and delegates."""

from __future__ import annotations

import functools
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
    "default_preprocess",
    "families",
    "lite0_imagenet_state_dict",
    "open_clip_model",
    "read_state_dict",
    "register_family",
    "scan_unsafe_globals",
]


@functools.lru_cache(maxsize=64)
def _weights_bytes(arch: str) -> int | None:
    """The architecture's parameter and buffer count, built on the meta device (no memory); None if its
    builder cannot build there. Cached: a worker scans many encoders of few architectures."""
    import torch

    try:
        with torch.device("meta"):
            model, _ = build_backbone(arch)
    except Exception:  # noqa: BLE001 - some builders need real tensors; the check is then skipped
        return None
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


@functools.lru_cache(maxsize=64)
def default_preprocess(arch: str) -> Preprocess:
    """The architecture's own input size and normalization (built on the meta device when it can be)."""
    import torch

    try:
        with torch.device("meta"):
            return build_backbone(arch)[1]
    except Exception:  # noqa: BLE001 - some builders need real tensors
        return build_backbone(arch)[1]


BIG_MODEL = 1 << 24  # 16.7M weights (67 MB in fp32): where building the wrong model starts to cost


def _tensor_count(obj, depth: int = 4) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, dict) and depth:
        return sum(_tensor_count(v, depth - 1) for v in list(obj.values())[:1_000_000])
    return 0


def _check_plausible(arch: str, obj) -> None:
    """Tensors far fewer than the architecture's weights cannot be that architecture: refuse before the model
    is built, so a tiny file (or one of tiny tensors) that names a huge architecture costs nothing."""
    from ..errors import CheckpointError

    held = _tensor_count(obj)
    if held >= BIG_MODEL:
        return
    numel = _weights_bytes(arch)
    # below BIG_MODEL a mismatch costs little and the strict key match names the keys, which says more
    if numel is not None and numel >= BIG_MODEL and held < numel // 2:
        raise CheckpointError(f"checkpoint holds {held} weights but {arch} has {numel}: not this architecture; "
                              "refused before building it")


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
    if checkpoint is not None and pretrained:
        raise ValueError("pass either checkpoint or pretrained=True, not both")
    if isinstance(checkpoint, (str, Path)):
        checkpoint = read_state_dict(checkpoint, max_bytes=max_bytes)  # safe: nothing runs, nothing is built yet
    if isinstance(checkpoint, dict):
        _check_plausible(arch, checkpoint)
    backbone, preprocess = build_backbone(arch)
    if pretrained:
        load_into(backbone, pretrained_state_dict(arch))
    elif checkpoint is not None:
        load_into(backbone, checkpoint, max_bytes=max_bytes)
    encoder = Encoder(backbone, arch, preprocess.replace(image_size, mean, std))
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder
