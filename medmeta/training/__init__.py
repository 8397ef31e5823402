"""Meta-training: backbone pre-training, episodic training, validation and calibration.

Modules: :mod:`.config` (``TrainConfig``, no torch), :mod:`.checks` (its validation),
:mod:`.config_file` (``--config`` YAML), :mod:`.names` (method/backbone names for help texts),
:mod:`.build` (the learner), :mod:`.loop` (``train``: the run and its phases),
:mod:`.pretrain`, :mod:`.episodic`, :mod:`.selection` (validation, best checkpoint),
:mod:`.resume` (``--resume`` state), :mod:`.calibration` (``fit_calibration``, ``recalibrate``).

``TrainConfig`` imports without torch; ``train`` and ``TrainResult`` load the loop (torch,
MONAI) on first use.
"""

from medmeta.training.config import ConfigError, TrainConfig

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "train"]


def __getattr__(name: str):
    if name in ("train", "TrainResult"):
        from medmeta.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'medmeta.training' has no attribute {name!r}")
