"""medmeta: few-shot diagnosis of rare conditions by meta-learning on common ones.

The Python API (see ``docs/api.md``)::

    from medmeta import adapt, adapt_arrays, evaluate, load_run, train, EvaluationSettings, TrainConfig

    result = train(TrainConfig(protocol="sample_data/protocol.yaml", out="runs/demo"))
    run = load_run("runs/demo")                       # checkpoint, learner, preprocessing, protocol
    batch = adapt(run, "sample_data/cases")           # a cases folder ...
    batch = adapt_arrays(run, {"a": [...], "b": [...]}, [...])   # ... or in-memory arrays

Importing ``medmeta`` is light: torch and MONAI load when one of these is first used.
"""

__version__ = "0.1.0"

from medmeta.errors import MedmetaError

# name -> module that defines it; loaded on first access (PEP 562) so `import medmeta` stays light
_LAZY = {
    "adapt": "medmeta.adaptation",
    "adapt_arrays": "medmeta.adaptation",
    "AdaptResult": "medmeta.adaptation",
    "evaluate": "medmeta.evaluation",
    "EvaluationSettings": "medmeta.evaluation",
    "EvaluationResult": "medmeta.evaluation",
    "load_run": "medmeta.run",
    "LoadedRun": "medmeta.run",
    "train": "medmeta.training",
    "TrainConfig": "medmeta.training",
    "TrainResult": "medmeta.training",
}
_ALIASES = {"evaluate": "evaluate_checkpoint"}

__all__ = ["MedmetaError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), _ALIASES.get(name, name))
        globals()[name] = value
        return value
    raise AttributeError(f"module 'medmeta' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
