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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medmeta.errors import CasesError, ScanReadError
from medmeta.io import sha256_file
from medmeta.pipeline.discovery import CaseFiles, discover_cases, display_path
from medmeta.pipeline.task import Task

__all__ = [
    "CaseBatch", "CaseFiles", "CaseSource", "QueryScan", "cases_from_arrays", "discover_cases", "display_path", "open_cases",
    "read_cases", "read_labels", "stream_queries",
]


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


@dataclass
class QueryScan:
    """One case as read: ``image`` ``(C, *spatial)`` and no ``reason``, or no image and the
    ``reason`` it could not be read; ``path`` as reports name it; ``volume`` a volume's stored
    shape, spacing and orientation (None for an image); ``thumbnail`` the PNG bytes of its
    thumbnail when asked for (made where the case was read)."""

    path: str
    image: torch.Tensor | None
    reason: str | None = None
    sha256: str = ""
    volume: dict | None = None
    thumbnail: bytes | None = None


@dataclass
class CaseSource:
    """A cases folder with its support read and its query cases still to read.

    Attributes:
        support_images: ``(n_support, C, *spatial)``; ``support_labels`` ``(n_support,)``.
        conditions: the support folders' names; label ``i`` is ``conditions[i]``.
        support: ``{condition: [{"path", "sha256"}]}`` of the support scans read.
        rejected: ``(path, reason)`` of the paths not read so far (the support's, and anything
            discovery refused); :func:`stream_queries` adds the unreadable cases as it meets them.
        notes: what the report should say about how the cases were found.
        query: the case files (or series folders) to read, in order.
    """

    support_images: torch.Tensor
    support_labels: torch.Tensor
    conditions: list[str]
    support: dict[str, list[dict[str, str]]]
    rejected: list[tuple[str, str]]
    notes: list[str]
    query: list[Path]
    root: Path
    volumes: bool = False

    def relative(self, path: Path) -> str:
        """``path`` relative to the cases folder, as reports name it."""
        return display_path(path.relative_to(self.root))


def open_cases(cases_dir: str | Path, reader) -> CaseSource:
    """Find the scans of ``cases_dir`` and read its support with ``reader`` (a
    :class:`~medmeta.data.ScanReader`); the cases are read later, by :func:`stream_queries`.
    Stops with a :class:`CasesError` (carrying the rejected files) when a condition has no
    readable support scan.

    For a reader of volumes (``spatial_dims`` 3) a case is a volume file (NIfTI, multi-frame
    DICOM) or a folder of DICOM slices (a series, :func:`~medmeta.data.volumes.group_series`),
    named by the folder's path."""
    from medmeta.data.volumes import group_series

    found = discover_cases(cases_dir)
    volumes = getattr(getattr(reader, "preprocessing", None), "spatial_dims", 2) == 3
    scans = group_series if volumes else list
    rejected = found.rejected
    images, labels, support = [], [], {}
    for index, (condition, files) in enumerate(found.support.items()):
        support[condition] = []
        for path in scans(files):
            scan = _read_scan(path, reader, found.relative, volumes)
            if scan.reason is not None:
                rejected.append((scan.path, scan.reason))
                continue
            images.append(scan.image)
            labels.append(index)
            support[condition].append({"path": scan.path, "sha256": scan.sha256, **({"volume": scan.volume} if scan.volume else {})})
    unusable = [c for c, read in support.items() if not read]
    if unusable:
        raise CasesError(f"{found.root / 'support'}: no readable scan for condition(s) {', '.join(unusable)}", rejected)
    return CaseSource(
        torch.stack(images), torch.tensor(labels), list(found.support), support, rejected, _link_notes(found),
        scans(found.query), found.root, volumes,
    )


def _read_scan(path: Path, reader, relative, volumes: bool) -> QueryScan:
    """Read one scan (a case or a support scan) and its digest; an unreadable one carries why."""
    from medmeta.data.volumes import volume_sha256

    name = relative(path)
    try:
        image, info = reader.read(path)
    except ScanReadError as exc:
        return QueryScan(name, None, exc.reason)
    digest = volume_sha256(path) if volumes else sha256_file(path)
    return QueryScan(name, image, None, digest, info.to_dict() if info is not None else None)


#: The most cases a loader worker reads and hands over together: one shared-memory tensor per
#: group instead of one per case (handing each case over alone took a third of the main
#: process's time at 64 px).
QUERY_GROUP = 16
#: ... and the most bytes of pixels in a group, so that large scans and volumes go one by one
#: and the workers' read-ahead (4 groups each) stays small.
QUERY_GROUP_BYTES = 4 << 20


def query_group(n_cases: int, workers: int, scan_bytes: int) -> int:
    """Cases per group: at most :data:`QUERY_GROUP` and :data:`QUERY_GROUP_BYTES` of pixels, and
    few enough that every worker gets a group."""
    return max(1, min(QUERY_GROUP, QUERY_GROUP_BYTES // max(1, scan_bytes), -(-n_cases // max(1, workers))))


class _QueryGroups(torch.utils.data.Dataset):
    """Item ``g``: the :class:`QueryScan` s of ``source.query[g * group : (g + 1) * group]``, read
    in a loader worker, with their thumbnails when ``thumbnails``, as a :class:`_ScanGroup`. The
    images come back through torch's shared memory: handing them over as pickled numpy arrays
    was 10% faster but let the main process's memory grow with the batch (682 -> 755 MiB from
    1,000 to 6,000 cases, against 691 -> 689 MiB)."""

    def __init__(self, source: CaseSource, reader, thumbnails: bool, group: int):
        self.source, self.reader, self.thumbnails, self.group = source, reader, thumbnails, group

    def __len__(self) -> int:
        return -(-len(self.source.query) // self.group)

    def __getitem__(self, index: int) -> "_ScanGroup":
        from medmeta.reports.thumbnails import oriented, thumbnail_png

        scans = []
        for path in self.source.query[index * self.group : (index + 1) * self.group]:
            scan = _read_scan(path, self.reader, self.source.relative, self.source.volumes)
            if scan.image is not None and self.thumbnails:
                scan.thumbnail = thumbnail_png(scan.image, oriented=oriented(scan.volume))
            scans.append(scan)
        read = [scan.image for scan in scans if scan.image is not None]
        for scan in scans:
            scan.image = None
        return _ScanGroup(scans, torch.stack(read) if read else None)


@dataclass
class _ScanGroup:
    """Scans read together, their images taken out: ``images`` ``(n_read, C, *spatial)`` holds
    those of the readable scans in order."""

    scans: list[QueryScan]
    images: torch.Tensor | None

    def unpack(self) -> list[QueryScan]:
        readable = iter(self.images if self.images is not None else ())
        for scan in self.scans:
            if scan.reason is None:
                scan.image = next(readable)
        return self.scans


def stream_queries(
    source: CaseSource, reader, chunk_cases: int | None = None, workers: int = 0, thumbnails: bool = False
) -> Iterator[list[QueryScan]]:
    """The readable cases of ``source`` in order, ``chunk_cases`` at a time (None: all in one
    list), read by ``workers`` processes ahead of the consumer (0: here). Each unreadable case
    is added to ``source.rejected`` as it is met. Raises :class:`CasesError` at the end when no
    case could be read. Memory holds at most a chunk plus the workers' read-ahead."""
    from medmeta.data.loading import make_loader

    workers = workers if len(source.query) > 1 else 0
    group = query_group(len(source.query), workers, _scan_bytes(source))
    groups = make_loader(_QueryGroups(source, reader, thumbnails, group), None, workers)
    chunk: list[QueryScan] = []
    n_read = 0
    for group in groups:
        for scan in group.unpack():
            if scan.reason is not None:
                source.rejected.append((scan.path, scan.reason))
                continue
            chunk.append(scan)
            n_read += 1
            if chunk_cases is not None and len(chunk) >= chunk_cases:
                yield chunk
                chunk = []
    if chunk:
        yield chunk
    if not n_read:
        what = "case(s)" if source.volumes else "case file(s)"
        raise CasesError(f"{source.root / 'query'}: none of the {len(source.query)} {what} could be read", source.rejected)


def _scan_bytes(source: CaseSource) -> int:
    """Bytes of one read case: a support scan's (every scan comes out in the same shape)."""
    image = source.support_images[0]
    return image.numel() * image.element_size()


def read_cases(cases_dir: str | Path, reader) -> CaseBatch:
    """Read ``cases_dir`` with ``reader`` whole: :func:`open_cases`, then every case in memory
    (:func:`stream_queries` reads them a chunk at a time instead). Stops with a
    :class:`CasesError` (carrying the rejected files) only when a condition has no readable
    support scan or no case can be read."""
    source = open_cases(cases_dir, reader)
    queries = [scan for chunk in stream_queries(source, reader) for scan in chunk]
    task = Task(source.support_images, source.support_labels, torch.stack([q.image for q in queries]), source.conditions)
    return CaseBatch(
        task, [q.path for q in queries], [q.sha256 for q in queries], source.support, source.rejected, source.notes,
        query_volumes=[q.volume for q in queries] if source.volumes else [],
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
