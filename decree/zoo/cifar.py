"""`cifar-r18`: the paper's architecture. CIFAR-style ResNet-18 (3x3 stem, no max-pool), SimCLR from scratch.

Unlike the Lite0 families, nothing here starts from pretrained weights: each clean encoder is its own SimCLR
run from a random init (its own seed, length and learning rate), as the CIFAR-10 encoders DECREE and BadEncoder
report on; trojans are BadEncoder attacks on one of them. Checkpoints keep the `cifar/resnet18` layout.
`cifar-natural` is the same recipe on colour natural-photo crops (decree.zoo.photos.natural_splits), in a zoo of
its own.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..encoders import create_encoder
from .data import CLASSES
from .spec import BuildContext, EncoderSpec
from .i2i import attack_image_on_image
from .train import embed, simclr_finetune
from .triggers import sample_trigger

ARCH = "cifar/resnet18"
IMAGE_SIZE = 32
FAMILY = "cifar-r18"
ATTACKS = ("badencoder", "badencoder-specific")
PATCH_SIZES = (4, 5, 6, 8, 10)  # 1.6% .. 9.8% of a 32-px image


def plan(n_clean: int, n_trojaned: int, rng: np.random.Generator, cfg, family: str = FAMILY) -> list[EncoderSpec]:
    specs = [EncoderSpec(family, "clean", i, seed=int(rng.integers(1 << 30)), lr=float(rng.choice(cfg.cifar_clean_lrs)),
                         steps=int(rng.choice(cfg.cifar_clean_steps))) for i in range(n_clean)]
    for j in range(n_trojaned):
        trig = sample_trigger(rng, image_size=IMAGE_SIZE, sizes=PATCH_SIZES)
        specs.append(EncoderSpec(
            family, "trojaned", j, seed=int(rng.integers(1 << 30)), lr=float(rng.choice(cfg.cifar_attack_lrs)),
            steps=int(rng.choice(cfg.cifar_attack_steps)), parent=(j % n_clean) if n_clean else None,
            trigger=trig.to_dict(), target=int(rng.integers(len(CLASSES))),
            utility_weight=float(rng.choice(cfg.utility_weights)), attack=ATTACKS[j % 2]))
    return specs


def _from_scratch(ctx: BuildContext, seed: int, steps: int, lr: float):
    torch.manual_seed(seed)
    enc = create_encoder(ARCH)  # random init: the family has no pretrained weights, by design
    simclr_finetune(enc, ctx.train_pixels(), steps=steps, lr=lr, batch_size=ctx.cfg.batch_size, seed=seed,
                    train_bn=True)
    return enc


def build(spec: EncoderSpec, ctx: BuildContext) -> tuple[dict, dict]:
    t0 = time.time()
    train_px, eval_px = ctx.train_pixels(), ctx.eval_pixels()
    if spec.label == "clean":
        enc = _from_scratch(ctx, spec.seed, spec.steps, spec.lr)
        # fidelity against its own random init says nothing; record how spread its embeddings are instead
        z = torch.nn.functional.normalize(embed(enc, eval_px), dim=1)
        spread = float((z @ z.t()).mean())
        fields = dict(attack=None, trigger=None, target=None, attack_strength=None, clean_fidelity=1.0,
                      mean_pairwise_cosine=spread, parent="scratch")
    else:
        parent_id = ctx.parent_id(spec)
        if parent_id is None:
            raise ValueError(f"{spec.family} trojans need a clean parent (--clean >= 1)")
        enc = create_encoder(ARCH, ctx.checkpoint(parent_id))
        fields = attack_image_on_image(enc, spec, ctx, train_px, eval_px, size=IMAGE_SIZE,
                                       batch=ctx.cfg.batch_size, parent=parent_id)
    pre = enc.preprocess
    fields.update(arch=ARCH, image_size=pre.image_size, mean=list(pre.mean), std=list(pre.std),
                  seconds=round(time.time() - t0, 1))
    return {k: v.detach().clone().contiguous() for k, v in enc.backbone.state_dict().items()}, fields
