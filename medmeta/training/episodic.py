"""Phase 2: episodic meta-training (Adam, step schedule), validating every ``val_interval``
episodes; one optimiser step per meta-batch of episodes."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medmeta.progress import console, make_progress
from medmeta.training.config import ConfigError

if TYPE_CHECKING:
    from medmeta.training.loop import Run


#: Stream of the seed sequence ``[seed, stream, episode]`` that seeds torch before each episode.
EPISODE_RNG_STREAM = 13


def start_episodic(run: "Run") -> None:
    """Drop the pre-training head; Adam over :func:`episodic_param_groups` with a step schedule."""
    cfg = run.config
    run.head = None
    run.projection = None
    run.teacher = None
    from medmeta.training.distributed import EpisodeLoss, wrap

    run.optimizer = torch.optim.Adam(episodic_param_groups(run), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # every method's episode uses all its parameters (tests/test_method_contract.py), so DDP
    # need not search the graph for unused ones
    run.step_module = wrap(EpisodeLoss(run.learner), run.processes, run.device)
    run.scheduler = torch.optim.lr_scheduler.StepLR(run.optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    run.ema = moving_average(run.learner, cfg.ema_decay)


def moving_average(learner: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """torch's :class:`~torch.optim.swa_utils.AveragedModel` keeping an exponential moving
    average of ``learner``'s parameters and buffers (normalisation statistics included), or
    None when ``decay`` is 0. Its first update copies the weights; each later one moves the
    average ``1 - decay`` of the way to them."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(learner, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def episodic_param_groups(run: "Run") -> list[dict[str, Any]]:
    """The method's own parameters at ``lr``; the backbone's at ``backbone_lr`` (left out, and
    frozen, when that is 0)."""
    cfg = run.config
    if cfg.backbone_lr is None:  # one group, in the module's own order (as older runs' saved optimisers)
        return [{"params": list(run.learner.parameters())}]
    backbone = list(run.learner.backbone.parameters())
    ids = {id(p) for p in backbone}
    own = [p for p in run.learner.parameters() if id(p) not in ids]
    run.learner.backbone.requires_grad_(not run.backbone_frozen)
    groups = [{"params": own}] if own else []
    if not run.backbone_frozen:
        groups.append({"params": backbone, "lr": cfg.backbone_lr})
    if not groups:
        raise ConfigError(
            f"method {cfg.method!r} has no parameters besides the backbone; --backbone-lr 0 would train nothing", "backbone_lr"
        )
    return groups


def meta_train(run: "Run") -> None:
    """Train from episode ``run.episode`` to ``episodes`` (or until ``max_minutes`` of training
    time), validating and saving the resume state every ``val_interval`` episodes and at the end."""
    cfg = run.config
    assert run.optimizer is not None
    run.train_mode()
    recent: dict[str, list[float]] = {"loss": [], "acc": []}
    episodes_this_session = 0
    started_session = time.perf_counter()
    with make_progress(disable=run.quiet) as progress:
        run.progress = progress
        task = progress.add_task("Meta-training", total=cfg.episodes, completed=run.episode, status="")
        episodes = iter(run.episode_loader())
        while run.episode < cfg.episodes:
            if _out_of_time(run):
                break
            batch = _meta_step(run, recent, episodes)
            episodes_this_session += len(batch)
            window = slice(-50, None)
            status = f"loss {np.mean(recent['loss'][window]):.3f} acc {np.mean(recent['acc'][window]):.3f}"
            progress.update(task, advance=len(batch), status=status)
            _validate_if_due(run, previous=run.episode - len(batch))
        run.progress = None
    run.episodes_per_second = episodes_this_session / max(1e-9, time.perf_counter() - started_session)


def _out_of_time(run: "Run") -> bool:
    """True (after validating the model as it is, unless just done) once the budget is spent."""
    from medmeta.training.distributed import main_decides

    cfg = run.config
    if cfg.max_minutes is None or not main_decides(run.processes, run.train_seconds >= cfg.max_minutes * 60):
        return False
    console.print(f"Time budget of {cfg.max_minutes} min reached at episode {run.episode}.")
    if not run.history or run.history[-1]["episode"] != run.episode:
        from medmeta.training.selection import validate

        validate(run, label=f"episode {run.episode} (end of the time budget)")
    return True


def _meta_step(run: "Run", recent: dict[str, list[float]], episodes) -> range:
    """One optimiser step on the mean loss of the next meta-batch of episodes (taken from the
    iterator ``episodes`` of :meth:`Run.episode_loader`); returns the batch.
    With several processes each trains its share of the batch, and DDP averages the gradients
    (:mod:`medmeta.training.distributed`): each loss is scaled so that the average is the
    gradient of the whole batch's mean loss."""
    from medmeta.training.distributed import no_sync

    cfg = run.config
    started = time.perf_counter()
    batch = range(run.episode, min(run.episode + cfg.meta_batch, cfg.episodes))
    mine = run.processes.share(batch)
    share = len(batch) / run.processes.world_size  # episodes per process
    run.optimizer.zero_grad(set_to_none=True)
    for position, index in enumerate(mine):
        ep = next(episodes)
        assert ep.index == index, f"the loader gave episode {ep.index} where {index} was due"
        # what a method draws from torch's generator (MANN's label slots) is the episode's own,
        # whichever process trains it
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, EPISODE_RNG_STREAM, index]).generate_state(1)[0]))
        images = run.batch_to_device(ep.images)
        support, query = images[: ep.n_support], images[ep.n_support :]
        with no_sync(run.step_module, last=position == len(mine) - 1):
            with run.autocast():
                loss, logits = run.step_module(support, ep.support_labels.to(run.device), query, ep.query_labels.to(run.device))
            run.scaler.scale(loss / share).backward()
        recent["loss"].append(loss.item())
        recent["acc"].append(float((logits.argmax(1).cpu() == ep.query_labels).float().mean()))
    run.optimiser_step(clip=cfg.grad_clip)
    if run.ema is not None:
        run.ema.update_parameters(run.learner)
    for _ in batch:
        run.scheduler.step()
    run.episode += len(batch)
    run.train_seconds += time.perf_counter() - started
    return batch


def _validate_if_due(run: "Run", previous: int) -> None:
    cfg = run.config
    if run.episode // cfg.val_interval > previous // cfg.val_interval or run.episode == cfg.episodes:
        from medmeta.training.resume import save_state
        from medmeta.training.selection import validate

        validate(run, label=f"episode {run.episode}")
        save_state(run)
        run.train_mode()
