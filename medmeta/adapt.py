"""Adapting a trained model to a handful of labelled scans and diagnosing a batch of cases.

Cases folder layout::

    cases/
      support/<condition name>/<scans>     the labelled scans (any depth below the condition)
      query/<scans or patient folders>     the unlabelled cases to diagnose

Unreadable files are reported (``rejected.csv``) and skipped; one bad scan never stops a batch.

Besides temperature-scaled probabilities, every case gets the conformal prediction set stored
in the checkpoint (the conditions compatible with the scan at the target coverage), a referral
flag with its reasons (a set that is not a single condition, or a scan far from the support
scans), and, when every condition has at least two support scans, a stability value: the
largest change of any of its probabilities when one support scan is left out. See
``docs/calibration.md``.
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
from medmeta.calibration import (
    TEMPERATURE_PRIOR_SIGMA,
    SupportTemperature,
    check_conformal_source,
    check_temperature_source,
    episode_conformal,
    expected_calibration_error,
    referral,
    softmax,
)
from medmeta.checkpoint import build_learner, load_checkpoint
from medmeta.data.reading import Preprocessing, ScanReader
from medmeta.device import resolve_device
from medmeta.errors import CasesError, ScanReadError
from medmeta.io import sha256_file
from medmeta.leave_one_out import has_two_per_class, leave_one_out


@dataclass
class CaseResult:
    """One diagnosed case. ``probabilities`` are temperature-scaled, in ``conditions`` order.

    ``prediction_set`` is None when the checkpoint has no conformal calibration;
    ``stability_max_change`` is None when some condition has a single support scan (or the
    check was switched off)."""

    path: str
    predicted: str
    probabilities: list[float]
    sha256: str
    distance: float
    image: torch.Tensor = field(repr=False)
    label: str | None = None
    prediction_set: list[str] | None = None
    refer: bool = False
    refer_reason: str = ""
    stability_max_change: float | None = None


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
    stability: bool = True,
    conformal_source: str = "val",
    temperature_source: str = "val",
    prior_sigma: float = TEMPERATURE_PRIOR_SIGMA,
) -> AdaptResult:
    """Adapt to ``cases_dir/support`` and predict every case in ``cases_dir/query``.

    With ``stability`` (and at least two support scans per condition) the support is refitted
    once per support scan, without it, to measure each case's leave-one-out stability.

    ``conformal_source`` says where the prediction sets' threshold comes from: ``"val"``, the
    one fitted on validation conditions and stored in the checkpoint; ``"support"``, one fitted
    on this support's own leave-one-out predictions (same score and coverage; needs two support
    scans per condition, else the checkpoint's is used and a note says so; see
    :func:`medmeta.calibration.episode_conformal`).

    ``temperature_source`` likewise: ``"val"``, the checkpoint's temperature; ``"support"``, the
    checkpoint's temperature updated by this support's leave-one-out predictions (prior spread
    ``prior_sigma`` in log temperature; see :class:`medmeta.calibration.SupportTemperature`);
    with one scan of some condition the checkpoint's is used and a note says so.
    """
    check_conformal_source(conformal_source)
    check_temperature_source(temperature_source)
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
    support_x, support_y = torch.stack(support_images), torch.tensor(support_labels)
    query_x = torch.stack([img for _, img in queries])
    learner.eval()
    logits, distances = predict_cases(learner, support_x, support_y, query_x, torch_device, batch_size)
    probs = softmax(logits / temperature)

    conformal, distance_threshold = ckpt.conformal, ckpt.distance_threshold
    notes = ckpt.calibration_notes()
    min_support = min(len(support_info[c]) for c in conditions)
    single = [c for c in conditions if len(support_info[c]) < 2]
    wants_support_sets = conformal_source == "support" and conformal is not None
    wants_support_temperature = temperature_source == "support"
    sets_source, temperature_used, support_temperature = "val", "val", None
    changes: np.ndarray | None = None
    if (stability or wants_support_sets or wants_support_temperature) and has_two_per_class(support_y):
        loo = leave_one_out(
            learner, support_x, support_y, query_x if stability else None, temperature, torch_device, batch_size
        )
        changes = loo.max_change
        support_probs = softmax(loo.support_logits / temperature)
        if wants_support_temperature:
            fitted = SupportTemperature(temperature, prior_sigma).fit(loo.support_logits, support_y.numpy())
            probs, support_probs = fitted.predict_proba(logits), fitted.predict_proba(loo.support_logits)
            temperature_used, support_temperature = "support", fitted.temperature_
            notes.append(
                f"Probabilities use the validation temperature {temperature:.3g} updated by this support's own "
                f"leave-one-out predictions ({len(support_y)} scans; posterior temperature {fitted.temperature_:.3g}, "
                f"prior spread {prior_sigma:g} in log temperature)."
            )
        if wants_support_sets:
            conformal = episode_conformal(conformal, support_probs, support_y.numpy())
            sets_source = "support"
            notes.append(
                f"Prediction sets are calibrated on this support's own leave-one-out predictions "
                f"({len(support_y)} scans, threshold {conformal.threshold_:.3f}), not on the validation conditions."
            )
    elif wants_support_temperature:
        notes.append(
            f"Probabilities use the validation temperature: updating it by the support needs two support scans "
            f"per condition and {', '.join(single)} have one."
        )
    if wants_support_sets and sets_source == "val":
        notes.append(
            f"Prediction sets use the validation-calibrated threshold: support calibration needs two support scans "
            f"per condition and {', '.join(single)} have one."
        )
    if not stability:
        notes.append("Leave-one-out stability was not computed (switched off).")
    elif changes is None:
        notes.append(
            f"Leave-one-out stability was not computed: condition(s) {', '.join(single)} have a single support scan "
            "(leaving it out would remove the condition)."
        )
    sets = conformal.predict_sets(probs) if conformal is not None else None
    refer, reasons = referral(sets, distances, distance_threshold, conditions)

    cases = [
        CaseResult(
            path=rel(path),
            predicted=conditions[int(p.argmax())],
            probabilities=[float(x) for x in p],
            sha256=sha256_file(path),
            distance=float(d),
            image=image,
            label=label_map.get(rel(path)),
            prediction_set=[c for c, inside in zip(conditions, sets[i]) if inside] if sets is not None else None,
            refer=bool(refer[i]),
            refer_reason=reasons[i],
            stability_max_change=float(changes[i]) if changes is not None else None,
        )
        for i, ((path, image), p, d) in enumerate(zip(queries, probs, distances))
    ]
    metadata = {
        "medmeta_version": medmeta.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(ckpt.path),
        "checkpoint_sha256": ckpt.sha256,
        "method": ckpt.meta["method"]["name"],
        "backbone": ckpt.meta["backbone"]["name"],
        "temperature": temperature,
        "temperature_source": temperature_used,
        "support_temperature": support_temperature,
        "temperature_prior_sigma": prior_sigma if temperature_used == "support" else None,
        "conformal": {**conformal.to_dict(), "source": sets_source} if conformal is not None else None,
        "referral": None
        if distance_threshold is None and conformal is None
        else {
            # None when nothing is flagged on distance (no distance, no threshold, or share 0)
            "distance_threshold": distance_threshold if distance_threshold is not None and np.isfinite(distance_threshold) else None,
            "share": ckpt.meta.get("calibration", {}).get("referral", {}).get("share"),
        },
        "stability": {
            "computed": changes is not None,
            "min_support_scans_per_condition": min_support,
            "refits": len(support_labels) if changes is not None else 0,
        },
        "notes": notes,
        "preprocessing": preprocessing.to_dict(),
        "cases_dir": str(root.resolve()),
        "device": str(torch_device),
    }
    result = AdaptResult(conditions, cases, rejected, support_info, metadata)
    if label_map:
        result.metrics = score(result, probs)
    return result


@torch.no_grad()
def predict_cases(
    learner,
    support_images: torch.Tensor,
    support_labels: torch.Tensor,
    query_images: torch.Tensor,
    device: torch.device,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit ``learner`` to the support (``(n_support, C, H, W)`` images, ``(n_support,)`` labels)
    and predict ``query_images`` ``(n_query, C, H, W)`` in batches: logits ``(n_query, n_way)``
    and support distances ``(n_query,)``, float64 on the CPU."""
    learner.fit_support(support_images.to(device), support_labels.to(device))
    logits_parts, distance_parts = [], []
    for start in range(0, len(query_images), batch_size):
        batch = query_images[start : start + batch_size].to(device)
        logits_parts.append(learner.predict_query(batch).double().cpu())
        distance_parts.append(learner.support_distance(batch).double().cpu())
    return torch.cat(logits_parts).numpy(), torch.cat(distance_parts).numpy()


def leave_one_out_stability(
    learner,
    support_images: torch.Tensor,
    support_labels: torch.Tensor,
    query_images: torch.Tensor,
    temperature: float = 1.0,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> np.ndarray:
    """``(n_query,)``: for each query, the largest absolute change of any temperature-scaled class
    probability when one support scan is left out (see :func:`medmeta.leave_one_out.leave_one_out`;
    at least two support scans per class). The learner is left fitted to the last refit."""
    return leave_one_out(learner, support_images, support_labels, query_images, temperature, device, batch_size).max_change


def score(result: AdaptResult, probs: np.ndarray) -> dict[str, Any]:
    """Accuracy and ECE (15 bins) over the cases that have a label naming a support condition;
    with prediction sets, their coverage and mean size; the referral rate and the accuracy of
    the cases not referred."""
    index = {c: i for i, c in enumerate(result.conditions)}
    labelled = [(i, index[case.label]) for i, case in enumerate(result.cases) if case.label in index]
    unknown = sorted({case.label for case in result.cases if case.label is not None and case.label not in index})
    metrics: dict[str, Any] = {"n_labelled": len(labelled), "unknown_labels": unknown}
    if labelled:
        rows, targets = np.array([i for i, _ in labelled]), np.array([t for _, t in labelled])
        metrics["accuracy"] = float((probs[rows].argmax(1) == targets).mean())
        metrics["ece"] = expected_calibration_error(probs[rows], targets, n_bins=15)
        cases = [result.cases[i] for i in rows]
        if all(case.prediction_set is not None for case in cases):
            metrics["coverage"] = float(np.mean([case.label in case.prediction_set for case in cases]))
            metrics["mean_set_size"] = float(np.mean([len(case.prediction_set) for case in cases]))
        kept = [case for case in cases if not case.refer]
        metrics["referral_rate"] = 1.0 - len(kept) / len(cases)
        metrics["accuracy_not_referred"] = float(np.mean([case.predicted == case.label for case in kept])) if kept else None
    return metrics
