"""Errors that medmeta reports to a user as one clear line (never a traceback)."""

from __future__ import annotations


class MedmetaError(Exception):
    """Base class: anything a user can cause with bad input or configuration."""


class ScanReadError(MedmetaError):
    """A scan could not be read or is unusable; the message names the file and the reason."""

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ProtocolError(MedmetaError):
    """A protocol file, data source or class split is invalid."""


class CheckpointError(MedmetaError):
    """A file is not a usable medmeta checkpoint."""


class CalibrationError(MedmetaError):
    """A calibration setting (target coverage, conformal score, referral share) is invalid, or
    there is nothing to calibrate on."""


class CasesError(MedmetaError):
    """A cases folder for `medmeta adapt` cannot be diagnosed; ``rejected`` lists the
    ``(file, reason)`` pairs found unreadable before the batch had to stop."""

    def __init__(self, message: str, rejected: list[tuple[str, str]] | None = None):
        self.rejected = list(rejected or [])
        super().__init__(message)


class OutputBusyError(MedmetaError):
    """Another medmeta command holds the lock on the same output folder."""


class OutputChangedError(MedmetaError):
    """The output folder changed while a command ran; its new results were kept elsewhere."""
