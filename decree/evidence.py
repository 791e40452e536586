"""Evidence images of an inverted trigger: the mask, the pattern, and mask·pattern."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .inversion import InversionResult


def _to_png(t: torch.Tensor, path: Path, scale: int) -> None:
    from PIL import Image

    arr = t.detach().float().clamp(0, 1).cpu().numpy()
    arr = (arr * 255).round().astype(np.uint8)
    img = Image.fromarray(arr if arr.ndim == 2 else np.transpose(arr, (1, 2, 0)))
    if scale > 1:  # 32×32 triggers are unreadable at their native size
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def save_evidence(result: InversionResult, out_dir: str | Path, stem: str) -> dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h = result.mask.shape[-1]
    scale = max(1, 128 // h)
    paths = {
        "evidence_mask": out / f"{stem}.mask.png",
        "evidence_pattern": out / f"{stem}.pattern.png",
        "evidence_stamp": out / f"{stem}.stamp.png",
    }
    _to_png(result.mask, paths["evidence_mask"], scale)
    _to_png(result.pattern, paths["evidence_pattern"], scale)
    _to_png(result.mask[None] * result.pattern, paths["evidence_stamp"], scale)
    return {k: str(v) for k, v in paths.items()}
