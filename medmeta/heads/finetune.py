"""Fine-tuning the backbone's last block(s) and a prototype-initialised classifier on the support."""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from medmeta.heads.base import BackboneHead
from medmeta.heads.normalise import EmbeddingNormaliser
from medmeta.heads.registry import register_head
from medmeta.methods.protonet import compute_prototypes, squared_distances

#: The step counts and learning rates tried when the head is tuned on val episodes
#: (:func:`medmeta.training.head_tuning.tune_finetune`); ``0`` steps is the untuned classifier.
STEPS_GRID = (0, 10, 25, 50)
LR_GRID = (1e-4, 5e-4, 2e-3)
#: The frozen-part outputs a fine-tuning learner keeps (scan views), at most.
MAX_CACHED_VIEWS = 4096


def _content_key(image: torch.Tensor) -> int:
    """A 63-bit key of a scan's pixels (seeds its views and names its cached outputs)."""
    import hashlib

    digest = hashlib.blake2b(image.detach().cpu().contiguous().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def split_backbone(backbone: nn.Module, blocks: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module]:
    """``(trunk, tail)`` with ``backbone(x) == tail(trunk(x))``: ``tail`` holds the last
    ``blocks`` stages and the pooling, so only its weights are fine-tuned. A backbone without
    :meth:`stages` (a ``torchvision:``/``timm:`` model) is fine-tuned whole: the trunk is the
    identity."""
    if not hasattr(backbone, "stages"):
        return (lambda x: x), backbone
    stages = backbone.stages()
    blocks = max(1, min(int(blocks), len(stages)))
    frozen, tuned = stages[: len(stages) - blocks], stages[len(stages) - blocks :]

    def trunk(x: torch.Tensor) -> torch.Tensor:
        for stage in frozen:
            x = stage(x)
        return x

    return trunk, _Tail(nn.Sequential(*tuned), backbone.pool)


class _Tail(nn.Module):
    def __init__(self, stages: nn.Module, pool: nn.Module):
        super().__init__()
        self.stages, self.pool = stages, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(x)).flatten(1)


@register_head("finetune")
class FinetuneHead(BackboneHead):
    """Hu, Li, Stühmer, Kim & Hospedales, "Pushing the Limits of Simple Pipelines for Few-Shot
    Learning: External Data and Fine-Tuning Make a Difference" (P>M>F), CVPR 2022: the "F",
    fine-tuning on the support at adaptation time.

    The backbone's last ``blocks`` stages and a cosine classifier (its class weights initialised
    to the prototypes of the normalised support embeddings, so ``steps=0`` is the ``prototype``
    head on cosine logits) are trained for ``steps`` full-batch Adam steps at ``lr`` on
    ``views`` views of every support scan (the scan itself and ``views - 1`` augmented copies),
    with cross-entropy. The frozen part runs once per view; normalisation statistics stay as
    trained (batch statistics of a few scans would be noise). The trained weights are never
    changed: each fit works on a copy. ``steps`` and ``lr`` are chosen on val episodes at
    training time and stored in the checkpoint.

    Args:
        steps: Adam steps.
        lr: learning rate of the tuned blocks and the classifier.
        blocks: backbone stages fine-tuned (from the last).
        views: views per support scan (1: no augmentation).
        scale: the cosine classifier's fixed logit scale.
        augment: augmentation level of the views (``light`` or ``strong``).
        seed: seed of the augmentation (the same for every fit, so refits are comparable).
    """

    name = "finetune"

    def __init__(self, steps: int = 25, lr: float = 5e-4, blocks: int = 1, views: int = 4, scale: float = 10.0,
                 augment: str = "light", seed: int = 0):
        if int(steps) < 0 or int(steps) != steps:
            raise ValueError(f"steps must be a whole number >= 0, got {steps!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if int(blocks) < 1 or int(views) < 1:
            raise ValueError(f"blocks and views must be at least 1, got {blocks!r} and {views!r}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.steps, self.lr, self.blocks, self.views = int(steps), float(lr), int(blocks), int(views)
        self.scale, self.augment, self.seed = float(scale), str(augment), int(seed)

    def hparams(self) -> dict[str, Any]:
        return {"steps": self.steps, "lr": self.lr, "blocks": self.blocks, "views": self.views, "scale": self.scale,
                "augment": self.augment, "seed": self.seed}

    def learner(self, learner: nn.Module, normaliser: EmbeddingNormaliser | None = None,
                cache: dict | None = None) -> "FinetuneLearner":
        """The adapting learner; ``cache`` shares the frozen part's outputs between learners
        over the same trained weights (e.g. one per learning rate while tuning)."""
        return FinetuneLearner(learner, self, normaliser, cache)


class FinetuneLearner(nn.Module):
    """A trained learner whose adaptation is :class:`FinetuneHead`: the adaptation interface of
    :class:`~medmeta.heads.HeadLearner` (``fit_support``, ``predict_query``,
    ``predict_with_distance``, ``support_distance``, ``correct_held_out_logits``)."""

    def __init__(self, learner: nn.Module, head: FinetuneHead, normaliser: EmbeddingNormaliser | None = None,
                 cache: dict | None = None):
        super().__init__()
        self.learner = learner
        self.head = head
        self.normaliser = normaliser or EmbeddingNormaliser("none")
        self.refiner = None
        #: frozen-part outputs by (scan content, view); valid while the learner's weights are fixed
        self._cache: dict[tuple[int, int], torch.Tensor] = {} if cache is None else cache
        self._augmenters: dict[int, object] = {}

    @property
    def backbone(self) -> nn.Module:
        return self.learner.backbone

    def fit_support(self, support_images: torch.Tensor, support_labels: torch.Tensor) -> "FinetuneLearner":
        """Fine-tune on ``support_images`` ``(n_support, C, H, W)`` with ``support_labels``
        ``(n_support,)`` (see :class:`FinetuneHead`)."""
        self._fit(support_images, support_labels, self.head.steps, self.head.lr)
        return self

    def trajectory(self, support_images: torch.Tensor, support_labels: torch.Tensor, query_images: torch.Tensor,
                   checkpoints: tuple[int, ...], lr: float) -> dict[int, torch.Tensor]:
        """The query logits ``(n_query, n_way)`` after each number of steps in ``checkpoints``
        of one fine-tuning run at ``lr`` (how the steps are tuned: one run gives every count)."""
        out: dict[int, torch.Tensor] = {}

        def record(step: int) -> None:
            if step in checkpoints:
                self._update_class_means()
                out[step] = self.predict_query(query_images)

        self._fit(support_images, support_labels, max(checkpoints), lr, on_step=record)
        return out

    def _fit(self, images: torch.Tensor, labels: torch.Tensor, steps: int, lr: float, on_step=None) -> None:
        trunk, tail = split_backbone(self.learner.backbone, self.head.blocks)
        self.trunk_ = trunk
        self.tail_ = copy.deepcopy(tail).eval()  # eval: normalisation statistics as trained
        with torch.no_grad():
            frozen = self._frozen_views(images, trunk)
            view_labels = labels.repeat(self.head.views)
            prototypes = compute_prototypes(self._embed_frozen(frozen[: len(images)]), labels)
        self.weight_ = nn.Parameter(F.normalize(prototypes, dim=1).clone())
        self.support_labels_ = labels
        self._support_frozen = frozen[: len(images)]
        self.class_means_ = prototypes
        if on_step is not None:
            on_step(0)
        if steps > 0:
            params = [p for p in self.tail_.parameters()] + [self.weight_]
            for p in params:
                p.requires_grad_(True)
            optimiser = torch.optim.Adam(params, lr=lr)
            with torch.enable_grad():
                for step in range(1, steps + 1):
                    loss = F.cross_entropy(self._logits(self._embed_frozen(frozen)), view_labels)
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    if on_step is not None:
                        with torch.no_grad():
                            on_step(step)
        self._update_class_means()

    def _update_class_means(self) -> None:
        """The support class means in the (fine-tuned) embedding, for distances."""
        with torch.no_grad():
            self.class_means_ = compute_prototypes(self._embed_frozen(self._support_frozen), self.support_labels_).detach()

    def _frozen_views(self, images: torch.Tensor, trunk) -> torch.Tensor:
        """The frozen part's output on every view, ``(views * n, ...)``, view-major: the scans
        themselves, then each augmented round. A scan's views depend on its pixels and
        ``head.seed`` only (not on the other scans), and their frozen outputs are cached, so the
        leave-one-out refits of a support pay only for the fine-tuning steps."""
        keys = [_content_key(image) for image in images]
        missing = [(i, v) for v in range(self.head.views) for i, key in enumerate(keys) if (key, v) not in self._cache]
        if missing:
            batch = torch.stack([self._view(images[i], keys[i], v) for i, v in missing])
            for (i, v), out in zip(missing, trunk(batch)):
                self._cache[(keys[i], v)] = out
        frozen = torch.stack([self._cache[(key, v)] for v in range(self.head.views) for key in keys])
        if len(self._cache) > MAX_CACHED_VIEWS:
            self._cache.clear()
        return frozen

    def _view(self, image: torch.Tensor, key: int, v: int) -> torch.Tensor:
        """View ``v`` of ``image``: itself for 0, else an augmented copy seeded by its pixels."""
        if v == 0:
            return image
        if v not in self._augmenters:
            from medmeta.data.augment import Augmenter

            self._augmenters[v] = Augmenter(self.head.augment, seed=self.head.seed * 1009 + v)
        return self._augmenters[v](image[None].detach().cpu(), step=key)[0].to(image.device, image.dtype)

    def _embed_frozen(self, frozen: torch.Tensor) -> torch.Tensor:
        return self.normaliser(self.tail_(frozen))

    def _logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.head.scale * F.normalize(embeddings, dim=1) @ F.normalize(self.weight_, dim=1).T

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(n, C, H, W)`` -> ``(n, d)`` normalised embeddings through the fine-tuned blocks."""
        return self._embed_frozen(self.trunk_(images))

    def predict_with_distance(self, query_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(n_query, n_way)`` and the distance to the nearest support class mean
        ``(n_query,)`` in the fine-tuned embedding, one pass."""
        if getattr(self, "tail_", None) is None:
            raise RuntimeError("call fit_support before predicting")
        with torch.no_grad():
            embeddings = self.embed(query_images)
            distance = squared_distances(embeddings, self.class_means_).min(dim=1).values.clamp_min(0).sqrt()
            return self._logits(embeddings).detach(), distance

    def predict_query(self, query_images: torch.Tensor) -> torch.Tensor:
        return self.predict_with_distance(query_images)[0]

    def support_distance(self, query_images: torch.Tensor) -> torch.Tensor:
        return self.predict_with_distance(query_images)[1]

    def correct_held_out_logits(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return np.asarray(logits, dtype=np.float64)
