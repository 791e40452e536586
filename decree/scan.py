"""The one core call per encoder: load safely, invert, score, save evidence.

Two trigger models are searched. The patch search (DECREE's mask) finds small triggers; the blend search finds
whole-image triggers (blends, sinusoids, universal noise), whose mask would cover the whole image and so could
never be judged by area. Each has its own score and verdict; the encoder's verdict is the more suspicious one.
The blend search is skipped when the patch search already flagged the encoder (the verdict cannot change).

Preprocessing that the audited party claims (a sidecar's input size, mean, std) can lie: a trojan trained at 32 px
and scanned at a claimed 16 px may look clean. With `reference` (the auditor's preprocessing; None values are the
architecture's defaults) the encoder is scanned at both when they differ, and the more suspicious verdict stands;
`preprocess_decided` says which one decided.

With `base` (the model the encoder was fine-tuned from, decree.transfer), the best trigger is also stamped for
the base: `specific_pl1` is its area divided by how much less the base collapses, judged at half the threshold.
`base` may also be the consensus bases of a fleet (decree.consensus): the encoder is compared with the one it is
a fine-tune of, and with none when it is near none of them.
"""

from __future__ import annotations

import hashlib
import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__
from .consensus import Consensus, nearest, weight_distance
from .encoders import Encoder, create_encoder, default_preprocess
from .errors import InversionError
from .evidence import save_evidence
from .inversion import InversionConfig, InversionResult, invert
from .scoring import Score, score
from .shadow import ShadowSet
from .transfer import specific_verdict as judge_specific, transfer


@dataclass
class ScanResult:
    encoder_id: str
    arch: str
    result: InversionResult  # the patch search
    verdict: str  # the more suspicious of the patch and blend verdicts
    threshold: float
    device: str
    seconds: float  # load + inversion
    evidence: dict[str, str] = field(default_factory=dict)
    blend: InversionResult | None = None  # the whole-image search (None: not run)
    patch_verdict: str | None = None
    blend_verdict: str | None = None
    blend_threshold: float | None = None
    image_size: int | None = None
    shadow_sha256: str | None = None
    preprocess_decided: str | None = None  # "claimed" | "reference" when both were scanned, else None
    base_similarity: float | None = None  # the base model's similarity under the same trigger (None: no base)
    specific_pl1: float | None = None  # PL1 / how much less the base collapses (decree.transfer)
    specific_verdict: str | None = None
    base_distance: float | None = None  # weight distance to the base compared with (or the nearest consensus)
    base_members: int | None = None  # consensus: members of the one compared with (0: near none of them)
    base_group: str | None = None  # consensus: the lineage (Consensus.name) of the one compared with
    base_pl1: float | None = None  # the base's own smallest trigger on this shadow set (None: no base, or no τ)
    transfer_seconds: float | None = None  # of `seconds`, the base-model transfer's (not a result column)

    def to_row(self) -> dict:
        r, b = self.result, self.blend
        return {
            "l1_norm": r.l1_norm,
            "pl1_norm": r.pl1_norm,
            "similarity": r.similarity,
            "reached_tau": r.reached_tau,
            "steps": r.steps,
            "seconds": self.seconds,
            "profile": r.profile,
            "device": self.device,
            "threshold": self.threshold,
            "verdict": self.verdict,
            "decree_version": __version__,
            "evidence_mask": self.evidence.get("evidence_mask"),
            "evidence_pattern": self.evidence.get("evidence_pattern"),
            "evidence_stamp": self.evidence.get("evidence_stamp"),
            "evidence_grid": self.evidence.get("evidence_grid"),
            "patch_verdict": self.patch_verdict,
            "blend_pl1": None if b is None else b.pl1_norm,
            "blend_similarity": None if b is None else b.similarity,
            "blend_reached_tau": None if b is None else b.reached_tau,
            "blend_steps": None if b is None else b.steps,
            "blend_threshold": self.blend_threshold,
            "blend_verdict": self.blend_verdict,
            "image_size": self.image_size,
            "shadow_sha256": self.shadow_sha256,
            "preprocess_decided": self.preprocess_decided,
            "base_similarity": self.base_similarity,
            "specific_pl1": self.specific_pl1,
            "specific_verdict": self.specific_verdict,
            "base_distance": self.base_distance,
            "base_members": self.base_members,
            "base_group": self.base_group,
            "base_pl1": self.base_pl1,
        }


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _shadow_pixels(shadow, image_size: int, device: torch.device) -> tuple[torch.Tensor, str | None]:
    """(pixels at the encoder's size, the shadow set's digest: None for a bare tensor)."""
    if isinstance(shadow, torch.Tensor):
        x = shadow.to(device)
        if x.shape[-1] != image_size or x.shape[-2] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        return x, None
    if not isinstance(shadow, ShadowSet):
        shadow = ShadowSet(shadow)
    return shadow.pixels(image_size, device), shadow.digest


def scan_encoder(
    checkpoint,
    arch: str,
    shadow,
    *,
    config: InversionConfig | None = None,
    image_size: int | None = None,
    mean=None,
    std=None,
    threshold: float | None = None,
    device=None,
    evidence_dir: str | Path | None = None,
    encoder_id: str | None = None,
    max_bytes: int | None = None,
    reference: dict | None = None,
    base: Encoder | Sequence[Consensus] | None = None,
) -> ScanResult:
    """Scan one checkpoint. Raises a DecreeError subclass when the encoder cannot be scanned.

    `reference` ({"image_size", "mean", "std"}, None values: the architecture's defaults): also scan with this
    preprocessing when it differs from the given one, and keep the more suspicious verdict. `base`: the encoder's
    base model (same architecture), for `specific_pl1` (decree.transfer), or consensus bases to pick it from.
    """
    t0 = time.perf_counter()
    dev = torch.device(device) if device is not None else default_device()
    cfg = config or InversionConfig.from_profile("fast")
    if threshold is not None:  # the inversion's settle rule must stop against the threshold the verdict uses
        cfg = replace(cfg, threshold=float(threshold))
    encoder = create_encoder(arch, checkpoint, image_size=image_size, mean=mean, std=std, max_bytes=max_bytes)
    base, distance, members, lineage = _which_base(encoder, base)
    found = _search(encoder, shadow, cfg, threshold, dev)
    judged = encoder  # the preprocessing whose search decided
    decided = None
    if reference is not None:
        ref = default_preprocess(arch).replace(reference.get("image_size"), reference.get("mean"), reference.get("std"))
        if ref != encoder.preprocess:
            other_encoder = Encoder(encoder.backbone, arch, ref).eval()
            other = _search(other_encoder, shadow, cfg, threshold, dev)
            # the audited party's claim stands unless the auditor's preprocessing finds what it hides
            decided = "reference" if other.suspicious and not found.suspicious else "claimed"
            found, judged = (other, other_encoder) if decided == "reference" else (found, encoder)
    specific, transfer_seconds, own_pl1 = None, None, None
    if base is not None:
        r, t_transfer = found.result, time.perf_counter()
        t = transfer(judged, base, found.pixels, r.mask, r.pattern, cfg.tau)
        specific, transfer_seconds = (t.base_similarity, t.specific_pl1(r.pl1_norm)), time.perf_counter() - t_transfer
        own_pl1 = base_pl1(base, judged.preprocess, found.pixels, found.shadow_digest, cfg, dev)
    eid = encoder_id or (Path(str(checkpoint)).stem if not isinstance(checkpoint, dict) else "encoder")
    evidence = save_evidence(found.result, evidence_dir, eid, found.pixels) if evidence_dir is not None else {}
    s, blend_score = found.score, found.blend_score
    specific_verdict = None
    if specific is not None:
        specific_verdict = judge_specific(found.result.reached_tau, specific[1], s.threshold, own_pl1, distance)
    return ScanResult(
        encoder_id=eid,
        arch=arch,
        result=found.result,
        verdict="trojaned" if found.suspicious or specific_verdict == "trojaned" else "clean",
        threshold=s.threshold,
        device=str(dev),
        seconds=time.perf_counter() - t0,
        evidence=evidence,
        blend=found.blend,
        patch_verdict=s.verdict,
        blend_verdict=None if blend_score is None else blend_score.verdict,
        blend_threshold=None if blend_score is None else blend_score.threshold,
        image_size=found.image_size,
        shadow_sha256=found.shadow_digest,
        preprocess_decided=decided,
        base_similarity=None if specific is None else specific[0],
        specific_pl1=None if specific is None else specific[1],
        specific_verdict=specific_verdict,
        base_distance=distance,
        base_members=members,
        base_group=lineage,
        base_pl1=own_pl1,
        transfer_seconds=transfer_seconds,
    )


# base encoder -> {(shadow, preprocessing, settings, device): its own PL1}: a worker inverts each base once per
# shadow set, not once per encoder compared with it (weak keys: a base dropped by the worker is forgotten)
_BASE_PL1: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def base_pl1(base: Encoder, preprocess, pixels: torch.Tensor, shadow_digest: str | None, cfg: InversionConfig,
             device: torch.device) -> float | None:
    """The base's own smallest trigger on the shadow set, searched as the encoder's was (same settings, the
    encoder's preprocessing: the pixel space its trigger lives in); None when the base never reached τ."""
    memo = _BASE_PL1.setdefault(base.backbone, {})
    if shadow_digest is None:  # a bare tensor: its content names it (an id could be a freed tensor's)
        data = pixels.detach().cpu().contiguous().numpy().tobytes()
        shadow_digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    key = (shadow_digest, tuple(pixels.shape), preprocess, cfg, str(device))
    if key not in memo:
        view = Encoder(base.backbone, base.arch, preprocess).eval() if preprocess != base.preprocess else base
        found = _checked(invert(view, pixels, cfg, device=device))
        memo[key] = found.pl1_norm if found.reached_tau else None
    return memo[key]


def _which_base(encoder: Encoder, base) -> tuple[Encoder | None, float | None, int | None, str | None]:
    """(the base to stamp the trigger for, the encoder's weight distance to it, consensus members, its lineage).
    A named base is the auditor's word and is used at any distance (its per-encoder verdict only within
    decree.transfer.DRIFT_LIMIT); of consensus bases, only the one the encoder is a fine-tune of
    (decree.consensus.nearest)."""
    if base is None:
        return None, None, None, None
    if isinstance(base, Encoder):
        return base, weight_distance(encoder.backbone.state_dict(), base.backbone.state_dict()), None, None
    chosen, distance = nearest(encoder, base)
    if chosen is None:
        return None, distance, 0, None
    return chosen.encoder, distance, chosen.members, chosen.name or None


@dataclass
class _Found:
    result: InversionResult
    score: Score
    blend: InversionResult | None
    blend_score: Score | None
    pixels: torch.Tensor
    shadow_digest: str | None
    image_size: int

    @property
    def suspicious(self) -> bool:
        return self.score.verdict == "trojaned" or (self.blend_score is not None and self.blend_score.verdict == "trojaned")


def _search(encoder: Encoder, shadow, cfg: InversionConfig, threshold: float | None, dev: torch.device) -> _Found:
    """The patch search, then the blend search unless the patch search already flagged the encoder."""
    pixels, shadow_digest = _shadow_pixels(shadow, encoder.preprocess.image_size, dev)
    result = _checked(invert(encoder, pixels, cfg, device=dev))
    s = score(result, threshold)
    blend, blend_score = None, None
    bcfg = cfg.blend_config()
    if bcfg is not None and s.verdict != "trojaned":
        blend = _checked(invert(encoder, pixels, bcfg, device=dev))
        blend_score = score(blend)
    return _Found(result, s, blend, blend_score, pixels, shadow_digest, encoder.preprocess.image_size)


def _checked(result: InversionResult) -> InversionResult:
    if not (math.isfinite(result.l1_norm) and torch.isfinite(result.mask).all()):
        raise InversionError("inversion produced a non-finite mask")
    return result
