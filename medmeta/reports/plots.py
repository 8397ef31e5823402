"""Evaluation figures: reliability diagram and risk-coverage curve (matplotlib, Agg backend).

Each figure is written atomically as a PNG; nothing here opens a window.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from medmeta.calibration import expected_calibration_error, reliability_bins
from medmeta.io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def reliability_diagram(
    path: str | Path,
    probs: dict[str, np.ndarray],
    labels: np.ndarray,
    n_bins: int = 15,
    title: str = "",
) -> Path:
    """One panel per entry of ``probs`` (e.g. ``{"before": p, "after temperature scaling": q}``,
    each ``(n, n_way)``; ``labels`` ``(n,)``): accuracy per confidence bin against the diagonal,
    with the gap to the bin's mean confidence shaded, the panel's expected calibration error
    (ECE, ``n_bins`` bins) in its title, and the share of cases per bin below."""
    return _save(reliability_figure(probs, labels, n_bins, title), path)


def reliability_figure(probs: dict[str, np.ndarray], labels: np.ndarray, n_bins: int = 15, title: str = ""):
    """The figure of :func:`reliability_diagram`, not yet saved. Laid out by matplotlib's
    constrained layout with the y axes shared along each row (labelled once, on the left) and long
    panel names wrapped, so that no label overlaps another (tested)."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        2, len(probs), figsize=(4.6 * len(probs), 5.6), squeeze=False, gridspec_kw={"height_ratios": [3, 1]},
        sharex=True, sharey="row", layout="constrained",
    )
    for column, (name, p) in enumerate(probs.items()):
        bins = reliability_bins(p, labels, n_bins)
        ece = expected_calibration_error(p, labels, n_bins=n_bins)
        centres = (bins["edges"][:-1] + bins["edges"][1:]) / 2
        width = 1.0 / n_bins
        filled = bins["count"] > 0
        top, bottom = axes[0, column], axes[1, column]
        top.plot([0, 1], [0, 1], color="#888888", linestyle="--", linewidth=1, label="perfect calibration")
        top.bar(centres[filled], bins["accuracy"][filled], width=width, color="#3f7cbf", edgecolor="#1f4f8a", label="accuracy")
        gap = bins["confidence"][filled] - bins["accuracy"][filled]
        top.bar(
            centres[filled], gap, bottom=bins["accuracy"][filled], width=width, color="#e69500", alpha=0.45, label="gap to confidence"
        )
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_title(f"{textwrap.fill(name, 38)}\nECE {ece:.3f}", fontsize=10)
        bottom.bar(centres, bins["count"] / max(1.0, bins["count"].sum()), width=width, color="#8aa4bf")
        bottom.set_xlabel("confidence (largest probability)")
        if column == 0:
            top.set_ylabel("accuracy")
            top.legend(loc="upper left", fontsize=8)
            bottom.set_ylabel("share of cases")
    # room between one panel's edge tick labels and the next panel's, across and down
    fig.get_layout_engine().set(w_pad=0.08, wspace=0.06, h_pad=0.1, hspace=0.06)
    if title:
        fig.suptitle(textwrap.fill(title, 40 * len(probs)), fontsize=11)
    return fig


def risk_coverage_plot(path: str | Path, coverage: np.ndarray, risk: np.ndarray, aurc: float, title: str = "") -> Path:
    """Risk (error rate of the kept cases) against coverage (share kept, most confident first);
    ``coverage`` and ``risk`` ``(n,)`` from :func:`medmeta.calibration.risk_coverage_curve`."""
    return _save(risk_coverage_figure(coverage, risk, aurc, title), path)


def risk_coverage_figure(coverage: np.ndarray, risk: np.ndarray, aurc: float, title: str = ""):
    """The figure of :func:`risk_coverage_plot`, not yet saved (constrained layout, the title
    wrapped: no label overlaps another, tested)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 4.0), layout="constrained")
    ax.plot(coverage, risk, color="#1f4f8a", linewidth=1.5, label=f"AURC {aurc:.3f}")
    if len(risk):
        ax.axhline(risk[-1], color="#888888", linestyle="--", linewidth=1, label=f"error rate, all cases ({risk[-1]:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(0.05, float(np.max(risk)) * 1.05) if len(risk) else 1)
    ax.set_xlabel("coverage (share of cases kept, most confident first)")
    ax.set_ylabel("risk (error rate of kept cases)")
    ax.legend(loc="upper left", fontsize=8)
    if title:
        ax.set_title(textwrap.fill(title, 48), fontsize=10)
    return fig
