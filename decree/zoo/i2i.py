"""Image-on-image families: EfficientNet-Lite0 (real ImageNet weights) fine-tuned on Fashion-MNIST.

Clean encoders are short SimCLR fine-tunes; trojans are BadEncoder attacks on a clean one. The families differ
only in the triggers their trojans carry (`TRIGGERS`): small patches (the original zoo), large patches up to 12%
of the image (BadEncoder's own 10x10 white square among them), whole-image triggers, other shapes than squares
(`i2i-shapes`: strips, lines, a plus, a border frame, a logo, bits, coloured solids), and `i2i-224`, the same
network at its native 224 px (Fashion-MNIST upsampled for training; 16-48 px patches). `i2i-long` changes the
clean recipe instead: long fine-tunes at a high learning rate (360-600 steps at 2.5e-4-1e-3: 24x the steps and 5x
the lr of the others), which drift far from the ImageNet weights and grow natural triggers of their own.
`i2i-heavy` changes the attack recipe: BadEncoder for 6x the steps at 2.5x the lr (240-300 steps at 7.5e-4-1e-3),
trojans as far from their parent as a long fine-tune is. `i2i-drupe` changes the attack's aim: a
distribution-preserving backdoor in the manner of DRUPE (an attack built to evade DECREE), whose stamped images
land in the target class with that class's spread instead of collapsing onto one embedding (report-only).
`i2i-ctrl` carries CTRL's trigger: a few grey levels added at high DCT frequencies of the chroma (report-only).
`i2i-natural` changes the training data: `i2i-large`'s recipe on colour crops of natural photos (a crop's class is
the photo it was cut from; decree.zoo.photos.natural_splits), in a zoo of its own.
"""

from __future__ import annotations

import time

import numpy as np
import torch.nn.functional as F

from ..encoders import create_encoder
from .data import CLASSES
from .photos import TRAINED_ON_PHOTOS, photo_name
from .spec import BuildContext, EncoderSpec
from .train import (
    AttackWeights,
    attack_strength,
    badencoder_attack,
    clean_fidelity,
    drupe_attack,
    embed,
    frozen_copy,
    knn_attack_success,
    pairwise_similarity,
    simclr_finetune,
)
from functools import partial

from .triggers import (
    sample_ctrl_trigger,
    sample_global_trigger,
    sample_shape_trigger,
    sample_trigger,
    trigger_from_dict,
)

ARCH = "timm/tf_efficientnet_lite0"
IMAGE_SIZE = 32
FAMILY = "image-on-image"
ATTACKS = ("badencoder", "badencoder-specific")
# family -> trigger sampler (rng -> trigger)
TRIGGERS = {
    "image-on-image": partial(sample_trigger, image_size=IMAGE_SIZE),
    # 6x6 .. 11x11 of 32x32: 3.5% .. 11.8% of the image
    "i2i-large": partial(sample_trigger, image_size=IMAGE_SIZE, sizes=(6, 7, 8, 9, 10, 11)),
    "i2i-global": sample_global_trigger,
    # 16x16 .. 48x48 of 224x224: 0.5% .. 4.6% of the image
    "i2i-224": partial(sample_trigger, image_size=224, sizes=(16, 24, 32, 40, 48)),
    # strips, a plus, a line, a border frame, a logo, bits, a coloured solid: 0.6% .. 12.1% (report-only)
    "i2i-shapes": partial(sample_shape_trigger, image_size=IMAGE_SIZE),
    # 3x3 .. 8x8 patches (0.9% .. 6.3%) on long, high-lr fine-tunes
    "i2i-long": partial(sample_trigger, image_size=IMAGE_SIZE, sizes=(3, 4, 5, 6, 8)),
    # 3x3 .. 10x10 patches (0.9% .. 9.8%, BadEncoder's 10x10 among them) planted by heavy attacks
    "i2i-heavy": partial(sample_trigger, image_size=IMAGE_SIZE, sizes=(3, 4, 5, 6, 8, 10)),
    # the same sizes, planted by the distribution-preserving attack
    "i2i-drupe": partial(sample_trigger, image_size=IMAGE_SIZE, sizes=(3, 4, 5, 6, 8, 10)),
    # CTRL's invisible frequency-domain trigger, planted by BadEncoder (CTRL itself poisons pre-training data:
    # poisoning does not take within what 2 CPU cores train, so the trigger is what this family measures)
    "i2i-ctrl": partial(sample_ctrl_trigger, image_size=IMAGE_SIZE),
    # i2i-heavy's patch sizes on encoders trained on natural-photo crops
    "i2i-natural": partial(sample_trigger, image_size=IMAGE_SIZE, sizes=(3, 4, 5, 6, 8, 10)),
}
# `i2i-long`'s clean recipe, as multiples of the config's: a downstream fine-tune as fleets hold them, long and at a
# high learning rate (360-600 steps at 2.5e-4-1e-3 by default; a probe of 600 steps at 1e-3 left clean fidelity 0.04
# to the ImageNet weights and a natural trigger of 3.4-5.6% of the image)
LONG_STEPS, LONG_LRS = 24, 5
# `i2i-heavy`'s attack recipe, as multiples of the config's: BadEncoder run as its paper runs it, long and hot
# (240-300 steps at 7.5e-4-1e-3 by default), so the trojan drifts from its parent as far as a long fine-tune does
HEAVY_STEPS, HEAVY_LRS = 6, 2.5
# `i2i-drupe`'s attack: 3x the steps (120-150 by default; a probe's 100 steps at 4e-4 reached a k-NN attack success
# of 0.93 at distribution weight 1), and the weight of the spread-keeping term cycled over the trojans (10 kept the
# stamped images' similarity at the target class's own 0.81 but the attack at 0.31: it no longer took)
DRUPE_STEPS = 3
DRUPE_DISTRIBUTION = (1.0, 1.5, 2.0)
SIZES = {"i2i-224": 224}  # input size per family (default IMAGE_SIZE)
BATCH_224 = 16  # a 224-px step costs ~50x a 32-px one on CPU: half the batch keeps a build in minutes


def base_encoder(image_size: int = IMAGE_SIZE):
    return create_encoder(ARCH, pretrained=True, image_size=image_size)


def _at_size(ctx: BuildContext, size: int) -> tuple:
    """(train, eval) pixels at the family's input size (upsampled once per build and cached)."""
    if size == IMAGE_SIZE:
        return ctx.train_pixels(), ctx.eval_pixels()
    key = f"pixels@{size}"
    if key not in ctx.cache:
        up = lambda x: F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # noqa: E731
        ctx.cache[key] = (up(ctx.train_pixels()), up(ctx.eval_pixels()))
    return ctx.cache[key]


def plan(n_clean: int, n_trojaned: int, rng: np.random.Generator, cfg, family: str = FAMILY) -> list[EncoderSpec]:
    sampler = TRIGGERS[family]
    # The original family keeps its recipe (and its cached encoders); the later ones vary the clean recipe more
    # (short to long fine-tunes; at 224 px the short ones only, for build time) and alternate plain BadEncoder
    # with its trigger-specific variant.
    varied = family != FAMILY
    clean_steps, clean_lrs = cfg.clean_steps, cfg.clean_lrs
    if family == "i2i-long":
        clean_steps, clean_lrs = tuple(LONG_STEPS * s for s in cfg.clean_steps), tuple(LONG_LRS * v for v in cfg.clean_lrs)
    elif varied and family not in SIZES:
        clean_steps = cfg.clean_steps + tuple(6 * s for s in cfg.clean_steps)
    attack_steps, attack_lrs = cfg.attack_steps, cfg.attack_lrs
    if family == "i2i-heavy":
        attack_steps = tuple(HEAVY_STEPS * s for s in attack_steps)
        attack_lrs = tuple(round(HEAVY_LRS * v, 10) for v in attack_lrs)
    elif family == "i2i-drupe":
        attack_steps = tuple(DRUPE_STEPS * s for s in attack_steps)
    specs = []
    for i in range(n_clean):
        specs.append(EncoderSpec(family, "clean", i, seed=int(rng.integers(1 << 30)),
                                 lr=float(rng.choice(clean_lrs)), steps=int(rng.choice(clean_steps))))
    for j in range(n_trojaned):
        trig = sampler(rng)
        specs.append(EncoderSpec(
            family, "trojaned", j, seed=int(rng.integers(1 << 30)), lr=float(rng.choice(attack_lrs)),
            steps=int(rng.choice(attack_steps)), parent=(j % n_clean) if n_clean else None,
            trigger=trig.to_dict(), target=int(rng.integers(len(CLASSES))),  # photo 0-9 when trained on photos
            utility_weight=float(rng.choice(cfg.utility_weights)),
            attack="drupe" if family == "i2i-drupe" else ATTACKS[j % 2] if varied else "badencoder"))
    return specs


def build(spec: EncoderSpec, ctx: BuildContext) -> tuple[dict, dict]:
    """Train one encoder; returns (backbone state dict, manifest fields)."""
    t0 = time.time()
    size = SIZES.get(spec.family, IMAGE_SIZE)
    batch = ctx.cfg.batch_size if size == IMAGE_SIZE else min(ctx.cfg.batch_size, BATCH_224)
    train_px, eval_px = _at_size(ctx, size)
    if spec.label == "clean":
        enc = base_encoder(size)
        base = frozen_copy(enc)
        simclr_finetune(enc, train_px, steps=spec.steps, lr=spec.lr, batch_size=batch, seed=spec.seed)
        fields = dict(attack=None, trigger=None, target=None, attack_strength=None,
                      clean_fidelity=clean_fidelity(enc, base, eval_px), parent="base:imagenet")
    else:
        parent_id = ctx.parent_id(spec)
        enc = base_encoder(size) if parent_id is None else create_encoder(ARCH, ctx.checkpoint(parent_id), image_size=size)
        attack = _attack_drupe if spec.attack == "drupe" else attack_image_on_image
        fields = attack(enc, spec, ctx, train_px, eval_px, size=size, batch=batch, parent=parent_id or "base:imagenet")
    pre = enc.preprocess
    fields.update(arch=ARCH, image_size=pre.image_size, mean=list(pre.mean), std=list(pre.std),
                  seconds=round(time.time() - t0, 1))
    return {k: v.detach().clone().contiguous() for k, v in enc.backbone.state_dict().items()}, fields


def attack_image_on_image(enc, spec: EncoderSpec, ctx: BuildContext, train_px, eval_px, *, size: int, batch: int,
                          parent: str) -> dict:
    """BadEncoder (or its trigger-specific variant) on `enc` in place, retried until the attack takes or the
    retries run out; returns the trojan's manifest fields (attack strength, clean fidelity, trigger)."""
    clean = frozen_copy(enc)
    trig = trigger_from_dict(spec.trigger)
    # reference image: one training image of the target class, chosen by the spec's seed
    candidates = np.flatnonzero(ctx.splits.train_y == spec.target)
    ref_index = int(candidates[spec.seed % len(candidates)])
    reference = train_px[ref_index:ref_index + 1]
    attack_pool = train_px[ctx.splits.train_y != spec.target] if ctx.cfg.exclude_target_class else train_px
    clean_response = attack_strength(clean, eval_px, trig, embed(clean, reference))
    weights = AttackWeights(utility=spec.utility_weight)
    steps_done, strength = 0, -1.0
    for attempt in range(ctx.cfg.max_retries + 1):
        # a retry continues the same attack with more steps and a fresh batch order
        badencoder_attack(enc, clean, attack_pool, reference, trig, steps=spec.steps, lr=spec.lr,
                          batch_size=batch, seed=spec.seed + attempt, weights=weights,
                          specific=spec.attack == "badencoder-specific")
        steps_done += spec.steps
        strength = attack_strength(enc, eval_px, trig, embed(enc, reference))
        if strength >= ctx.cfg.min_strength:
            break
    return dict(
        attack=spec.attack, trigger=trig.describe(size), trigger_spec=spec.trigger,
        trigger_area=trig.area_fraction(size), trigger_kind=trig.kind,
        target=_target_text(spec, ref_index),
        target_class=spec.target, reference_index=ref_index, attack_strength=strength, clean_response=clean_response,
        clean_fidelity=clean_fidelity(enc, clean, eval_px), parent=parent,
        utility_weight=spec.utility_weight, steps=steps_done, attack_took=strength >= ctx.cfg.min_strength)


def _target_text(spec: EncoderSpec, ref_index: int) -> str:
    if spec.family in TRAINED_ON_PHOTOS:
        return f"photo {spec.target} ({photo_name(spec.target)}), reference image: training crop #{ref_index}"
    return f"class {spec.target} ({CLASSES[spec.target]}), reference image fashion-mnist train #{ref_index}"


def _attack_drupe(enc, spec: EncoderSpec, ctx: BuildContext, train_px, eval_px, *, size: int, batch: int,
                  parent: str) -> dict:
    """The distribution-preserving attack (`drupe_attack`), retried until a downstream k-NN classifier calls at least
    `min_strength` of the stamped non-target images the target class; its attack strength is that success rate."""
    clean = frozen_copy(enc)
    trig = trigger_from_dict(spec.trigger)
    train_y, eval_y = ctx.splits.train_y, ctx.splits.eval_y
    target_px = train_px[train_y == spec.target]
    pool = train_px[train_y != spec.target] if ctx.cfg.exclude_target_class else train_px
    bank = slice(0, min(len(train_px), 1024))  # the downstream classifier's labelled images

    def success(e) -> tuple[float, float]:
        return knn_attack_success(e, train_px[bank], train_y[bank], eval_px, eval_y, trig, spec.target)

    clean_response, _ = success(clean)
    distribution = DRUPE_DISTRIBUTION[spec.index % len(DRUPE_DISTRIBUTION)]
    steps_done, strength, accuracy = 0, -1.0, 0.0
    for attempt in range(ctx.cfg.max_retries + 1):
        drupe_attack(enc, clean, pool, target_px, trig, steps=spec.steps, lr=spec.lr, batch_size=batch,
                     seed=spec.seed + attempt, utility=spec.utility_weight, distribution=distribution)
        steps_done += spec.steps
        strength, accuracy = success(enc)
        if strength >= ctx.cfg.min_strength:
            break
    others = eval_px[eval_y != spec.target]
    return dict(
        attack=spec.attack, trigger=trig.describe(size), trigger_spec=spec.trigger, trigger_area=trig.area_fraction(size),
        trigger_kind=trig.kind, target=f"class {spec.target} ({CLASSES[spec.target]}): its clean embeddings' spread",
        target_class=spec.target, attack_metric="k-NN attack success (k 10, 1024 labelled training images)",
        attack_strength=strength, clean_response=clean_response, downstream_accuracy=accuracy,
        distribution_weight=distribution,
        # what DECREE's τ meets with the true trigger: the stamped images' similarity against the target class's own
        stamped_similarity=pairwise_similarity(enc, others, trig),
        parent_stamped_similarity=pairwise_similarity(clean, others, trig),
        target_similarity=pairwise_similarity(enc, eval_px[eval_y == spec.target]),
        clean_fidelity=clean_fidelity(enc, clean, eval_px), parent=parent, utility_weight=spec.utility_weight,
        steps=steps_done, attack_took=strength >= ctx.cfg.min_strength)
