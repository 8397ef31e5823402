"""Mixed precision of training steps: which precision runs, autocast and loss scaling, every
method under bfloat16, and a training run's record of it."""

from __future__ import annotations

import json

import pytest
import torch

from medmeta.backbones.registry import create_backbone
from medmeta.errors import MedmetaError
from medmeta.methods import create_method, list_methods
from medmeta.precision import autocast, grad_scaler, resolve_precision
from medmeta.training import TrainConfig, train
from medmeta.training.config import ConfigError

from conftest import toy_episode

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    "name, device, cuda_bf16, expected",
    [
        ["auto", CPU, False, "fp32"],  # bf16 tested below fp32 on derm-rare: not the default
        ["auto", CUDA, True, "fp32"],
        ["fp32", CPU, False, "fp32"],
        ["bf16", CPU, False, "bf16"],
        ["fp16", CUDA, False, "fp16"],
        ["bf16", CUDA, True, "bf16"],
    ],
)
def test_the_precision_a_run_uses(monkeypatch, name, device, cuda_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    assert resolve_precision(name, device) == expected


@pytest.mark.parametrize(
    "name, device, message",
    [["fp16", CPU, "needs a GPU"], ["fp64", CPU, "unknown precision"], ["bf16", CUDA, "no bfloat16 support"]],
)
def test_a_precision_the_device_cannot_run_is_refused(monkeypatch, name, device, message):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(MedmetaError, match=message):
        resolve_precision(name, device)


def test_autocast_computes_convolutions_in_bfloat16_and_fp32_leaves_them():
    conv, x = torch.nn.Conv2d(1, 2, 3), torch.randn(1, 1, 8, 8)
    with autocast(CPU, "bf16"):
        assert conv(x).dtype == torch.bfloat16
    with autocast(CPU, "fp32"):
        assert conv(x).dtype == torch.float32
    assert conv.weight.dtype == torch.float32  # the weights themselves stay float32


@pytest.mark.parametrize("precision, enabled", [["fp16", True], ["bf16", False], ["fp32", False]])
def test_only_fp16_scales_the_loss(precision, enabled):
    scaler = grad_scaler(CPU, precision)
    assert scaler.is_enabled() is enabled
    loss = torch.tensor(2.0)
    assert (scaler.scale(loss) > loss).item() is enabled


@pytest.mark.parametrize("method", list_methods())
def test_every_method_trains_under_bfloat16(method):
    """Finite loss, a gradient for every parameter, and the same loss as float32 to bfloat16's
    precision (8 bits of mantissa: about 1%), second-order MAML included."""
    torch.manual_seed(0)
    learner = create_method(method, create_backbone("conv4", in_channels=1, hidden=8))
    learner.train()
    xs, ys, xq, yq = toy_episode(3, shot=2, query=3, size=16)
    state = torch.get_rng_state()
    loss32, _ = learner.episode_loss(xs, ys, xq, yq)
    torch.set_rng_state(state)  # MANN draws its label slots: the same ones again
    with autocast(CPU, "bf16"):
        loss16, logits = learner.episode_loss(xs, ys, xq, yq)
    loss16.backward()
    assert torch.isfinite(loss16) and torch.isfinite(logits).all()
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.05, abs=0.02)
    missing = [n for n, p in learner.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing


def test_a_bf16_run_trains_and_says_so(tmp_path, sample_protocol):
    config = TrainConfig(
        protocol=str(sample_protocol), out=str(tmp_path / "run"), episodes=4, pretrain_epochs=1, pretrain_batch_size=32,
        val_interval=4, val_episodes=4, calibration_episodes=4, tuning_episodes=0, image_size=24, device="cpu",
        precision="bf16", backbone_kwargs={"hidden": 16},
    )
    result = train(config, quiet=True)
    meta = json.loads((tmp_path / "run" / "best.json").read_text())
    assert meta["training"]["precision"] == "bf16" and meta["training"]["processes"] == 1
    assert result.episodes_done == 4 and 0 <= result.best_val["accuracy"] <= 1
    assert meta["training"]["config"]["precision"] == "bf16"


def test_fp16_on_the_cpu_is_refused_naming_the_option(tmp_path, sample_protocol):
    config = TrainConfig(protocol=str(sample_protocol), out=str(tmp_path / "run"), device="cpu", precision="fp16")
    with pytest.raises(ConfigError, match="needs a GPU") as caught:
        train(config, quiet=True)
    assert caught.value.field == "precision"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_gpu_run_trains_in_half_precision(tmp_path, sample_protocol, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    config = TrainConfig(
        protocol=str(sample_protocol), out=str(tmp_path / "run"), episodes=6, pretrain_epochs=1, val_interval=6,
        val_episodes=4, calibration_episodes=4, tuning_episodes=0, image_size=32, device="cuda", precision=precision,
    )
    result = train(config, quiet=True)
    assert result.episodes_done == 6 and result.best_val["accuracy"] > 0


def test_compile_is_refused_where_torch_compile_cannot_differentiate_twice(sample_protocol):
    with pytest.raises(ConfigError, match="differentiates twice") as caught:
        TrainConfig(protocol=str(sample_protocol), method="maml", compile=True).validate()
    assert caught.value.field == "compile"
    TrainConfig(protocol=str(sample_protocol), method="fomaml", compile=True).validate()  # first order: accepted
    TrainConfig(protocol=str(sample_protocol), method="maml", method_kwargs={"first_order": True}, compile=True).validate()


def test_a_compiled_backbone_trains_as_the_eager_one():
    """``--compile`` compiles the backbone in place: the same parameter names (checkpoints load
    either way), and the same loss and gradients to float32 rounding."""
    xs, ys, xq, yq = toy_episode(3, shot=2, query=3, size=16)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        learner = create_method("protonet", create_backbone("conv4", in_channels=1, hidden=8))
        if compiled:
            learner.backbone.compile()
        loss, _ = learner.episode_loss(xs, ys, xq, yq)
        loss.backward()
        results.append((list(learner.state_dict()), loss.detach(), [p.grad for p in learner.parameters()]))
    (names, loss, grads), (names_c, loss_c, grads_c) = results
    assert names_c == names
    torch.testing.assert_close(loss_c, loss, rtol=1e-4, atol=1e-5)
    for grad_c, grad in zip(grads_c, grads):
        torch.testing.assert_close(grad_c, grad, rtol=1e-3, atol=1e-5)
