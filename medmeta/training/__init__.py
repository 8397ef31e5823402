"""Meta-training: backbone pre-training, episodic training, validation and calibration."""

from medmeta.training.config import TrainConfig
from medmeta.training.trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
