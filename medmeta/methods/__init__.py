"""Few-shot meta-learners behind one interface (:class:`MetaLearner`), built by name."""

from medmeta.methods import maml, mann, matching, protonet  # noqa: F401  (registration)
from medmeta.methods.base import MetaLearner
from medmeta.methods.registry import create_method, list_methods, register_method

__all__ = ["MetaLearner", "create_method", "list_methods", "register_method"]
