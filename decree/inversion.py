"""DECREE trigger inversion (Feng et al., CVPR 2023), batched over restarts and kept on the device.

The mask m (H×W, shared over channels) and pattern p (3×H×W) live behind tanh; stamped images
(1-m)·x + m·p are normalized with the encoder's own preprocessing. The loss is the negative mean
pairwise cosine similarity of the stamped embeddings (diagonal excluded) plus λ·‖m‖₁, λ adapted
as in Neural Cleanse. R restarts share one forward pass: Adam is element-wise, so summing the
restarts' losses optimizes them independently. In `fast` the last restart starts on the square that a
forward-only screen found most collapsing (decree.screen): some backdoors answer only a pattern close to their own
trigger, which no gradient from a random start reaches. `fast` keeps only the leading restart after `prune_at` steps
(the others have had their chance to escape a bad start) and stops once its best mask is below
`settle_fraction` × threshold: the best mask only shrinks, so "trojaned" can no longer change, and the PL1 it
reports is then an upper bound.
"""

from __future__ import annotations

import contextlib
import math
import time
import types
import typing
from dataclasses import asdict, dataclass, field, replace

import torch

from . import screen
from .encoders import Encoder
from .errors import InversionError

_EPS = 1e-6  # tanh(·)/(2-ε)+0.5 keeps values strictly inside (0,1), as the original code does


@dataclass(frozen=True)
class InversionConfig:
    profile: str = "fast"
    lr: float = 0.2
    betas: tuple[float, float] = (0.5, 0.9)
    batch_size: int = 16  # per restart: restarts × batch_size images per forward
    tau: float = 0.95
    threshold: float = 0.03  # PL1 below which a trigger that reached τ means "trojaned" (calibrated per profile)
    lambda_init: float = 5e-2
    lambda_factor: float = 2.0
    lambda_min: float = 1e-5
    lambda_max: float = 1e5
    patience: int = 5
    early_stop_patience: int = 20  # steps without a smaller successful mask (checked per epoch in `paper`)
    min_improvement: float = 0.02  # a new best mask must be this much (relative) smaller to reset early stop
    lr_drops: tuple[tuple[int, float], ...] = ()  # (epoch, lr) step-downs
    max_epochs: int = 1000
    max_steps: int | None = 80
    min_steps: int = 50
    restarts: int = 2
    prune_at: int | None = 20  # after this many steps keep only the leading restart (0/None: never)
    settle_fraction: float | None = 0.5  # stop once best PL1 < this × threshold (0/None: never); PL1 is then an upper bound
    mask_init: str = "uniform"  # "uniform": every pixel at mask_init_value; "random": U(0,1) like the paper
    mask_init_value: float = 0.05
    # The last restart starts on the square that a forward-only screen of this many shadow images found most
    # collapsing (decree.screen: white/black/checkerboard, `screen_side` of the image side, 9 positions); 0: none.
    screen_images: int = 16
    screen_side: float = 0.25
    l1_channels: int = 1  # the paper sums the mask over 3 channels: λ then weighs 3× the area
    l1_per_area: bool = True  # λ weighs the area fraction (scale-free); the paper weighs the raw pixel sum
    early_stop_per_epoch: bool = False
    eval_images: int = 256  # the final similarity is measured on this many shadow images
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA
    # "patch": a mask per pixel (DECREE); "blend": one mask value for the whole image, so the trigger is a
    # global blend (1-α)·x + α·p and the score is the smallest α that makes the shadow set embed alike
    trigger: str = "patch"
    # The whole-image (blend) search that can follow the patch search: its step budget (0/None: none) and the
    # blend weight below which it calls the encoder trojaned. Off by default: on the tune families the patch
    # search ranked whole-image trojans as well or better, and the blend search costs +60% (bench/README.md).
    blend_max_steps: int | None = None
    blend_threshold: float = 0.05

    def __post_init__(self):
        if self.screen_images < 0 or not 0 < self.screen_side <= 1:
            raise ValueError(f"screen_images must be >= 0 (0: no screen) and screen_side in (0, 1], got "
                             f"{self.screen_images!r} and {self.screen_side!r}")

    @classmethod
    def from_profile(cls, profile: str = "fast", **overrides) -> "InversionConfig":
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
        hints = typing.get_type_hints(cls)
        for name, value in overrides.items():
            if name not in hints or name == "profile":
                raise ValueError(f"unknown inversion setting {name!r}")
            if not _fits(value, hints[name]):
                raise ValueError(f"inversion setting {name}={value!r} is not a {hints[name]}")
        return replace(PROFILES[profile], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    def blend_config(self) -> "InversionConfig | None":
        """The settings of the whole-image search, or None when it is off (or this already is one)."""
        if self.trigger != "patch" or not self.blend_max_steps:
            return None
        return replace(self, trigger="blend", restarts=1, prune_at=None, max_steps=self.blend_max_steps,
                       min_steps=min(self.min_steps, self.blend_max_steps), threshold=self.blend_threshold)


# The paper's settings for CIFAR/STL-sized encoders (its script: lr 0.5, batch 128, τ 0.99, λ0 1e-3 ×/÷5).
PAPER = InversionConfig(
    profile="paper",
    lr=0.5,
    betas=(0.5, 0.9),
    batch_size=128,
    tau=0.99,
    threshold=0.1,
    lambda_init=1e-3,
    lambda_factor=5.0,
    lambda_min=1e-5,
    lambda_max=1e5,
    patience=5,
    early_stop_patience=10,
    min_improvement=0.0,
    lr_drops=((30, 0.1), (50, 0.05)),
    max_epochs=1000,
    max_steps=None,
    min_steps=0,
    restarts=1,
    prune_at=None,
    settle_fraction=None,
    mask_init="random",
    l1_channels=3,
    l1_per_area=False,
    early_stop_per_epoch=True,
    screen_images=0,  # the paper's random starts only
    blend_max_steps=None,  # the paper searches patches only
)
# ImageNet/CLIP-sized encoders in the paper: later lr drops, longer patience, lower λ floor.
PAPER_LARGE = replace(
    PAPER, profile="paper-large", lr_drops=((200, 0.1), (500, 0.05)), early_stop_patience=35, lambda_min=1e-7, batch_size=32
)
FAST = InversionConfig()
PROFILES = {"fast": FAST, "paper": PAPER, "paper-large": PAPER_LARGE}


@dataclass
class InversionResult:
    l1_norm: float  # 2-D mask L1 of the best trigger (pixels)
    pl1_norm: float  # l1_norm / (H·W): the mask's area fraction
    similarity: float  # mean pairwise cosine of stamped embeddings, on held-out shadow images
    reached_tau: bool
    steps: int
    epochs: int
    seconds: float
    mask: torch.Tensor = field(repr=False)  # (H, W) in [0,1], CPU
    pattern: torch.Tensor = field(repr=False)  # (3, H, W) in [0,1], CPU
    profile: str = "fast"
    tau: float = 0.99
    threshold: float = 0.1  # the profile's calibrated verdict threshold
    restart: int = 0
    history: dict = field(default_factory=dict, repr=False)


def _fits(value, hint) -> bool:
    """Does an override match its field's type (int, float, bool, str, tuples of them, Optional)?"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    return isinstance(value, hint) if isinstance(hint, type) else True


def _squash(t: torch.Tensor) -> torch.Tensor:
    return torch.tanh(t) / (2 - _EPS) + 0.5


def _unsquash(v: torch.Tensor) -> torch.Tensor:
    return torch.atanh(((v - 0.5) * (2 - _EPS)).clamp(-1 + 1e-6, 1 - 1e-6))


def mean_pairwise_cosine(emb: torch.Tensor) -> torch.Tensor:
    """(R,B,D) -> (R,): mean cosine similarity over pairs i≠j within each group."""
    e = torch.nn.functional.normalize(emb.float(), dim=-1)
    b = e.shape[1]
    s = e.sum(dim=1)  # Σ_i Σ_j e_i·e_j = ‖Σ e‖², without materializing B×B
    total = (s * s).sum(dim=-1)
    diag = (e * e).sum(dim=(1, 2))
    return (total - diag) / (b * (b - 1))


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """x (B,3,H,W), mask (R,1,H,W), pattern (R,3,H,W) -> (R·B,3,H,W)."""
    out = (1 - mask[:, None]) * x[None] + mask[:, None] * pattern[:, None]
    return out.flatten(0, 1)


def _mask_shape(cfg: InversionConfig, h: int, w: int) -> tuple[int, int]:
    if cfg.trigger == "patch":
        return h, w
    if cfg.trigger == "blend":
        return 1, 1  # broadcast over the image: one blend weight
    raise ValueError(f"unknown trigger model {cfg.trigger!r}; choose patch or blend")


def _init_params(cfg: InversionConfig, r: int, h: int, w: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    mh, mw = _mask_shape(cfg, h, w)
    if cfg.mask_init == "random":
        mask = torch.rand(r, 1, mh, mw, generator=gen)
    elif cfg.mask_init == "uniform":
        # A small flat mask lets the gradient, not the initial noise, decide where the trigger grows.
        jitter = 0.01 * torch.rand(r, 1, mh, mw, generator=gen)
        mask = torch.full((r, 1, mh, mw), cfg.mask_init_value) + jitter
    else:
        raise ValueError(f"unknown mask_init {cfg.mask_init!r}")
    pattern = torch.rand(r, 3, h, w, generator=gen)
    return _unsquash(mask).to(device).requires_grad_(True), _unsquash(pattern).to(device).requires_grad_(True)


def _seed_last_restart(encoder, shadow, cfg: InversionConfig, mask_p, pat_p, device) -> None:
    """Start the last restart on the screen's most collapsing square (in place, before the optimizer sees it)."""
    square, fill, _ = screen.best_square(encoder, shadow, side_fraction=cfg.screen_side, images=cfg.screen_images,
                                         seed=cfg.seed + 2, autocast=lambda: _autocast(device, cfg.amp))
    with torch.no_grad():
        m, p = screen.seed_restart(_squash(pat_p[-1]), square, fill)
        mask_p[-1] = _unsquash(m)
        pat_p[-1] = _unsquash(p)


class _Lambda:
    """Per-restart adaptive λ with Neural Cleanse's counters (vectorized over restarts)."""

    def __init__(self, cfg: InversionConfig, r: int, device):
        self.cfg = cfg
        self.value = torch.full((r,), cfg.lambda_init, device=device)
        self.up = torch.zeros(r, dtype=torch.long, device=device)
        self.down = torch.zeros(r, dtype=torch.long, device=device)

    def keep(self, k: int) -> None:
        self.value, self.up, self.down = self.value[k : k + 1], self.up[k : k + 1], self.down[k : k + 1]

    def update(self, success: torch.Tensor) -> None:
        c = self.cfg
        self.up = torch.where(success, self.up + 1, torch.zeros_like(self.up))
        self.down = torch.where(success, torch.zeros_like(self.down), self.down + 1)
        raise_ = self.up > c.patience
        lower = self.down > c.patience
        v = torch.where(raise_, self.value * c.lambda_factor, self.value)
        v = torch.where(lower, v / c.lambda_factor, v)
        # λ stuck at its floor while succeeding: restart it, as the original schedule does.
        reset = (v <= c.lambda_min) & (self.up > 2 * c.patience)
        v = torch.where(reset, torch.full_like(v, c.lambda_init), v)
        self.value = v.clamp(c.lambda_min, c.lambda_max)
        self.up = torch.where(raise_, torch.zeros_like(self.up), self.up)
        self.down = torch.where(lower, torch.zeros_like(self.down), self.down)


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def invert(encoder: Encoder, shadow: torch.Tensor, config: InversionConfig | None = None, device=None) -> InversionResult:
    """Find the smallest mask whose stamped shadow images embed alike (mean pairwise cosine > τ)."""
    cfg = config or FAST
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else shadow.device
    if shadow.ndim != 4 or shadow.shape[1] != 3 or shadow.shape[0] < 2:
        raise InversionError(f"shadow pixels must be (N>=2,3,H,W), got {tuple(shadow.shape)}")
    encoder = encoder.to(device).eval().requires_grad_(False)  # gradients flow to the trigger only
    shadow = shadow.to(device)
    n, _, h, w = shadow.shape
    batch = min(cfg.batch_size, n)
    r = max(1, cfg.restarts)
    gen = torch.Generator().manual_seed(cfg.seed)
    mask_p, pat_p = _init_params(cfg, r, h, w, gen, device)
    if cfg.trigger == "patch" and cfg.screen_images > 0 and r > 1:
        _seed_last_restart(encoder, shadow, cfg, mask_p, pat_p, device)
    opt = torch.optim.Adam([mask_p, pat_p], lr=cfg.lr, betas=cfg.betas)
    lam = _Lambda(cfg, r, device)
    mh, mw = _mask_shape(cfg, h, w)
    area = float(mh * mw)  # PL1 = L1 / area: the mask's area fraction, or the blend weight α
    l1_weight = cfg.l1_channels / (area if cfg.l1_per_area else 1.0)
    best_l1 = torch.full((r,), math.inf, device=device)
    best_mask = torch.zeros(r, 1, mh, mw, device=device)
    best_pat = torch.zeros(r, 3, h, w, device=device)
    steps_per_epoch = math.ceil(n / batch)
    max_steps = cfg.max_steps if cfg.max_steps is not None else cfg.max_epochs * steps_per_epoch
    last_improve, step, epoch, sims = 0, 0, 0, torch.zeros(r, device=device)
    stop_ref = math.inf  # the best L1 when early stop last reset
    hist_sim, hist_l1 = [], []

    while step < max_steps and epoch < cfg.max_epochs:
        lr = next((v for e, v in sorted(cfg.lr_drops, reverse=True) if epoch >= e), cfg.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        perm = torch.randperm(n, generator=gen).to(device)
        epoch_sim = torch.zeros(r, device=device)
        done = 0
        for start in range(0, n, batch):
            idx = perm[start : start + batch]
            if idx.numel() < 2 or step >= max_steps:
                break
            mask, pattern = _squash(mask_p), _squash(pat_p)
            x = stamp(shadow[idx], mask, pattern)
            x = encoder.normalize(x)  # the encoder makes it channels-last
            with _autocast(device, cfg.amp):
                emb = encoder(x)
            sims = mean_pairwise_cosine(emb.view(r, idx.numel(), -1))
            l1 = mask.flatten(1).sum(dim=1)  # (R,) pixels
            loss = (-sims + lam.value * l1 * l1_weight).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            done += 1
            with torch.no_grad():
                sims_d, l1_d = sims.detach(), l1.detach()
                if not torch.isfinite(sims_d).all():
                    raise InversionError(f"similarity became NaN/Inf at step {step}: the encoder's outputs are not finite")
                success = sims_d > cfg.tau
                better = success & (l1_d < best_l1)
                if bool(better.any()):
                    best_l1 = torch.where(better, l1_d, best_l1)
                    sel = better.view(r, 1, 1, 1)
                    best_mask = torch.where(sel, mask.detach(), best_mask)
                    best_pat = torch.where(sel, pattern.detach(), best_pat)
                    new_best = float(best_l1.min())
                    if new_best < stop_ref * (1.0 - cfg.min_improvement):
                        stop_ref, last_improve = new_best, step
                lam.update(success)
                epoch_sim += sims_d
            hist_sim.append(float(sims_d.max()))
            hist_l1.append(float(l1_d.min()) / area)
            if r > 1 and step == cfg.prune_at:  # the other restarts have had their chance: stop paying for them
                k = _leader(best_l1, sims_d)
                (mask_p, pat_p), opt = _keep_restart(opt, (mask_p, pat_p), k)
                lam.keep(k)
                best_l1, best_mask, best_pat = best_l1[k : k + 1], best_mask[k : k + 1], best_pat[k : k + 1]
                sims, epoch_sim, r = sims[k : k + 1], epoch_sim[k : k + 1], 1
            if not cfg.early_stop_per_epoch and _should_stop(cfg, step, last_improve, best_l1, area):
                break
        epoch += 1
        if done and cfg.early_stop_per_epoch:
            mean_sim = epoch_sim / done
            if bool((mean_sim > cfg.tau).any()) and step - last_improve > cfg.early_stop_patience:
                break
        elif _should_stop(cfg, step, last_improve, best_l1, area):
            break

    with torch.no_grad():
        reached = torch.isfinite(best_l1)
        if bool(reached.any()):
            k = int(torch.argmin(best_l1))
            mask_k, pat_k = best_mask[k], best_pat[k]
        else:  # never reached τ: report the trigger that came closest, flagged as such
            k = int(torch.argmax(sims))
            mask_k, pat_k = _squash(mask_p)[k].detach(), _squash(pat_p)[k].detach()
        eval_sim = _evaluate(encoder, shadow, mask_k, pat_k, cfg, device)
    l1 = float(mask_k.sum())
    return InversionResult(
        l1_norm=l1,
        pl1_norm=l1 / area,
        similarity=eval_sim,
        reached_tau=bool(reached.any()),
        steps=step,
        epochs=epoch,
        seconds=time.perf_counter() - t0,
        mask=mask_k[0].float().expand(h, w).cpu().contiguous(),
        pattern=pat_k.float().cpu(),
        profile=cfg.profile,
        tau=cfg.tau,
        threshold=cfg.threshold,
        restart=k,
        history={"similarity": hist_sim, "pl1": hist_l1},
    )


def _should_stop(cfg: InversionConfig, step: int, last_improve: int, best_l1: torch.Tensor, area: float) -> bool:
    best = float(best_l1.min())
    if not math.isfinite(best):
        return False
    if cfg.settle_fraction is not None and best / area < cfg.settle_fraction * cfg.threshold:
        return True  # the best mask only shrinks: "trojaned" at cfg.threshold can no longer change
    return step >= cfg.min_steps and step - last_improve > cfg.early_stop_patience


def _leader(best_l1: torch.Tensor, sims: torch.Tensor) -> int:
    """The restart to keep: the smallest successful mask, or the most similar if none succeeded yet."""
    if bool(torch.isfinite(best_l1).any()):
        return int(torch.argmin(best_l1))
    return int(torch.argmax(sims))


def _keep_restart(opt: torch.optim.Adam, params, k: int):
    """Slice restart k out of the parameters and Adam's moments: its trajectory continues unchanged."""
    kept = [p.detach()[k : k + 1].clone().requires_grad_(True) for p in params]
    group = opt.param_groups[0]
    new = torch.optim.Adam(kept, lr=group["lr"], betas=group["betas"])

    def take(v):  # moments are per element: slice them; the step count is a 0-d tensor shared by all
        if not torch.is_tensor(v):
            return v
        return (v[k : k + 1] if v.dim() else v).clone()

    for old, p in zip(params, kept):
        new.state[p] = {name: take(v) for name, v in opt.state.get(old, {}).items()}
    return kept, new


def _evaluate(encoder, shadow, mask, pattern, cfg, device) -> float:
    n = min(cfg.eval_images, shadow.shape[0])
    idx = torch.randperm(shadow.shape[0], generator=torch.Generator().manual_seed(cfg.seed + 1))[:n].to(device)
    sims = []
    for chunk in idx.split(max(2, cfg.batch_size * max(1, cfg.restarts))):
        if chunk.numel() < 2:
            continue
        x = encoder.normalize(stamp(shadow[chunk], mask[None], pattern[None]))
        with _autocast(device, cfg.amp):
            emb = encoder(x)
        sims.append(torch.nn.functional.normalize(emb.float(), dim=-1))
    e = torch.cat(sims)[None]
    sim = float(mean_pairwise_cosine(e)[0])
    if not math.isfinite(sim):
        raise InversionError("similarity is NaN/Inf on the shadow set: the encoder's outputs are not finite")
    return sim
