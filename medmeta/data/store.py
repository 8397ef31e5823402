"""Decoded-image store: within a run no file is decoded twice, and with a cache folder
(:mod:`medmeta.data.disk_cache`) not across runs either."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from medmeta.data.reading import ScanReader
from medmeta.data.records import ImageRecord
from medmeta.errors import ScanReadError


class ImageStore:
    """Decodes each record once through a :class:`ScanReader` and keeps the result.

    Images are kept as ``float16`` tensors ``(channels, *spatial)`` (half the memory of
    ``float32``; 8-bit-sourced intensities lose nothing that matters) and handed out as
    ``float32``. With ``cache_dir`` the decoded tensors are also kept on disk
    (:class:`~medmeta.data.disk_cache.DiskCache`) and a later run reads them instead of decoding;
    with ``in_memory=False`` as well, nothing is held in memory: every :meth:`get` reads the
    disk entry (the page cache and the data loader's workers hide most of that), so a data set
    larger than memory trains. ``n_decoded`` counts actual decodes in this process, for tests
    and diagnostics.
    """

    def __init__(self, reader: ScanReader, cache_dir: str | Path | None = None, in_memory: bool = True):
        from medmeta.data.disk_cache import DiskCache

        if not in_memory and cache_dir is None:
            raise ValueError("a store that keeps nothing in memory needs a cache folder")
        self.reader = reader
        self.disk = DiskCache(cache_dir, reader) if cache_dir is not None else None
        self.in_memory = in_memory
        self._cache: dict[str, torch.Tensor] = {}
        self._failed: dict[str, str] = {}
        self._decoded_here = 0

    @property
    def n_decoded(self) -> int:
        return self._decoded_here + (self.disk.n_decoded if self.disk is not None else 0)

    def _load(self, record: ImageRecord) -> torch.Tensor:
        if self.disk is not None:
            return self.disk.get(record)
        self._decoded_here += 1
        return self.reader(record.source, name=record.key).to(torch.float16)

    def get_half(self, record: ImageRecord) -> torch.Tensor:
        """The stored ``float16`` tensor (decoded, or read from the cache folder, if need be)."""
        cached = self._cache.get(record.key)
        if cached is not None:
            return cached
        if record.key in self._failed:
            raise ScanReadError(record.key, self._failed[record.key])
        try:
            cached = self._load(record)
        except ScanReadError as exc:
            self._failed[record.key] = exc.reason
            raise
        if self.in_memory:
            self._cache[record.key] = cached
        return cached

    def get(self, record: ImageRecord) -> torch.Tensor:
        return self.get_half(record).float()

    def stack(self, records: Sequence[ImageRecord]) -> torch.Tensor:
        """``(len(records), channels, *spatial)`` float32."""
        return torch.stack([self.get(r) for r in records])

    def warm(
        self, records: Iterable[ImageRecord], on_progress: Callable[[], None] | None = None, workers: int = 0
    ) -> tuple[list[ImageRecord], list[tuple[ImageRecord, str]]]:
        """Decode all ``records`` now (in ``workers`` processes, in order); return ``(readable,
        [(unreadable, reason), ...])``. Held in memory unless ``in_memory`` is off (then the
        workers only fill the cache folder)."""
        records = list(records)
        pending = [r for r in records if r.key not in self._cache and r.key not in self._failed]
        if workers > 0 and len(pending) > 1:
            self._warm_in_workers(pending, workers, on_progress)
        else:
            for record in records:
                try:
                    self.get_half(record)
                except ScanReadError:
                    pass  # noted in _failed
                if on_progress is not None:
                    on_progress()
        good = [r for r in records if r.key not in self._failed]
        return good, [(r, self._failed[r.key]) for r in records if r.key in self._failed]

    def _warm_in_workers(self, records: list[ImageRecord], workers: int, on_progress) -> None:
        from medmeta.data.loading import make_loader

        for index, image, reason, decoded in make_loader(_Decoding(self, records), None, workers):
            record = records[index]
            self._decoded_here += decoded
            if reason is not None:
                self._failed[record.key] = reason
            elif self.in_memory:
                self._cache[record.key] = image
            if on_progress is not None:
                on_progress()

    def __len__(self) -> int:
        return len(self._cache)


class _Decoding(torch.utils.data.Dataset):
    """Item ``i``: ``(i, float16 tensor or None, reason or None, decodes done)``, in a worker."""

    def __init__(self, store: ImageStore, records: list[ImageRecord]):
        self.store, self.records = store, records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        before = self.store.n_decoded
        try:
            image = self.store._load(self.records[index])
        except ScanReadError as exc:
            return index, None, exc.reason, self.store.n_decoded - before
        return index, (image if self.store.in_memory else None), None, self.store.n_decoded - before
