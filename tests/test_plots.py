"""Evaluation figures: the reliability diagram shows each panel's ECE and no text on it overlaps
another (titles, axis labels, tick labels, legend), also with the long panel names evaluate uses."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medmeta.calibration import expected_calibration_error
from medmeta.calibration import risk_coverage_curve
from medmeta.reports.plots import reliability_diagram, reliability_figure, risk_coverage_figure


def _probs(seed: int, n: int = 300, way: int = 3, temperature: float = 1.0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(0, 2, (n, way)) / temperature
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _texts(fig):
    """Every non-empty visible text on the figure with its box in pixels."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [fig._suptitle] if fig._suptitle is not None else []
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
        texts += [t for t in ax.get_xticklabels() + ax.get_yticklabels()]
        if ax.get_legend() is not None:
            texts += ax.get_legend().get_texts()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text().strip()]


@pytest.mark.parametrize(
    "names, title",
    [
        (["before", "after temperature scaling (T = 0.564)"], "protonet on derm-rare, 600 3-way 5-shot test episodes"),
        (["before", "after support-updated T (val 0.564, mean 1.21)"], "maml on mri-new-modality, 600 4-way 1-shot test episodes"),
        (["one panel"], ""),
    ],
)
def test_reliability_diagram_text_does_not_overlap(names, title):
    labels = np.random.default_rng(9).integers(0, 3, 300)
    fig = reliability_figure({name: _probs(i, temperature=1 + 2 * i) for i, name in enumerate(names)}, labels, title=title)
    texts = _texts(fig)
    assert len(texts) > 20
    overlapping = [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(texts, 2) if box_a.overlaps(box_b)]
    assert overlapping == []


def test_each_panel_shows_its_ece(tmp_path):
    labels = np.random.default_rng(9).integers(0, 3, 300)
    probs = {"before": _probs(0), "after": _probs(0, temperature=3.0)}
    fig = reliability_figure(probs, labels)
    titles = [ax.get_title() for ax in fig.axes[:2]]
    for (name, p), shown in zip(probs.items(), titles):
        assert shown == f"{name}\nECE {expected_calibration_error(p, labels, n_bins=15):.3f}"
    assert reliability_diagram(tmp_path / "r.png", probs, labels).stat().st_size > 10_000


def test_risk_coverage_text_does_not_overlap():
    rng = np.random.default_rng(3)
    confidence, correct = rng.random(500), rng.random(500) < 0.7
    coverage, risk = risk_coverage_curve(confidence, correct)
    fig = risk_coverage_figure(coverage, risk, 0.123, title="maml on mri-new-modality, 600 4-way 1-shot test episodes")
    texts = _texts(fig)
    assert any(t == "AURC 0.123" for t, _ in texts)
    assert [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(texts, 2) if box_a.overlaps(box_b)] == []
