"""The adaptation pipeline shared by ``adapt``, ``evaluate`` and validation during training.

One task (a labelled support and the cases to diagnose) goes through small named steps::

    read          cases folder / arrays  -> Task                  (medmeta.pipeline.task)
    head fit      Task                   -> Logits                (medmeta.pipeline.head)
    calibration   Logits                 -> Probabilities         (medmeta.pipeline.temperature)
    sets          Probabilities          -> PredictionSets        (medmeta.pipeline.sets)
    referral      sets + distances       -> Referral              (medmeta.pipeline.referral_step)

:class:`AdaptationPipeline` chains them and returns a :class:`Diagnosis`. A new head, a
transductive step or another reader is one new class with the same contract.
"""

from medmeta.pipeline.head import LearnerHead, Logits
from medmeta.pipeline.pipeline import AdaptationPipeline, Diagnosis
from medmeta.pipeline.referral_step import Referral, ReferralStep
from medmeta.pipeline.sets import PredictionSets, PredictionSetStep
from medmeta.pipeline.task import Task
from medmeta.pipeline.temperature import Probabilities, TemperatureStep

__all__ = [
    "AdaptationPipeline",
    "Diagnosis",
    "LearnerHead",
    "Logits",
    "PredictionSetStep",
    "PredictionSets",
    "Probabilities",
    "Referral",
    "ReferralStep",
    "Task",
    "TemperatureStep",
]
