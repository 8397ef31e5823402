"""Temperature scaling (Guo et al. 2017), fitted across episodes of held-out conditions."""

from __future__ import annotations

import numpy as np
import torch
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
