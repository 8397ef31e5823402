"""Adapting a trained model to a handful of labelled scans and diagnosing a batch of cases.

Cases folder layout::

    cases/
      support/<condition name>/<scans>     the labelled scans (any depth below the condition)
      query/<scans or patient folders>     the unlabelled cases to diagnose

Unreadable files are reported (``rejected.csv``) and skipped; one bad scan never stops a batch.
"""

from __future__ import annotations

import csv
import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import medmeta
from medmeta.calibration import expected_calibration_error, softmax
from medmeta.checkpoint import build_learner, load_checkpoint
from medmeta.data.reading import Preprocessing, ScanReader
from medmeta.device import resolve_device
from medmeta.errors import CasesError, ScanReadError
from medmeta.io import sha256_file


@dataclass
class CaseResult:
    """One diagnosed case. ``probabilities`` are temperature-scaled, in ``conditions`` order."""

    path: str
    predicted: str
    probabilities: list[float]
    sha256: str
    distance: float
    image: torch.Tensor = field(repr=False)
    label: str | None = None


@dataclass
class AdaptResult:
    conditions: list[str]
    cases: list[CaseResult]
    rejected: list[tuple[str, str]]
    support: dict[str, list[dict[str, str]]]
    metadata: dict[str, Any]
    metrics: dict[str, Any] | None = None


def _is_visible_file(path: Path, root: Path) -> bool:
    return path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)


def discover_cases(cases_dir: str | Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """``({condition: [support files]}, [query files])``, checking the layout."""
    root = Path(cases_dir)
    if not root.is_dir():
        raise CasesError(f"{root}: cases folder not found")
    support_dir, query_dir = root / "support", root / "query"
    if not support_dir.is_dir():
        raise CasesError(f"{root}: no 'support/' folder (expected support/<condition>/<scans>)")
    if not query_dir.is_dir():
        raise CasesError(f"{root}: no 'query/' folder with the cases to diagnose")
    support = {
        d.name: sorted(p for p in d.rglob("*") if _is_visible_file(p, d))
        for d in sorted(support_dir.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }
    empty = [name for name, files in support.items() if not files]
    if empty:
        raise CasesError(f"{support_dir}: condition folder(s) with no files: {', '.join(empty)}")
    if len(support) < 2:
        raise CasesError(f"{support_dir}: need at least 2 condition folders, found {len(support)}")
    query = sorted(p for p in query_dir.rglob("*") if _is_visible_file(p, query_dir))
    if not query:
        raise CasesError(f"{query_dir}: no cases to diagnose (the folder is empty)")
    return support, query


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


def adapt(
    checkpoint: str | Path,
    cases_dir: str | Path,
    labels: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
) -> AdaptResult:
    """Adapt to ``cases_dir/support`` and predict every case in ``cases_dir/query``."""
    root = Path(cases_dir)
    ckpt = load_checkpoint(checkpoint)
    learner = build_learner(ckpt)
    torch_device = resolve_device(device)
    learner.to(torch_device)
    preprocessing = Preprocessing.from_dict(ckpt.meta["preprocessing"])
    reader = ScanReader(preprocessing)
    support_files, query_files = discover_cases(root)
    label_map = read_labels(labels) if labels else {}

    rejected: list[tuple[str, str]] = []
    rel = lambda p: p.relative_to(root).as_posix()  # noqa: E731
    conditions = list(support_files)

    support_images, support_labels, support_info = [], [], {}
    for index, (condition, files) in enumerate(support_files.items()):
        support_info[condition] = []
        for path in files:
            try:
                image = reader(path)
            except ScanReadError as exc:
                rejected.append((rel(path), exc.reason))
                continue
            support_images.append(image)
            support_labels.append(index)
            support_info[condition].append({"path": rel(path), "sha256": sha256_file(path)})
    unusable = [c for c in conditions if not support_info[c]]
    if unusable:
        raise CasesError(f"{root / 'support'}: no readable scan for condition(s) {', '.join(unusable)}", rejected)

    queries: list[tuple[Path, torch.Tensor]] = []
    for path in query_files:
        try:
            queries.append((path, reader(path)))
        except ScanReadError as exc:
            rejected.append((rel(path), exc.reason))
    if not queries:
        raise CasesError(f"{root / 'query'}: none of the {len(query_files)} case file(s) could be read", rejected)

    temperature = ckpt.temperature
    learner.eval()
    with torch.no_grad():
        learner.fit_support(torch.stack(support_images).to(torch_device), torch.tensor(support_labels, device=torch_device))
        logits_parts, distance_parts = [], []
        for start in range(0, len(queries), batch_size):
            batch = torch.stack([img for _, img in queries[start : start + batch_size]]).to(torch_device)
            logits_parts.append(learner.predict_query(batch).double().cpu())
            distance_parts.append(learner.support_distance(batch).double().cpu())
    logits = torch.cat(logits_parts).numpy()
    distances = torch.cat(distance_parts).numpy()
    probs = softmax(logits / temperature)

    cases = [
        CaseResult(
            path=rel(path),
            predicted=conditions[int(p.argmax())],
            probabilities=[float(x) for x in p],
            sha256=sha256_file(path),
            distance=float(d),
            image=image,
            label=label_map.get(rel(path)),
        )
        for (path, image), p, d in zip(queries, probs, distances)
    ]
    metadata = {
        "medmeta_version": medmeta.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(ckpt.path),
        "checkpoint_sha256": ckpt.sha256,
        "method": ckpt.meta["method"]["name"],
        "backbone": ckpt.meta["backbone"]["name"],
        "temperature": temperature,
        "preprocessing": preprocessing.to_dict(),
        "cases_dir": str(root.resolve()),
        "device": str(torch_device),
    }
    result = AdaptResult(conditions, cases, rejected, support_info, metadata)
    if label_map:
        result.metrics = score(result, probs)
    return result


def score(result: AdaptResult, probs: np.ndarray) -> dict[str, Any]:
    """Accuracy and ECE (15 bins) over the cases that have a label naming a support condition."""
    index = {c: i for i, c in enumerate(result.conditions)}
    labelled = [(i, index[case.label]) for i, case in enumerate(result.cases) if case.label in index]
    unknown = sorted({case.label for case in result.cases if case.label is not None and case.label not in index})
    metrics: dict[str, Any] = {"n_labelled": len(labelled), "unknown_labels": unknown}
    if labelled:
        rows, targets = np.array([i for i, _ in labelled]), np.array([t for _, t in labelled])
        metrics["accuracy"] = float((probs[rows].argmax(1) == targets).mean())
        metrics["ece"] = expected_calibration_error(probs[rows], targets, n_bins=15)
    return metrics
