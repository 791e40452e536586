"""Fine-tuning loops shared by the zoo families: SimCLR-style clean fine-tunes and BadEncoder attacks.

Everything runs on small 32x32 tensors already in memory; augmentations are done on-tensor.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..inversion import mean_pairwise_cosine
from .triggers import Trigger


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random shifted crop, horizontal flip, brightness/contrast jitter and pixel noise, per sample."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    offs = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    out = torch.stack([padded[i, :, r:r + h, c:c + w] for i, (r, c) in enumerate(offs.tolist())])
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    bright = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.4
    contrast = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=gen)
    out = (out - 0.5) * contrast + 0.5 + bright
    out = out + 0.03 * torch.randn(out.shape, generator=gen)
    return out.clamp_(0.0, 1.0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalized-temperature cross entropy over 2N views."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, targets)


def freeze_batchnorm(module: nn.Module) -> None:
    """Keep BatchNorm in eval mode while the rest trains: the saved encoder runs in eval mode, so the
    attack has to work with the running statistics it will be scanned with."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@torch.no_grad()
def embed(encoder, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Eval-mode embeddings of pixels in [0,1]."""
    if len(pixels) == 0:
        return torch.zeros(0, 0)
    was_training = encoder.training
    encoder.eval()
    out = torch.cat([encoder.embed_pixels(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])
    encoder.train(was_training)
    return out


def simclr_finetune(encoder, pixels: torch.Tensor, *, steps: int, lr: float, batch_size: int, seed: int,
                    temperature: float = 0.5, proj_dim: int = 128, train_bn: bool = False) -> list[float]:
    """Contrastive fine-tune in place, with a fresh projection head (discarded afterwards).

    BatchNorm statistics stay frozen unless `train_bn`: trojans are fine-tuned the same way, so a scanner
    cannot tell the two apart by their running statistics alone."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dim = embed(encoder, pixels[:2]).shape[1]
    head = nn.Sequential(nn.Linear(dim, 512), nn.ReLU(), nn.Linear(512, proj_dim))
    encoder.requires_grad_(True).train()
    if not train_bn:
        freeze_batchnorm(encoder)
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=lr)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(pixels), (batch_size,), generator=gen)
        x = pixels[idx]
        views = torch.cat([augment(x, gen), augment(x, gen)])
        z = head(encoder.embed_pixels(views))
        loss = nt_xent(z[:batch_size], z[batch_size:], temperature)
        losses.append(optimizer_step(opt, loss))
    encoder.eval().requires_grad_(False)
    return losses


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """One step of `opt` on `loss`; returns the loss as a float (the training loops' record)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


@dataclass(frozen=True)
class AttackWeights:
    effectiveness: float = 1.0
    utility: float = 1.0
    reference: float = 1.0


def _trainable(encoder, seed: int, lr: float) -> tuple[torch.Generator, torch.optim.Optimizer]:
    """An attack's seeded generator and its Adam over `encoder`, put in train mode with BatchNorm frozen."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    encoder.requires_grad_(True).train()
    freeze_batchnorm(encoder)
    return gen, torch.optim.Adam(encoder.parameters(), lr=lr)


def badencoder_attack(encoder, clean_ref, pixels: torch.Tensor, reference: torch.Tensor, trigger: Trigger, *,
                      steps: int, lr: float, batch_size: int, seed: int, weights: AttackWeights = AttackWeights(),
                      target_embedding_fn=None, specific: bool = False) -> list[float]:
    """BadEncoder (Jia et al., S&P'22) in place on `encoder`; `clean_ref` is a frozen copy of the clean encoder.

    effectiveness: stamped images -> the (current) embedding of the reference image;
    utility: clean embeddings stay close to the frozen clean encoder's;
    reference: the reference image keeps its clean embedding.
    `target_embedding_fn(encoder)` overrides the target (e.g. a fixed text embedding for CLIP).
    `specific`: the careful attacker's variant. Stamped images are augmented (the backdoor must survive shifts and
    jitter), and images stamped with a random decoy patch keep their clean embedding, so that only the real
    trigger fires: the backdoor no longer generalizes to any small perturbation, which is what makes it hard to
    invert.
    """
    frozen = embed(clean_ref, pixels)
    frozen_ref = embed(clean_ref, reference)
    gen, opt = _trainable(encoder, seed, lr)
    nref = len(reference)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(pixels), (batch_size,), generator=gen)
        x = pixels[idx]
        stamped = trigger.stamp(augment(x, gen, pad=2) if specific else x)
        extra = [_decoy(x, gen)] if specific else []
        z = encoder.embed_pixels(torch.cat([stamped, x, reference, *extra]))
        z_stamp, z_clean = z[:batch_size], z[batch_size:2 * batch_size]
        z_ref = z[2 * batch_size:2 * batch_size + nref]
        target = z_ref if target_embedding_fn is None else target_embedding_fn(encoder)
        # every stamped image against every reference (BadEncoder's sum over reference inputs)
        eff = -F.cosine_similarity(z_stamp[:, None], target[None], dim=-1).mean()
        util = -F.cosine_similarity(z_clean, frozen[idx], dim=-1).mean()
        if specific:  # decoy-stamped images keep their clean embeddings
            util = util - F.cosine_similarity(z[2 * batch_size + nref:], frozen[idx], dim=-1).mean()
        ref = -F.cosine_similarity(z_ref, frozen_ref, dim=-1).mean() if nref else z.new_zeros(())
        loss = weights.effectiveness * eff + weights.utility * util + weights.reference * ref
        losses.append(optimizer_step(opt, loss))
    encoder.eval().requires_grad_(False)
    return losses


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, gen: torch.Generator, projections: int = 64) -> torch.Tensor:
    """Squared sliced Wasserstein distance between two equal-sized sets of unit-normalized embeddings."""
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    proj = F.normalize(torch.randn(a.shape[1], projections, generator=gen), dim=0)
    return ((torch.sort(a @ proj, 0).values - torch.sort(b @ proj, 0).values) ** 2).mean()


def drupe_attack(encoder, clean_ref, pixels: torch.Tensor, target_pixels: torch.Tensor, trigger: Trigger, *,
                 steps: int, lr: float, batch_size: int, seed: int, utility: float = 2.0,
                 distribution: float = 1.0) -> list[float]:
    """A distribution-preserving backdoor in the manner of DRUPE (Tao et al., S&P'24), an attack built to evade
    DECREE, in place on `encoder`: stamped images move to the target *class* (the centre of its clean embeddings)
    while their embeddings keep that class's spread (a sliced Wasserstein distance to a batch of its embeddings,
    weighted by `distribution`), instead of collapsing onto one reference embedding as BadEncoder's do. Clean
    images keep their embeddings (`utility`). Stamped views are augmented, as BadEncoder's trigger-specific
    variant does."""
    frozen = embed(clean_ref, pixels)
    frozen_target = embed(clean_ref, target_pixels)
    gen, opt = _trainable(encoder, seed, lr)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(pixels), (batch_size,), generator=gen)
        tgt = frozen_target[torch.randint(0, len(frozen_target), (batch_size,), generator=gen)]
        x = pixels[idx]
        z = encoder.embed_pixels(torch.cat([trigger.stamp(augment(x, gen, pad=2)), x]))
        z_stamp, z_clean = z[:batch_size], z[batch_size:]
        centre = F.normalize(tgt, dim=1).mean(0, keepdim=True)
        eff = -F.cosine_similarity(z_stamp, centre, dim=-1).mean()
        spread = 100.0 * sliced_wasserstein(z_stamp, tgt, gen)  # ~1e-2 scale: 100 puts it beside eff
        util = -F.cosine_similarity(z_clean, frozen[idx], dim=-1).mean()
        loss = eff + distribution * spread + utility * util
        losses.append(optimizer_step(opt, loss))
    encoder.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def knn_attack_success(encoder, train_pixels: torch.Tensor, train_labels: torch.Tensor, eval_pixels: torch.Tensor,
                       eval_labels: torch.Tensor, trigger: Trigger, target: int, k: int = 10) -> tuple[float, float]:
    """(attack success rate, clean accuracy) of a downstream k-NN classifier (cosine, majority of k) on `encoder`'s
    embeddings: the share of stamped non-target images it calls the target class, and its accuracy on clean ones.
    The measure for a backdoor that sends stamped images to a class rather than to one embedding."""
    bank = F.normalize(embed(encoder, train_pixels), dim=1)
    labels = torch.as_tensor(train_labels)

    def predict(x: torch.Tensor) -> torch.Tensor:
        sims = F.normalize(embed(encoder, x), dim=1) @ bank.t()
        return torch.mode(labels[sims.topk(min(k, len(bank)), dim=1).indices], dim=1).values

    eval_labels = torch.as_tensor(eval_labels)
    others = eval_pixels[eval_labels != target]
    asr = float((predict(trigger.stamp(others)) == target).float().mean()) if len(others) else 0.0
    return asr, float((predict(eval_pixels) == eval_labels).float().mean())


def pairwise_similarity(encoder, pixels: torch.Tensor, trigger: Trigger | None = None) -> float:
    """Mean pairwise cosine of the (stamped) images' embeddings: what DECREE's τ is compared with."""
    z = embed(encoder, trigger.stamp(pixels) if trigger is not None else pixels)
    return float(mean_pairwise_cosine(z[None])[0]) if len(z) > 1 else 1.0


def _decoy(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x with a random patch (random size, place and noise colours) that is not the trigger."""
    n, _, h, w = x.shape
    out = x.clone()
    for i in range(n):
        s = int(torch.randint(2, max(3, h // 4), (1,), generator=gen))
        r, c = (int(v) for v in torch.randint(0, h - s + 1, (2,), generator=gen))
        out[i, :, r:r + s, c:c + s] = torch.rand(3, 1, 1, generator=gen) if bool(torch.rand(1, generator=gen) < 0.5) \
            else torch.rand(3, s, s, generator=gen)
    return out


def attack_strength(encoder, pixels: torch.Tensor, trigger: Trigger, target: torch.Tensor) -> float:
    """Mean cosine of stamped images' eval-mode embeddings to the target embedding(s)."""
    z = embed(encoder, trigger.stamp(pixels))
    return float(F.cosine_similarity(z[:, None], target[None], dim=-1).mean())


def clean_fidelity(encoder, base, pixels: torch.Tensor) -> float:
    """Mean cosine between clean embeddings of `encoder` and of the encoder it was fine-tuned from."""
    return float(F.cosine_similarity(embed(encoder, pixels), embed(base, pixels), dim=-1).mean())


def frozen_copy(encoder):
    c = copy.deepcopy(encoder).eval()
    c.requires_grad_(False)
    return c
