"""Born-again self-distillation of the pre-trained backbone (``--pretrain-generations``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medmeta.checkpoint import load_tensors
from medmeta.training import TrainConfig, train
from medmeta.training.config import ConfigError
from medmeta.training.distill import distillation_loss, generation_seed


def _config(sample_protocol, out, **overrides):
    base = dict(
        protocol=str(sample_protocol), out=str(out), episodes=0, pretrain_epochs=1, pretrain_generations=2,
        pretrain_batch_size=16, val_interval=3, val_episodes=4, calibration_episodes=6, tuning_episodes=0,
        image_size=24, device="cpu", seed=5,
    )
    base.update(overrides)
    return TrainConfig(**base)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_distillation_loss_exact_value(temperature):
    # the teacher's softened prediction is (0.75, 0.25) at every temperature, the student's uniform
    teacher = torch.tensor([[temperature * math.log(3.0), 0.0]])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    loss = distillation_loss(torch.zeros(1, 2), teacher, temperature)
    assert loss.item() == pytest.approx(temperature**2 * kl, rel=1e-6)


def test_distillation_loss_is_zero_on_agreement_and_trains_only_the_student():
    torch.manual_seed(0)
    student = torch.randn(6, 4, requires_grad=True)
    teacher = torch.randn(6, 4, requires_grad=True)
    assert distillation_loss(teacher.detach(), teacher.detach()).item() == pytest.approx(0.0, abs=1e-6)
    distillation_loss(student, teacher).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


def test_generation_seeds_differ_and_generation_0_keeps_the_run_seed():
    assert generation_seed(5, 0) == 5
    assert len({generation_seed(5, g) for g in range(4)}) == 4


def test_second_generation_learns_from_the_first_and_both_are_validated(tmp_path, sample_protocol, monkeypatch):
    import medmeta.training.pretrain as pretrain

    calls = []
    original = pretrain.distillation_loss

    def recording(student, teacher, *args, **kwargs):
        calls.append(tuple(student.shape))
        return original(student, teacher, *args, **kwargs)

    monkeypatch.setattr(pretrain, "distillation_loss", recording)
    train(_config(sample_protocol, tmp_path / "g2"), quiet=True)
    assert calls and all(shape[0] == 16 for shape in calls)  # generation 2's batches only
    history = json.loads((tmp_path / "g2" / "best.json").read_text())["training"]["history"]
    assert [h["epoch"] for h in history if h["phase"] == "pretrain"] == [1, 2]
    calls.clear()
    train(_config(sample_protocol, tmp_path / "g1", pretrain_generations=1), quiet=True)
    assert calls == []


def test_the_student_restarts_from_fresh_weights_of_its_generation(tmp_path, sample_protocol, monkeypatch):
    import medmeta.training.distill as distill

    seen = {}
    original = distill.fresh_backbone_weights

    def recording(run, generation):
        weights = original(run, generation)
        seen[generation] = {k: v.clone() for k, v in weights.items()}
        return weights

    monkeypatch.setattr(distill, "fresh_backbone_weights", recording)
    train(_config(sample_protocol, tmp_path / "g"), quiet=True)
    assert list(seen) == [1]
    # the first generation started from the run seed's weights; the second from its own
    from medmeta.training.build import build_learner

    torch.manual_seed(5)
    first = build_learner(_config(sample_protocol, tmp_path / "x")).backbone.state_dict()
    assert any(not torch.equal(first[k], seen[1][k]) for k in first if k.endswith("weight"))


class _Stop(Exception):
    pass


@pytest.mark.parametrize("stop_after", [2, 3], ids=["at the generation boundary", "within generation 2"])
def test_a_run_stopped_in_the_second_generation_resumes_to_the_same_weights(tmp_path, sample_protocol, monkeypatch, stop_after):
    import medmeta.training.resume as resume

    cfg = dict(pretrain_epochs=2)
    train(_config(sample_protocol, tmp_path / "straight", **cfg), quiet=True)
    original = resume.save_state

    def stop_in_generation_2(run):
        original(run)
        if run.epoch == stop_after:
            raise _Stop

    monkeypatch.setattr(resume, "save_state", stop_in_generation_2)
    with pytest.raises(_Stop):
        train(_config(sample_protocol, tmp_path / "stopped", **cfg), quiet=True)
    saved = load_tensors(tmp_path / "stopped" / "last.safetensors")
    assert any(k.startswith("teacher.") for k in saved) == (stop_after == 3)
    monkeypatch.setattr(resume, "save_state", original)
    train(_config(sample_protocol, tmp_path / "stopped", **cfg), resume=True, quiet=True)
    for name in ("best.safetensors", "last.safetensors"):
        straight, resumed = load_tensors(tmp_path / "straight" / name), load_tensors(tmp_path / "stopped" / name)
        assert straight.keys() == resumed.keys()
        for key in straight:
            torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=f"{name}:{key}")
    histories = [json.loads((tmp_path / run / "best.json").read_text())["training"]["history"] for run in ("straight", "stopped")]
    assert histories[0] == histories[1]


def test_generations_refuse_a_starting_checkpoint(tmp_path, sample_protocol):
    with pytest.raises(ConfigError, match="pretrain-generations"):
        _config(sample_protocol, tmp_path / "r", init_from=str(tmp_path / "other")).validate()
