"""Family 2, CLIP (image-on-pair and text-on-pair) on a tiny open_clip config trained on Fashion-MNIST.

A base CLIP is trained contrastively on images and class captions (once per build, cached under records/).
Clean encoders continue its training with other seeds; trojans fine-tune its vision tower so stamped images
embed onto a target image's embedding (image-on-pair) or a target caption's (text-on-pair, Carlini & Terzis),
while clean embeddings stay close to the base's. Only the vision tower is saved: it is what a scan sees.
`clip-ctrl` is the same family with CTRL's frequency-domain trigger instead of a patch, `clip-badclip` with a patch
whose pixels were first optimized on the base toward the target, as BadCLIP does (both report-only).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..encoders import create_encoder, open_clip_model
from ..encoders.registry import Encoder, Preprocess
from .data import CLASSES
from .spec import BuildContext, EncoderSpec, digest
from .train import (AttackWeights, attack_strength, augment, badencoder_attack, clean_fidelity, embed, frozen_copy,
                    optimizer_step)
from .triggers import OptimizedPatch, Trigger, sample_ctrl_trigger, sample_trigger, trigger_from_dict

CONFIG = "decree-tiny-clip"
ARCH = f"open_clip/{CONFIG}"
FAMILY = "clip"
IMAGE_SIZE = 32
TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "a black and white photo of the {}.", "an image of a {}.")
ATTACKS = ("image-on-pair", "text-on-pair")
# family -> trigger sampler: 3-6 px patches, or CTRL's frequency-domain trigger (`clip-ctrl`, report-only)
TRIGGERS = {FAMILY: lambda rng: sample_trigger(rng, IMAGE_SIZE), "clip-ctrl": sample_ctrl_trigger,
            # where the patch goes and how large; its pixels are optimized on the base at build time (report-only)
            "clip-badclip": lambda rng: sample_trigger(rng, IMAGE_SIZE, sizes=(4, 5, 6))}
# `clip-badclip`: the patch's pixels take this many Adam steps on the base first, and the backdoor half the family's
# injection steps (BadCLIP's trigger needs less change to the weights)
BADCLIP_PATCH_STEPS, BADCLIP_PATCH_LR, BADCLIP_ATTACK_SHARE = 150, 0.1, 0.5


def tokenizer():
    import open_clip

    open_clip_model  # noqa: B018 - importing decree.encoders registered the config
    return open_clip.get_tokenizer(CONFIG)


def _preprocess() -> Preprocess:
    return create_encoder(ARCH).preprocess


def visual_encoder(model) -> Encoder:
    """The CLIP model's vision tower as a scan would see it (shares the model's parameters)."""
    return Encoder(model.visual, ARCH, _preprocess())


def train_clip(model, pixels: torch.Tensor, labels: torch.Tensor, *, steps: int, lr: float, batch_size: int,
               seed: int) -> list[float]:
    """CLIP's symmetric contrastive loss against the class captions (one random template per step).

    Captions repeat across a batch, so each image is contrasted with the ten class captions instead of with
    the batch's duplicated texts. The token table stays frozen: it is 85% of the weights and only the towers
    matter here.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tok = tokenizer()
    captions = tok([t.format(c) for t in TEMPLATES for c in CLASSES]).view(len(TEMPLATES), len(CLASSES), -1)
    enc = visual_encoder(model)
    model.train().requires_grad_(True)
    model.token_embedding.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    # linear warmup then cosine decay, as CLIP training does; a ViT at full lr from step 0 barely learns
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(pixels), (batch_size,), generator=gen)
        y = labels[idx]
        img = F.normalize(enc.embed_pixels(augment(pixels[idx], gen, pad=2)), dim=-1)
        t = int(torch.randint(0, len(TEMPLATES), (1,), generator=gen))
        txt = F.normalize(model.encode_text(captions[t]), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.t()
        # text -> image: every image of the class is a positive
        present = torch.unique(y)
        log_p = logits.t()[present].log_softmax(dim=1)
        pos = (y[None] == present[:, None]).float()
        loss_t = -(log_p * pos).sum(1).div(pos.sum(1)).mean()
        loss = (F.cross_entropy(logits, y) + loss_t) / 2
        losses.append(optimizer_step(opt, loss))
        sched.step()
    model.eval().requires_grad_(False)
    return losses


def base_model(ctx: BuildContext):
    """The base CLIP of this build: trained once, kept in memory and under records/ for later runs."""
    if "clip_base" in ctx.cache:
        return ctx.cache["clip_base"]
    cfg = ctx.cfg
    key = digest({"steps": cfg.clip_base_steps, "lr": cfg.clip_base_lr, "bs": cfg.clip_batch_size,
                  "n_train": cfg.n_train, "train": ctx.splits.train_x[:64].tobytes().hex()[:4096]})
    path = ctx.out / "records" / f"clip-base-{key}.safetensors"
    # torch's default generator starts from a random seed in each process: seed the initial weights from the key
    # (which the build's seed decides through its training images), or every build trains another base
    torch.manual_seed(int(key[:15], 16))
    model = open_clip_model(CONFIG)
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
    else:
        t0 = time.time()
        labels = torch.from_numpy(ctx.splits.train_y)
        losses = train_clip(model, ctx.train_pixels(), labels, steps=cfg.clip_base_steps, lr=cfg.clip_base_lr,
                            batch_size=cfg.clip_batch_size, seed=0)
        ctx.cache["clip_base_seconds"] = round(time.time() - t0, 1)
        ctx.cache["clip_base_loss"] = losses[-1] if losses else None
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(path))
    model.eval().requires_grad_(False)
    ctx.cache["clip_base"] = model
    return model


def class_text_embeddings(model) -> torch.Tensor:
    """(10, D) mean caption embedding per class over the templates, normalized."""
    tok = tokenizer()
    with torch.no_grad():
        z = F.normalize(model.encode_text(tok([t.format(c) for t in TEMPLATES for c in CLASSES])), dim=-1)
    return F.normalize(z.view(len(TEMPLATES), len(CLASSES), -1).mean(0), dim=-1)


def zero_shot_accuracy(model, visual: Encoder, pixels: torch.Tensor, labels: np.ndarray) -> float:
    pred = (F.normalize(embed(visual, pixels), dim=-1) @ class_text_embeddings(model).t()).argmax(1)
    return float((pred.numpy() == labels).mean())


def optimize_patch(encoder: Encoder, pixels: torch.Tensor, trigger: Trigger, target: torch.Tensor, *, steps: int,
                   lr: float, seed: int, batch_size: int = 32) -> OptimizedPatch:
    """BadCLIP's first stage: the pixels of `trigger`'s square, optimized on the (frozen, clean) `encoder` so that
    stamped images embed near `target`; returned rounded, as the manifest will stamp it."""
    gen = torch.Generator().manual_seed(seed)
    size, s = pixels.shape[-1], trigger.size
    mask, _ = trigger.mask_and_pattern(size)
    logits = torch.zeros(3, s, s, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    target = F.normalize(target.reshape(1, -1), dim=-1)
    encoder.eval()
    for _ in range(steps):
        x = pixels[torch.randint(0, len(pixels), (batch_size,), generator=gen)]
        pattern = F.pad(torch.sigmoid(logits), (trigger.col, size - trigger.col - s, trigger.row, size - trigger.row - s))
        z = F.normalize(encoder.embed_pixels(x * (1 - mask) + pattern * mask), dim=-1)
        loss = -(z @ target.t()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    values = torch.sigmoid(logits).detach().flatten().tolist()
    return OptimizedPatch(s, trigger.row, trigger.col, trigger.position, tuple(round(v, 4) for v in values))


def plan(n_clean: int, n_trojaned: int, rng: np.random.Generator, cfg, family: str = FAMILY) -> list[EncoderSpec]:
    unknown = set(cfg.clip_attacks) - set(ATTACKS)
    if unknown or not cfg.clip_attacks:
        raise ValueError(f"unknown CLIP attacks {sorted(unknown)}; known: {ATTACKS}")
    specs = [EncoderSpec(family, "clean", i, seed=int(rng.integers(1 << 30)), lr=float(rng.choice(cfg.clip_clean_lrs)),
                         steps=int(rng.choice(cfg.clip_clean_steps))) for i in range(n_clean)]
    for j in range(n_trojaned):
        trig = TRIGGERS[family](rng)
        specs.append(EncoderSpec(
            family, "trojaned", j, seed=int(rng.integers(1 << 30)), lr=float(rng.choice(cfg.clip_attack_lrs)),
            steps=int(rng.choice(cfg.clip_attack_steps)), parent=None, trigger=trig.to_dict(),
            target=int(rng.integers(len(CLASSES))), utility_weight=float(rng.choice(cfg.clip_utility_weights)),
            attack=cfg.clip_attacks[j % len(cfg.clip_attacks)]))
    return specs


def build(spec: EncoderSpec, ctx: BuildContext) -> tuple[dict, dict]:
    t0 = time.time()
    base = base_model(ctx)
    model = open_clip_model(CONFIG)
    model.load_state_dict(base.state_dict())
    visual = visual_encoder(model)
    base_visual = frozen_copy(visual_encoder(base))
    train_px, eval_px = ctx.train_pixels(), ctx.eval_pixels()
    if spec.label == "clean":
        train_clip(model, train_px, torch.from_numpy(ctx.splits.train_y), steps=spec.steps, lr=spec.lr,
                   batch_size=ctx.cfg.clip_batch_size, seed=spec.seed)
        fields = dict(attack=None, trigger=None, target=None, attack_strength=None)
    else:
        trig = trigger_from_dict(spec.trigger)
        pool = train_px[ctx.splits.train_y != spec.target] if ctx.cfg.exclude_target_class else train_px
        cls = CLASSES[spec.target]
        if spec.attack == "image-on-pair":
            candidates = np.flatnonzero(ctx.splits.train_y == spec.target)
            ref_index = int(candidates[spec.seed % len(candidates)])
            reference = train_px[ref_index:ref_index + 1]
            target_desc = f"image: class {spec.target} ({cls}), fashion-mnist train #{ref_index}"
            target_fn, target_now = None, lambda: embed(visual, reference)
            extra = {"reference_index": ref_index}
        else:
            caption = f"a photo of a {cls}."
            with torch.no_grad():
                text_z = base.encode_text(tokenizer()([caption]))
            reference = train_px[:0]
            target_desc = f"text: {caption!r} (class {spec.target})"
            target_fn, target_now = (lambda _enc: text_z), (lambda: text_z)
            extra = {"target_caption": caption}
        steps = spec.steps
        if spec.family == "clip-badclip":
            trig = optimize_patch(base_visual, pool, trig, target_now(), steps=BADCLIP_PATCH_STEPS,
                                  lr=BADCLIP_PATCH_LR, seed=spec.seed)
            steps = max(1, round(BADCLIP_ATTACK_SHARE * spec.steps))
        clean_response = attack_strength(base_visual, eval_px, trig, target_now() if target_fn else
                                         embed(base_visual, reference))
        steps_done, strength = 0, -1.0
        for attempt in range(ctx.cfg.max_retries + 1):
            badencoder_attack(visual, base_visual, pool, reference, trig, steps=steps, lr=spec.lr,
                              batch_size=ctx.cfg.batch_size, seed=spec.seed + attempt,
                              weights=AttackWeights(utility=spec.utility_weight), target_embedding_fn=target_fn)
            steps_done += steps
            strength = attack_strength(visual, eval_px, trig, target_now())
            if strength >= ctx.cfg.min_strength:
                break
        fields = dict(attack=spec.attack, trigger=trig.describe(IMAGE_SIZE), trigger_spec=trig.to_dict(),
                      trigger_area=trig.area_fraction(IMAGE_SIZE), trigger_kind=trig.kind, target=target_desc,
                      target_class=spec.target,
                      attack_strength=strength, clean_response=clean_response, utility_weight=spec.utility_weight,
                      steps=steps_done, attack_took=strength >= ctx.cfg.min_strength, **extra)
    pre = visual.preprocess
    fields.update(clean_fidelity=clean_fidelity(visual, base_visual, eval_px), parent="base:clip",
                  zero_shot_accuracy=zero_shot_accuracy(model, visual, eval_px, ctx.splits.eval_y),
                  base_zero_shot_accuracy=zero_shot_accuracy(base, base_visual, eval_px, ctx.splits.eval_y),
                  arch=ARCH, image_size=pre.image_size, mean=list(pre.mean), std=list(pre.std),
                  seconds=round(time.time() - t0, 1))
    state = {k: v.detach().clone().contiguous() for k, v in model.visual.state_dict().items()}
    return state, fields
