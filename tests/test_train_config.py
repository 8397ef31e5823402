"""TrainConfig: validation of every setting, the --config YAML file, and the train options
generated from the config's fields. No training runs here (the command is intercepted)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields, replace

import pytest
import torch
from typer.testing import CliRunner

from medmeta.errors import CalibrationError, MedmetaError
from medmeta.training import ConfigError, TrainConfig
from medmeta.training.config import help_text, option_name

runner = CliRunner()


def _config(sample_protocol, **overrides) -> TrainConfig:
    return TrainConfig(**{"protocol": str(sample_protocol), "out": "unused", "device": "cpu", **overrides})


# (overrides, field named by the error, message fragment)
REFUSED = [
    ({"method": "nope"}, "method", "unknown method 'nope'"),
    ({"backbone": "vgg"}, "backbone", "unknown backbone 'vgg'"),
    ({"augment": "heavy"}, "augment", "unknown augment 'heavy'"),
    ({"channels": 2}, "channels", "channels must be 1 (grayscale) or 3"),
    ({"image_size": 8}, "image_size", "image_size must be at least 16"),
    ({"episodes": -1}, "episodes", "episodes must be at least 0"),
    ({"pretrain_epochs": -2}, "pretrain_epochs", "pretrain_epochs must be at least 0"),
    ({"lr": 0.0}, "lr", "lr must be positive"),
    ({"lr": -1e-3}, "lr", "lr must be positive"),
    ({"pretrain_lr": 0}, "pretrain_lr", "pretrain_lr must be positive"),
    ({"pretrain_label_smoothing": 1.0}, "pretrain_label_smoothing", "must be at least 0 and below 1"),
    ({"pretrain_label_smoothing": -0.1}, "pretrain_label_smoothing", "must be at least 0 and below 1"),
    ({"pretrain_contrastive": -0.5}, "pretrain_contrastive", "must be between 0 and 100"),
    ({"augment_grayscale": 1.5}, "augment_grayscale", "must be a probability in [0, 1]"),
    ({"tuning_episodes": -1}, "tuning_episodes", "tuning_episodes must be at least 0"),
    ({"backbone_lr": -0.1}, "backbone_lr", "backbone_lr must be 0 (frozen) or positive"),
    ({"backbone_lr": 0.0}, "backbone_lr", "would train nothing"),  # protonet has only its backbone
    ({"grad_clip": 0.0}, "grad_clip", "grad_clip must be positive"),
    ({"meta_batch": 0}, "meta_batch", "meta_batch must be at least 1"),
    ({"val_interval": 0}, "val_interval", "val_interval must be at least 1"),
    ({"val_episodes": 0}, "val_episodes", "val_episodes must be at least 1"),
    ({"calibration_episodes": 0}, "calibration_episodes", "calibration_episodes must be at least 1"),
    ({"pretrain_batch_size": 0}, "pretrain_batch_size", "pretrain_batch_size must be at least 1"),
    ({"train_shots": [0, 2]}, "train_shots", "train_shots must be positive"),
    ({"way": 1}, "way", "way must be at least 2"),
    ({"shot": 0}, "shot", "shot must be at least 1"),
    ({"query": 0}, "query", "query must be at least 1"),
    ({"lr_step": 0}, "lr_step", "lr_step must be at least 1"),
    ({"lr_gamma": 0.0}, "lr_gamma", "lr_gamma must be positive"),
    ({"weight_decay": -1e-4}, "weight_decay", "weight_decay must be at least 0"),
    ({"seed": -1}, "seed", "seed must be at least 0"),
    ({"max_minutes": 0.0}, "max_minutes", "max_minutes must be positive"),
    ({"device": "tpu"}, "device", "unknown device 'tpu'"),
    ({"lr": float("nan")}, "lr", "lr must be a finite number"),
    ({"coverage": 1.0}, "coverage", "between 0 and 1"),
    ({"coverage": 0.0}, "coverage", "between 0 and 1"),
    ({"conformal_score": "raps"}, "conformal_score", "unknown conformal score"),
    ({"refer_share": 1.0}, "refer_share", "share of cases to refer"),
    ({"refer_share": -0.1}, "refer_share", "share of cases to refer"),
    # wrong types, e.g. from a YAML file
    ({"lr": "fast"}, "lr", "lr must be a number, got 'fast'"),
    ({"episodes": "10"}, "episodes", "episodes must be an integer"),
    ({"episodes": 2.5}, "episodes", "episodes must be an integer"),
    ({"episodes": True}, "episodes", "episodes must be an integer"),
    ({"shot": "5"}, "shot", "shot must be an integer (or null)"),
    ({"class_conditional": "yes"}, "class_conditional", "class_conditional must be true or false"),
    ({"train_shots": [1, 1.5]}, "train_shots", "train_shots must be a list of integers"),
    ({"train_shots": 5}, "train_shots", "train_shots must be a list of integers"),
    ({"method": 3}, "method", "method must be a text"),
    ({"method_kwargs": ["inner_steps=5"]}, "method_kwargs", "method_kwargs must be a mapping"),
    ({"coverage": "0.9"}, "coverage", "coverage must be a number"),
]


@pytest.mark.parametrize("overrides, field, message", REFUSED, ids=[f"{o}" for o, _, _ in REFUSED])
def test_every_bad_setting_is_refused_with_a_clear_error(sample_protocol, overrides, field, message):
    with pytest.raises(MedmetaError) as caught:
        _config(sample_protocol, **overrides).validate()
    assert message in str(caught.value)
    assert isinstance(caught.value, ConfigError) and caught.value.field == field
    if field in ("coverage", "conformal_score", "refer_share") and not isinstance(overrides[field], str):
        assert isinstance(caught.value, CalibrationError)  # as before: calibration settings are CalibrationErrors


def test_options_the_method_does_not_take_are_refused_before_any_work(sample_protocol):
    with pytest.raises(MedmetaError, match="cannot build protonet on conv4"):
        _config(sample_protocol, method_kwargs={"bogus": 1}).validate()
    with pytest.raises(MedmetaError, match="cannot build protonet on conv4"):
        _config(sample_protocol, backbone_kwargs={"bogus": 1}).validate()


def test_valid_configs_pass_and_leave_the_random_state_alone(sample_protocol):
    state = torch.get_rng_state()
    _config(sample_protocol).validate()
    _config(sample_protocol, method="matching", method_kwargs={"fce": True}, backbone_lr=0.0).validate()
    _config(sample_protocol, train_shots=[1, 5], way=2, shot=1, query=3, grad_clip=1.0, max_minutes=0.5, lr=1).validate()
    assert torch.equal(torch.get_rng_state(), state)


def test_static_names_in_help_equal_the_registries():
    from medmeta.backbones import list_backbones
    from medmeta.calibration.conformal import SCORES
    from medmeta.data.augment import AUGMENTATIONS
    from medmeta.device import DEVICES
    from medmeta.methods import list_methods
    from medmeta.training import names

    assert sorted(names.METHOD_NAMES) == sorted(list_methods())
    assert sorted(names.BACKBONE_NAMES) == sorted(list_backbones())
    assert tuple(names.AUGMENT_NAMES) == tuple(AUGMENTATIONS)
    assert tuple(names.CONFORMAL_SCORES) == tuple(SCORES)
    assert tuple(names.DEVICE_NAMES) == tuple(DEVICES)


def test_the_command_line_modules_import_neither_torch_nor_monai():
    code = "import sys, medmeta.cli.train, medmeta.cli.calibrate; print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---- the YAML file -------------------------------------------------------------------------------
def test_config_yaml_round_trip(tmp_path, sample_protocol):
    from medmeta.training.config_file import write_config_file

    config = _config(
        sample_protocol, method="matching", train_shots=[1, 5], lr=3e-4, backbone_lr=0.0, grad_clip=2.5, max_minutes=1e-9,
        class_conditional=True, method_kwargs={"fce": True}, backbone_kwargs={"channels": [4, 8], "norm_kind": "group"},
        init_from=str(tmp_path / "other run"), out=str(tmp_path / "run: x"),
    )
    path = write_config_file(config, tmp_path)
    assert path.name == "config.yaml" and TrainConfig.from_yaml(path) == config
    assert TrainConfig.from_yaml(path).to_yaml() == config.to_yaml()


def test_config_file_errors_name_the_file_and_the_key(tmp_path):
    bad = tmp_path / "run.yaml"
    cases = [
        ("episodes: 5\nlearning_rate: 0.1\n", "unknown key 'learning_rate'"),
        ("epsiodes: 5\n", "did you mean 'episodes'"),
        ("episodes: many\n", "episodes must be an integer (or null), got 'many'"),
        ("lr: fast\n", "lr must be a number, got 'fast'"),
        ("train_shots: [1, two]\n", "train_shots must be a list of integers"),
        ("- episodes\n", "a training config is a mapping"),
        ("episodes: [1\n", "not valid YAML"),
    ]
    for text, message in cases:
        bad.write_text(text)
        with pytest.raises(ConfigError) as caught:
            TrainConfig.from_yaml(bad)
        assert str(bad) in str(caught.value) and message in str(caught.value), text
    with pytest.raises(ConfigError, match="cannot read"):
        TrainConfig.from_yaml(tmp_path / "absent.yaml")


def test_config_file_takes_exponent_numbers_and_may_be_empty(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\npretrain_lr: 5E-2\nmax_minutes: 10\n")  # PyYAML reads 1e-3 as text
    config = TrainConfig.from_yaml(path)
    assert config.lr == 1e-3 and config.pretrain_lr == 0.05 and config.max_minutes == 10
    path.write_text("# nothing\n")
    assert TrainConfig.from_yaml(path) == TrainConfig()


# ---- the train command's options -----------------------------------------------------------------
def _train_command():
    import typer

    from medmeta.cli.train import train

    app = typer.Typer()
    app.command("train")(train)
    app.command("other")(lambda: None)  # two commands: "train" stays a subcommand
    return app


def test_every_config_field_has_an_option_with_the_fields_help():
    import typer

    from medmeta.cli.train import RENAMED_OPTIONS

    command = typer.main.get_command(_train_command()).commands["train"]
    options = {p.name: p for p in command.params}
    for spec in fields(TrainConfig):
        assert spec.name in options, f"TrainConfig.{spec.name} has no option of medmeta train"
        param = options[spec.name]
        expected = RENAMED_OPTIONS.get(spec.name, "--" + spec.name.replace("_", "-"))
        assert option_name(spec.name) == expected and expected in param.opts
        assert param.help == help_text(spec.name)
    assert {"config", "resume"} <= set(options)
    for name in ("pretrain_lr", "pretrain_batch_size", "weight_decay", "lr_step", "lr_gamma"):
        assert option_name(name) in options[name].opts


@pytest.fixture
def captured(monkeypatch):
    """Intercept the library's train(): the command's config is recorded, nothing is trained."""
    import medmeta.training.loop as loop

    seen: list[tuple[TrainConfig, bool]] = []
    monkeypatch.setattr(loop, "train", lambda config, resume=False, quiet=False, overwrite=False: seen.append((config, resume)))
    return seen


def _invoke(*args):
    return runner.invoke(_train_command(), ["train", *[str(a) for a in args]])


def test_command_line_options_override_the_config_file(tmp_path, sample_protocol, captured):
    path = tmp_path / "run.yaml"
    path.write_text(f"protocol: {sample_protocol}\nepisodes: 7\nlr: 2.0e-4\nseed: 3\nmethod_kwargs: {{distance: euclidean}}\n")
    result = _invoke("--config", path, "--seed", 0, "--pretrain-lr", 0.01, "--train-shot", 1, "--train-shot", 5)
    assert result.exit_code == 0, result.output
    config, resume = captured[-1]
    # from the file; given on the command line (the default value 0 still wins over the file); defaults
    assert config.episodes == 7 and config.lr == 2e-4 and config.method_kwargs == {"distance": "euclidean"}
    assert config.seed == 0 and config.pretrain_lr == 0.01 and config.train_shots == [1, 5]
    assert config.val_episodes == TrainConfig().val_episodes and resume is False
    assert _invoke("--protocol", sample_protocol).exit_code == 0
    assert captured[-1][0] == replace(TrainConfig(), protocol=str(sample_protocol))


def test_a_saved_config_given_back_reproduces_the_config(tmp_path, sample_protocol, captured):
    from medmeta.training.config_file import write_config_file

    config = _config(sample_protocol, episodes=12, train_shots=[1, 3], backbone_kwargs={"norm_kind": "group"}, grad_clip=1.0)
    path = write_config_file(config, tmp_path)
    assert _invoke("--config", path).exit_code == 0
    assert captured[-1][0] == config


def test_command_errors_name_the_option_or_the_file_key(tmp_path, sample_protocol, captured):
    result = _invoke("--protocol", sample_protocol, "--image-size", 8)
    assert result.exit_code == 2 and "--image-size: image_size must be at least 16" in result.output
    path = tmp_path / "run.yaml"
    path.write_text("image_size: 8\n")
    result = _invoke("--protocol", sample_protocol, "--config", path)
    assert result.exit_code == 2 and f"{path}: image_size must be at least 16" in " ".join(result.output.split())
    assert _invoke("--protocol", sample_protocol, "--config", path, "--image-size", 32).exit_code == 0  # overridden
    path.write_text("image_sise: 8\n")
    result = _invoke("--config", path)
    assert result.exit_code == 2 and "unknown key 'image_sise'" in result.output and "Traceback" not in result.output
    result = _invoke("--protocol", sample_protocol, "--backbone-lr", 0)
    assert result.exit_code == 2 and "would train nothing" in " ".join(result.output.split())
    assert len(captured) == 1  # only the run whose bad file value was overridden


def test_episode_bars_nest_in_a_running_bar_and_stand_alone():
    from medmeta.progress import make_progress
    from medmeta.training.bars import episode_bar

    with make_progress(disable=True) as progress:
        with episode_bar("Validating", 3, within=progress) as on_episode:
            for _ in range(3):
                on_episode(None)
            assert progress.tasks[-1].completed == 3
        assert not progress.tasks
    with episode_bar("Calibrating", 2, quiet=True) as on_episode:
        on_episode(None)
