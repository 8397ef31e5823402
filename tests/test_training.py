"""Training: resume equality, the end-to-end result, checkpoint contents, calibration."""

from __future__ import annotations

import json
import traceback

import pytest
import torch

from medmeta.checkpoint import load_tensors
from medmeta.evaluation import EvaluationSettings, evaluate_checkpoint
from medmeta.training import TrainConfig, train


def _config(sample_protocol, out, **overrides):
    base = dict(
        protocol=str(sample_protocol), out=str(out), episodes=6, pretrain_epochs=0, val_interval=3, val_episodes=4,
        calibration_episodes=6, image_size=24, device="cpu", seed=5, augment="light",
    )
    base.update(overrides)
    return TrainConfig(**base)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, sample_protocol):
    train(_config(sample_protocol, tmp_path / "straight", episodes=6), quiet=True)
    train(_config(sample_protocol, tmp_path / "resumed", episodes=3), quiet=True)
    result = train(_config(sample_protocol, tmp_path / "resumed", episodes=6), resume=True, quiet=True)
    assert result.episodes_done == 6
    straight = load_tensors(tmp_path / "straight" / "last.safetensors")
    resumed = load_tensors(tmp_path / "resumed" / "last.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


def test_resume_after_pretraining_matches_too(tmp_path, sample_protocol):
    cfg = dict(pretrain_epochs=2, pretrain_batch_size=64, episodes=2, val_interval=2)
    train(_config(sample_protocol, tmp_path / "a", **cfg), quiet=True)
    # stop at the boundary between pre-training and episodes (episodes=0), then resume to 2
    train(_config(sample_protocol, tmp_path / "b", **{**cfg, "episodes": 0}), quiet=True)
    train(_config(sample_protocol, tmp_path / "b", **cfg), resume=True, quiet=True)
    a = load_tensors(tmp_path / "a" / "last.safetensors")
    b = load_tensors(tmp_path / "b" / "last.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_resume_without_state_is_a_clear_error(tmp_path, sample_protocol):
    from medmeta.errors import CheckpointError

    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(_config(sample_protocol, tmp_path / "empty"), resume=True, quiet=True)


def test_checkpoint_sidecar_records_what_is_needed(trained_run):
    meta = json.loads((trained_run / "best.json").read_text())
    assert meta["format"] == "medmeta-checkpoint"
    assert meta["method"]["name"] == "protonet" and meta["backbone"]["name"] == "conv4"
    assert meta["preprocessing"]["image_size"] == 48
    assert meta["protocol"]["classes"]["test"] == ["synth/gradient_halo", "synth/triangle_mass", "synth/concentric_rings"]
    assert len(meta["weights"]["sha256"]) == 64
    cal = meta["calibration"]
    assert cal["method"] == "temperature" and 0.01 < cal["temperature"] < 100
    assert cal["ece_after_fit_episodes"] <= cal["ece_before_fit_episodes"] + 1e-9
    conformal, referral = cal["conformal"], cal["referral"]
    assert conformal["score"] == "lac" and conformal["coverage"] == 0.9 and conformal["class_conditional"] is False
    assert conformal["threshold"] is None or 0 <= conformal["threshold"] <= 1
    assert conformal["n_calibration"] == 40 * 2 * 10  # calibration episodes x val way x query
    assert 0 <= conformal["coverage_val"] <= 1 and conformal["mean_set_size_val"] >= 0
    assert referral["share"] == 0.05 and referral["distance_threshold"] > 0  # ProtoNet has a distance
    assert "NaN" not in (trained_run / "best.json").read_text().split('"calibration"')[1]


def test_short_run_beats_chance_on_unseen_test_conditions(trained_run):
    settings = EvaluationSettings(shot=5, episodes=40, seed=0)
    stats = evaluate_checkpoint(trained_run, settings, device="cpu", quiet=True).to_dict()
    assert stats["way"] == 3 and stats["episodes"] == 40
    # chance is 1/3 on the 3 held-out synthetic conditions
    assert stats["accuracy"] - stats["accuracy_ci95"] > 0.5, stats
    assert stats["macro_auc"] > 0.7, stats


def test_unknown_shot_query_refused_before_training(tmp_path, sample_protocol):
    from medmeta.errors import ProtocolError

    with pytest.raises(ProtocolError, match="fewer images than shot"):
        train(_config(sample_protocol, tmp_path / "x", shot=25, query=10), quiet=True)


def test_init_from_copies_the_backbone_and_refuses_another_architecture(tmp_path, trained_run, sample_protocol):
    from medmeta.checkpoint import load_checkpoint
    from medmeta.errors import CheckpointError
    from medmeta.training.build import build_learner, init_backbone

    config = _config(sample_protocol, tmp_path / "x", image_size=48, init_from=str(trained_run / "best.json"))
    learner = build_learner(config)
    init_backbone(learner, config)
    source = load_checkpoint(trained_run).tensors
    for key, value in learner.backbone.state_dict().items():
        torch.testing.assert_close(value, source[f"backbone.{key}"], rtol=0, atol=0)
    other = _config(sample_protocol, tmp_path / "y", init_from=str(trained_run / "best.json"), backbone_kwargs={"hidden": 32})
    with pytest.raises(CheckpointError, match="differs"):
        init_backbone(build_learner(other), other)


def test_backbone_arguments_compare_with_their_defaults_filled_in():
    from medmeta.training.build import _with_defaults

    assert _with_defaults("conv4", {"in_channels": 3}) == _with_defaults("conv4", {"in_channels": 3, "norm_kind": "batch"})
    assert _with_defaults("conv4", {}) != _with_defaults("conv4", {"norm_kind": "group"})
    assert _with_defaults("resnet12", {"channels": (4, 8)}) == _with_defaults("resnet12", {"channels": [4, 8]})


def test_time_budget_stop_still_validates_the_final_model(tmp_path, sample_protocol):
    result = train(_config(sample_protocol, tmp_path / "t", episodes=50, val_interval=1000, max_minutes=1e-9), quiet=True)
    assert result.episodes_done == 1  # the first step runs, then the budget is spent
    # the pre-trained start, then the final model: its weights and their moving average (one step)
    assert [(h["episode"], h.get("weights")) for h in result.history] == [(0, None), (1, None), (1, "average")]


def test_backbone_lr_zero_freezes_the_backbone_and_its_statistics_while_the_method_learns(tmp_path, sample_protocol, trained_run):
    from medmeta.checkpoint import load_checkpoint

    start = load_checkpoint(trained_run).tensors
    config = _config(
        sample_protocol, tmp_path / "frozen", method="matching", method_kwargs={"fce": True}, image_size=48,
        init_from=str(trained_run / "best.json"), backbone_lr=0.0, episodes=3,
    )
    train(config, quiet=True)
    state = load_tensors(tmp_path / "frozen" / "last.safetensors")
    after = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    backbone = [k for k in after if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone)  # BatchNorm statistics are frozen too
    for key in backbone:
        torch.testing.assert_close(after[key], start[key], rtol=0, atol=0, msg=key)
    from medmeta.methods import create_method
    from medmeta.backbones import create_backbone

    torch.manual_seed(config.seed)
    fresh = create_method("matching", create_backbone("conv4"), fce=True).state_dict()
    own = [k for k in after if not k.startswith("backbone.")]
    assert own and any(not torch.equal(after[k], fresh[k]) for k in own)


def test_backbone_lr_zero_refused_for_a_method_with_nothing_else_to_train(tmp_path, sample_protocol):
    with pytest.raises(ValueError, match="would train nothing"):
        train(_config(sample_protocol, tmp_path / "p", backbone_lr=0.0), quiet=True)


def test_grad_clip_caps_the_gradient_norm_of_every_step(tmp_path, sample_protocol, monkeypatch):
    norms = []
    original = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        if not any(frame.filename.endswith("episodic.py") for frame in traceback.extract_stack()):
            return original(self, *args, **kwargs)  # e.g. the finetune head's steps at calibration
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    train(_config(sample_protocol, tmp_path / "c", episodes=3, grad_clip=1e-3), quiet=True)
    assert len(norms) == 3 and max(norms) <= 1e-3 * (1 + 1e-4)
    norms.clear()
    train(_config(sample_protocol, tmp_path / "u", episodes=3), quiet=True)
    assert min(norms) > 1e-3  # without clipping the same steps are far larger


def test_pretraining_smooths_its_labels_as_configured(tmp_path, sample_protocol, monkeypatch):
    from torch.nn import functional as F

    seen = []
    original = F.cross_entropy

    def recording(*args, **kwargs):
        if "label_smoothing" in kwargs:  # the pre-training loss (calibration's has none)
            seen.append(kwargs["label_smoothing"])
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", recording)
    train(_config(sample_protocol, tmp_path / "s", episodes=0, pretrain_epochs=1, pretrain_label_smoothing=0.2), quiet=True)
    assert seen and set(seen) == {0.2}
    seen.clear()
    train(_config(sample_protocol, tmp_path / "p", episodes=0, pretrain_epochs=1), quiet=True)
    assert seen and set(seen) == {0.0}


def test_train_shots_draws_each_episode_shot_from_the_list_reproducibly(tmp_path, sample_protocol):
    from medmeta.training.loop import Run as _Run

    run = _Run(_config(sample_protocol, tmp_path / "s", train_shots=[3, 1, 3]), quiet=True)
    run.load_images()
    assert run.train_shots == [1, 3] and run.shot == 5  # validation keeps the protocol's shot
    shots = [len(run.train_episode(i).support) // run.way for i in range(40)]
    assert set(shots) == {1, 3} and 10 <= shots.count(1) <= 30
    again = _Run(_config(sample_protocol, tmp_path / "t", train_shots=[1, 3]), quiet=True)
    again.load_images()
    assert [again.train_episode(i).support for i in range(40)] == [run.train_episode(i).support for i in range(40)]
    # a single training shot is the ordinary sampler
    plain = _Run(_config(sample_protocol, tmp_path / "p"), quiet=True)
    plain.load_images()
    assert plain.train_shots == [5] and len(plain.train_episode(0).support) == 5 * plain.way
    with pytest.raises(ValueError, match="train_shots must be positive"):
        _Run(_config(sample_protocol, tmp_path / "z", train_shots=[0, 2]), quiet=True)


def test_the_run_folder_keeps_a_config_yaml_that_reproduces_the_run(trained_run):
    from medmeta.training.config_file import CONFIG_FILE

    stored = json.loads((trained_run / "best.json").read_text())["training"]["config"]
    assert TrainConfig.from_yaml(trained_run / CONFIG_FILE) == TrainConfig.from_dict(stored)


def test_training_stores_the_calibration_record_and_recalibrating_gives_it_again(trained_run, tmp_path):
    """The held-out check at the end of training reuses the selecting validation's episodes;
    ``medmeta calibrate`` runs them again: the records must be equal, number for number."""
    import shutil

    from medmeta.calibration import CalibrationRecord
    from medmeta.training.calibration import recalibrate, sidecar_entry

    stored = json.loads((trained_run / "best.json").read_text())["calibration"]
    record = CalibrationRecord.from_dict(stored)
    assert record.fitted and record.schema_version == 1 and sidecar_entry(record) == stored
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    again = recalibrate(run, device="cpu", quiet=True)
    assert isinstance(again, CalibrationRecord) and sidecar_entry(again) == stored
    assert json.loads((run / "best.json").read_text())["calibration"] == stored


def test_an_uncalibrated_checkpoint_carries_the_empty_record(tmp_path, sample_protocol):
    from medmeta.calibration import CalibrationRecord
    from medmeta.training.loop import Run
    from medmeta.training.selection import checkpoint_meta

    meta = checkpoint_meta(Run(_config(sample_protocol, tmp_path / "r"), quiet=True))
    assert meta["calibration"] == CalibrationRecord().to_dict() and meta["calibration"]["method"] == "none"


# [device, image_ndim, expected layout]
MEMORY_FORMATS = [
    ["cpu", 4, torch.channels_last],
    ["cpu", 5, torch.channels_last_3d],
    ["cuda", 4, torch.contiguous_format],
]


@pytest.mark.parametrize("device, ndim, expected", MEMORY_FORMATS)
def test_training_memory_format_table(device, ndim, expected):
    from medmeta.device import training_memory_format

    assert training_memory_format(torch.device(device), ndim) is expected


def test_training_runs_in_channels_last_on_the_cpu_and_validates_in_the_checkpoint_layout(tmp_path, sample_protocol, monkeypatch):
    from medmeta.training import selection

    seen = {"steps": [], "validations": []}
    original_step, original_run_episodes = torch.optim.Adam.step, selection.run_episodes

    def layout(params) -> tuple[bool, bool]:
        convs = [p for p in params if p.dim() == 4]
        return (all(p.is_contiguous(memory_format=torch.channels_last) for p in convs), all(p.is_contiguous() for p in convs))

    def layout_checking_step(self, *args, **kwargs):
        if any(frame.filename.endswith("episodic.py") for frame in traceback.extract_stack()):  # not the finetune head's
            seen["steps"].append(layout(p for group in self.param_groups for p in group["params"]))
        return original_step(self, *args, **kwargs)

    def layout_checking_episodes(learner, *args, **kwargs):
        seen["validations"].append(layout(learner.parameters()))
        return original_run_episodes(learner, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", layout_checking_step)
    monkeypatch.setattr(selection, "run_episodes", layout_checking_episodes)
    train(_config(sample_protocol, tmp_path / "run", episodes=4, val_interval=2), quiet=True)
    assert seen["steps"] == [(True, False)] * 4  # training: channels_last
    # before episodic training, then at 2 and 4 the weights and their moving average: every
    # validation in the layout a checkpoint is loaded in
    assert seen["validations"] == [(False, True)] * 5


def test_channels_last_gives_the_default_layout_s_loss_and_gradients():
    from medmeta.training.build import build_learner

    torch.manual_seed(0)
    learner = build_learner(TrainConfig(image_size=32))
    images = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(3).repeat_interleave(4)
    support, query = [0, 4, 8], [i for i in range(12) if i not in (0, 4, 8)]

    def loss_and_grads(memory_format):
        learner.to(memory_format=memory_format)
        learner.zero_grad(set_to_none=True)
        x = images.contiguous(memory_format=memory_format)
        loss, _ = learner.episode_loss(x[support], labels[support], x[query], labels[query])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in learner.parameters()]

    loss_nhwc, grads_nhwc = loss_and_grads(torch.channels_last)
    loss_nchw, grads_nchw = loss_and_grads(torch.contiguous_format)
    torch.testing.assert_close(loss_nhwc, loss_nchw, rtol=1e-5, atol=1e-6)
    assert len(grads_nhwc) == len(grads_nchw) > 0
    for a, b in zip(grads_nhwc, grads_nchw):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
