"""Decoded-image cache: within a run, no file is decoded twice."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from medmeta.data.reading import ScanReader
from medmeta.data.records import ImageRecord
from medmeta.errors import ScanReadError


class ImageStore:
    """Decodes each record once through a :class:`ScanReader` and keeps the result.

    Images are kept as ``float16`` tensors ``(channels, size, size)`` (half the memory of
    ``float32``; 8-bit-sourced intensities lose nothing that matters) and handed out as
    ``float32``. ``n_decoded`` counts actual decodes, for tests and diagnostics.
    """

    def __init__(self, reader: ScanReader):
        self.reader = reader
        self._cache: dict[str, torch.Tensor] = {}
        self._failed: dict[str, str] = {}
        self.n_decoded = 0

    def get(self, record: ImageRecord) -> torch.Tensor:
        cached = self._cache.get(record.key)
        if cached is None:
            if record.key in self._failed:
                raise ScanReadError(record.key, self._failed[record.key])
            try:
                self.n_decoded += 1
                cached = self.reader(record.source, name=record.key).to(torch.float16)
            except ScanReadError as exc:
                self._failed[record.key] = exc.reason
                raise
            self._cache[record.key] = cached
        return cached.float()

    def stack(self, records: Sequence[ImageRecord]) -> torch.Tensor:
        """``(len(records), channels, size, size)`` float32."""
        return torch.stack([self.get(r) for r in records])

    def warm(
        self, records: Iterable[ImageRecord], on_progress: Callable[[], None] | None = None
    ) -> tuple[list[ImageRecord], list[tuple[ImageRecord, str]]]:
        """Decode all ``records`` now; return ``(readable, [(unreadable, reason), ...])``."""
        good, bad = [], []
        for record in records:
            try:
                self.get(record)
                good.append(record)
            except ScanReadError as exc:
                bad.append((record, exc.reason))
            if on_progress is not None:
                on_progress()
        return good, bad

    def __len__(self) -> int:
        return len(self._cache)
