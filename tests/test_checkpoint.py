"""Checkpoints: safetensors + JSON round trip, verification, and refusal of anything else."""

from __future__ import annotations

import json

import pytest
import torch

from medmeta.backbones import create_backbone
from medmeta.checkpoint import (
    build_learner,
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
)
from medmeta.errors import CheckpointError
from medmeta.methods import create_method


def _saved(tmp_path):
    torch.manual_seed(0)
    learner = create_method("protonet", create_backbone("conv4", in_channels=1, hidden=8), scale=2.0)
    # move BatchNorm statistics away from their defaults so the round trip must carry buffers
    learner.train()
    learner.backbone(torch.rand(8, 1, 16, 16))
    meta = {
        "method": {"name": "protonet", "hparams": learner.hparams()},
        "backbone": {"name": "conv4", "kwargs": {"in_channels": 1, "hidden": 8}},
        "preprocessing": {"image_size": 16, "channels": 1},
        "calibration": {"method": "temperature", "temperature": 1.7},
    }
    path = save_checkpoint(tmp_path / "best.json", learner, meta)
    return learner.eval(), path


def test_round_trip_gives_identical_predictions(tmp_path):
    learner, path = _saved(tmp_path)
    ckpt = load_checkpoint(tmp_path)  # a run folder resolves to best.json
    rebuilt = build_learner(ckpt)
    assert ckpt.temperature == 1.7 and ckpt.meta["format"] == "medmeta-checkpoint"
    assert set(ckpt.meta["versions"]) >= {"medmeta", "torch", "monai"}
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        expected = learner.fit_support(x[:4], y).predict_query(x[4:])
        actual = rebuilt.fit_support(x[:4], y).predict_query(x[4:])
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert load_checkpoint(path.with_suffix(".safetensors")).sha256 == ckpt.sha256


def test_tampered_weights_are_refused(tmp_path):
    _, path = _saved(tmp_path)
    weights = path.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"hello": 1}', "not a medmeta checkpoint"),
        ("not json at all", "not a medmeta checkpoint"),
        ('{"format": "medmeta-checkpoint", "format_version": 1}', "no 'weights' entry"),
    ],
)
def test_files_that_are_not_checkpoints_are_refused(tmp_path, content, message):
    path = tmp_path / "model.json"
    path.write_text(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_pickle_file_posing_as_safetensors_is_refused_without_unpickling(tmp_path):
    import hashlib
    import pickle

    weights = tmp_path / "evil.safetensors"
    weights.write_bytes(pickle.dumps({"a": 1}))
    sidecar = {
        "format": "medmeta-checkpoint",
        "format_version": 1,
        "weights": {"file": weights.name, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()},
    }
    (tmp_path / "evil.json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(tmp_path / "evil.json")


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")


def test_optimizer_state_survives_the_tensor_split():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, rest = optimizer_to_tensors(opt.state_dict(), "optim")
    json.dumps(rest)  # the non-tensor part must be plain JSON
    restored = torch.optim.Adam(model.parameters(), lr=0.5)
    restored.load_state_dict(optimizer_from_tensors(tensors, json.loads(json.dumps(rest)), "optim"))
    for key in ("exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(restored.state_dict()["state"][0][key], opt.state_dict()["state"][0][key])
    assert restored.param_groups[0]["lr"] == 0.01
