"""The one core call per encoder: load safely, invert, score, save evidence."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__
from .encoders import create_encoder
from .errors import InversionError
from .evidence import save_evidence
from .inversion import InversionConfig, InversionResult, invert
from .scoring import score
from .shadow import ShadowSet


@dataclass
class ScanResult:
    encoder_id: str
    arch: str
    result: InversionResult
    verdict: str
    threshold: float
    device: str
    seconds: float  # load + inversion
    evidence: dict[str, str] = field(default_factory=dict)

    def to_row(self) -> dict:
        r = self.result
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
        }


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _shadow_pixels(shadow, image_size: int, device: torch.device) -> torch.Tensor:
    if isinstance(shadow, torch.Tensor):
        x = shadow.to(device)
        if x.shape[-1] != image_size or x.shape[-2] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        return x
    if not isinstance(shadow, ShadowSet):
        shadow = ShadowSet(shadow)
    return shadow.pixels(image_size, device)


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
) -> ScanResult:
    """Scan one checkpoint. Raises a DecreeError subclass when the encoder cannot be scanned."""
    t0 = time.perf_counter()
    dev = torch.device(device) if device is not None else default_device()
    cfg = config or InversionConfig.from_profile("fast")
    if threshold is not None:  # the inversion's settle rule must stop against the threshold the verdict uses
        cfg = replace(cfg, threshold=float(threshold))
    encoder = create_encoder(arch, checkpoint, image_size=image_size, mean=mean, std=std, max_bytes=max_bytes)
    pixels = _shadow_pixels(shadow, encoder.preprocess.image_size, dev)
    result = invert(encoder, pixels, cfg, device=dev)
    if not (math.isfinite(result.l1_norm) and torch.isfinite(result.mask).all()):
        raise InversionError("inversion produced a non-finite mask")
    s = score(result, threshold)
    eid = encoder_id or (Path(str(checkpoint)).stem if not isinstance(checkpoint, dict) else "encoder")
    evidence = save_evidence(result, evidence_dir, eid) if evidence_dir is not None else {}
    return ScanResult(
        encoder_id=eid,
        arch=arch,
        result=result,
        verdict=s.verdict,
        threshold=s.threshold,
        device=str(dev),
        seconds=time.perf_counter() - t0,
        evidence=evidence,
    )
