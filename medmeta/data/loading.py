"""Training batches through torch's ``DataLoader``: a seeded ``Sampler`` says which episode (or
pre-training batch) comes next, a ``Dataset`` builds it (images from the
:class:`~medmeta.data.store.ImageStore`, augmentation seeded by the step), and ``workers``
processes build the next ones while the current step trains.

What a batch holds depends only on the seed and its index, never on the workers: the episode
is :meth:`EpisodeSampler.episode(index) <medmeta.data.episodes.EpisodeSampler.episode>` and its
augmentation is seeded by ``(seed, index)``, exactly as in a loop without workers
(``tests/test_loading.py`` pins it). The loader is given its own ``torch.Generator``, so making
one does not move torch's global random state.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medmeta.cores import available_cores
from medmeta.data.episodes import Episode
from medmeta.data.records import ImageRecord
from medmeta.data.store import ImageStore

#: Batches each worker prepares ahead of the training step.
PREFETCH = 4


def auto_workers(processes: int = 1) -> int:
    """Loader workers per training process when the config says ``None``: the cores left over
    by the training processes, at most 4; none on a machine with two cores or fewer per
    process, where a worker only takes a core from the step (``docs/training.md``,
    "Input pipeline", has the measurement)."""
    cores = available_cores()
    per_process = cores // max(1, processes)
    return 0 if per_process <= 2 else min(4, per_process - 2)


def auto_decode_workers(processes: int = 1) -> int:
    """Processes that decode the scans before training when the config says ``None``: one per
    core the training processes share (at most 8), none with a single core. Decoding, unlike
    the training step, has no threads of its own: two workers on two cores decoded derm-rare's
    scans in 56 s against 101 s in the training process."""
    cores = available_cores()
    per_process = cores // max(1, processes)
    return 0 if per_process < 2 else min(8, per_process)


@dataclass
class EpisodeBatch:
    """One prepared training episode.

    Attributes:
        index: the episode's index.
        images: ``(n_support + n_query, C, *spatial)`` float32 augmented images, support first.
        support_labels: ``(n_support,)`` int64.
        query_labels: ``(n_query,)`` int64.
    """

    index: int
    images: torch.Tensor
    support_labels: torch.Tensor
    query_labels: torch.Tensor

    @property
    def n_support(self) -> int:
        return len(self.support_labels)


class MetaBatchIndices(Sampler[int]):
    """Episode indices ``start .. stop - 1`` in meta-batches of ``meta_batch``, keeping the share of
    each batch that ``processes`` (a :class:`~medmeta.training.distributed.Processes`) trains."""

    def __init__(self, start: int, stop: int, meta_batch: int, processes=None):
        self.start, self.stop, self.meta_batch, self.processes = start, stop, meta_batch, processes

    def __iter__(self) -> Iterator[int]:
        for first in range(self.start, self.stop, self.meta_batch):
            batch = range(first, min(first + self.meta_batch, self.stop))
            yield from (self.processes.share(batch) if self.processes is not None else batch)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class EpisodeImages(Dataset):
    """Item ``index``: the :class:`EpisodeBatch` of training episode ``index``.

    Args:
        episode: ``index -> Episode`` (the run's seeded training episodes).
        store: the decoded images.
        augment: ``(images, step) -> images``, seeded by ``step`` (here the episode index).
    """

    def __init__(self, episode: Callable[[int], Episode], store: ImageStore, augment: Callable[[torch.Tensor, int], torch.Tensor]):
        self.episode, self.store, self.augment = episode, store, augment

    def __getitem__(self, index: int) -> EpisodeBatch:
        ep = self.episode(index)
        images = self.augment(self.store.stack(ep.support + ep.query), step=index)
        return EpisodeBatch(index, images, ep.support_labels, ep.query_labels)


class PretrainOrder(Sampler[tuple[int, int]]):
    """``(epoch, batch)`` keys from ``(start_epoch, 0)`` to the end of ``stop_epoch - 1``."""

    def __init__(self, start_epoch: int, stop_epoch: int, n_batches: int):
        self.start_epoch, self.stop_epoch, self.n_batches = start_epoch, stop_epoch, n_batches

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for epoch in range(self.start_epoch, self.stop_epoch):
            for batch in range(self.n_batches):
                yield epoch, batch

    def __len__(self) -> int:
        return max(0, self.stop_epoch - self.start_epoch) * self.n_batches


@dataclass
class PretrainBatch:
    """One prepared pre-training batch: ``images`` ``(n, C, *spatial)`` (augmented), ``second``
    a second augmented view of the same images or None, ``targets`` ``(n,)`` class indices."""

    epoch: int
    batch: int
    images: torch.Tensor
    second: torch.Tensor | None
    targets: torch.Tensor


def epoch_order(seed: int, epoch: int, n_images: int) -> np.ndarray:
    """The seeded order in which pre-training epoch ``epoch`` visits the images."""
    return np.random.default_rng([seed, 7, epoch]).permutation(n_images)


class PretrainImages(Dataset):
    """Item ``(epoch, b)``: this process's share of batch ``b`` of pre-training epoch ``epoch``
    (images in :func:`epoch_order`, ``batch_size`` per batch; of several processes, every
    ``world_size``-th from ``rank``), augmented with the step's seed; with ``second_view_offset``
    also a second view seeded that much further on.

    Args:
        records: the training images, ``targets[i]`` the class of ``records[i]``.
    """

    def __init__(
        self, records: Sequence[ImageRecord], targets: torch.Tensor, store: ImageStore, augment, seed: int, batch_size: int,
        rank: int = 0, world_size: int = 1, second_view_offset: int | None = None,
    ):
        self.records, self.targets, self.store, self.augment = list(records), targets, store, augment
        self.seed, self.batch_size, self.rank, self.world_size = seed, batch_size, rank, world_size
        self.second_view_offset = second_view_offset

    @staticmethod
    def step(epoch: int, batch: int) -> int:
        """The augmentation seed of a batch (apart from every episode index)."""
        return (epoch + 1) * 1_000_000 + batch

    def __getitem__(self, key: tuple[int, int]) -> PretrainBatch:
        epoch, b = key
        order = epoch_order(self.seed, epoch, len(self.records))
        idx = order[b * self.batch_size : (b + 1) * self.batch_size][self.rank :: self.world_size]
        raw = self.store.stack([self.records[i] for i in idx])
        step = self.step(epoch, b)
        second = None if self.second_view_offset is None else self.augment(raw, step=step + self.second_view_offset)
        return PretrainBatch(epoch, b, self.augment(raw, step=step), second, self.targets[torch.from_numpy(idx)])


def make_loader(dataset: Dataset, sampler: Sampler | None, workers: int, seed: int = 0) -> DataLoader:
    """A loader of single prepared items (``batch_size=None``) from ``sampler``'s keys (None:
    ``0 .. len(dataset) - 1``), in order, with ``workers`` processes (0: in this process). Workers
    are forked on Linux, so they share the decoded images already in memory instead of copying
    them."""
    context = "fork" if workers > 0 and sys.platform.startswith("linux") else None
    return DataLoader(
        dataset, sampler=sampler, batch_size=None, num_workers=workers, collate_fn=_as_is,
        prefetch_factor=PREFETCH if workers > 0 else None, multiprocessing_context=context,
        generator=torch.Generator().manual_seed(seed),
    )


def _as_is(item):
    return item
