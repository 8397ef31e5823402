"""N-way K-shot Q-query episodes, seeded and reproducible, with patient separation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medmeta.data.records import ImageRecord
from medmeta.errors import ProtocolError
from medmeta.io import atomic_write_csv


@dataclass
class Episode:
    """One few-shot task.

    Attributes:
        classes: the ``way`` class names; label ``i`` means ``classes[i]``.
        support: ``way * shot`` records, grouped by class.
        support_labels: ``(way * shot,)`` int64 labels in ``[0, way)``.
        query: ``way * query`` records, grouped by class.
        query_labels: ``(way * query,)`` int64 labels.
    """

    index: int
    classes: list[str]
    support: list[ImageRecord]
    support_labels: torch.Tensor
    query: list[ImageRecord]
    query_labels: torch.Tensor


class EpisodeSampler:
    """Draws episodes from ``{class name: records}``.

    Episode ``i`` depends only on ``(seed, i)``, so a run can be resumed at any episode and two
    methods can be compared on identical episodes. Where records carry a ``patient_id``, no
    patient (or lesion) appears in both the support and the query of one episode.
    """

    def __init__(self, records_by_class: dict[str, list[ImageRecord]], way: int, shot: int, query: int, seed: int = 0):
        if way < 2:
            raise ProtocolError("an episode needs way >= 2")
        if len(records_by_class) < way:
            raise ProtocolError(f"{way}-way episodes need {way} classes, only {len(records_by_class)} available")
        self.class_names = sorted(records_by_class)
        self.records_by_class = {name: list(records_by_class[name]) for name in self.class_names}
        self.way, self.shot, self.query, self.seed = way, shot, query, seed
        for name, records in self.records_by_class.items():
            if len(records) < shot + query:
                raise ProtocolError(f"class '{name}' has {len(records)} images, fewer than shot + query = {shot + query}")

    def episode(self, index: int) -> Episode:
        rng = np.random.default_rng([self.seed, index])
        picked = [self.class_names[i] for i in rng.choice(len(self.class_names), self.way, replace=False)]
        for _attempt in range(50):
            drawn = self._draw(picked, rng)
            if drawn is not None:
                break
        else:
            raise ProtocolError(
                f"cannot draw episode {index}: too few distinct patients in {picked} to keep support and query apart"
            )
        support, query = drawn
        return Episode(
            index=index,
            classes=picked,
            support=[r for group in support for r in group],
            support_labels=torch.arange(self.way).repeat_interleave(self.shot),
            query=[r for group in query for r in group],
            query_labels=torch.arange(self.way).repeat_interleave(self.query),
        )

    def _draw(self, picked: list[str], rng: np.random.Generator):
        support, query = [], []
        for name in picked:
            records = self.records_by_class[name]
            order = rng.permutation(len(records))
            chosen = [records[i] for i in order[: self.shot]]
            patients = {r.patient_id for r in chosen if r.patient_id is not None}
            rest = [records[i] for i in order[self.shot :] if records[i].patient_id is None or records[i].patient_id not in patients]
            if len(rest) < self.query:
                return None
            support.append(chosen)
            query.append(rest[: self.query])
        support_patients = {r.patient_id for group in support for r in group if r.patient_id}
        if any(r.patient_id in support_patients for group in query for r in group if r.patient_id):
            return None  # a patient with images in two classes of this episode
        return support, query

    def __iter__(self):
        index = 0
        while True:
            yield self.episode(index)
            index += 1

    def save_manifest(self, path: str | Path, indices: range | list[int]) -> None:
        """Write the file list of the given episodes as CSV (episode, role, class, label, key, patient_id)."""
        atomic_write_csv(path, ["episode", "role", "class", "label", "key", "patient_id"], self._manifest_rows(indices))

    def _manifest_rows(self, indices: range | list[int]):
        for index in indices:
            ep = self.episode(index)
            for role, records, labels in (("support", ep.support, ep.support_labels), ("query", ep.query, ep.query_labels)):
                for record, label in zip(records, labels.tolist()):
                    yield [index, role, ep.classes[label], label, record.key, record.patient_id or ""]
