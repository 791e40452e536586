"""decree: the plain-PyTorch core of decree-ray (DECREE backdoor detection for image encoders)."""

__version__ = "0.2.0"

from .encoders import Encoder, Preprocess, create_encoder  # noqa: E402
from .errors import (  # noqa: E402
    ArchitectureError,
    CheckpointError,
    DecreeError,
    InversionError,
    ShadowError,
    UnsafeCheckpointError,
)
from .inversion import InversionConfig, InversionResult, invert  # noqa: E402
from .scan import ScanResult, scan_encoder  # noqa: E402
from .scoring import DEFAULT_THRESHOLD, Score, score  # noqa: E402
from .shadow import ShadowSet, load_shadow  # noqa: E402

__all__ = [
    "ArchitectureError",
    "CheckpointError",
    "DEFAULT_THRESHOLD",
    "DecreeError",
    "Encoder",
    "InversionConfig",
    "InversionError",
    "InversionResult",
    "Preprocess",
    "ScanResult",
    "Score",
    "ShadowError",
    "ShadowSet",
    "UnsafeCheckpointError",
    "create_encoder",
    "invert",
    "load_shadow",
    "scan_encoder",
    "score",
    "__version__",
]
