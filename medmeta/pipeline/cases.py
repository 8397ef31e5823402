"""Read step: a cases folder (or in-memory arrays) -> a :class:`~medmeta.pipeline.Task`.

Cases folder layout::

    cases/
      support/<condition name>/<scans>     the labelled scans (any depth below the condition)
      query/<scans or patient folders>     the unlabelled cases to diagnose

Every path under ``support/`` and ``query/`` is either read or collected as a ``(path,
reason)`` pair and skipped (:mod:`medmeta.pipeline.discovery` states the rule for links, FIFOs
and hidden files); one bad scan never stops a batch.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medmeta.errors import CasesError, ScanReadError
from medmeta.io import sha256_file
from medmeta.pipeline.discovery import CaseFiles, discover_cases, display_path
from medmeta.pipeline.task import Task

__all__ = ["CaseBatch", "CaseFiles", "cases_from_arrays", "discover_cases", "display_path", "read_cases", "read_labels"]


@dataclass
class CaseBatch:
    """A read batch: the task, and what reports need to name its scans.

    Attributes:
        task: support and query tensors, condition names from the folder names.
        query_paths: ``(n_query,)`` path of each case relative to the cases folder.
        query_sha256: ``(n_query,)`` sha256 of each case file ("" for in-memory cases).
        support: ``{condition: [{"path", "sha256"}]}`` of the support scans that were read.
        rejected: ``(path, reason)`` of every path that was not read or could not be read.
        notes: what the report should say about how the cases were found (links followed
            out of the cases folder).
        query_volumes: ``(n_query,)`` for volumes, each case's stored shape, spacing and
            orientation (:meth:`~medmeta.data.volumes.VolumeInfo.to_dict`); empty for images.
    """

    task: Task
    query_paths: list[str]
    query_sha256: list[str]
    support: dict[str, list[dict[str, str]]]
    rejected: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    query_volumes: list[dict] = field(default_factory=list)


def read_labels(path: str | Path) -> dict[str, str]:
    """``path,label`` CSV (paths relative to the cases folder) -> ``{path: label}``."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CasesError(f"{path}: cannot read labels CSV ({exc})") from None
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise CasesError(f"{path}: a labels CSV needs the columns 'path' and 'label'")
    return {Path(r["path"].strip()).as_posix(): r["label"].strip() for r in rows if r.get("path")}


def read_cases(cases_dir: str | Path, reader) -> CaseBatch:
    """Read ``cases_dir`` with ``reader`` (a :class:`~medmeta.data.ScanReader`). Stops with a
    :class:`CasesError` (carrying the rejected files) only when a condition has no readable
    support scan or no case can be read.

    For a reader of volumes (``spatial_dims`` 3) a case is a volume file (NIfTI, multi-frame
    DICOM) or a folder of DICOM slices (a series, :func:`~medmeta.data.volumes.group_series`),
    named by the folder's path."""
    from medmeta.data.volumes import group_series, volume_sha256

    found = discover_cases(cases_dir)
    root = found.root
    rejected = found.rejected
    rel = found.relative
    volumes = getattr(getattr(reader, "preprocessing", None), "spatial_dims", 2) == 3
    scans = group_series if volumes else list
    infos: dict[Path, dict] = {}

    def read(path: Path) -> torch.Tensor | None:
        try:
            image, info = reader.read(path)
        except ScanReadError as exc:
            rejected.append((rel(path), exc.reason))
            return None
        if info is not None:
            infos[path] = info.to_dict()
        return image

    digest = volume_sha256 if volumes else sha256_file
    images, labels, support = [], [], {}
    for index, (condition, files) in enumerate(found.support.items()):
        support[condition] = []
        for path in scans(files):
            image = read(path)
            if image is not None:
                images.append(image)
                labels.append(index)
                support[condition].append({"path": rel(path), "sha256": digest(path)})
    unusable = [c for c, scans in support.items() if not scans]
    if unusable:
        raise CasesError(f"{root / 'support'}: no readable scan for condition(s) {', '.join(unusable)}", rejected)
    candidates = scans(found.query)
    queries = [(path, image) for path in candidates if (image := read(path)) is not None]
    if not queries:
        what = "case(s)" if volumes else "case file(s)"
        raise CasesError(f"{root / 'query'}: none of the {len(candidates)} {what} could be read", rejected)
    task = Task(torch.stack(images), torch.tensor(labels), torch.stack([img for _, img in queries]), list(found.support))
    return CaseBatch(
        task, [rel(p) for p, _ in queries], [digest(p) for p, _ in queries], support, rejected, _link_notes(found),
        query_volumes=[infos[p] for p, _ in queries] if volumes else [],
    )


def _link_notes(found: CaseFiles) -> list[str]:
    if not found.outside_links:
        return []
    shown = ", ".join(found.outside_links[:5]) + (" ..." if len(found.outside_links) > 5 else "")
    return [
        f"{len(found.outside_links)} symbolic link(s) in the cases folder point outside it and were followed: {shown}"
    ]


def cases_from_arrays(
    support: dict[str, Sequence[np.ndarray | torch.Tensor]],
    query: Sequence[np.ndarray | torch.Tensor],
    reader,
    names: Sequence[str] | None = None,
) -> CaseBatch:
    """The in-memory counterpart of :func:`read_cases`: ``support`` maps each condition to its
    scans and ``query`` lists the cases, each a 2D array ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``
    with C in 1, 3, 4, or for a reader of volumes a 3D array ``(D, H, W)`` (a tensor is taken
    as its array), preprocessed by ``reader`` exactly as
    files are. ``names`` labels the cases in reports (default ``case_0``, ``case_1``, ...)."""
    if len(support) < 2:
        raise CasesError(f"need at least 2 conditions in the support, got {len(support)}")
    names = list(names) if names is not None else [f"case_{i}" for i in range(len(query))]
    if len(names) != len(query):
        raise CasesError(f"{len(names)} case names for {len(query)} cases")
    if not len(query):
        raise CasesError("no cases to diagnose")
    as_array = lambda x: x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)  # noqa: E731
    images, labels, info = [], [], {}
    for index, (condition, scans) in enumerate(support.items()):
        if not len(scans):
            raise CasesError(f"condition {condition!r} has no support scan")
        info[condition] = []
        for j, scan in enumerate(scans):
            images.append(reader(as_array(scan), name=f"support/{condition}/{j}"))
            labels.append(index)
            info[condition].append({"path": f"support/{condition}/{j}", "sha256": ""})
    read = [reader.read(as_array(x), name=n) for x, n in zip(query, names)]
    task = Task(torch.stack(images), torch.tensor(labels), torch.stack([image for image, _ in read]), list(support))
    volumes = [volume.to_dict() for _, volume in read if volume is not None]
    return CaseBatch(task, names, [""] * len(names), info, query_volumes=volumes if len(volumes) == len(read) else [])
