"""MAML, first-order MAML and ANIL with a prototype-initialised head (Proto-MAML) and optional
learned per-parameter inner learning rates (Meta-SGD)."""

from __future__ import annotations

from typing import Any, Union

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from medmeta.methods.base import MetaLearner
from medmeta.methods.protonet import compute_prototypes, squared_distances
from medmeta.methods.registry import register_method

HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"
BACKBONE_PREFIX = "backbone."

StepSize = Union[float, torch.Tensor]


@register_method("maml")
class MAML(MetaLearner):
    """Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks", ICML 2017.

    MAML meta-learns an initialisation from which a few gradient steps on a task's support set
    give a good classifier for that task. Per episode, the *inner loop* takes ``inner_steps``
    gradient steps of size ``inner_lr`` on the support cross-entropy, starting from the learner's
    own weights; the *outer* (meta) loss is the query cross-entropy of the adapted weights, and
    its gradient with respect to the initial weights (through the inner steps) trains them.

    The inner loop is functional: the adapted ("fast") weights are plain tensors in a
    dictionary, run through the backbone with :func:`torch.func.functional_call`; the module's
    own parameters are never modified.

    **Head (Proto-MAML).** Triantafillou et al., "Meta-Dataset", ICLR 2020: the linear classifier
    over the backbone features is created per task from the support prototypes ``c_k`` (class
    means of the support embeddings): ``W_k = 2 c_k``, ``b_k = -||c_k||^2``, so before any step
    the logits are ProtoNet's negative squared distances up to a per-query constant. The
    initialisation is part of the graph (the meta-gradient flows through the prototypes into the
    backbone), and any number of classes works at adaptation: there is no fixed ``way``. In the
    inner loop the head is a variable of its own: the inner gradient with respect to the
    backbone is the partial derivative with the head held fixed.

    **Orders.** Second order (``first_order=False``, the paper's MAML) differentiates through the
    inner gradients (``create_graph=True``): the graph of every inner step is kept until the
    outer backward, so memory grows about linearly with ``inner_steps``. First order
    (``first_order=True``, FOMAML, also in Finn et al. 2017) detaches the inner gradients
    (``fast = p - lr * g.detach()``), so ``d fast / d p`` is the identity: the meta-gradient is
    the query gradient at the adapted weights, applied to the initial weights (plus, for the
    head, its path through the prototype initialisation into the backbone). Memory is then
    constant in ``inner_steps``.

    **ANIL** (``head_only=True``, see :class:`ANIL`): only the head is adapted; the backbone
    features of support and query are computed once per episode.

    **Meta-SGD** (``learn_inner_lr=True``). Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn
    Quickly for Few-Shot Learning", 2017: every adapted parameter has a learned step size,
    initialised to ``inner_lr`` and trained by the outer loss. Backbone step sizes are
    element-wise (the parameter's shape); the head's are per feature (``(1, num_features)`` for
    the weight, ``(1,)`` for the bias) and shared by the classes, since classes are created per
    task. They are parameters of the module (``inner_lrs.<name with '.' -> '__'>``, e.g.
    ``inner_lrs.backbone__features__0__weight``, ``inner_lrs.head__weight``), hence saved in
    checkpoints. At adaptation the learned sizes are multiplied by ``adapt_lr / inner_lr``
    (1 by default).

    **Normalisation.** ``backbone_defaults = {"norm_kind": "group"}``: GroupNorm normalises each
    image on its own and keeps no running statistics, so nothing leaks between query cases
    (predictions do not depend on which other cases share the batch) or across episodes, in
    training and at adaptation alike. A user may still ask for ``norm_kind="batch"``: training
    then uses the statistics of each support or query batch (as in the original MAML code) and
    updates the running statistics; adaptation and prediction run on copies of the buffers, so
    the checkpoint is never changed (in eval mode, the running statistics are used).

    **Adaptation** (:meth:`fit_support`): ``adapt_steps`` first-order steps of size ``adapt_lr``
    (``inner_lr`` when ``None``) on the support scans, from the checkpoint's weights; the
    adapted weights are kept, detached, in ``fast_params_`` (a plain dict, not parameters or
    buffers: the module's ``state_dict`` is unchanged). Autograd is enabled inside, so it works
    under ``torch.no_grad()``.

    Args:
        backbone: module mapping ``(n, C, H, W)`` to ``(n, num_features)`` embeddings; must have
            a ``num_features`` attribute.
        inner_steps: inner-loop steps per training episode (0: the Proto-MAML head alone).
        inner_lr: inner-loop step size during meta-training (initial value of the learned step
            sizes with ``learn_inner_lr``).
        adapt_steps: steps on the support set at adaptation (evaluation, ``medmeta adapt``).
        adapt_lr: step size at adaptation; ``None`` uses ``inner_lr``.
        first_order: detach the inner gradients (FOMAML) instead of differentiating through them.
        learn_inner_lr: learn a step size per adapted parameter (Meta-SGD).
        head_only: adapt only the head (ANIL); the backbone is trained by the outer loop only.
    """

    backbone_defaults: dict[str, Any] = {"norm_kind": "group"}

    def __init__(
        self,
        backbone: nn.Module,
        inner_steps: int = 5,
        inner_lr: float = 0.01,
        adapt_steps: int = 10,
        adapt_lr: float | None = None,
        first_order: bool = False,
        learn_inner_lr: bool = False,
        head_only: bool = False,
    ):
        super().__init__(backbone)
        if int(inner_steps) < 0 or int(adapt_steps) < 0:
            raise ValueError(f"inner_steps and adapt_steps must be >= 0, got {inner_steps} and {adapt_steps}")
        if not float(inner_lr) > 0 or (adapt_lr is not None and not float(adapt_lr) > 0):
            raise ValueError(f"inner_lr and adapt_lr must be > 0, got {inner_lr} and {adapt_lr}")
        if not hasattr(backbone, "num_features"):
            raise ValueError("the backbone needs a num_features attribute (size of its embeddings)")
        self.inner_steps = int(inner_steps)
        self.inner_lr = float(inner_lr)
        self.adapt_steps = int(adapt_steps)
        self.adapt_lr = None if adapt_lr is None else float(adapt_lr)
        self.first_order = bool(first_order)
        self.learn_inner_lr = bool(learn_inner_lr)
        self.head_only = bool(head_only)
        # Meta-SGD step sizes; empty (no state_dict entries) unless learn_inner_lr.
        self.inner_lrs = nn.ParameterDict()
        if self.learn_inner_lr:
            reference = next(backbone.parameters(), None)
            dtype = reference.dtype if reference is not None else torch.get_default_dtype()
            device = reference.device if reference is not None else None
            for name in self._adapted_backbone_names():
                parameter = self.get_parameter(name)
                self.inner_lrs[_lr_key(name)] = nn.Parameter(torch.full_like(parameter, self.inner_lr))
            d = int(backbone.num_features)
            self.inner_lrs[_lr_key(HEAD_WEIGHT)] = nn.Parameter(torch.full((1, d), self.inner_lr, dtype=dtype, device=device))
            self.inner_lrs[_lr_key(HEAD_BIAS)] = nn.Parameter(torch.full((1,), self.inner_lr, dtype=dtype, device=device))
        self.fast_params_: dict[str, torch.Tensor] | None = None
        self.support_means_: torch.Tensor | None = None

    # ---- the MetaLearner interface -----------------------------------------------------------
    def episode_loss(
        self,
        support_images: torch.Tensor,
        support_labels: torch.Tensor,
        query_images: torch.Tensor,
        query_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inner loop on the support set, then the query loss of the adapted weights.

        Args:
            support_images: ``(n_support, C, H, W)``.
            support_labels: ``(n_support,)`` int64 in ``[0, n_way)``.
            query_images: ``(n_query, C, H, W)``.
            query_labels: ``(n_query,)`` int64 in ``[0, n_way)``.

        Returns:
            The query cross-entropy (differentiable with respect to the initial weights, the
            step sizes with ``learn_inner_lr``, through the inner loop) and the query logits
            ``(n_query, n_way)``.
        """
        track = torch.is_grad_enabled()
        with torch.enable_grad():
            fast = self._inner_loop(support_images, support_labels, self.inner_steps, self.inner_lr, track=track)
        logits = self._logits(fast, query_images)
        return F.cross_entropy(logits, query_labels), logits

    @property
    def differentiates_backbone_twice(self) -> bool:
        return not self.first_order and not self.head_only

    def fit_support(self, support_images: torch.Tensor, support_labels: torch.Tensor) -> "MAML":
        """Fine-tune a copy of the weights on the support set (``adapt_steps`` first-order steps).

        Args:
            support_images: ``(n_support, C, H, W)``.
            support_labels: ``(n_support,)`` int64 in ``[0, n_way)``; every class present.
        """
        buffers = self._buffer_copies()
        lr = self.inner_lr if self.adapt_lr is None else self.adapt_lr
        with torch.enable_grad():
            fast = self._inner_loop(support_images, support_labels, self.adapt_steps, lr, track=False, buffers=buffers)
        adapted = {BACKBONE_PREFIX + n: p.detach() for n, p in self.backbone.named_parameters()}
        adapted.update({name: tensor.detach() for name, tensor in fast.items()})
        self.fast_params_ = adapted
        with torch.no_grad():
            embeddings = self._embed(adapted, support_images, buffers)  # (n_support, d)
            self.support_means_ = compute_prototypes(embeddings, support_labels)  # (n_way, d)
        return self

    def predict_query(self, query_images: torch.Tensor) -> torch.Tensor:
        """Logits ``(n_query, n_way)`` of the adapted model for ``query_images`` ``(n_query, C, H, W)``."""
        if self.fast_params_ is None:
            raise RuntimeError("call fit_support before predict_query")
        return self._logits(self.fast_params_, query_images, self._buffer_copies())

    def support_distance(self, query_images: torch.Tensor) -> torch.Tensor:
        """``(n_query,)`` Euclidean distance of each query's adapted embedding to the nearest class
        mean of the adapted support embeddings, for ``query_images`` ``(n_query, C, H, W)``."""
        if self.fast_params_ is None or self.support_means_ is None:
            raise RuntimeError("call fit_support before support_distance")
        with torch.no_grad():
            embeddings = self._embed(self.fast_params_, query_images, self._buffer_copies())  # (n_query, d)
            return squared_distances(embeddings, self.support_means_).min(dim=1).values.sqrt()

    def hparams(self) -> dict[str, Any]:
        return {
            "inner_steps": self.inner_steps,
            "inner_lr": self.inner_lr,
            "adapt_steps": self.adapt_steps,
            "adapt_lr": self.adapt_lr,
            "first_order": self.first_order,
            "learn_inner_lr": self.learn_inner_lr,
            "head_only": self.head_only,
        }

    # ---- the inner loop ------------------------------------------------------------------------
    def _inner_loop(
        self,
        support_images: torch.Tensor,
        support_labels: torch.Tensor,
        steps: int,
        lr: float,
        track: bool,
        buffers: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Adapted weights after ``steps`` steps on the support cross-entropy.

        Args:
            support_images: ``(n_support, C, H, W)``.
            support_labels: ``(n_support,)`` int64 in ``[0, n_way)``.
            steps: number of gradient steps.
            lr: step size (with ``learn_inner_lr``, the learned sizes times ``lr / inner_lr``).
            track: keep the graph from the module's parameters to the result (meta-training);
                otherwise every step starts from detached leaves (adaptation, constant memory).
            buffers: backbone buffers to use instead of the module's (copies at adaptation).

        Returns:
            ``{"backbone.<name>": (parameter shape), "head.weight": (n_way, d),
            "head.bias": (n_way,)}``; backbone entries only for the adapted parameters (none
            with ``head_only``).
        """
        names = self._adapted_backbone_names()
        create_graph = track and not self.first_order
        step_sizes = self._step_sizes(names, lr, track)
        fast: dict[str, torch.Tensor] = {}
        for name in names:
            parameter = self.get_parameter(name)
            fast[name] = parameter if track else parameter.detach().requires_grad_()
        embeddings: torch.Tensor | None = self._embed(fast, support_images, buffers)  # (n_support, d)
        if not track and self.head_only:
            embeddings = embeddings.detach()  # fixed features: adaptation needs no graph to the backbone
        weight, bias = prototype_head(embeddings if track else embeddings.detach(), support_labels)
        if not track:
            weight, bias = weight.requires_grad_(), bias.requires_grad_()
        fast[HEAD_WEIGHT], fast[HEAD_BIAS] = weight, bias
        for _ in range(steps):
            if embeddings is None:
                embeddings = self._embed(fast, support_images, buffers)  # (n_support, d) at the current weights
            grads = self._support_gradients(fast, embeddings, support_labels, names, create_graph, track)
            fast = {name: _descend(fast[name], grads[name], step_sizes[name], track, create_graph) for name in fast}
            if not self.head_only:
                # release this step's forward graph before the next forward (first order keeps
                # no inner graph; the first step's survives through the head initialisation)
                embeddings = grads = None
        return fast

    def _support_gradients(
        self,
        fast: dict[str, torch.Tensor],
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        names: list[str],
        create_graph: bool,
        track: bool,
    ) -> dict[str, torch.Tensor]:
        """Partial derivatives of the support cross-entropy with respect to every entry of ``fast``.

        Args:
            fast: the current weights (see :meth:`_inner_loop`).
            embeddings: ``(n_support, d)`` support embeddings computed with ``fast``.
            labels: ``(n_support,)`` int64 support labels.
            names: the adapted backbone entries of ``fast``.
            create_graph: differentiate through the gradients (second order).
            track: the graph up to ``fast`` is needed later (meta-training).
        """
        # At the first step the head is a function of these very embeddings (the prototypes).
        # The loss reads them through an alias, so that the gradient taken at the alias, and
        # pulled back through the backbone, is the partial derivative with the head held fixed.
        features = embeddings.view_as(embeddings)
        loss = F.cross_entropy(features @ fast[HEAD_WEIGHT].T + fast[HEAD_BIAS], labels)
        inputs = [fast[HEAD_WEIGHT], fast[HEAD_BIAS]] + ([features] if names else [])
        grads = torch.autograd.grad(loss, inputs, create_graph=create_graph, retain_graph=True)
        result = {HEAD_WEIGHT: grads[0], HEAD_BIAS: grads[1]}
        if names:
            backbone_inputs = [fast[name] for name in names]
            backbone_grads = torch.autograd.grad(
                features, backbone_inputs, grad_outputs=grads[2], create_graph=create_graph, retain_graph=track, allow_unused=True
            )
            for name, tensor, grad in zip(names, backbone_inputs, backbone_grads):
                result[name] = torch.zeros_like(tensor) if grad is None else grad
        return result

    def _step_sizes(self, names: list[str], lr: float, track: bool) -> dict[str, StepSize]:
        """Step size per entry of the fast weights: ``lr``, or the learned sizes scaled by
        ``lr / inner_lr`` (detached when not ``track``)."""
        keys = names + [HEAD_WEIGHT, HEAD_BIAS]
        if not self.learn_inner_lr:
            return {name: lr for name in keys}
        scale = lr / self.inner_lr
        sizes: dict[str, StepSize] = {}
        for name in keys:
            learned = self.inner_lrs[_lr_key(name)]
            learned = learned if track else learned.detach()
            sizes[name] = learned if scale == 1.0 else learned * scale
        return sizes

    # ---- helpers ---------------------------------------------------------------------------
    def _adapted_backbone_names(self) -> list[str]:
        """Learner-level names (``backbone.<name>``) of the backbone parameters the inner loop adapts."""
        if self.head_only:
            return []
        return [BACKBONE_PREFIX + n for n, p in self.backbone.named_parameters() if p.requires_grad]

    def _embed(self, fast: dict[str, torch.Tensor], images: torch.Tensor, buffers: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``(n, C, H, W)`` -> ``(n, d)`` embeddings, with the backbone entries of ``fast`` in place
        of the module's parameters (the module's own ones for the others)."""
        tensors = {n[len(BACKBONE_PREFIX) :]: t for n, t in fast.items() if n.startswith(BACKBONE_PREFIX)}
        if buffers:
            tensors.update(buffers)
        return functional_call(self.backbone, tensors, (images,))

    def _logits(self, fast: dict[str, torch.Tensor], images: torch.Tensor, buffers: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``(n, C, H, W)`` -> ``(n, n_way)`` logits of the model given by ``fast``."""
        return self._embed(fast, images, buffers) @ fast[HEAD_WEIGHT].T + fast[HEAD_BIAS]

    def _buffer_copies(self) -> dict[str, torch.Tensor]:
        """Copies of the backbone's buffers (e.g. BatchNorm running statistics), so that adaptation
        and prediction never update the module's own."""
        return {n: b.clone() for n, b in self.backbone.named_buffers()}


@register_method("fomaml")
class FOMAML(MAML):
    """Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks", ICML 2017 (its first-order approximation).

    :class:`MAML` with ``first_order=True``: the inner gradients are treated as constants, so
    the meta-gradient is the query gradient at the adapted weights applied to the initial
    weights (plus the head's path through its prototype initialisation). Memory does not grow
    with ``inner_steps``. Every other argument is :class:`MAML`'s.

    Args:
        backbone: module mapping ``(n, C, H, W)`` to ``(n, num_features)``.
        first_order: ``True`` (the point of this variant).
        **kwargs: the other :class:`MAML` arguments.
    """

    def __init__(self, backbone: nn.Module, first_order: bool = True, **kwargs: Any):
        super().__init__(backbone, first_order=first_order, **kwargs)


@register_method("anil")
class ANIL(MAML):
    """Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards Understanding the
    Effectiveness of MAML", ICLR 2020.

    :class:`MAML` with ``head_only=True`` (Almost No Inner Loop): the inner loop adapts only the
    prototype-initialised linear head; the backbone features of support and query are computed
    once per episode and the backbone is trained by the outer loop alone. By default the inner
    loop is second order *through the head only* (``first_order=False``): the meta-gradient
    differentiates through the head's inner gradients, which depend on the support features,
    and this costs little since the head is small. ``first_order=True`` detaches those
    gradients as in FOMAML.

    Args:
        backbone: module mapping ``(n, C, H, W)`` to ``(n, num_features)``.
        head_only: ``True`` (the point of this variant).
        **kwargs: the other :class:`MAML` arguments.
    """

    def __init__(self, backbone: nn.Module, head_only: bool = True, **kwargs: Any):
        super().__init__(backbone, head_only=head_only, **kwargs)


def prototype_head(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Proto-MAML initialisation of a linear head from support embeddings.

    Args:
        embeddings: ``(n_support, d)``.
        labels: ``(n_support,)`` int64 in ``[0, n_way)``.

    Returns:
        ``weight`` ``(n_way, d)`` = ``2 c_k`` and ``bias`` ``(n_way,)`` = ``-||c_k||^2`` for the
        class means ``c_k``, so that ``e @ weight.T + bias = -||e - c_k||^2 + ||e||^2``.
    """
    prototypes = compute_prototypes(embeddings, labels)  # (n_way, d)
    return 2 * prototypes, -prototypes.pow(2).sum(dim=-1)


def _descend(parameter: torch.Tensor, grad: torch.Tensor, step_size: StepSize, track: bool, create_graph: bool) -> torch.Tensor:
    """One step ``parameter - step_size * grad``.

    Second order keeps ``grad``'s graph; first order detaches it, so that ``d result / d
    parameter`` is the identity; without ``track`` the result is a fresh leaf (adaptation).
    """
    if not track:
        return (parameter - step_size * grad).detach().requires_grad_()
    return parameter - step_size * (grad if create_graph else grad.detach())


def _lr_key(name: str) -> str:
    """Key of a learned step size in ``inner_lrs`` (``ParameterDict`` keys cannot hold dots)."""
    return name.replace(".", "__")
