"""Resume state: ``last.safetensors`` (weights, their moving average, optimiser tensors, torch RNG, and in its header
the config, phase, counters, scheduler and history), written after every pre-training epoch and
validation, and read back by ``--resume``.

The state is one file, replaced atomically, so a run killed at any instant (``kill -9`` while
saving included) resumes from a state whose weights and counters belong together. ``last.json``
is a readable copy of the header's part, written after it; runs saved before the header held
the state are read from ``last.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from medmeta.checkpoint import load_tensors, optimizer_from_tensors, optimizer_to_tensors, save_tensors, tensors_metadata
from medmeta.errors import CheckpointError
from medmeta.io import atomic_write_json, json_text
from medmeta.training.config import TrainConfig

if TYPE_CHECKING:
    from medmeta.training.loop import Run

STATE_FORMAT = "medmeta-train-state"
#: The key of the state JSON in ``last.safetensors``'s header.
STATE_KEY = "medmeta_train_state"


def save_state(run: "Run") -> None:
    """Write the run's resume state into its folder: one atomic ``last.safetensors`` holding
    tensors and state, then its readable copy ``last.json`` (process 0 only, when there are several)."""
    if not run.processes.is_main:
        return
    assert run.optimizer is not None
    tensors = {f"model.{k}": v for k, v in run.learner.state_dict().items()}
    if run.head is not None:
        tensors.update({f"head.{k}": v for k, v in run.head.state_dict().items()})
    if run.projection is not None:
        tensors.update({f"projection.{k}": v for k, v in run.projection.state_dict().items()})
    if run.teacher is not None:
        tensors.update({f"teacher.{k}": v for k, v in run.teacher.state_dict().items()})
    if run.ema is not None:
        tensors.update({f"ema.{k}": v for k, v in run.ema.state_dict().items()})
    optim_tensors, optim_rest = optimizer_to_tensors(run.optimizer.state_dict(), "optim")
    tensors.update(optim_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    state = {
        "format": STATE_FORMAT,
        "config": run.config.to_dict(),
        "phase": run.phase,
        "epoch": run.epoch,
        "episode": run.episode,
        "generation": run.generation,
        "train_seconds": run.train_seconds,
        "optimizer": optim_rest,
        "scheduler": run.scheduler.state_dict(),
        "grad_scaler": run.scaler.state_dict(),
        "best_val": run.best_val,
        "history": run.history,
    }
    save_tensors(run.out / "last.safetensors", tensors, metadata={STATE_KEY: json_text(state, indent=None)})
    atomic_write_json(run.out / "last.json", state)


def read_state(out: str | Path) -> dict:
    """The resume state of the run in ``out``: the header of ``last.safetensors`` (or, for runs
    saved before it held the state, ``last.json``)."""
    out = Path(out)
    tensors_path, json_path = out / "last.safetensors", out / "last.json"
    try:
        if tensors_path.is_file():
            text = tensors_metadata(tensors_path).get(STATE_KEY)
            if text is not None:
                return _checked(json.loads(text), tensors_path)
        return _checked(json.loads(json_path.read_text(encoding="utf-8")), json_path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{json_path}: cannot resume, no readable training state ({exc})") from None


def _checked(state, path: Path) -> dict:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a medmeta training state")
    return state


def load_state(run: "Run") -> None:
    """Restore what :func:`save_state` wrote: weights, counters, phase, optimiser, scheduler, RNG."""
    state = read_state(run.out)
    tensors = load_tensors(run.out / "last.safetensors")
    run.learner.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    run.epoch, run.episode = int(state["epoch"]), int(state["episode"])
    run.train_seconds = float(state.get("train_seconds", 0.0))
    run.best_val, run.history = state["best_val"], state["history"]
    run.generation = int(state.get("generation", 0))
    run.start_phase(state["phase"])
    if run.head is not None:
        run.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    if run.projection is not None:
        run.projection.load_state_dict({k[11:]: v for k, v in tensors.items() if k.startswith("projection.")})
    if run.teacher is not None:
        run.teacher.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("teacher.")})
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    if run.ema is not None and ema:  # a state saved without one (older runs) starts the average afresh
        run.ema.load_state_dict(ema)
    assert run.optimizer is not None
    run.optimizer.load_state_dict(optimizer_from_tensors(tensors, state["optimizer"], "optim"))
    run.scheduler.load_state_dict(state["scheduler"])
    if state.get("grad_scaler") and run.scaler.is_enabled():  # fp16 then, and now: its loss scale continues
        run.scaler.load_state_dict(state["grad_scaler"])
    torch.set_rng_state(tensors["rng.torch"])


# What a resumed run may change: its budget, where and how it runs, and where it is (a moved folder).
RESUME_MAY_CHANGE = ("episodes", "device", "precision", "compile", "workers", "cache_dir", "cache_in_memory", "max_minutes", "out")


def _stored_config(out: str | Path) -> TrainConfig:
    try:
        stored = read_state(out)["config"]
    except CheckpointError:
        raise CheckpointError(f"{Path(out) / 'last.json'}: nothing to resume (no readable training state in {out})") from None
    except KeyError:
        raise CheckpointError(f"{Path(out) / 'last.json'}: nothing to resume (the training state has no config)") from None
    return TrainConfig.from_dict(stored)


def resumed_config(config: TrainConfig) -> TrainConfig:
    """On resume the stored configuration wins, except what :data:`RESUME_MAY_CHANGE` names (the
    budget, the device and precision); the run is always written where ``config.out`` says (the
    folder may have been moved)."""
    merged = _stored_config(config.out)
    for name in RESUME_MAY_CHANGE:
        setattr(merged, name, getattr(config, name))
    return merged


def check_resume_options(out: str | Path, given: dict) -> None:
    """Refuse options given with ``--resume`` that differ from the run's own (``given``: field ->
    value as the command line set them); a resumed run cannot change its method or data."""
    from medmeta.training.config import ConfigError, option_name

    stored = _stored_config(out).to_dict()
    wanted = TrainConfig(**{**stored, **given}).to_dict()
    differing = [name for name in given if name not in RESUME_MAY_CHANGE and wanted[name] != stored[name]]
    if differing:
        listed = ", ".join(f"{option_name(n)} {wanted[n]!r} (the run has {stored[n]!r})" for n in differing)
        raise ConfigError(
            f"{out}: --resume continues the run as it was configured; these options differ from it: {listed}. "
            "Drop them, or start a new run in another --out",
            differing[0],
        )
