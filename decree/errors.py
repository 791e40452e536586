"""Typed errors of the core. The scale layer turns each into a result row (status="error")."""

from __future__ import annotations


class DecreeError(Exception):
    """Base class: anything that makes one encoder unscannable."""


class CheckpointError(DecreeError):
    """The checkpoint cannot be read or does not fit the architecture."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint needs code to unpickle. Nothing in it was run."""

    def __init__(self, message: str, blocked: list[str] | None = None):
        super().__init__(message)
        self.blocked = list(blocked or [])


class ArchitectureError(DecreeError):
    """The architecture name is unknown or cannot be built."""


class ShadowError(DecreeError):
    """The shadow set is empty, corrupt or of the wrong type."""


class InversionError(DecreeError):
    """The inversion diverged (NaN/Inf) or cannot run on this encoder."""
