"""Decoded scans kept on disk between runs, with MONAI's :class:`~monai.data.PersistentDataset`.

A scan's entry is named by the sha256 of what decides its pixels: the file's bytes (an in-memory
array's bytes), the :class:`~medmeta.data.reading.Preprocessing` that decoded it, the size limit
it was read under and :data:`CACHE_FORMAT`. A file edited in place, or another preprocessing, is
therefore decoded anew; a copy of a file under another name hits the same entry. Entries are
``float16`` tensors ``(C, *spatial)`` written by ``torch.save`` through a temporary file and
renamed, and read back with ``torch.load(weights_only=True)``: a cache folder another process (or
person) wrote into can hold wrong pixels at worst, never code that runs. A corrupt entry is
deleted and decoded again (MONAI's own check).

The folder holds images derived from patients' scans: keep it where the scans themselves may be
kept (see ``docs/training.md``, "Input pipeline").
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from monai.transforms import Transform

from medmeta.data.reading import ScanReader
from medmeta.data.records import ImageRecord
from medmeta.errors import ScanReadError
from medmeta.io import sha256_file

#: Part of every entry's name: raised when what an entry holds changes meaning.
CACHE_FORMAT = 1


class _Decode(Transform):
    """The cached step (a deterministic MONAI transform, so PersistentDataset caches its output):
    ``{"source": path or array, "name": key}`` -> ``{"image": float16}``; counts its calls."""

    def __init__(self, reader: ScanReader):
        self.reader = reader
        self.calls = 0

    def __call__(self, item: dict) -> dict:
        self.calls += 1
        return {"image": self.reader(item["source"], name=item["name"]).to(torch.float16)}


class DiskCache:
    """Decode through ``reader`` once per content and preprocessing, across runs.

    ``get(record)`` returns the ``float16`` tensor or raises the reader's
    :class:`~medmeta.errors.ScanReadError` (failures are not cached: a file fixed later is read).
    ``n_decoded`` counts actual decodes (the rest were read from ``cache_dir``).
    """

    def __init__(self, cache_dir: str | Path, reader: ScanReader):
        from monai.data import PersistentDataset

        self.cache_dir = Path(cache_dir)
        self.reader = reader
        self._settings = json.dumps(
            {"preprocessing": reader.preprocessing.to_dict(), "max_pixels": reader.max_pixels, "format": CACHE_FORMAT},
            sort_keys=True,
        )
        self._decode = _Decode(reader)
        # hash_transform stays None: the preprocessing is part of every entry's name already
        self._dataset = PersistentDataset(data=[], transform=self._decode, cache_dir=self.cache_dir, hash_func=self._entry_name)

    @property
    def n_decoded(self) -> int:
        """Scans decoded by this process (the others were read from the cache folder)."""
        return self._decode.calls

    def _entry_name(self, item: dict) -> bytes:
        return hashlib.sha256(f"{item['content']}|{self._settings}".encode()).hexdigest().encode()

    def entry_path(self, record: ImageRecord) -> Path:
        """Where ``record``'s decoded pixels are (or would be) kept (its file must be readable)."""
        item = self._item(record)
        assert item is not None, f"{record.key} cannot be read"
        return self.cache_dir / f"{self._entry_name(item).decode()}.pt"

    @staticmethod
    def _item(record: ImageRecord) -> dict | None:
        """The entry's description, or None when the file cannot be read to hash it."""
        if record.array is not None:
            content = "array:" + hashlib.sha256(record.array.tobytes()).hexdigest() + str(record.array.shape)
        else:
            try:
                content = "file:" + sha256_file(record.path)
            except OSError:
                return None
        return {"source": record.source, "name": record.key, "content": content}

    def get(self, record: ImageRecord) -> torch.Tensor:
        item = self._item(record)
        if item is None:  # the reader says why (not found, not a file ...), in its own words
            return self.reader(record.source, name=record.key).to(torch.float16)
        try:
            return self._dataset._cachecheck(item)["image"]
        except ScanReadError:
            raise
        except RuntimeError as exc:  # MONAI wraps a failing transform; the reader's own reason is inside
            cause = exc
            while cause is not None and not isinstance(cause, ScanReadError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None
