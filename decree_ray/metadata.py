"""Preprocessing metadata from the audited party (manifest lines, `<checkpoint>.json` sidecars), made typed and
bounded where it enters: a wrong type, a non-finite or absurd number is this entry's error, never the scan's.
"""

from __future__ import annotations

import math
from typing import Any

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024  # 1024 px: past every common encoder; a shadow set at 4096 px is 200 MB
MAX_TEXT = 300  # arch names and labels
_MEAN_RANGE, _STD_RANGE = (-10.0, 10.0), (1e-4, 10.0)


class MetadataError(ValueError):
    pass


def missing(value: Any) -> bool:
    """None, an empty string or a NaN (a CSV or Parquet manifest's empty cell)."""
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def text(value: Any, what: str) -> str | None:
    if missing(value):
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise MetadataError(f"{what} must be a string, got {type(value).__name__}")
    value = str(value)
    if len(value) > MAX_TEXT:
        raise MetadataError(f"{what} is {len(value)} characters long (at most {MAX_TEXT})")
    return value


def image_size(value: Any) -> int | None:
    if missing(value):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value.isdigit() or len(value) > 5:
            raise MetadataError(f"image_size must be an integer, got {value[:20]!r}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MetadataError(f"image_size must be an integer, got {type(value).__name__}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise MetadataError(f"image_size must be a whole number, got {value!r}")
    if not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE:
        shown = value if abs(value) < 10**12 else "a huge number"
        raise MetadataError(f"image_size must be within {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}, got {shown}")
    return int(value)


def floats(value: Any, what: str) -> tuple[float, ...] | None:
    """1 or 3 finite numbers (a list, or a string "0.5,0.5,0.5" / "[0.5, ...]" from a CSV cell)."""
    import json

    if missing(value):
        return None
    if isinstance(value, str):
        s = value.strip()
        try:
            value = json.loads(s) if s.startswith("[") else [v for v in s.split(",") if v.strip()]
        except (ValueError, RecursionError) as e:
            raise MetadataError(f"{what} is not a list of numbers") from e
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or len(value) not in (1, 3):
        raise MetadataError(f"{what} must be 1 or 3 numbers")
    out = []
    lo, hi = _STD_RANGE if what == "std" else _MEAN_RANGE
    for v in value:
        if isinstance(v, bool):
            raise MetadataError(f"{what} must hold numbers")
        try:
            f = float(v)
        except (TypeError, ValueError, OverflowError) as e:
            raise MetadataError(f"{what} must hold numbers") from e
        if not (math.isfinite(f) and lo <= f <= hi):
            raise MetadataError(f"{what} values must be finite and within {lo:g}..{hi:g}")
        out.append(f)
    return tuple(out)


def preprocessing(record: dict) -> dict[str, Any]:
    """arch, image_size, mean, std and label of a manifest line or a sidecar, validated (MetadataError)."""
    return {"arch": text(record.get("arch"), "arch"), "image_size": image_size(record.get("image_size")),
            "mean": floats(record.get("mean"), "mean"), "std": floats(record.get("std"), "std"),
            "label": text(record.get("label"), "label")}
