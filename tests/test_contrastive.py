"""The self-supervised contrastive loss of pre-training (NT-Xent on two augmented views)."""

from __future__ import annotations

import math

import pytest
import torch

from medmeta.checkpoint import load_tensors
from medmeta.training import TrainConfig, train
from medmeta.training.contrastive import ProjectionHead, nt_xent


def _config(sample_protocol, out, **overrides):
    base = dict(
        protocol=str(sample_protocol), out=str(out), episodes=0, pretrain_epochs=2, pretrain_batch_size=16,
        val_interval=3, val_episodes=4, calibration_episodes=6, tuning_episodes=0, image_size=24, device="cpu", seed=5,
    )
    base.update(overrides)
    return TrainConfig(**base)


def test_nt_xent_exact_value_on_orthogonal_pairs():
    # each embedding's other view has similarity 1, the two others 0: -log(e / (e + 2)) per row
    z = torch.eye(2)
    assert nt_xent(z, z.clone(), temperature=1.0).item() == pytest.approx(math.log(2 + math.e) - 1, abs=1e-6)


def test_nt_xent_of_identical_embeddings_is_log_2n_minus_1():
    z = torch.ones(5, 3)
    assert nt_xent(z, z.clone(), temperature=0.2).item() == pytest.approx(math.log(9), abs=1e-5)


def test_nt_xent_falls_as_the_views_agree_and_its_gradient_reaches_both():
    torch.manual_seed(0)
    z1 = torch.randn(8, 16, requires_grad=True)
    noise = torch.randn(8, 16)
    close, far = nt_xent(z1, z1.detach() + 0.01 * noise), nt_xent(z1, noise)
    assert close.item() < 0.5 and far.item() > 2.0
    z2 = torch.randn(8, 16, requires_grad=True)
    nt_xent(z1, z2).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


@pytest.mark.parametrize("shapes", [((4, 3), (5, 3)), ((4,), (4,)), ((2, 3, 1), (2, 3, 1))])
def test_nt_xent_refuses_views_that_do_not_pair(shapes):
    with pytest.raises(ValueError, match="two views"):
        nt_xent(torch.zeros(shapes[0]), torch.zeros(shapes[1]))


def test_projection_head_shape_and_gradients():
    head = ProjectionHead(32, 8)
    out = head(torch.randn(5, 32))
    assert out.shape == (5, 8)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_pretraining_adds_the_contrastive_loss_with_its_weight(tmp_path, sample_protocol, monkeypatch):
    import medmeta.training.pretrain as pretrain

    calls = []
    original = pretrain.nt_xent

    def recording(z1, z2, *args, **kwargs):
        calls.append((tuple(z1.shape), tuple(z2.shape)))
        return original(z1, z2, *args, **kwargs)

    monkeypatch.setattr(pretrain, "nt_xent", recording)
    train(_config(sample_protocol, tmp_path / "plain", pretrain_epochs=1), quiet=True)
    assert calls == []
    train(_config(sample_protocol, tmp_path / "ssl", pretrain_epochs=1, pretrain_contrastive=0.5), quiet=True)
    assert calls and all(a == b and a[0] == 16 and a[1] == 128 for a, b in calls)
    plain = load_tensors(tmp_path / "plain" / "best.safetensors")
    ssl = load_tensors(tmp_path / "ssl" / "best.safetensors")
    assert plain.keys() == ssl.keys()  # the projection is not part of the checkpoint
    assert any(not torch.equal(plain[k], ssl[k]) for k in plain if k.endswith("weight"))


class _Stop(Exception):
    pass


def test_a_run_stopped_in_contrastive_pretraining_resumes_to_the_same_weights(tmp_path, sample_protocol, monkeypatch):
    import medmeta.training.resume as resume

    cfg = dict(pretrain_contrastive=0.5)
    train(_config(sample_protocol, tmp_path / "straight", **cfg), quiet=True)
    original, saves = resume.save_state, []

    def stop_after_first_epoch(run):
        original(run)
        saves.append(run.epoch)
        if run.epoch == 1:
            raise _Stop

    monkeypatch.setattr(resume, "save_state", stop_after_first_epoch)
    with pytest.raises(_Stop):
        train(_config(sample_protocol, tmp_path / "stopped", **cfg), quiet=True)
    state = load_tensors(tmp_path / "stopped" / "last.safetensors")
    assert any(k.startswith("projection.") for k in state)
    monkeypatch.setattr(resume, "save_state", original)
    train(_config(sample_protocol, tmp_path / "stopped", **cfg), resume=True, quiet=True)
    straight = load_tensors(tmp_path / "straight" / "best.safetensors")
    resumed = load_tensors(tmp_path / "stopped" / "best.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
