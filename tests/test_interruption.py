"""Interrupted training: a run killed at any instant resumes to the same weights as a run that
was never stopped.

Before the fix the resume state was two files written one after the other (tensors, then
``last.json``); a kill between the two left new weights beside old counters, and ``--resume``
silently replayed episodes on top of the newer weights. The state is now one atomic file.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import torch

from medmeta.checkpoint import load_tensors
from medmeta.training import TrainConfig, train


def _config(protocol, out, **overrides) -> TrainConfig:
    base = dict(
        protocol=str(protocol), out=str(out), episodes=6, pretrain_epochs=0, val_interval=3, val_episodes=4,
        calibration_episodes=6, image_size=24, device="cpu", seed=5, augment="light",
    )
    base.update(overrides)
    return TrainConfig(**base)


def _assert_same_weights(a, b) -> None:
    left, right = load_tensors(a / "last.safetensors"), load_tensors(b / "last.safetensors")
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(right[key], left[key], rtol=0, atol=0, msg=key)


def test_a_kill_between_the_two_state_files_still_resumes_exactly(tmp_path, sample_protocol):
    """The torn save, made on purpose: ``last.safetensors`` of episode 6 beside ``last.json`` of
    episode 3 (a kill after the first write). Resuming must continue from episode 6."""
    train(_config(sample_protocol, tmp_path / "straight", episodes=9), quiet=True)
    run = tmp_path / "torn"
    train(_config(sample_protocol, run, episodes=3), quiet=True)
    stale = json.loads((run / "last.json").read_text())
    train(_config(sample_protocol, run, episodes=6), resume=True, quiet=True)
    (run / "last.json").write_text(json.dumps(stale))  # as if killed before last.json was replaced
    result = train(_config(sample_protocol, run, episodes=9), resume=True, quiet=True)
    assert result.episodes_done == 9
    _assert_same_weights(tmp_path / "straight", run)


def test_kill_9_during_training_then_resume_matches_an_uninterrupted_run(tmp_path, sample_protocol):
    episodes = 24
    config = _config(sample_protocol, tmp_path / "killed", episodes=episodes, val_interval=2)
    code = textwrap.dedent(f"""
        from medmeta.training import TrainConfig, train
        train(TrainConfig.from_dict({config.to_dict()!r}), quiet=True)
    """)
    process = subprocess.Popen([sys.executable, "-c", code])
    state = tmp_path / "killed" / "last.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads(state.read_text())["episode"] >= 4:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, "training ended before it could be killed"
    killed_at = json.loads(state.read_text())["episode"]
    assert killed_at < episodes

    result = train(_config(sample_protocol, tmp_path / "killed", episodes=episodes, val_interval=2), resume=True, quiet=True)
    assert result.episodes_done == episodes
    train(_config(sample_protocol, tmp_path / "straight", episodes=episodes, val_interval=2), quiet=True)
    _assert_same_weights(tmp_path / "straight", tmp_path / "killed")
    shutil.rmtree(tmp_path / "straight")
