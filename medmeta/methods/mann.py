"""Memory-Augmented Neural Networks (MANN) with least-recently-used memory access."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from medmeta.methods.base import MetaLearner
from medmeta.methods.registry import register_method

# Seed of the fixed support order used outside training mode (adaptation is deterministic).
EVAL_ORDER_SEED = 0
# How embeddings are normalised within an episode before they reach the controller.
EPISODE_NORMS = ("support", "none")


class MemoryState(NamedTuple):
    """Everything the MANN carries from one step of an episode to the next (batch of one).

    Attributes:
        memory: ``(memory_slots, memory_size)`` external memory ``M_t``.
        usage: ``(memory_slots,)`` usage weights ``w^u_t``.
        read_weights: ``(n_reads, memory_slots)`` read weights ``w^r_t`` of every head.
        reads: ``(1, n_reads * memory_size)`` read vectors ``r_t``, concatenated over heads.
        hidden: ``(1, controller_size)`` controller LSTM output ``h_t``.
        cell: ``(1, controller_size)`` controller LSTM cell state ``c_t``.
        written: ``(memory_slots,)`` bool, slots written by the support (see ``support_distance``).
    """

    memory: torch.Tensor
    usage: torch.Tensor
    read_weights: torch.Tensor
    reads: torch.Tensor
    hidden: torch.Tensor
    cell: torch.Tensor
    written: torch.Tensor

    def detach(self) -> "MemoryState":
        return MemoryState(*(t.detach() for t in self))


@register_method("mann")
class MANN(MetaLearner):
    """Santoro, Bartunov, Botvinick, Wierstra & Lillicrap, "Meta-Learning with Memory-Augmented
    Neural Networks", ICML 2016.

    An LSTM controller with an external memory ``M`` (``memory_slots x memory_size``) that it
    writes by least-recently-used access (LRUA) and reads by content. An episode is a sequence:
    at step ``t`` the controller receives the backbone embedding of image ``x_t``, the one-hot
    label of the *previous* image ``y_{t-1}`` (size ``max_way``) and its previous read vectors.
    It must therefore bind each image to its label, which arrives one step later, through memory.

    One step (every head ``j`` of ``n_reads`` emits a key ``k_j = tanh(.)``, a write gate
    ``alpha_j`` and a key strength ``beta_j = 1 + softplus(.)`` from the controller output):

    1. ``w^lu_{t-1}``: head ``j`` targets the ``j``-th least-used slot of ``w^u_{t-1}``; those
       slots are erased (set to zero) before writing, as in the paper;
    2. write weights ``w^w_t = sigmoid(alpha) w^r_{t-1} + (1 - sigmoid(alpha)) w^lu_{t-1}``
       (see :func:`lrua_write_weights`), ``M_t = M_{t-1} + sum_j w^w_j k_j^T``;
    3. read weights ``w^r_t = softmax_i(beta * cos(k, M_t(i)))``, read vectors ``r = w^r_t M_t``;
    4. usage ``w^u_t = gamma w^u_{t-1} + sum_j (w^r_j + w^w_j)``.

    Deviations from the paper, each needed for MANN to leave chance within a CPU budget (see
    ``docs/methods/mann.md`` for the measurements):

    - the key strength ``beta`` (from the Neural Turing Machine's content addressing), started
      sharp (``key_strength_init``): a bare softmax of cosines over 128 slots is almost uniform,
      so reads carry no gradient signal;
    - **episode normalisation** (``episode_norm="support"``): embeddings are centred on the mean
      of the episode's support embeddings and divided by their root-mean-square spread, queries
      with the support's statistics (so no query influences another). Without it the controller
      learns keys that tell the meta-training conditions apart and collapse on new ones.

    Presentation of an episode (the design choices of this implementation):

    - **Support.** The support images are fed one per step, each with the previous support
      image's label (zero for the first), as in the paper. After the last support image one
      closing step is fed with an all-zero image embedding and the last support label, so that
      every support label is seen. Every support step writes to memory.
    - **Queries.** Each query is one more step from the state reached after the support, with a
      zero label vector: it reads the memory but never writes it, and its logits are a linear
      layer over ``[h, r]`` (``max_way`` outputs, of which the episode's classes are selected).
      Queries are thus independent of one another (no leak between query cases, and the same
      answer whatever the batching), in meta-training and at adaptation alike.
    - **Labels and order.** In training mode every episode draws from torch's global RNG a random
      permutation of the ``max_way`` label slots (class ``c`` is presented, and predicted, as
      slot ``perm[c]``) and a random order of the support. In evaluation mode the label slots
      are the identity and the support order is a fixed pseudo-random permutation (seed
      ``EVAL_ORDER_SEED``), so adaptation is deterministic and looks like training episodes
      (which are shuffled) rather than class-sorted ones.

    :meth:`fit_support` starts from an empty memory every time and stores the final state,
    detached, in attributes ending in ``_`` (not parameters or buffers: the state dict is
    unchanged). :meth:`episode_loss` runs the same computation without detaching, so the query
    loss trains the backbone, the controller and the heads through the memory; as in the paper,
    every support step also predicts the label of the scan it is shown (``sequence_loss``).

    Args:
        backbone: module mapping ``(n, C, H, W)`` to ``(n, d)``; must expose ``num_features``.
        memory_slots: number of memory rows (at least ``n_reads``).
        memory_size: size of a memory row (and of the keys).
        controller_size: hidden size of the LSTM controller.
        n_reads: number of read heads (each also writes).
        gamma: usage decay, in ``[0, 1]``.
        max_way: size of the label input and output; any ``n_way <= max_way`` works.
        sequence_loss: weight of the per-step support loss added to the query loss (0: queries only).
        episode_norm: ``"support"`` (normalise embeddings by the support's mean and spread) or ``"none"``.
        key_strength_init: initial key strength ``beta`` of every head (> 1).
    """

    def __init__(
        self,
        backbone: nn.Module,
        memory_slots: int = 128,
        memory_size: int = 40,
        controller_size: int = 200,
        n_reads: int = 4,
        gamma: float = 0.95,
        max_way: int = 10,
        sequence_loss: float = 1.0,
        episode_norm: str = "support",
        key_strength_init: float = 11.0,
    ):
        super().__init__(backbone)
        d = getattr(backbone, "num_features", None)
        if not isinstance(d, int):
            raise ValueError("MANN needs a backbone with an integer `num_features`")
        if min(memory_slots, memory_size, controller_size, n_reads, max_way) < 1:
            raise ValueError("memory_slots, memory_size, controller_size, n_reads and max_way must be positive")
        if n_reads > memory_slots:
            raise ValueError(f"n_reads ({n_reads}) cannot exceed memory_slots ({memory_slots})")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
        if sequence_loss < 0:
            raise ValueError(f"sequence_loss must be non-negative, got {sequence_loss}")
        if episode_norm not in EPISODE_NORMS:
            raise ValueError(f"episode_norm must be one of {', '.join(EPISODE_NORMS)}, got {episode_norm!r}")
        if key_strength_init <= 1.0:
            raise ValueError(f"key_strength_init must exceed 1 (beta = 1 + softplus), got {key_strength_init}")
        self.memory_slots = int(memory_slots)
        self.memory_size = int(memory_size)
        self.controller_size = int(controller_size)
        self.n_reads = int(n_reads)
        self.gamma = float(gamma)
        self.max_way = int(max_way)
        self.sequence_loss = float(sequence_loss)
        self.episode_norm = episode_norm
        self.key_strength_init = float(key_strength_init)
        self.embedding_size = d
        read_size = self.n_reads * self.memory_size
        self.controller = nn.LSTMCell(d + self.max_way + read_size, self.controller_size)
        # per head: key (memory_size), write-gate logit, key-strength logit
        self.heads = nn.Linear(self.controller_size, self.n_reads * (self.memory_size + 2))
        self.output = nn.Linear(self.controller_size + read_size, self.max_way)
        with torch.no_grad():  # every head starts with key strength beta = key_strength_init
            bias = self.heads.bias.view(self.n_reads, self.memory_size + 2)
            bias[:, -1] = math.log(math.expm1(self.key_strength_init - 1.0))

        self.state_: MemoryState | None = None
        self.norm_: tuple[torch.Tensor, torch.Tensor] | None = None  # support (mean, scale)
        self.label_slots_: torch.Tensor | None = None  # (n_way,) output slot of each class

    # ---- episode plumbing ----------------------------------------------------------------------
    def _check_way(self, labels: torch.Tensor) -> int:
        n_way = int(labels.max().item()) + 1
        if n_way > self.max_way:
            raise ValueError(
                f"MANN was built with max_way={self.max_way} label slots but this episode has {n_way} classes; "
                f"use n_way <= {self.max_way} or build the model with a larger max_way"
            )
        return n_way

    def _label_slots(self, n_way: int, device: torch.device) -> torch.Tensor:
        """``(n_way,)`` label slot of each class: random in training mode, identity otherwise."""
        if self.training:
            return torch.randperm(self.max_way)[:n_way].to(device)
        return torch.arange(n_way, device=device)

    def _support_order(self, n_support: int, device: torch.device) -> torch.Tensor:
        """``(n_support,)`` order of presentation: random in training mode, fixed otherwise."""
        if self.training:
            return torch.randperm(n_support).to(device)
        return torch.randperm(n_support, generator=torch.Generator().manual_seed(EVAL_ORDER_SEED)).to(device)

    def initial_state(self, like: torch.Tensor) -> MemoryState:
        """Empty memory, zero usage, uniform read weights (those of a read from an empty memory),
        zero read vectors and controller state; on the device and dtype of ``like``."""
        kw = {"device": like.device, "dtype": like.dtype}
        return MemoryState(
            memory=torch.zeros(self.memory_slots, self.memory_size, **kw),
            usage=torch.zeros(self.memory_slots, **kw),
            read_weights=torch.full((self.n_reads, self.memory_slots), 1.0 / self.memory_slots, **kw),
            reads=torch.zeros(1, self.n_reads * self.memory_size, **kw),
            hidden=torch.zeros(1, self.controller_size, **kw),
            cell=torch.zeros(1, self.controller_size, **kw),
            written=torch.zeros(self.memory_slots, dtype=torch.bool, device=like.device),
        )

    def _heads(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Controller output ``(batch, controller_size)`` -> keys ``(batch, n_reads, memory_size)``,
        write-gate logits ``(batch, n_reads)`` and key strengths ``(batch, n_reads)``."""
        out = self.heads(hidden).view(hidden.shape[0], self.n_reads, self.memory_size + 2)
        keys = torch.tanh(out[..., : self.memory_size])
        return keys, out[..., -2], 1.0 + F.softplus(out[..., -1])

    def _step(self, state: MemoryState, embedding: torch.Tensor, label: torch.Tensor) -> MemoryState:
        """One support step with writing.

        Args:
            state: the state after the previous step.
            embedding: ``(1, d)`` image embedding (zeros for the closing label step).
            label: ``(1, max_way)`` one-hot label of the previous item (zeros for the first).
        """
        hidden, cell = self.controller(torch.cat([embedding, label, state.reads], dim=1), (state.hidden, state.cell))
        keys, gates, strengths = self._heads(hidden)  # (1, n_reads, m), (1, n_reads), (1, n_reads)
        keys, gates, strengths = keys[0], gates[0], strengths[0]
        write_weights, least_used = lrua_write_weights(gates, state.read_weights, state.usage)  # (n_reads, slots)
        erased = least_used.amax(dim=0)  # (slots,) 1 on the least-used slots
        memory = state.memory * (1.0 - erased).unsqueeze(1) + write_weights.T @ keys  # (slots, m)
        read_weights = torch.softmax(strengths.unsqueeze(1) * content_similarity(keys, memory), dim=1)  # (n_reads, slots)
        reads = (read_weights @ memory).reshape(1, -1)  # (1, n_reads * m)
        usage = self.gamma * state.usage + read_weights.sum(0) + write_weights.sum(0)
        targets = F.one_hot(write_weights.argmax(dim=1), self.memory_slots).amax(dim=0).bool()
        written = (state.written & (erased == 0)) | targets
        return MemoryState(memory, usage, read_weights, reads, hidden, cell, written)

    def support_norm(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Episode normalisation from the support embeddings ``(n_support, d)`` alone: their mean
        ``(1, d)`` and the root-mean-square distance to it ``()`` (1 when that is ~0, e.g. a single
        scan). Identity (0, 1) when ``episode_norm == "none"``."""
        if self.episode_norm == "none":
            return embeddings.new_zeros(1, embeddings.shape[1]), embeddings.new_ones(())
        mean = embeddings.mean(dim=0, keepdim=True)
        scale = (embeddings - mean).pow(2).sum(dim=1).mean().sqrt()
        return mean, torch.where(scale > 1e-6, scale, torch.ones_like(scale))

    def encode_support(
        self, support_images: torch.Tensor, support_labels: torch.Tensor
    ) -> tuple[MemoryState, torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Write a support set to a fresh memory.

        Args:
            support_images: ``(n_support, C, H, W)``.
            support_labels: ``(n_support,)`` int64 in ``[0, n_way)``, ``n_way <= max_way``.

        Returns:
            The state after the closing label step; the ``(n_way,)`` label slot of each class; the
            episode normalisation ``(mean (1, d), scale ())``; the ``(n_support, max_way)`` logits
            of every support step for the scan shown at that step (before its label arrives); and
            the ``(n_support,)`` label slot of the scan shown at each step.
        """
        n_way = self._check_way(support_labels)
        slots = self._label_slots(n_way, support_labels.device)
        order = self._support_order(len(support_labels), support_labels.device)
        embeddings = self.backbone(support_images)  # (n_support, d)
        norm = self.support_norm(embeddings)
        embeddings = ((embeddings - norm[0]) / norm[1])[order]
        step_slots = slots[support_labels[order]]  # (n_support,)
        labels = F.one_hot(step_slots, self.max_way).to(embeddings.dtype)  # (n_support, max_way)
        state = self.initial_state(embeddings)
        previous = torch.zeros(1, self.max_way, dtype=embeddings.dtype, device=embeddings.device)
        step_logits = []
        for t in range(len(order)):
            state = self._step(state, embeddings[t : t + 1], previous)
            step_logits.append(self.output(torch.cat([state.hidden, state.reads], dim=1)))
            previous = labels[t : t + 1]
        state = self._step(state, torch.zeros_like(embeddings[:1]), previous)
        return state, slots, norm, torch.cat(step_logits), step_slots

    def read_queries(
        self, state: MemoryState, norm: tuple[torch.Tensor, torch.Tensor], query_images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One read-only step per query from ``state``, with a zero label.

        Args:
            state: the state after the support.
            norm: the support's episode normalisation (see :meth:`support_norm`).
            query_images: ``(n_query, C, H, W)``.

        Returns:
            Output logits over all label slots ``(n_query, max_way)`` and the query keys
            ``(n_query, n_reads, memory_size)``.
        """
        embeddings = (self.backbone(query_images) - norm[0]) / norm[1]  # (n_query, d)
        n = embeddings.shape[0]
        inputs = torch.cat([embeddings, embeddings.new_zeros(n, self.max_way), state.reads.expand(n, -1)], dim=1)
        hidden, _ = self.controller(inputs, (state.hidden.expand(n, -1), state.cell.expand(n, -1)))
        keys, _, strengths = self._heads(hidden)
        similarity = content_similarity(keys, state.memory)  # (n_query, n_reads, slots)
        read_weights = torch.softmax(strengths.unsqueeze(-1) * similarity, dim=-1)
        reads = (read_weights @ state.memory).flatten(1)  # (n_query, n_reads * m)
        return self.output(torch.cat([hidden, reads], dim=1)), keys

    # ---- MetaLearner -----------------------------------------------------------------------------
    def fit_support(self, support_images: torch.Tensor, support_labels: torch.Tensor) -> "MANN":
        state, slots, norm, _, _ = self.encode_support(support_images, support_labels)
        self.state_, self.label_slots_ = state.detach(), slots
        self.norm_ = (norm[0].detach(), norm[1].detach())
        return self

    def predict_query(self, query_images: torch.Tensor) -> torch.Tensor:
        state, slots = self._fitted("predict_query")
        logits, _ = self.read_queries(state, self.norm_, query_images)
        return logits[:, slots]

    def support_distance(self, query_images: torch.Tensor) -> torch.Tensor:
        """``(n_query,)``: one minus the largest cosine similarity between any of the query's
        read keys and the memory rows written by the support, in ``[0, 2]``. A row counts as
        written by the support when it received the largest write weight of some head at some
        support step and was not erased afterwards."""
        state, _ = self._fitted("support_distance")
        _, keys = self.read_queries(state, self.norm_, query_images)
        similarity = content_similarity(keys, state.memory[state.written])  # (n_query, n_reads, n_written)
        return (1.0 - similarity.flatten(1).max(dim=1).values).clamp(0.0, 2.0)

    def episode_loss(
        self,
        support_images: torch.Tensor,
        support_labels: torch.Tensor,
        query_images: torch.Tensor,
        query_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`fit_support` + :meth:`predict_query` but with gradients through the memory.

        The loss is the query cross-entropy plus ``sequence_loss`` times the paper's per-step
        loss: the cross-entropy of every support step's prediction for the scan it is shown,
        over all ``max_way`` slots (the first scan of each condition can only be guessed).
        Returns the loss and the query logits ``(n_query, n_way)``."""
        state, slots, norm, step_logits, step_slots = self.encode_support(support_images, support_labels)
        logits = self.read_queries(state, norm, query_images)[0][:, slots]  # (n_query, n_way)
        loss = F.cross_entropy(logits, query_labels)
        if self.sequence_loss > 0:
            loss = loss + self.sequence_loss * F.cross_entropy(step_logits, step_slots)
        return loss, logits

    def hparams(self) -> dict:
        return {
            "memory_slots": self.memory_slots,
            "memory_size": self.memory_size,
            "controller_size": self.controller_size,
            "n_reads": self.n_reads,
            "gamma": self.gamma,
            "max_way": self.max_way,
            "sequence_loss": self.sequence_loss,
            "episode_norm": self.episode_norm,
            "key_strength_init": self.key_strength_init,
        }

    def _fitted(self, caller: str) -> tuple[MemoryState, torch.Tensor]:
        if self.state_ is None or self.label_slots_ is None or self.norm_ is None:
            raise RuntimeError(f"call fit_support before {caller}")
        return self.state_, self.label_slots_


def content_similarity(keys: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of keys ``(..., memory_size)`` with memory rows ``(slots, memory_size)``
    -> ``(..., slots)``; an all-zero row has similarity 0."""
    return F.normalize(keys, dim=-1, eps=1e-8) @ F.normalize(memory, dim=-1, eps=1e-8).T


def least_used_weights(usage: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``(n_heads, slots)`` one-hot rows: head ``j`` gets the ``j``-th least-used slot of ``usage``
    ``(slots,)`` (ties go to the lower index)."""
    order = torch.sort(usage.detach(), stable=True).indices[:n_heads]
    return F.one_hot(order, usage.shape[0]).to(usage.dtype)


def lrua_write_weights(
    gate_logits: torch.Tensor, previous_read_weights: torch.Tensor, usage: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-recently-used write weights of Santoro et al. (2016).

    ``w^w = sigmoid(gate) * w^r_{t-1} + (1 - sigmoid(gate)) * w^lu_{t-1}``: each head either
    updates the slot it read last or writes to a fresh, least-used slot. Each row sums to 1 when
    ``previous_read_weights`` rows do.

    Args:
        gate_logits: ``(n_heads,)`` write-gate logits ``alpha``.
        previous_read_weights: ``(n_heads, slots)`` read weights of the previous step.
        usage: ``(slots,)`` usage weights of the previous step.

    Returns:
        Write weights ``(n_heads, slots)`` and the least-used weights ``(n_heads, slots)``.
    """
    least_used = least_used_weights(usage, previous_read_weights.shape[0])
    gate = torch.sigmoid(gate_logits).unsqueeze(1)  # (n_heads, 1)
    return gate * previous_read_weights + (1.0 - gate) * least_used, least_used
