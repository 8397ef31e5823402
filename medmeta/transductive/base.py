"""Common interface of the transductive refiners, shared helpers and the inductive baseline.

A *refiner* takes the embeddings of one episode (the labelled support cases and the unlabelled
batch of query cases) and returns one row of logits per query case. Transductive refiners use the
query batch itself, without its labels, to improve the classifier; :class:`InductivePrototypes`
does not look at the batch and is the baseline they are compared with.

Embeddings arrive already normalised by the caller (centred by a base mean, then L2-normalised,
as in SimpleShot). Refiners never move tensors between devices: every tensor they create has the
device and dtype of the inputs.
"""

from __future__ import annotations

import inspect
import operator
from abc import ABC, abstractmethod

import torch
from torch import Tensor
from torch.nn import functional as F


class TransductiveRefiner(ABC):
    """Base class of all refiners (scikit-learn style: ``__init__`` stores hyperparameters only).

    Subclasses set :attr:`name` and implement :meth:`_refine`. The public :meth:`refine` checks the
    episode, detaches the inputs (they are never modified and never receive a gradient) and calls
    :meth:`_refine` under ``torch.no_grad()``; a refiner that optimises its own parameters enables
    gradients locally for them only.
    """

    name: str = "base"

    def refine(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
        """Logits of the query cases.

        Args:
            support: ``(n_support, d)`` float32 or float64 support embeddings.
            support_labels: ``(n_support,)`` integer labels in ``[0, n_way)``; every class present.
            query: ``(n_query, d)`` query embeddings, same dtype and device as ``support``.
            n_way: number of classes.

        Returns:
            ``(n_query, n_way)`` logits (the predicted class is their argmax; the scale differs
            between refiners, so calibrate a temperature per refiner), on the inputs' device and
            dtype, without gradient history. ``n_query == 0`` gives an empty ``(0, n_way)`` tensor.
        """
        support, support_labels, query, n_way = check_episode(support, support_labels, query, n_way)
        if query.shape[0] == 0:
            return support.new_zeros((0, n_way))
        with torch.no_grad():
            logits = self._refine(support.detach(), support_labels, query.detach(), n_way)
        return logits.detach()

    @abstractmethod
    def _refine(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
        """Checked, detached episode -> ``(n_query, n_way)`` logits (called under ``no_grad``)."""

    def get_params(self) -> dict:
        """The hyperparameters, as passed to ``__init__`` (scikit-learn's convention)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {p: getattr(self, p) for p in names}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


class InductivePrototypes(TransductiveRefiner):
    """Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017
    (with the normalised features of Wang et al., "SimpleShot", arXiv 2019).

    The inductive baseline: each class is the mean of its support embeddings and a query's logit
    for a class is minus its squared Euclidean distance to that mean. The query batch is not used,
    so every case is diagnosed as if it were alone.
    """

    name = "inductive"

    def __init__(self):
        pass

    def _refine(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
        prototypes = class_means(support, support_labels, n_way)  # (n_way, d)
        return -squared_distances(query, prototypes)


# ----------------------------------------------------------------------------------------------
# helpers


def check_episode(support: Tensor, support_labels: Tensor, query: Tensor, n_way: int):
    """Validate one episode; returns ``(support, support_labels as int64, query, n_way)``.

    Raises ``ValueError`` (or ``TypeError`` for wrong types) naming the problem.
    """
    for name, t in (("support", support), ("support_labels", support_labels), ("query", query)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    try:
        n_way_int = operator.index(n_way)  # ints, numpy integers, 0-d integer tensors
    except TypeError:
        n_way_int = None
    if isinstance(n_way, bool) or n_way_int is None or n_way_int < 1:
        raise ValueError(f"n_way must be a positive int, got {n_way!r}")
    n_way = n_way_int
    if support.ndim != 2 or query.ndim != 2:
        raise ValueError(
            f"support and query must be 2-D (n, d), got shapes {tuple(support.shape)} and {tuple(query.shape)}"
        )
    if support.shape[1] != query.shape[1]:
        raise ValueError(f"support and query dimensions differ: {support.shape[1]} != {query.shape[1]}")
    if not support.is_floating_point() or support.dtype != query.dtype:
        raise ValueError(f"support and query must share one floating dtype, got {support.dtype} and {query.dtype}")
    if support.device != query.device or support_labels.device != support.device:
        raise ValueError(
            f"support, support_labels and query must be on one device, got {support.device}, "
            f"{support_labels.device} and {query.device}"
        )
    if support_labels.ndim != 1 or support_labels.shape[0] != support.shape[0]:
        raise ValueError(
            f"support_labels must have shape ({support.shape[0]},), got {tuple(support_labels.shape)}"
        )
    if support_labels.dtype == torch.bool or support_labels.is_floating_point() or support_labels.is_complex():
        raise ValueError(f"support_labels must be integers, got {support_labels.dtype}")
    labels = support_labels.long()
    if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= n_way:
        raise ValueError(f"support_labels must lie in [0, {n_way}) and not be empty")
    counts = torch.bincount(labels, minlength=n_way)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"every class needs at least one support case; missing: {missing}")
    if not bool(torch.isfinite(support).all()) or not bool(torch.isfinite(query).all()):
        raise ValueError("support and query embeddings must be finite")
    return support, labels, query, n_way


def one_hot(labels: Tensor, n_way: int, like: Tensor) -> Tensor:
    """``(n,)`` int labels -> ``(n, n_way)`` one-hot with ``like``'s dtype and device."""
    return F.one_hot(labels, n_way).to(dtype=like.dtype, device=like.device)


def class_means(x: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """``(n, d)`` embeddings and ``(n,)`` labels -> ``(n_way, d)`` class means (every class present)."""
    oh = one_hot(labels, n_way, x)  # (n, n_way)
    return (oh.T @ x) / oh.sum(0).unsqueeze(1)


def squared_distances(x: Tensor, centres: Tensor) -> Tensor:
    """``(n, d)`` and ``(k, d)`` -> ``(n, k)`` squared Euclidean distances (clamped at 0)."""
    d2 = (x * x).sum(1, keepdim=True) - 2.0 * (x @ centres.T) + (centres * centres).sum(1).unsqueeze(0)
    return d2.clamp_min(0.0)


def cosine_similarity(x: Tensor, centres: Tensor) -> Tensor:
    """``(n, d)`` and ``(k, d)`` -> ``(n, k)`` cosine similarities (zero vectors give 0)."""
    return F.normalize(x, dim=1) @ F.normalize(centres, dim=1).T


def shots(labels: Tensor, n_way: int) -> int:
    """Smallest number of support cases of a class."""
    return int(torch.bincount(labels, minlength=n_way).min())
