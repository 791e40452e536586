"""What a zoo build is made of: its knobs (ZooConfig), one encoder's recipe (EncoderSpec), shared state."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch

from .data import Splits, to_pixels

# Bump when a change to the training code should invalidate cached zoos and encoders.
ZOO_CODE_VERSION = "1"


@dataclass(frozen=True)
class ZooConfig:
    """Knobs of a build. Defaults build a real zoo in minutes on 2 cores; `tiny()` is for tests."""

    n_train: int = 2048  # images used to fine-tune and attack (Fashion-MNIST train split)
    n_eval: int = 256  # held-out images for attack_strength / clean_fidelity (test split)
    n_shadow: int = 300  # shadow images written to shadow.npz (test split, disjoint from eval)
    batch_size: int = 32
    clean_steps: tuple[int, ...] = (15, 20, 25)
    clean_lrs: tuple[float, ...] = (5e-5, 1e-4, 2e-4)
    attack_steps: tuple[int, ...] = (40, 50)
    attack_lrs: tuple[float, ...] = (3e-4, 4e-4)
    # utility weight < 2 collapsed clean embeddings (fidelity 0.69-0.77, pairwise cosine 0.8-0.9 vs ~0.5 for
    # clean encoders): a scanner could flag that instead of the backdoor
    utility_weights: tuple[float, ...] = (2.0, 2.5, 3.0)
    min_strength: float = 0.9  # a trojan whose attack did not take is dropped
    max_retries: int = 2  # extra rounds of `steps` for a trojan below min_strength
    exclude_target_class: bool = True  # stamp only non-target images during the attack
    # One thread: on a shared 2-core machine two threads ran 5-10x slower than one (OpenMP contention).
    threads: int = 1
    # CLIP family
    clip_base_steps: int = 300
    clip_base_lr: float = 1e-3
    clip_batch_size: int = 64
    clip_clean_steps: tuple[int, ...] = (40, 60, 80)
    clip_clean_lrs: tuple[float, ...] = (1e-4, 2e-4)
    clip_attack_steps: tuple[int, ...] = (60, 80, 100)
    clip_attack_lrs: tuple[float, ...] = (2e-4, 3e-4)
    clip_attacks: tuple[str, ...] = ("image-on-pair", "text-on-pair")  # cycled over the trojans
    clip_utility_weights: tuple[float, ...] = (0.5, 1.0, 2.0)  # the ViT keeps fidelity >= 0.99 even at 0.5
    # cifar-r18 family (SimCLR from scratch: Adam at 1e-3 learns in a few hundred steps, 1e-4 did not)
    cifar_clean_steps: tuple[int, ...] = (150, 200, 250)
    cifar_clean_lrs: tuple[float, ...] = (1e-3, 2e-3)
    cifar_attack_steps: tuple[int, ...] = (80, 100)
    cifar_attack_lrs: tuple[float, ...] = (1e-3, 2e-3)  # 2e-4..5e-4 left a 5x5 noise patch at strength 0.69

    @classmethod
    def tiny(cls, **overrides) -> ZooConfig:
        base = cls(n_train=256, n_eval=48, n_shadow=32, batch_size=16, clean_steps=(2,), clean_lrs=(1e-4,),
                   attack_steps=(12,), attack_lrs=(1e-3,), utility_weights=(1.0,), min_strength=0.0,
                   max_retries=0, clip_base_steps=10, clip_batch_size=32, clip_clean_steps=(2,),
                   clip_attack_steps=(12,), clip_attack_lrs=(1e-3,), cifar_clean_steps=(2,),
                   cifar_attack_steps=(3,))
        return replace(base, **overrides)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def recipe(self, family: str | None = None, families=None) -> dict:
        """What decides the encoders (threads only decide the speed); CLIP knobs leave image-on-image alone,
        and the cifar knobs only count for builds that hold a cifar family (older zoos keep their hash)."""
        cifar = families is not None and any(f.startswith("cifar") for f in families)
        return {k: v for k, v in self.to_dict().items()
                if k != "threads" and not (family == "image-on-image" and k.startswith("clip_"))
                and not (k.startswith("cifar_") and not cifar)}


@dataclass(frozen=True)
class EncoderSpec:
    """The full recipe of one encoder; its hash decides whether a cached file can be reused."""

    family: str
    label: str  # clean | trojaned
    index: int  # within (family, label)
    seed: int
    lr: float
    steps: int
    parent: int | None = None  # index of the clean encoder a trojan starts from (None: the base)
    trigger: dict | None = None
    target: int | None = None  # target class
    utility_weight: float = 1.0
    attack: str | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.family, self.label, self.index)

    def digest(self, cfg: ZooConfig, build_seed: int) -> str:
        # The spec carries its sampled lr/steps/weights; of the config only what else shapes the weights counts,
        # so widening a choice list rebuilds just the encoders whose recipe changed.
        keys = _SHAPING_KEYS + (_CLIP_SHAPING_KEYS if self.family.startswith("clip") else ())
        shaping = {k: v for k, v in cfg.recipe().items() if k in keys}
        return digest({"spec": asdict(self), "cfg": shaping, "seed": build_seed, "code": ZOO_CODE_VERSION})


_SHAPING_KEYS = ("n_train", "n_eval", "batch_size", "min_strength", "max_retries", "exclude_target_class")
_CLIP_SHAPING_KEYS = ("clip_base_steps", "clip_base_lr", "clip_batch_size")


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class BuildContext:
    cfg: ZooConfig
    splits: Splits
    out: Path
    ids: dict[tuple[str, str, int], str] = field(default_factory=dict)
    cache: dict = field(default_factory=dict)  # family-level shared objects (e.g. the CLIP base model)

    @cached_property
    def _train(self) -> torch.Tensor:
        return to_pixels(self.splits.train_x)

    @cached_property
    def _eval(self) -> torch.Tensor:
        return to_pixels(self.splits.eval_x)

    def train_pixels(self) -> torch.Tensor:
        return self._train

    def eval_pixels(self) -> torch.Tensor:
        return self._eval

    def parent_id(self, spec: EncoderSpec) -> str | None:
        return None if spec.parent is None else self.ids[(spec.family, "clean", spec.parent)]

    def checkpoint(self, encoder_id: str) -> Path:
        return self.out / "encoders" / f"{encoder_id}.safetensors"
