"""medmeta: few-shot diagnosis of rare conditions by meta-learning on common ones."""

__version__ = "0.1.0"

from medmeta.errors import MedmetaError

__all__ = ["MedmetaError", "__version__"]
