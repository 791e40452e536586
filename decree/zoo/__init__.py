"""Benchmark zoo: clean and trojaned encoders built offline from real weights and real images."""

from .build import ALL_FAMILIES, FAMILIES, build_zoo, is_cached, read_manifest
from .data import CLASSES, load_fashion_mnist, make_splits
from .spec import ZOO_CODE_VERSION, EncoderSpec, ZooConfig
from .triggers import GlobalTrigger, Trigger, sample_global_trigger, sample_trigger, trigger_from_dict

__all__ = [
    "ALL_FAMILIES",
    "GlobalTrigger",
    "sample_global_trigger",
    "trigger_from_dict",
    "CLASSES",
    "FAMILIES",
    "ZOO_CODE_VERSION",
    "EncoderSpec",
    "Trigger",
    "ZooConfig",
    "build_zoo",
    "is_cached",
    "load_fashion_mnist",
    "make_splits",
    "read_manifest",
    "sample_trigger",
]
