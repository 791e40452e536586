"""Evidence images of an inverted trigger: the mask, the pattern, mask·pattern, and a grid a person can judge.

The grid shows a few shadow images (top row), the same images stamped with the recovered trigger (middle) and the
mask as a heat map over them (bottom): whether a small, consistent patch takes over every image is visible at a
glance. It reuses the pixels the inversion already holds, so it costs milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .inversion import InversionResult

GRID_IMAGES = 4
_TILE = 96  # px per grid tile: 32-px triggers are unreadable at their native size


def _to_png(t: torch.Tensor, path: Path, scale: int) -> None:
    from PIL import Image

    arr = t.detach().float().clamp(0, 1).cpu().numpy()
    arr = (arr * 255).round().astype(np.uint8)
    img = Image.fromarray(arr if arr.ndim == 2 else np.transpose(arr, (1, 2, 0)))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def trigger_grid(result: InversionResult, shadow: torch.Tensor, n: int = GRID_IMAGES) -> torch.Tensor:
    """(3, 3·T, n·T) in [0,1]: clean images, stamped images, mask heat map over the clean images."""
    import torch.nn.functional as F

    x = shadow[:n].detach().float().cpu()
    mask, pattern = result.mask.float().cpu()[None, None], result.pattern.float().cpu()[None]
    stamped = (1 - mask) * x + mask * pattern
    heat = torch.stack([torch.ones_like(mask[0, 0]), 0.15 * torch.ones_like(mask[0, 0]), torch.zeros_like(mask[0, 0])])
    overlay = 0.45 * x.mean(1, keepdim=True).expand_as(x) + 0.55 * (mask * heat[None] + (1 - mask) * 0.1)
    rows = []
    for imgs in (x, stamped, overlay):
        tiles = F.interpolate(imgs, size=(_TILE, _TILE), mode="nearest" if imgs.shape[-1] < _TILE else "area")
        rows.append(torch.cat(list(tiles), dim=-1))
    return torch.cat(rows, dim=-2).clamp(0, 1)


def save_evidence(result: InversionResult, out_dir: str | Path, stem: str, shadow: torch.Tensor | None = None
                  ) -> dict[str, str]:
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
    if shadow is not None and len(shadow):
        paths["evidence_grid"] = out / f"{stem}.grid.png"
        _to_png(trigger_grid(result, shadow), paths["evidence_grid"], 1)
    return {k: str(v) for k, v in paths.items()}
