"""A small typed registry of encoder families, filled by a decorator (as timm's register_model)."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from ..errors import ArchitectureError


@dataclass(frozen=True)
class Preprocess:
    """What the inverter must know to stamp in pixel space: input size and normalization."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self):
        # Degenerate preprocessing would still yield a verdict (std=inf makes every image alike): refuse it.
        if not 8 <= int(self.image_size) <= 4096:
            raise ArchitectureError(f"image_size must be within 8..4096, got {self.image_size}")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)) or min(self.std) <= 0:
            raise ArchitectureError(f"mean/std must be finite with std > 0, got mean={self.mean} std={self.std}")

    def replace(self, image_size: int | None = None, mean=None, std=None) -> "Preprocess":
        # None means "the encoder's default", so CLI defaults never override what the encoder knows.
        try:
            size = int(image_size) if image_size is not None else self.image_size
        except (TypeError, ValueError) as e:
            raise ArchitectureError(f"image_size must be an integer, got {image_size!r}") from e
        return Preprocess(
            image_size=size,
            mean=_triple(mean) if mean is not None else self.mean,
            std=_triple(std) if std is not None else self.std,
        )


def _triple(values) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in values)
    except (TypeError, ValueError) as e:
        raise ArchitectureError(f"mean/std must be numbers, got {values!r}") from e
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise ArchitectureError(f"mean/std need 1 or 3 values, got {len(vals)}")
    return vals  # type: ignore[return-value]


class Encoder(nn.Module):
    """Maps normalized images (N,3,H,W) to embeddings (N,D); carries its own preprocessing."""

    def __init__(self, backbone: nn.Module, arch: str, preprocess: Preprocess):
        super().__init__()
        # Channels-last makes conv backward several-fold faster on CPU (Lite0 at batch 32: 4.7s -> 1.0s)
        # and is what cuDNN prefers; inversion and zoo training both backprop through the encoder.
        self.backbone = backbone.to(memory_format=torch.channels_last)
        # ...but checkpoints are saved contiguous (safetensors refuses strided tensors).
        self.backbone.register_state_dict_post_hook(_contiguous_state)
        self.arch = arch
        self.preprocess = preprocess
        self.register_buffer("_mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(preprocess.std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [0,1] -> the encoder's normalized input."""
        return (pixels - self._mean.to(pixels.dtype)) / self._std.to(pixels.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone(x.contiguous(memory_format=torch.channels_last))
        if isinstance(out, (tuple, list)):  # e.g. open_clip towers that also return tokens
            out = out[0]
        return out.flatten(1)

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self(self.normalize(pixels))


def _contiguous_state(module, state_dict, prefix, local_metadata) -> None:
    for key, value in state_dict.items():
        if key.startswith(prefix) and isinstance(value, torch.Tensor) and not value.is_contiguous():
            state_dict[key] = value.contiguous()


class FamilyBuilder(Protocol):
    def __call__(self, name: str) -> tuple[nn.Module, Preprocess]: ...


_FAMILIES: dict[str, FamilyBuilder] = {}
_LIBRARIES: dict[str, str] = {}  # family -> the module its builder imports (warm_family)
_PRETRAINED: dict[str, Callable[[], dict[str, torch.Tensor]]] = {}


def register_family(prefix: str, library: str | None = None) -> Callable[[FamilyBuilder], FamilyBuilder]:
    """`library`: the module the builder imports on first use, so a worker can import it ahead (warm_family)."""

    def deco(fn: FamilyBuilder) -> FamilyBuilder:
        if prefix in _FAMILIES:
            raise ValueError(f"encoder family {prefix!r} is already registered")
        _FAMILIES[prefix] = fn
        if library:
            _LIBRARIES[prefix] = library
        return fn

    return deco


def warm_family(arch: str) -> bool:
    """Import the library of `arch`'s family now (timm takes seconds), so that an encoder's scan does not pay for
    it. Only a registered family's own library: `arch` is the audited party's string and never names a module.
    Never raises: a library that fails to import fails the scans that need it, each in its row."""
    library = _LIBRARIES.get(arch.partition("/")[0])
    if library is None:
        return False
    try:
        importlib.import_module(library)
    except Exception:  # noqa: BLE001 - the scan that needs it says why
        return False
    return True


def register_pretrained(arch: str) -> Callable:
    """Offline pretrained weights for one arch (a function returning its state dict)."""

    def deco(fn):
        if arch in _PRETRAINED:
            raise ValueError(f"pretrained weights for {arch!r} are already registered")
        _PRETRAINED[arch] = fn
        return fn

    return deco


PLUGIN_GROUP = "decree.encoders"
_plugins_loaded = False


def load_plugins() -> list[str]:
    """Import the encoder families of installed packages (entry point group `decree.encoders`, e.g.
    `[project.entry-points."decree.encoders"] mine = "my_pkg.decree_families"`). Each entry point is a module
    that registers families on import, or a callable that does when called. Runs once per process, so the CLI,
    the driver and every Ray worker see the same families; a plugin that fails to load is reported and skipped,
    never fatal. Returns the entry points that failed."""
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    import warnings
    from importlib.metadata import entry_points

    failed = []
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            obj = ep.load()
            if callable(obj):
                obj()
        except Exception as e:  # noqa: BLE001 - someone else's package must not stop a scan
            failed.append(ep.name)
            warnings.warn(f"decree encoder plugin {ep.name!r} ({ep.value}) failed to load: {e}", stacklevel=2)
    return failed


def families() -> list[str]:
    load_plugins()
    return sorted(_FAMILIES)


def has_pretrained(arch: str) -> bool:
    return arch in _PRETRAINED


def pretrained_state_dict(arch: str) -> dict[str, torch.Tensor]:
    if arch not in _PRETRAINED:
        raise ArchitectureError(f"no offline pretrained weights for {arch!r}; known: {sorted(_PRETRAINED)}")
    return _PRETRAINED[arch]()


def split_arch(arch: str) -> tuple[str, str]:
    family, sep, name = arch.partition("/")
    if not sep or not name:
        raise ArchitectureError(f"arch must look like '<family>/<name>', got {arch!r}; families: {families()}")
    if family not in _FAMILIES:
        load_plugins()
    if family not in _FAMILIES:
        raise ArchitectureError(f"unknown encoder family {family!r} in {arch!r}; families: {families()}")
    return family, name


def build_backbone(arch: str) -> tuple[nn.Module, Preprocess]:
    family, name = split_arch(arch)
    return _FAMILIES[family](name)
