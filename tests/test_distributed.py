"""Training on several processes (torchrun, DistributedDataParallel over gloo on the CPU):
the same weights as one process with the same meta-batch, for every method; resume; the launch."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from medmeta.checkpoint import load_tensors
from medmeta.methods import list_methods
from medmeta.training import TrainConfig, train
from medmeta.training.config import ConfigError
from medmeta.training.distributed import Processes, check_distributed
from medmeta.training.launch import launch, process_environment, torchrun_command

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")


def _config(sample_protocol, out, **overrides) -> TrainConfig:
    """Two optimiser steps of a meta-batch of 2 episodes, on small images and a narrow conv4."""
    base = dict(
        protocol=str(sample_protocol), out=str(out), episodes=4, meta_batch=2, pretrain_epochs=0, val_interval=4,
        val_episodes=2, calibration_episodes=2, tuning_episodes=0, image_size=24, device="cpu", seed=3,
        precision="fp32", ema_decay=0.0, backbone_kwargs={"hidden": 16},
    )
    base.update(overrides)
    return TrainConfig(**base)


def _train_on_two_processes(config: TrainConfig, resume: bool = False) -> None:
    """``medmeta train --nproc 2``'s launch: torchrun, two gloo processes of one thread each."""
    launch(config, 2, resume=resume, overwrite=not resume, quiet=True)


@pytest.fixture
def one_thread(monkeypatch):
    """Torch on one thread, as each of the two processes on two cores: oneDNN's sums then run in
    the same order in both runs (a different split of a sum changes its last bits, which Adam's
    normalised steps grow, on near-zero gradients, up to the learning rate)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the launched processes'
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _parameters(out) -> dict[str, torch.Tensor]:
    """The model's trained parameters in the resume state (not the batch-norm running
    statistics: each process keeps those of its own episodes, as DDP does)."""
    tensors = load_tensors(out / "last.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith("model.") and "running_" not in k and "num_batches" not in k}


@pytest.mark.parametrize("method", list_methods())
def test_two_processes_train_the_weights_of_one_with_the_same_meta_batch(tmp_path, sample_protocol, method, one_thread):
    one = _config(sample_protocol, tmp_path / "one", method=method)
    train(one, quiet=True)
    _train_on_two_processes(_config(sample_protocol, tmp_path / "two", method=method))
    single, double = _parameters(tmp_path / "one"), _parameters(tmp_path / "two")
    assert single.keys() == double.keys() and single
    start = train(_config(sample_protocol, tmp_path / "untrained", method=method, episodes=0), quiet=True)
    untrained = _parameters(start.out)
    # the steps moved the weights, and two processes moved them exactly as far as one did
    assert max((single[k] - untrained[k]).abs().max() for k in single) > 1e-4
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=0, atol=1e-6, msg=key)


def test_two_processes_resume_where_they_stopped(tmp_path, sample_protocol, one_thread):
    _train_on_two_processes(_config(sample_protocol, tmp_path / "straight"))
    _train_on_two_processes(_config(sample_protocol, tmp_path / "resumed", episodes=2))
    _train_on_two_processes(_config(sample_protocol, tmp_path / "resumed"), resume=True)
    straight, resumed = _parameters(tmp_path / "straight"), _parameters(tmp_path / "resumed")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)
    assert load_tensors(tmp_path / "resumed" / "last.safetensors")["optim.0.step"].item() == 2


@pytest.mark.parametrize(
    "environment, rank, world_size, share",
    [
        ({}, 0, 1, [4, 5, 6, 7]),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, 0, 2, [4, 6]),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 1, 2, [5, 7]),
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, 3, 4, [7]),
    ],
)
def test_each_process_takes_every_nth_episode_of_a_batch(monkeypatch, environment, rank, world_size, share):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    processes = Processes.from_environment()
    assert (processes.rank, processes.world_size, processes.is_main) == (rank, world_size, rank == 0)
    assert processes.share(range(4, 8)) == share


@pytest.mark.parametrize(
    "meta_batch, episodes, field",
    [(3, 6, "meta_batch"), (1, 6, "meta_batch"), (2, 5, "episodes"), (4, 6, "episodes")],
)
def test_a_meta_batch_that_does_not_split_evenly_is_refused(meta_batch, episodes, field):
    with pytest.raises(ConfigError) as caught:
        check_distributed(Processes(rank=0, world_size=2), meta_batch, episodes)
    assert caught.value.field == field
    check_distributed(Processes(rank=0, world_size=2), 2, 6)  # even: accepted
    check_distributed(Processes(), 3, 5)  # one process: anything goes


def test_the_launch_runs_torchrun_with_the_settings_file(monkeypatch):
    command = torchrun_command("/tmp/c.yaml", 4, resume=True, quiet=True)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=4" in command and "--standalone" in command
    assert command[command.index("-m", 3) + 1 :] == ["medmeta.cli", "--quiet", "train", "--config", "/tmp/c.yaml", "--resume"]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = int(process_environment(2)["OMP_NUM_THREADS"])
    assert threads >= 1 and threads * 2 <= max(2, len(os.sched_getaffinity(0)))
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert process_environment(2)["OMP_NUM_THREADS"] == "7"  # the user's setting stands


def test_a_failed_process_is_a_clear_error(tmp_path, sample_protocol, monkeypatch):
    from medmeta.errors import MedmetaError

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # 5 episodes cannot be split into meta-batches of 2: every process refuses before any work
    with pytest.raises(MedmetaError, match="training on 2 processes failed"):
        launch(_config(sample_protocol, tmp_path / "bad", episodes=5), 2, overwrite=True, quiet=True)
    assert not (tmp_path / "bad" / "best.json").exists()


def test_train_nproc_hands_the_checked_settings_to_the_launch(tmp_path, sample_protocol, monkeypatch):
    from typer.testing import CliRunner

    from medmeta.cli.main import app

    launched = []
    monkeypatch.setattr("medmeta.training.launch.launch", lambda config, nproc, **kw: launched.append((config, nproc, kw)))
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", "--protocol", str(sample_protocol), "--out", str(out), "--meta-batch", "4", "--nproc", "2", "--overwrite"]
    )
    assert result.exit_code == 0, result.output
    ((config, nproc, options),) = launched
    assert (nproc, config.meta_batch, config.out, options["overwrite"], options["resume"]) == (2, 4, str(out), True, False)
    refused = CliRunner().invoke(app, ["train", "--protocol", str(sample_protocol), "--out", str(out), "--nproc", "0"])
    assert refused.exit_code != 0 and "--nproc" in refused.output
