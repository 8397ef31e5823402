"""Temperature scaling (Guo et al. 2017), fitted across episodes of held-out conditions."""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import log_softmax, softmax
from torch.nn import functional as F


class TemperatureScaler:
    """Divides logits by one scalar ``temperature_`` that minimises the negative log-likelihood.

    Fitted on pooled query logits of validation-class episodes and carried, unchanged, to new
    conditions (this assumes validation and test conditions are exchangeable).

    Args:
        max_iter: L-BFGS iterations.
        bounds: the temperature is kept inside ``bounds`` (optimised in log space).
    """

    def __init__(self, max_iter: int = 200, bounds: tuple[float, float] = (1e-3, 1e4)):
        self.max_iter = max_iter
        self.bounds = bounds

    def fit(self, logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> "TemperatureScaler":
        """``logits`` ``(n, n_classes)``, ``labels`` ``(n,)``; returns self."""
        z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        # start from the scale of the logits so very sharp or very flat logits converge quickly
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=self.max_iter, line_search_fn="strong_wolfe")
        lo, hi = np.log(self.bounds[0]), np.log(self.bounds[1])

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(z / log_t.clamp(lo, hi).exp(), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        self.temperature_ = float(log_t.detach().clamp(lo, hi).exp())
        return self

    def transform(self, logits: np.ndarray | torch.Tensor):
        """Scaled logits, of the same type as given."""
        return logits / self.temperature_

    def predict_proba(self, logits: np.ndarray | torch.Tensor) -> np.ndarray:
        z = torch.as_tensor(np.asarray(logits), dtype=torch.float64) / self.temperature_
        return torch.softmax(z, dim=1).numpy()


# Default spread (standard deviation of log T) of the prior of a support-updated temperature.
TEMPERATURE_PRIOR_SIGMA = 0.5

# Where the temperature of an episode's (or an adaptation's) probabilities comes from.
TEMPERATURE_SOURCES = ("val", "support")


def check_temperature_source(source: str) -> str:
    """Refuse a temperature source outside :data:`TEMPERATURE_SOURCES` (a :class:`ValueError` naming it)."""
    if source not in TEMPERATURE_SOURCES:
        raise ValueError(f"temperature_source must be one of {', '.join(TEMPERATURE_SOURCES)}, got {source!r}")
    return source


class SupportTemperature:
    """The validation temperature updated by one episode's own support (Bayes' rule on ``log T``).

    The temperature that calibrates a model differs from one set of conditions to another (on
    derm-rare the best one for the rare conditions is 0.7 times the validation conditions'; on
    mri-new-modality 1.4 times), so a temperature fitted on validation conditions alone is only
    right when they resemble the new ones. The support of a new condition is labelled, and its
    leave-one-out predictions (each scan predicted from the others, see
    :mod:`medmeta.leave_one_out`) are out-of-sample predictions of exactly the new conditions,
    but a handful of them is too few to fit a temperature on: a support that happens to be
    perfectly separated asks for a temperature near zero. So the validation temperature is the
    prior and the support the evidence:

    - prior: ``log T ~ Normal(log prior_temperature, prior_sigma^2)``;
    - likelihood: ``prod_i softmax(z_i / T)[y_i]`` over the support's leave-one-out logits;
    - probabilities: the posterior average of ``softmax(z / T)`` (not the softmax at one
      temperature), on a grid over ``log T``.

    ``prior_sigma = 0`` keeps the validation temperature. The assumption moves from "validation
    and new conditions share a temperature" to "the new conditions' temperature is within a few
    ``prior_sigma`` (in log) of the validation one, and the support's leave-one-out predictions
    behave like the cases'"; see ``docs/calibration.md`` for the measured effect and limits.

    Args:
        prior_temperature: the validation temperature (the checkpoint's).
        prior_sigma: standard deviation of ``log T`` around it (0.5: a factor of 1.65).
        grid_size: points of the grid over ``log T``, which spans 5 ``prior_sigma`` either side.

    Attributes (after :meth:`fit`):
        log_temperatures_: ``(grid_size,)`` grid over ``log T``.
        weights_: ``(grid_size,)`` posterior probability of each grid point (sums to 1).
        temperature_: ``exp`` of the posterior mean of ``log T`` (a summary for reports).
    """

    def __init__(self, prior_temperature: float, prior_sigma: float = TEMPERATURE_PRIOR_SIGMA, grid_size: int = 201):
        self.prior_temperature = prior_temperature
        self.prior_sigma = prior_sigma
        self.grid_size = grid_size

    def fit(self, support_logits: np.ndarray, support_labels: np.ndarray) -> "SupportTemperature":
        """``support_logits`` ``(n_support, n_way)`` leave-one-out logits, ``support_labels``
        ``(n_support,)``; returns self."""
        if not self.prior_temperature > 0:
            raise ValueError(f"prior_temperature must be positive, got {self.prior_temperature}")
        if not self.prior_sigma >= 0:
            raise ValueError(f"prior_sigma must be >= 0, got {self.prior_sigma}")
        logits = np.asarray(support_logits, dtype=np.float64)
        labels = np.asarray(support_labels, dtype=np.int64)
        if logits.ndim != 2 or labels.shape != (len(logits),):
            raise ValueError(f"support logits {logits.shape} and labels {labels.shape} do not match")
        centre = np.log(self.prior_temperature)
        if self.prior_sigma == 0:
            self.log_temperatures_, self.weights_ = np.array([centre]), np.array([1.0])
        else:
            grid = centre + np.linspace(-5.0, 5.0, self.grid_size) * self.prior_sigma
            scaled = logits[None, :, :] / np.exp(grid)[:, None, None]  # (grid, n_support, n_way)
            log_probs = log_softmax(scaled, axis=2)
            log_post = log_probs[:, np.arange(len(labels)), labels].sum(axis=1) - 0.5 * ((grid - centre) / self.prior_sigma) ** 2
            weights = np.exp(log_post - log_post.max())
            self.log_temperatures_, self.weights_ = grid, weights / weights.sum()
        self.temperature_ = float(np.exp((self.weights_ * self.log_temperatures_).sum()))
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        """``(n, n_way)`` logits -> ``(n, n_way)`` posterior-averaged probabilities."""
        if not hasattr(self, "weights_"):
            raise RuntimeError("call fit before predict_proba")
        logits = np.asarray(logits, dtype=np.float64)
        keep = self.weights_ > 1e-12 * self.weights_.max()  # grid points that cannot matter are skipped
        weights = self.weights_[keep] / self.weights_[keep].sum()
        scaled = logits[None, :, :] / np.exp(self.log_temperatures_[keep])[:, None, None]
        return np.tensordot(weights, softmax(scaled, axis=2), axes=1)
