"""The moving average of the weights in episodic training (``ema_decay``): exact values, its
place in model selection, the checkpoint it writes, and resume."""

from __future__ import annotations

import pytest
import torch

from medmeta.checkpoint import load_tensors
from medmeta.training import TrainConfig, train
from medmeta.training.config import ConfigError
from medmeta.training.episodic import moving_average


def _config(sample_protocol, out, **overrides):
    base = dict(
        protocol=str(sample_protocol), out=str(out), episodes=4, pretrain_epochs=0, val_interval=2, val_episodes=4,
        calibration_episodes=6, tuning_episodes=0, image_size=24, device="cpu", seed=3, augment="light", ema_decay=0.5,
    )
    base.update(overrides)
    return TrainConfig(**base)


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))


def test_the_average_of_two_updates_has_the_exact_values():
    net = _net()
    average = moving_average(net, decay=0.75)
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        net[1].running_mean.copy_(torch.tensor([4.0, -8.0]))
    average.update_parameters(net)  # the first update copies
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[5.0, 6.0], [7.0, 8.0]]))
        net[1].running_mean.copy_(torch.tensor([0.0, 0.0]))
    average.update_parameters(net)  # then 0.75 * old + 0.25 * new
    torch.testing.assert_close(average.module[0].weight, torch.tensor([[2.0, 3.0], [4.0, 5.0]]), rtol=0, atol=0)
    # normalisation statistics are averaged with the parameters
    torch.testing.assert_close(average.module[1].running_mean, torch.tensor([3.0, -6.0]), rtol=0, atol=0)
    assert int(average.n_averaged) == 2


def test_no_average_without_a_decay():
    assert moving_average(_net(), decay=0.0) is None


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_a_decay_outside_0_1_is_refused(tmp_path, sample_protocol, decay):
    with pytest.raises(ConfigError, match="ema_decay"):
        _config(sample_protocol, tmp_path / "r", ema_decay=decay).validate()


def test_every_episodic_validation_scores_the_average_too_and_the_checkpoint_is_the_best_of_all(tmp_path, sample_protocol):
    # one validation, at the last episode: the checkpoint is whichever of the two scored higher
    result = train(_config(sample_protocol, tmp_path / "run", val_interval=4), quiet=True)
    at_end = [h for h in result.history if h["episode"] == 4]
    assert [h.get("weights", "current") for h in at_end] == ["current", "average"]
    assert not any(h.get("weights") for h in result.history if h["episode"] < 4)  # none before the first step
    last = load_tensors(tmp_path / "run" / "last.safetensors")
    own = {k[len("model."):]: v for k, v in last.items() if k.startswith("model.")}
    average = {k[len("ema.module."):]: v for k, v in last.items() if k.startswith("ema.module.")}
    assert own.keys() == average.keys()
    assert any(not torch.equal(own[k], average[k]) for k in own if own[k].is_floating_point())
    best_accuracy = max(h["accuracy"] for h in result.history)
    assert result.best_val["accuracy"] == best_accuracy
    best = load_tensors(tmp_path / "run" / "best.safetensors")
    if result.best_val["episode"] == 4:
        expected = average if result.best_val.get("weights") == "average" else own
        for key, value in best.items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def test_the_learner_gets_its_own_weights_back_after_scoring_the_average(tmp_path, sample_protocol):
    from medmeta.training.loop import Run

    run = Run(_config(sample_protocol, tmp_path / "run"), quiet=True)
    run.start_phase("episodic")
    params = list(run.learner.parameters())
    before = {k: v.clone() for k, v in run.learner.state_dict().items()}
    with torch.no_grad():
        run.ema.update_parameters(run.learner)
        for p in run.ema.module.parameters():
            p.add_(1.0)
    with run.averaged_weights():
        inside = run.learner.state_dict()
        assert all(torch.equal(inside[k], v) for k, v in run.ema.module.state_dict().items())
    after = run.learner.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(a is b for a, b in zip(params, run.learner.parameters()))  # the optimiser's references hold


def test_resume_continues_the_average_exactly(tmp_path, sample_protocol):
    train(_config(sample_protocol, tmp_path / "straight"), quiet=True)
    train(_config(sample_protocol, tmp_path / "resumed", episodes=2), quiet=True)
    train(_config(sample_protocol, tmp_path / "resumed"), resume=True, quiet=True)
    straight = load_tensors(tmp_path / "straight" / "last.safetensors")
    resumed = load_tensors(tmp_path / "resumed" / "last.safetensors")
    assert any(k.startswith("ema.") for k in straight) and straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
