"""Training on several processes: torch's DistributedDataParallel, launched by ``torchrun``.

``torchrun --nproc-per-node N -m medmeta.cli train ...`` (or ``medmeta train --nproc N``, which
starts torchrun itself) runs N copies of the training loop, one per GPU (NCCL) or per group of
CPU cores (gloo). The environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) is all a process needs; without it, training is the usual
single process.

How the work is shared, so that N processes compute what one process would:

- **Episodic training**: each optimiser step's meta-batch of ``meta_batch`` episodes is split
  across the processes, episode ``i`` of the batch to process ``i mod N``. Episodes and their
  augmentation are seeded by the global episode index alone, so the processes draw exactly the
  episodes one process would, none twice. Each process backpropagates its episodes' losses
  scaled by ``N / meta_batch``; DDP averages the gradients over the processes, so every process
  steps with the gradient of the whole meta-batch's mean loss, the one-process gradient.
  ``meta_batch`` must be a multiple of N and ``episodes`` a multiple of ``meta_batch``.
- **Pre-training**: each batch of ``pretrain_batch_size`` images is split the same way. Batch
  normalisation then sees each process's share of the batch (as DDP does without
  ``SyncBatchNorm``), so pre-training is close to, not exactly, the one-process run.
- **Process 0** (rank 0) alone validates, selects, writes checkpoints, the resume state and
  ``config.yaml``, calibrates and prints; the others wait for it at a barrier. Every process
  loads the resume state on ``--resume``. The model-selection episodes, seeded as always, are
  the same whatever N.

The gradients of the MAML family (second-order included) flow through the outer loss's
``backward`` into the parameters, where DDP's hooks all-reduce them; the inner loop's
``torch.autograd.grad`` calls never touch the parameters' ``.grad`` and are not all-reduced.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from medmeta.training.config import ConfigError

#: How long a process waits for the others at a collective (validation and calibration by
#: process 0 included) before the run is stopped as hung.
TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes (torchrun's environment)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "Processes":
        """From torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; one process without them."""
        try:
            return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
        except ValueError:
            raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Process 0: the one that validates, writes and prints."""
        return self.rank == 0

    def share(self, indices: range | list[int]) -> list[int]:
        """This process's share of a batch of indices (every ``world_size``-th, from ``rank``)."""
        return list(indices)[self.rank :: self.world_size]

    def device(self, device: torch.device) -> torch.device:
        """This process's GPU (``cuda:LOCAL_RANK``) when training on CUDA; the CPU as it is."""
        if device.type == "cuda" and self.distributed:
            return torch.device("cuda", self.local_rank)
        return device


def check_distributed(processes: Processes, meta_batch: int, episodes: int, pretrain_batch_size: int | None = None) -> None:
    """Refuse a meta-batch that cannot be split evenly across the processes, and a
    pre-training batch that would leave a process without images (DDP would wait for it)."""
    if not processes.distributed:
        return
    n = processes.world_size
    if pretrain_batch_size is not None and pretrain_batch_size < n:
        raise ConfigError(
            f"--pretrain-batch-size {pretrain_batch_size} cannot be split across {n} processes: each process needs "
            f"images of every batch; use at least {n}", "pretrain_batch_size",
        )
    if meta_batch % n:
        raise ConfigError(
            f"--meta-batch {meta_batch} cannot be split across {n} processes: use a multiple of {n} "
            "(each process trains meta_batch / N episodes of every step)", "meta_batch",
        )
    if episodes % meta_batch:
        raise ConfigError(
            f"--episodes {episodes} is not a multiple of --meta-batch {meta_batch}: with {n} processes every "
            "optimiser step needs a full meta-batch", "episodes",
        )


def start(processes: Processes, device: torch.device) -> None:
    """Join the process group: NCCL on GPUs, gloo on the CPU."""
    if not processes.distributed or torch.distributed.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend, timeout=TIMEOUT)


def stop(processes: Processes) -> None:
    """Leave the process group (after the last collective)."""
    if processes.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(processes: Processes) -> None:
    """Wait for every process (e.g. while process 0 validates)."""
    if processes.distributed:
        torch.distributed.barrier()


def main_decides(processes: Processes, decision: bool) -> bool:
    """Process 0's ``decision``, on every process (e.g. whether the time budget is spent:
    each process's clock differs, and all must stop at the same step)."""
    if not processes.distributed:
        return decision
    shared = [decision]
    torch.distributed.broadcast_object_list(shared, src=0)
    return bool(shared[0])


class EpisodeLoss(nn.Module):
    """A learner's :meth:`~medmeta.methods.base.MetaLearner.episode_loss` as a module's
    ``forward``, the call DDP wraps."""

    def __init__(self, learner: nn.Module):
        super().__init__()
        self.learner = learner

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor):
        return self.learner.episode_loss(support, support_labels, query, query_labels)


class PretrainForward(nn.Module):
    """Pre-training's forward pass: backbone features of every view, the classifier head's
    logits of the first ``n`` (one view per image), and the projection of all views when the
    contrastive loss is on (else ``None``)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, projection: nn.Module | None):
        super().__init__()
        self.backbone, self.head, self.projection = backbone, head, projection

    def forward(self, views: torch.Tensor, n: int):
        features = self.backbone(views)
        return self.head(features[:n]), None if self.projection is None else self.projection(features)


def wrap(module: nn.Module, processes: Processes, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel when training on several processes, else itself.
    Every parameter that requires a gradient must take part in each forward pass (DDP waits
    for all of them), as the method contract test asserts of every method."""
    if not processes.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def no_sync(module: Any, last: bool):
    """Within a step's episodes, the gradients are all-reduced once, on the last backward."""
    if last or not hasattr(module, "no_sync"):
        return nullcontext()
    return module.no_sync()
