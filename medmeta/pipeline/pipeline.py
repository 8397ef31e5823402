"""The steps chained: one task in, one :class:`Diagnosis` out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medmeta.calibration import TEMPERATURE_PRIOR_SIGMA
from medmeta.pipeline.head import LearnerHead, Logits
from medmeta.pipeline.referral_step import Referral, ReferralStep
from medmeta.pipeline.saliency import saliency_maps
from medmeta.pipeline.sets import PredictionSets, PredictionSetStep
from medmeta.pipeline.task import Task
from medmeta.pipeline.temperature import Probabilities, TemperatureStep


@dataclass
class Diagnosis:
    """Everything the pipeline decided about one task's cases, step by step."""

    conditions: list[str]
    logits: Logits
    probabilities: Probabilities
    sets: PredictionSets
    referral: Referral
    #: ``(maps (n_query, *spatial), peaks (n_query,))``: each case's occlusion saliency at the
    #: probabilities' temperature (:func:`~medmeta.pipeline.saliency.saliency_maps`), or None
    saliency: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def predicted(self) -> np.ndarray:
        """``(n_query,)`` index of each case's most probable condition."""
        return self.probabilities.query.argmax(1)


class AdaptationPipeline:
    """head -> temperature -> sets -> referral.

    ``stability`` asks the head for each case's leave-one-out stability (``adapt``); held-out
    support logits are asked for when a step needs them (support-calibrated temperature or
    sets). Build one from a loaded run with :meth:`from_run`.
    """

    def __init__(
        self,
        head: LearnerHead,
        temperature: TemperatureStep,
        sets: PredictionSetStep,
        referral: ReferralStep,
        stability: bool = False,
        head_name: str = "method",
        calibration=None,
    ):
        self.head = head
        self.temperature = temperature
        self.sets = sets
        self.referral = referral
        self.stability = stability
        #: which head (``--head``) adapts, and the :class:`~medmeta.calibration.CalibrationRecord` of it
        self.head_name = head_name
        self.calibration = calibration
        #: the transductive refiner's name (``--transductive``), or None
        self.transductive: str | None = None
        #: ask the head for each case's nearest support scans (``adapt``'s reports show them)
        self.nearest = False
        #: ask the head for each case's occlusion saliency (``adapt``'s reports overlay it)
        self.saliency = False

    @classmethod
    def from_run(
        cls,
        run,
        temperature_source: str = "val",
        conformal_source: str = "val",
        prior_sigma: float = TEMPERATURE_PRIOR_SIGMA,
        stability: bool = False,
        batch_size: int | None = 64,
        head: str | None = None,
        transductive: str | None = None,
    ) -> "AdaptationPipeline":
        """The pipeline of a :class:`~medmeta.run.LoadedRun` with ``head`` (None: the
        checkpoint's default head), optionally refined transductively over each task's whole
        batch of cases, and the calibration its checkpoint stores for that combination."""
        head = head or run.default_head
        learner = run.head_learner(head, transductive)
        calibration = run.calibration_for(head, transductive)
        pipeline = cls(
            LearnerHead(learner, run.device, None if transductive else batch_size),
            TemperatureStep(calibration.temperature, temperature_source, prior_sigma, by_shot=calibration.temperatures_by_shot()),
            PredictionSetStep(calibration.conformal, conformal_source),
            ReferralStep(calibration.distance_threshold),
            stability=stability,
            head_name=head,
            calibration=calibration,
        )
        pipeline.transductive = transductive
        return pipeline

    @property
    def needs_held_out(self) -> bool:
        return self.temperature.needs_held_out or self.sets.needs_held_out

    def __call__(self, task: Task) -> Diagnosis:
        logits = self.head(
            task, held_out=self.needs_held_out, stability=self.stability, temperature=self.temperature.temperature, nearest=self.nearest,
            saliency=self.saliency,
        )
        return self.finish(task, logits)

    def finish(self, task: Task, logits: Logits) -> Diagnosis:
        """The steps after the head, for logits computed already."""
        support_labels = task.support_labels.cpu().numpy()
        probs = self.temperature(logits, support_labels)
        sets = self.sets(probs, support_labels)
        referral = self.referral(sets.sets, logits.distances, task.conditions)
        saliency = None
        if logits.occlusion is not None:
            saliency = saliency_maps(logits.occlusion, probs.query.argmax(1), probs.temperature)
        return Diagnosis(list(task.conditions), logits, probs, sets, referral, saliency)
