"""Writing an evaluation: results JSON, reliability diagram and risk-coverage curve."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from medmeta.io import atomic_write_json, json_safe

if TYPE_CHECKING:
    from medmeta.evaluation import EvaluationResult


def write_evaluation(result: "EvaluationResult", out_dir: str | Path) -> dict[str, Path]:
    """Write ``evaluation_<tag>.json``, ``reliability_<tag>.png`` and ``risk_coverage_<tag>.png``
    into ``out_dir`` (each atomically; ``tag`` is :attr:`EvaluationResult.tag`); sets
    ``result.figures`` and returns the paths."""
    from medmeta.calibration import risk_coverage_curve
    from medmeta.reports.plots import reliability_diagram, risk_coverage_plot

    out, tag, s = Path(out_dir), result.tag, result.settings
    title = f"{result.method} on {result.protocol}, {s.episodes} {s.way}-way {s.shot}-shot test episodes"
    probs, labels = result.probabilities_after, result.labels
    paths = {"reliability": out / f"reliability_{tag}.png", "risk_coverage": out / f"risk_coverage_{tag}.png"}
    reliability_diagram(
        paths["reliability"], {"before": result.probabilities_before, after_label(result): probs}, labels, title=title
    )
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    risk_coverage_plot(paths["risk_coverage"], *risk_coverage_curve(confidence, correct), result.summary.aurc, title=title)
    result.figures = {name: path.name for name, path in paths.items()}
    paths["json"] = out / f"evaluation_{tag}.json"
    atomic_write_json(paths["json"], json_safe(result.to_dict()))
    return paths


def after_label(result: "EvaluationResult") -> str:
    """Legend of the calibrated curve in the reliability diagram."""
    summary = result.summary
    if summary.temperature_source == "support":
        return f"after support-updated T (val {summary.temperature:.3g}, mean {summary.support_temperature_mean:.3g})"
    return f"after temperature scaling (T = {summary.temperature:.3g})"
