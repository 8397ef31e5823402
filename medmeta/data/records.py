"""One labelled image, wherever it lives (a file on disk or a row of a MedMNIST array)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ImageRecord:
    """A labelled image.

    Attributes:
        key: unique identity, used for caching and manifests (the file path, or
            ``"<npz path>::<split>::<index>"``).
        label: the class name (qualified as ``source/class`` once inside a protocol).
        path: the file, or ``None`` for in-memory images.
        patient_id: the patient (or lesion) grouping key when known; images sharing it are
            never split between the support and the query of one episode.
        array: the pixels for in-memory sources, else ``None``.
    """

    key: str
    label: str
    path: Path | None = None
    patient_id: str | None = None
    array: np.ndarray | None = field(default=None, compare=False, repr=False, hash=False)

    @property
    def source(self) -> Path | np.ndarray:
        """What :class:`~medmeta.data.reading.ScanReader` reads."""
        if self.array is not None:
            return self.array
        assert self.path is not None
        return self.path

    def relabel(self, label: str) -> "ImageRecord":
        return ImageRecord(self.key, label, self.path, self.patient_id, self.array)
