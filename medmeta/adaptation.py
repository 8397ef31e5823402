"""Adapting a trained model to a handful of labelled scans and diagnosing a batch of cases.

Cases folder layout::

    cases/
      support/<condition name>/<scans>     the labelled scans (any depth below the condition)
      query/<scans or patient folders>     the unlabelled cases to diagnose

Unreadable files are reported (``rejected.csv``) and skipped; one bad scan never stops a batch.

:func:`adapt` is short orchestration of :mod:`medmeta.pipeline`: read the cases, fit the
head to the support, calibrate (temperature from val or updated by the support), build the
conformal prediction sets, decide referrals. Besides temperature-scaled probabilities, every
case gets its prediction set (the conditions compatible with the scan at the target
coverage), a referral flag with its reasons (a set that is not a single condition, or a scan
far from the support scans), and, when every condition has at least two support scans, a
stability value: the largest change of any of its probabilities when one support scan is left
out. See ``docs/calibration.md``.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import medmeta
from medmeta.calibration import (
    DEFAULT_CALIBRATION_SOURCE,
    TEMPERATURE_PRIOR_SIGMA,
    check_conformal_source,
    check_temperature_source,
    expected_calibration_error,
)
from medmeta.leave_one_out import leave_one_out
from medmeta.pipeline import AdaptationPipeline, Diagnosis, LearnerHead, Task
from medmeta.pipeline.cases import CaseSource, cases_from_arrays, discover_cases, open_cases, read_labels, stream_queries
from medmeta.run import as_run

__all__ = ["AdaptResult", "CaseResult", "adapt", "adapt_arrays", "discover_cases", "read_labels", "score"]


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
    #: the preprocessed scan, kept when no thumbnail folder was given (else None: streamed)
    image: torch.Tensor | None = field(repr=False)
    label: str | None = None
    prediction_set: list[str] | None = None
    refer: bool = False
    refer_reason: str = ""
    stability_max_change: float | None = None
    #: a volume's stored shape, voxel spacing (mm) and orientation; ``None`` for an image
    volume: dict[str, Any] | None = None
    #: the thumbnail's path relative to the report folder, when written as the case was diagnosed
    thumbnail: str | None = None
    #: the support scans nearest the case, nearest first: ``(condition, index within the
    #: condition's support scans, distance)`` (see :attr:`medmeta.pipeline.head.Logits.nearest`);
    #: empty for a method that does not adapt on embeddings
    nearest_support: list[tuple[str, int, float]] = field(default_factory=list)
    #: occlusion saliency (:mod:`medmeta.pipeline.saliency`): the overlay's path relative to the
    #: report folder when written as the case was diagnosed, else the map ``(*spatial)`` kept;
    #: ``saliency_peak`` the largest fall of the predicted condition's log-odds (at the
    #: probabilities' temperature) that hiding one window causes. All None when switched off.
    saliency_thumbnail: str | None = None
    saliency: np.ndarray | None = field(default=None, repr=False)
    saliency_peak: float | None = None
    #: the identifying DICOM attributes the privacy policy allows (:mod:`medmeta.privacy`), read
    #: from the case's header; None for a case that is not DICOM or when none is allowed
    dicom: dict[str, str] | None = None
    #: the case's DICOM Structured Report relative to the report folder (``--dicom-sr``), or None
    sr: str | None = None


@dataclass
class AdaptResult:
    """A diagnosed batch: the conditions (support folder names), one :class:`CaseResult` per
    readable case, ``(path, reason)`` of every unreadable file, the support scans read per
    condition, run ``metadata`` (what report.json records), and with labels the ``metrics``
    of :func:`score` and the label paths that matched no case (``unmatched_labels``).
    ``probabilities`` is ``(n_cases, n_conditions)``, the cases' rows stacked."""

    conditions: list[str]
    cases: list[CaseResult]
    rejected: list[tuple[str, str]]
    support: dict[str, list[dict[str, str]]]
    metadata: dict[str, Any]
    metrics: dict[str, Any] | None = None
    probabilities: np.ndarray | None = field(default=None, repr=False)
    unmatched_labels: list[str] = field(default_factory=list)
    #: ``(n_support, C, *spatial)`` the support scans as read, in ``support``'s order, kept when
    #: no thumbnail folder was given (for a page with its images inline); else None
    support_images: torch.Tensor | None = field(default=None, repr=False)


def adapt(
    checkpoint,
    cases_dir: str | Path,
    labels: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
    stability: bool = True,
    conformal_source: str = DEFAULT_CALIBRATION_SOURCE,
    temperature_source: str = DEFAULT_CALIBRATION_SOURCE,
    prior_sigma: float = TEMPERATURE_PRIOR_SIGMA,
    max_pixels: int | None = None,
    allow_unfinished: bool = False,
    head: str | None = None,
    transductive: str | None = None,
    thumbnail_dir: str | Path | None = None,
    chunk_cases: int | None = None,
    workers: int | None = None,
    saliency: bool = True,
) -> AdaptResult:
    """Adapt to ``cases_dir/support`` and predict every case in ``cases_dir/query``.

    The cases are read by ``workers`` processes (None: one per core, at most 8) and diagnosed
    ``chunk_cases`` at a time (None: as many as fit in :data:`CHUNK_BYTES` of pixels, at most
    :data:`MAX_CHUNK_CASES`), so memory stays flat however many cases there are. With
    ``thumbnail_dir`` each case's thumbnail is written there (``NNNNNN.png``) as it is diagnosed
    and its pixels are dropped (``CaseResult.image`` is None); without it every case keeps its
    pixels. Results do not depend on the chunks: everything fitted is fitted on the support
    alone. A ``transductive`` refiner uses the whole batch together, so it reads every case
    into one chunk.

    ``head`` says what is fitted on the support (:mod:`medmeta.heads`): ``"method"`` (the
    trained method's own adaptation), ``"prototype"`` or ``"logistic"`` on the normalised
    embeddings; None: the checkpoint's default, chosen on val classes at training.
    ``transductive`` names a refiner (:mod:`medmeta.transductive`, e.g. ``"soft_kmeans"``) that
    uses the whole batch of cases to refine an embedding head's prediction.

    ``checkpoint`` is a run folder, ``NAME.json``/``NAME.safetensors``, or a
    :class:`~medmeta.run.LoadedRun` from :func:`medmeta.load_run` (loaded once, reused).
    With ``stability`` (and at least two support scans per condition) the support is refitted
    once per support scan, without it, to measure each case's leave-one-out stability.

    ``conformal_source`` says where the prediction sets' threshold comes from: ``"val"``, the
    one fitted on validation conditions and stored in the checkpoint; ``"support"``, one fitted
    on this support's own leave-one-out predictions (same score and coverage; needs two support
    scans per condition, else the sets are ``"mass"`` sets and a note says so; see
    :func:`medmeta.calibration.episode_conformal`); ``"mass"``, no threshold: the most probable
    conditions up to the target coverage of the calibrated probability
    (:class:`medmeta.calibration.ProbabilityMassSets`).

    ``temperature_source`` likewise: ``"val"``, the checkpoint's temperature; ``"support"``, the
    checkpoint's temperature updated by this support's leave-one-out predictions (prior spread
    ``prior_sigma`` in log temperature; see :class:`medmeta.calibration.SupportTemperature`);
    with one scan of some condition the checkpoint's is used and a note says so.

    With ``saliency`` each case gets an occlusion saliency map of its prediction
    (:mod:`medmeta.pipeline.saliency`; about 50 more backbone passes per 2D case), written as an
    overlay ``saliency/NNNNNN.png`` beside the thumbnails.

    ``max_pixels``: a scan whose header declares more pixels is rejected without being decoded
    (default :data:`medmeta.data.reading.MAX_PIXELS`; only when ``checkpoint`` is a path).
    ``allow_unfinished`` accepts a checkpoint whose training stopped before calibration.
    """
    options = _Options(batch_size, stability, conformal_source, temperature_source, prior_sigma, head, transductive, saliency)
    label_map = read_labels(labels) if labels else None  # a bad labels file fails before any work
    run = as_run(checkpoint, device, max_pixels=max_pixels, allow_unfinished=allow_unfinished)
    source = open_cases(cases_dir, run.reader)
    chunk = None if transductive else (chunk_cases or auto_chunk_cases(source.support_images[0]))
    chunks = _case_chunks(source, run.reader, chunk, workers, thumbnails=thumbnail_dir is not None)
    result = _diagnose(run, source, chunks, options, str(Path(cases_dir).resolve()), thumbnail_dir)
    if label_map is not None:
        _attach_labels(result, label_map)
    return result


def adapt_arrays(
    checkpoint,
    support: dict[str, Sequence[np.ndarray | torch.Tensor]],
    query: Sequence[np.ndarray | torch.Tensor],
    labels: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    device: str = "auto",
    **options: Any,
) -> AdaptResult:
    """:func:`adapt` on in-memory scans: ``support`` maps each condition to its images and
    ``query`` lists the cases (2D arrays or tensors ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``,
    preprocessed as files are); ``labels`` optionally gives each case's true condition (to
    score the batch), ``names`` how reports call the cases. ``options`` are :func:`adapt`'s
    (``stability``, ``conformal_source``, ``temperature_source``, ``prior_sigma``, ``batch_size``,
    ``head``, ``transductive``, ``saliency``); each case keeps its pixels and saliency map."""
    if labels is not None and len(labels) != len(query):
        raise medmeta.MedmetaError(f"{len(labels)} labels for {len(query)} cases")
    run = as_run(checkpoint, device)
    batch = cases_from_arrays(support, query, run.reader, names)
    task = batch.task
    source = CaseSource(task.support_images, task.support_labels, task.conditions, batch.support, [], [], [], Path("."))
    volumes = batch.query_volumes or [None] * len(batch.query_paths)
    chunk = _Chunk(batch.query_paths, batch.query_sha256, list(task.query_images), volumes)
    result = _diagnose(run, source, [chunk], _Options(**options), None, None)
    if labels is not None:
        _attach_labels(result, dict(zip(batch.query_paths, labels)))
    return result


@dataclass
class _Options:
    batch_size: int = 64
    stability: bool = True
    conformal_source: str = DEFAULT_CALIBRATION_SOURCE
    temperature_source: str = DEFAULT_CALIBRATION_SOURCE
    prior_sigma: float = TEMPERATURE_PRIOR_SIGMA
    head: str | None = None
    transductive: str | None = None
    saliency: bool = True

    def __post_init__(self) -> None:
        check_conformal_source(self.conformal_source)
        check_temperature_source(self.temperature_source)


#: Pixels (as float32 bytes) of the cases diagnosed together, and the most cases in a chunk.
CHUNK_BYTES = 64 << 20
MAX_CHUNK_CASES = 512


def auto_chunk_cases(scan: torch.Tensor) -> int:
    """Cases per chunk for scans shaped like ``scan``: :data:`CHUNK_BYTES` of them, at most
    :data:`MAX_CHUNK_CASES`."""
    return max(1, min(MAX_CHUNK_CASES, CHUNK_BYTES // (4 * scan.numel())))


@dataclass
class _Chunk:
    """Cases read together: their names, digests, ``(C, *spatial)`` images, volume records and
    thumbnails (PNG bytes, made where they were read; None when not asked for)."""

    paths: list[str]
    sha256: list[str]
    images: list[torch.Tensor]
    volumes: list[dict | None]
    thumbnails: list[bytes | None] | None = None


def _case_chunks(source: CaseSource, reader, chunk: int | None, workers: int | None, thumbnails: bool):
    """The cases of ``source`` as :class:`_Chunk` s of ``chunk`` cases (None: one), read by
    ``workers`` processes (None: one per core, at most 8), with their thumbnails if asked for."""
    from medmeta.data.loading import auto_decode_workers

    workers = auto_decode_workers() if workers is None else workers
    for scans in stream_queries(source, reader, chunk, workers, thumbnails=thumbnails):
        yield _Chunk([q.path for q in scans], [q.sha256 for q in scans], [q.image for q in scans], [q.volume for q in scans],
                     [q.thumbnail for q in scans])


def _diagnose(run, source: CaseSource, chunks, options: _Options, cases_dir: str | None, thumbnail_dir) -> AdaptResult:
    """Diagnose the cases chunk by chunk against the support of ``source``; with
    ``thumbnail_dir`` write each case's thumbnail (and saliency overlay) there and drop its
    pixels (and map)."""
    from medmeta.reports.thumbnails import oriented, saliency_png

    pipeline = AdaptationPipeline.from_run(
        run, options.temperature_source, options.conformal_source, options.prior_sigma, options.stability, options.batch_size,
        head=options.head, transductive=options.transductive,
    )
    pipeline.nearest = True
    pipeline.saliency = options.saliency
    conditions = source.conditions
    cases: list[CaseResult] = []
    probabilities: list[np.ndarray] = []
    diagnosis = None
    for chunk in chunks:
        task = Task(source.support_images, source.support_labels, torch.stack(chunk.images), conditions)
        diagnosis = pipeline(task)
        sets = diagnosis.sets.sets
        thumbnails = chunk.thumbnails or [None] * len(chunk.paths)
        nearest = _nearest_support(diagnosis.logits, source)
        saliency, peaks = diagnosis.saliency if diagnosis.saliency is not None else (None, None)
        for i, (path, digest, image, volume, png) in enumerate(
            zip(chunk.paths, chunk.sha256, chunk.images, chunk.volumes, thumbnails)
        ):
            p = diagnosis.probabilities.query[i]
            case = CaseResult(
                path=path, predicted=conditions[int(p.argmax())], probabilities=[float(x) for x in p], sha256=digest,
                distance=float(diagnosis.logits.distances[i]), image=image,
                prediction_set=[c for c, inside in zip(conditions, sets[i]) if inside] if sets is not None else None,
                refer=bool(diagnosis.referral.refer[i]), refer_reason=diagnosis.referral.reasons[i],
                stability_max_change=float(diagnosis.logits.max_change[i]) if diagnosis.logits.max_change is not None else None,
                volume=volume, nearest_support=nearest[i],
            )
            if saliency is not None:
                case.saliency, case.saliency_peak = saliency[i], float(peaks[i])
            if thumbnail_dir is not None:
                name = f"{len(cases):06d}.png"
                _write_thumbnail(Path(thumbnail_dir) / name, png)
                if case.saliency is not None:
                    overlay = saliency_png(image, case.saliency, oriented=oriented(volume))
                    _write_thumbnail(Path(thumbnail_dir) / "saliency" / name, overlay)
                    case.saliency_thumbnail, case.saliency = f"{Path(thumbnail_dir).name}/saliency/{name}", None
                case.thumbnail, case.image = f"{Path(thumbnail_dir).name}/{name}", None
            cases.append(case)
        probabilities.append(diagnosis.probabilities.query)
        del task, chunk
    assert diagnosis is not None  # stream_queries raises when no case could be read
    if thumbnail_dir is not None:
        _support_thumbnails(source, thumbnail_dir)
    metadata = _metadata(run, pipeline, source, diagnosis, options, cases_dir)
    return AdaptResult(
        list(conditions), cases, source.rejected, source.support, metadata, probabilities=np.concatenate(probabilities),
        support_images=None if thumbnail_dir is not None else source.support_images,
    )


def _nearest_support(logits, source: CaseSource) -> list[list[tuple[str, int, float]]]:
    """Per case, its nearest support scans as ``(condition, index among the condition's scans,
    distance)``; empty lists when the head named none."""
    if logits.nearest is None:
        return [[] for _ in range(len(logits.query))]
    place = [(condition, j) for condition in source.conditions for j in range(len(source.support[condition]))]
    return [
        [(*place[int(s)], float(d)) for s, d in zip(indices, distances)]
        for indices, distances in zip(logits.nearest, logits.nearest_distances)
    ]


def _support_thumbnails(source: CaseSource, thumbnail_dir) -> None:
    """Each support scan's thumbnail as the model saw it, a PNG file in ``thumbnail_dir/support/``;
    the scan's ``thumbnail`` key holds its path relative to the report folder."""
    from medmeta.reports.thumbnails import oriented, thumbnail_png

    scans = [scan for condition in source.conditions for scan in source.support[condition]]
    for index, (scan, image) in enumerate(zip(scans, source.support_images)):
        name = f"support/{index:04d}.png"
        _write_thumbnail(Path(thumbnail_dir) / name, thumbnail_png(image, oriented=oriented(scan.get("volume"))))
        scan["thumbnail"] = f"{Path(thumbnail_dir).name}/{name}"



def _write_thumbnail(path: Path, png: bytes) -> None:
    """A case's thumbnail file. Written plainly: it goes into the report's temporary folder,
    which replaces the report folder whole (:func:`medmeta.io.atomic_folder`) only once every
    file is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)


def _metadata(run, pipeline, batch: CaseSource, diagnosis: Diagnosis, options: _Options, cases_dir: str | None) -> dict[str, Any]:
    calibration, probs, sets = pipeline.calibration, diagnosis.probabilities, diagnosis.sets
    # the validation temperature for this support's shot (see CalibrationRecord.temperature_for)
    val_temperature = probs.val_temperature if probs.val_temperature is not None else calibration.temperature
    refits = len(batch.support_labels) if diagnosis.logits.max_change is not None else 0
    return {
        "medmeta_version": medmeta.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(run.checkpoint.path),
        "checkpoint_sha256": run.checkpoint.sha256,
        "method": run.method,
        "backbone": run.backbone,
        "head": pipeline.head_name,
        "transductive": pipeline.transductive,
        "embedding_normalisation": _normalisation(run, pipeline.head_name),
        "temperature": val_temperature,
        "temperature_source": probs.source,
        "support_temperature": probs.temperature if probs.source == "support" else None,
        "temperature_prior_sigma": options.prior_sigma if probs.source == "support" else None,
        "conformal": {**sets.predictor.to_dict(), "source": sets.source} if sets.predictor is not None else None,
        "referral": None
        if calibration.referral is None and sets.predictor is None
        else {
            # None when nothing is flagged on distance (no distance, no threshold, or share 0)
            "distance_threshold": calibration.referral.distance_threshold if calibration.referral is not None else None,
            "share": calibration.referral.share if calibration.referral is not None else None,
        },
        "stability": {
            "computed": diagnosis.logits.max_change is not None,
            "min_support_scans_per_condition": min(len(scans) for scans in batch.support.values()),
            "refits": refits,
        },
        "saliency": _saliency_settings(batch, probs.temperature, pipeline.transductive)
        if diagnosis.saliency is not None
        else None,
        "notes": calibration.notes(run.method) + _notes(batch, diagnosis, options, val_temperature),
        "validation_evidence": validation_evidence(calibration),
        "preprocessing": run.preprocessing.to_dict(),
        "cases_dir": cases_dir,
        "device": str(run.device),
    }


def _saliency_settings(source: CaseSource, temperature: float, transductive: str | None) -> dict[str, Any]:
    """How the saliency maps were made (report.json's ``metadata.saliency``)."""
    from medmeta.pipeline.saliency import occlusion_windows, window_size

    spatial = tuple(source.support_images.shape[2:])
    return {
        "method": "occlusion",
        "window": list(window_size(spatial)),
        "windows": len(occlusion_windows(spatial)),
        "step": [max(1, side // 2) for side in window_size(spatial)],
        "fill": "the window's own mean value, channel by channel",
        "measure": "fall of the predicted condition's log-odds against the others",
        "temperature": temperature,
        "head": "inductive (without the transductive refiner)" if transductive else "as adapted",
    }


def validation_evidence(calibration) -> dict[str, Any] | None:
    """What the checkpoint measured for this head on held-out episodes of its validation
    conditions (never the batch's own cases): accuracy, expected calibration error before and
    after temperature scaling, the prediction sets' coverage against their target and mean
    size, the share referred. ``None`` for a checkpoint that was never calibrated; a figure it
    did not record is ``None``."""
    if not calibration.fitted:
        return None
    evidence = calibration.conformal_evidence or {}
    return {
        "fitted_on": calibration.fitted_on,
        "n_bins": calibration.n_bins,
        "accuracy": calibration.accuracy_val,
        "ece_before_temperature": calibration.ece_before_val,
        "ece_after_temperature": calibration.ece_after_val,
        "target_coverage": calibration.conformal.coverage if calibration.conformal is not None else None,
        "coverage": evidence.get("coverage_val"),
        "mean_set_size": evidence.get("mean_set_size_val"),
        "n_calibration_cases": calibration.conformal.n_calibration_ if calibration.conformal is not None else None,
        "referral_rate": calibration.referral.referral_rate_val if calibration.referral is not None else None,
    }


def _normalisation(run, head: str) -> str:
    """How the head's embeddings were normalised: ``"method"`` for the method's own head."""
    if head == "method":
        return "method"
    normaliser = run.checkpoint.normaliser
    return normaliser.kind if normaliser is not None else "none"


def _notes(batch: CaseSource, diagnosis: Diagnosis, options: _Options, temperature: float) -> list[str]:
    """What the report must say about how this batch was calibrated and what was not computed."""
    n_support, notes = len(batch.support_labels), list(batch.notes)
    single = ", ".join(c for c, scans in batch.support.items() if len(scans) < 2)
    probs, sets = diagnosis.probabilities, diagnosis.sets
    if probs.source == "support":
        notes.append(
            f"Probabilities use the validation temperature {temperature:.3g} updated by this support's own "
            f"leave-one-out predictions ({n_support} scans; posterior temperature {probs.temperature:.3g}, "
            f"prior spread {options.prior_sigma:g} in log temperature)."
        )
    if sets.source == "support":
        notes.append(
            f"Prediction sets are calibrated on this support's own leave-one-out predictions "
            f"({n_support} scans, threshold {sets.predictor.threshold_:.3f}), not on the validation conditions."
        )
    if probs.fell_back:
        notes.append(
            f"Probabilities use the validation temperature {temperature:.3g}: updating it by the support needs two support scans "
            f"per condition and {single} have one."
        )
    if sets.fell_back:
        notes.append(
            f"Prediction sets hold the most probable conditions up to {100 * sets.predictor.coverage:.0f}% of the "
            f"calibrated probability, not a calibrated threshold: support calibration needs two support scans per "
            f"condition and {single} have one, and thresholds fitted on the validation conditions do not carry to new "
            "ones. They cover as well as the probabilities are calibrated."
        )
    if not options.stability:
        notes.append("Leave-one-out stability was not computed (switched off).")
    elif diagnosis.logits.max_change is None:
        notes.append(
            f"Leave-one-out stability was not computed: condition(s) {single} have a single support scan "
            "(leaving it out would remove the condition)."
        )
    return notes


def _attach_labels(result: AdaptResult, label_map: dict[str, str]) -> None:
    for case in result.cases:
        case.label = label_map.get(case.path)
    result.unmatched_labels = sorted(set(label_map) - {case.path for case in result.cases})
    result.metrics = score(result, result.probabilities)


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
    and support distances ``(n_query,)``, float64 on the CPU (the pipeline's head step)."""
    n_way = int(support_labels.max()) + 1
    task = Task(support_images, support_labels, query_images, [str(i) for i in range(n_way)])
    logits = LearnerHead(learner, device, batch_size)(task)
    return logits.query, logits.distances


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
