"""The documented Python API: ``docs/api.md``'s example runs as written, and ``import medmeta`` is light."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _example() -> str:
    text = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "docs/api.md should hold one runnable example"
    return blocks[0]


@pytest.mark.slow
def test_the_documented_example_runs(monkeypatch):
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    exec(compile(_example(), "docs/api.md", "exec"), namespace)
    batch, result, evaluation = namespace["batch"], namespace["result"], namespace["evaluation"]
    assert len(batch.cases) == 30 and batch.metrics["n_labelled"] == 30
    assert [c.path for c in result.cases] == ["patient-a", "patient-b"]
    assert result.conditions == ["disc", "square"] and result.probabilities.shape == (2, 2)
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-9)
    assert result.metrics["n_labelled"] == 2
    assert evaluation.summary.episodes == 10 and evaluation.settings.shot == 5
    assert 0.0 <= evaluation.summary.accuracy <= 1.0


def test_public_names_and_a_light_import():
    code = (
        "import sys, medmeta\n"
        "assert 'torch' not in sys.modules and 'monai' not in sys.modules\n"
        "from medmeta import adapt, adapt_arrays, evaluate, load_run, train, TrainConfig, EvaluationSettings\n"
        "from medmeta.adaptation import adapt as a\n"
        "from medmeta.evaluation import evaluate_checkpoint as e\n"
        "assert adapt is a and evaluate is e and callable(load_run) and callable(train)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_arrays_need_two_conditions_and_one_label_per_case(trained_run):
    from medmeta import MedmetaError, adapt_arrays

    image = np.random.default_rng(0).random((32, 32))
    with pytest.raises(MedmetaError, match="at least 2 conditions"):
        adapt_arrays(trained_run, {"a": [image]}, [image], device="cpu")
    with pytest.raises(MedmetaError, match="2 labels for 1 cases"):
        adapt_arrays(trained_run, {"a": [image], "b": [image]}, [image], labels=["a", "b"], device="cpu")


def test_the_cli_copies_of_library_constants_agree():
    """The command modules keep torch-free copies of two constants (for a fast --help)."""
    from medmeta.calibration import CONFORMAL_SOURCES, DEFAULT_CALIBRATION_SOURCE, TEMPERATURE_PRIOR_SIGMA
    from medmeta.cli import adapt
    from medmeta.data.reading import MAX_PIXELS

    assert adapt.TEMPERATURE_PRIOR_SIGMA == TEMPERATURE_PRIOR_SIGMA and adapt.CONFORMAL_SOURCES == CONFORMAL_SOURCES
    assert adapt.DEFAULT_SOURCE == DEFAULT_CALIBRATION_SOURCE
    assert adapt.MAX_PIXELS == MAX_PIXELS
