"""Backbones from other libraries (``torchvision:MODEL``, ``timm:MODEL``) and ``--backbone-weights``.

Reading weights files, the refusals and the configuration checks run everywhere (on the built-in
conv4, or with the library import simulated). Tests that need torchvision or timm skip, saying
why, where the library is absent or cannot be imported (e.g. a torchvision built for another
torch). Nothing is downloaded: tiny models are saved to temporary files, and the sockets are
closed during the end-to-end runs.
"""

from __future__ import annotations

import pickle
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from medmeta.backbones import create_backbone
from medmeta.backbones.external import BackboneError, MissingLibraryError, external_class, library_problem
from medmeta.backbones.weights import PRETRAINED, WeightsError, load_backbone_weights, read_state_dict
from medmeta.errors import MedmetaError
from medmeta.training import ConfigError, TrainConfig
from conftest import toy_episode

SAMPLE_CASES = Path(__file__).resolve().parents[1] / "sample_data" / "cases"
PROBLEMS = {library: library_problem(library) for library in ("torchvision", "timm")}
# Tiny models of each library (a few hundred thousand parameters), with their constructor options.
TINY = [
    ("torchvision:shufflenet_v2_x0_5", {}),
    ("timm:test_resnet", {"zero_init_last": False}),  # timm zero-initialises the last BN of each block
    ("timm:test_vit", {}),
]


def _needs(name: str):
    library = name.split(":", 1)[0]
    return pytest.mark.skipif(PROBLEMS[library] is not None, reason=f"{library} unusable here: {PROBLEMS[library]}")


TINY_PARAMS = [pytest.param(name, kwargs, marks=_needs(name), id=name) for name, kwargs in TINY]
# one model per library for the slower tests
PER_LIBRARY = [pytest.param(name, kwargs, marks=_needs(name), id=name) for name, kwargs in TINY[:2]]


def _library_model(name: str, **kwargs) -> torch.nn.Module:
    """The library's own model, classifier included, as a user would have trained or downloaded it."""
    library, _, model = name.partition(":")
    module = external_class(library).import_library()
    torch.manual_seed(123)
    if library == "timm":
        return module.create_model(model, **kwargs)
    return module.models.get_model(model, **kwargs)


def _conv4(seed: int = 0, hidden: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_backbone("conv4", in_channels=1, hidden=hidden)


def _equal_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- weights files (on the built-in conv4: no library needed) -------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_a_state_dict_file_loads_exactly(tmp_path, fmt):
    source = _conv4(seed=1).state_dict()
    path = tmp_path / f"weights.{fmt}"
    save_file(source, str(path)) if fmt == "safetensors" else torch.save(source, path)
    backbone = _conv4(seed=2)
    report = load_backbone_weights(backbone, path)
    assert _equal_state(backbone.state_dict(), source)
    assert report.loaded == len(source) and report.notes() == []


def test_a_wrapped_checkpoint_and_a_dataparallel_prefix_are_understood(tmp_path):
    source = _conv4(seed=1).state_dict()
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in source.items()}}, path)
    backbone = _conv4(seed=2)
    load_backbone_weights(backbone, path)
    assert _equal_state(backbone.state_dict(), source)


class _Payload:
    """Unpickling this would create ``marker``: the kind of object weights_only refuses to run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_weights_only_refuses_a_pickle_with_python_objects(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile.pt"
    torch.save({"features.0.weight": torch.zeros(1), "payload": _Payload(marker)}, path)
    with pytest.raises(WeightsError, match="refused: it holds Python objects") as caught:
        load_backbone_weights(_conv4(), path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists()


def _refusal(tmp_path, tensors_or_bytes, name="w.safetensors") -> str:
    path = tmp_path / name
    if isinstance(tensors_or_bytes, bytes):
        path.write_bytes(tensors_or_bytes)
    elif isinstance(tensors_or_bytes, dict) and all(torch.is_tensor(v) for v in tensors_or_bytes.values()):
        save_file(tensors_or_bytes, str(path))
    else:
        torch.save(tensors_or_bytes, path)
    backbone = _conv4(seed=3)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(WeightsError) as caught:
        load_backbone_weights(backbone, path)
    assert _equal_state(backbone.state_dict(), before), "a refused file must leave the backbone as it was"
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message
    return message


def test_mismatching_files_are_refused_with_one_line_naming_the_file(tmp_path):
    good = _conv4(seed=1).state_dict()
    missing = {k: v for k, v in good.items() if k != "features.4.weight"}
    assert "lacks 1 of the" in _refusal(tmp_path, missing) and "features.4.weight" in _refusal(tmp_path, missing)
    assert "has 1 entries that conv4 does not have (head.weight)" in _refusal(tmp_path, {**good, "head.weight": torch.zeros(2)})
    assert "has shape (16, 1, 3, 3) but conv4 needs (8, 1, 3, 3)" in _refusal(tmp_path, _conv4(hidden=16).state_dict())
    assert "not a state dict" in _refusal(tmp_path, [1, 2, 3], name="list.pt")
    assert "neither a safetensors file nor a PyTorch state dict" in _refusal(tmp_path, b"\x00garbage" * 10, name="junk.bin")
    assert "not a readable safetensors file" in _refusal(tmp_path, b"\x10\x00\x00\x00\x00\x00\x00\x00{broken", name="bad.safetensors")


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(WeightsError, match="no such weights file"):
        read_state_dict(tmp_path / "absent.safetensors")
    with pytest.raises(WeightsError, match="not a file"):
        read_state_dict(tmp_path)


def test_pretrained_needs_an_external_backbone():
    with pytest.raises(BackboneError, match="conv4 has no library weights"):
        load_backbone_weights(_conv4(), PRETRAINED)


# ---- names and the optional libraries ---------------------------------------------------------------
def test_unknown_library_and_empty_model_names_are_refused():
    with pytest.raises(BackboneError, match="unknown backbone library 'keras'; external backbones are torchvision:MODEL or timm:MODEL"):
        create_backbone("keras:resnet50")
    with pytest.raises(BackboneError, match="names no model"):
        create_backbone("timm:")
    with pytest.raises(ValueError, match="unknown backbone 'resnet18'; choose from conv4, resnet12, or a model of another library"):
        create_backbone("resnet18")


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_a_missing_library_names_the_extra_to_install(monkeypatch, library):
    import importlib

    real = importlib.import_module

    def fake(name, *args):
        if name == library:
            raise ModuleNotFoundError(f"No module named {library!r}", name=library)
        return real(name, *args)

    monkeypatch.setattr("medmeta.backbones.external.importlib.import_module", fake)
    with pytest.raises(MissingLibraryError, match=rf"pip install 'medmeta\[{library}\]'"):
        create_backbone(f"{library}:resnet18")
    with pytest.raises(ConfigError, match=rf"medmeta\[{library}\]") as caught:
        TrainConfig(backbone=f"{library}:resnet18", device="cpu").validate()
    assert caught.value.field == "backbone"


def test_a_library_that_cannot_be_imported_says_so(monkeypatch):
    def broken(name, *args):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr("medmeta.backbones.external.importlib.import_module", broken)
    with pytest.raises(MissingLibraryError, match="torchvision is installed but cannot be imported .*operator torchvision::nms"):
        create_backbone("torchvision:resnet18")


def test_external_backbones_take_no_method_defaults():
    from medmeta.training.build import backbone_kwargs

    assert backbone_kwargs(TrainConfig(method="maml", backbone="timm:resnet18", channels=1)) == {"in_channels": 1}
    assert backbone_kwargs(TrainConfig(method="maml", backbone="conv4")) == {"in_channels": 3, "norm_kind": "group"}


# ---- the configuration -------------------------------------------------------------------------------
def _config(sample_protocol, **overrides) -> TrainConfig:
    return TrainConfig(**{"protocol": str(sample_protocol), "out": "unused", "device": "cpu", "backbone_kwargs": {"hidden": 8}, **overrides})


def test_config_checks_the_weights_file_before_any_work(tmp_path, sample_protocol):
    absent = tmp_path / "absent.pt"
    with pytest.raises(ConfigError, match="no such weights file") as caught:
        _config(sample_protocol, backbone_weights=str(absent)).validate()
    assert caught.value.field == "backbone_weights" and str(absent) in str(caught.value)
    _config(sample_protocol, backbone_weights=str(absent)).validate(resume=True)  # the saved state has the weights

    good = tmp_path / "conv4.safetensors"
    torch.manual_seed(0)
    save_file(create_backbone("conv4", in_channels=3, hidden=8).state_dict(), str(good))
    state = torch.get_rng_state()
    _config(sample_protocol, backbone_weights=str(good)).validate()
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ConfigError, match="has shape") as caught:
        _config(sample_protocol, backbone_weights=str(good), channels=1).validate()
    assert caught.value.field == "backbone_weights"
    with pytest.raises(ConfigError, match="not both"):
        _config(sample_protocol, backbone_weights=str(good), init_from=str(tmp_path)).validate()
    with pytest.raises(ConfigError, match="'pretrained' is the download of a torchvision:MODEL or timm:MODEL backbone"):
        _config(sample_protocol, backbone_weights=PRETRAINED).validate()


def test_the_train_command_refuses_a_bad_weights_file_in_one_line(tmp_path, sample_protocol):
    from medmeta.cli.main import app

    junk = tmp_path / "model [final].pt"
    junk.write_bytes(b"not a model")
    result = CliRunner().invoke(app, ["train", "--protocol", str(sample_protocol), "--out", str(tmp_path / "run"), "--backbone-weights", str(junk)])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert "--backbone-weights:" in result.output and str(junk) in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_fresh_run_starts_from_the_file_and_a_resumed_run_does_not_need_it(tmp_path, sample_protocol):
    from medmeta.checkpoint import load_tensors
    from medmeta.training import train

    torch.manual_seed(11)
    brought = create_backbone("conv4", in_channels=1, hidden=8).state_dict()
    weights = tmp_path / "conv4.safetensors"
    save_file(brought, str(weights))
    config = _config(
        sample_protocol, out=str(tmp_path / "run"), backbone_weights=str(weights), method="matching", method_kwargs={"fce": True},
        backbone_lr=0.0, channels=1, image_size=24, episodes=2, pretrain_epochs=0, val_interval=2, val_episodes=2,
        calibration_episodes=4, seed=1,
    )
    train(config, quiet=True)

    def backbone_of(name: str) -> dict:
        tensors = load_tensors(tmp_path / "run" / name)
        prefix = "backbone." if name.startswith("best") else "model.backbone."
        return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

    assert _equal_state(backbone_of("best.safetensors"), brought)  # frozen (--backbone-lr 0): exactly the file's
    weights.unlink()
    train(replace(config, episodes=4), resume=True, quiet=True)  # the saved state has the weights
    assert _equal_state(backbone_of("last.safetensors"), brought)


# ---- with the library ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs", TINY_PARAMS)
@pytest.mark.parametrize("channels", [1, 3])
def test_contract_finite_embeddings_and_every_parameter_gets_a_gradient(name, kwargs, channels):
    torch.manual_seed(0)
    model = create_backbone(name, in_channels=channels, **kwargs)
    out = model(torch.rand(4, channels, 32, 32))
    assert out.shape == (4, model.num_features) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert missing == []


@pytest.mark.parametrize("name, kwargs", TINY_PARAMS)
def test_its_own_normalisation_and_grayscale_repeated_to_rgb(name, kwargs):
    model = create_backbone(name, in_channels=1, **kwargs).eval()
    library_cfg = getattr(model.model, "pretrained_cfg", None) or {}
    expected_mean = library_cfg.get("mean") or (0.485, 0.456, 0.406)
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(expected_mean, dtype=torch.float32))
    gray = torch.rand(2, 1, 32, 32)
    rgb = gray.repeat(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(gray), model(rgb))
        torch.testing.assert_close(model(rgb), model.model((rgb - model.mean) / model.std).flatten(1))
    try:
        assert model.forward_features(rgb).shape[0] == 2
    except NotImplementedError as exc:  # a torchvision model that pools without a pooling layer
        assert name.startswith("torchvision:") and "no adaptive average pooling" in str(exc)
    custom = create_backbone(name, mean=0.5, std=[0.2, 0.3, 0.4], **kwargs)
    assert custom.mean.flatten().tolist() == [0.5] * 3 and "mean" in custom.state_dict()


@pytest.mark.parametrize("name, kwargs", PER_LIBRARY)
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_a_library_state_dict_loads_and_its_classifier_is_ignored(tmp_path, name, kwargs, fmt):
    library_model = _library_model(name, **kwargs)
    state = library_model.state_dict()
    path = tmp_path / f"model.{fmt}"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path)) if fmt == "safetensors" else torch.save(state, path)
    backbone = create_backbone(name, in_channels=1, **kwargs)
    report = load_backbone_weights(backbone, path)
    ours = backbone.state_dict()
    for key, value in state.items():
        if f"model.{key}" in ours:
            assert torch.equal(ours[f"model.{key}"], value), key
    assert report.ignored and all(k.split(".")[0] in ("fc", "classifier", "head") for k in report.ignored)
    assert "classifier entries" in report.notes()[0]
    # a feature weight missing is refused
    first = next(k for k in state if k.endswith("weight"))
    torch.save({k: v for k, v in state.items() if k != first}, tmp_path / "partial.pt")
    with pytest.raises(WeightsError, match=f"lacks 1 of the .*{first}"):
        load_backbone_weights(create_backbone(name, **kwargs), tmp_path / "partial.pt")


@pytest.mark.parametrize("name, kwargs", PER_LIBRARY)
def test_pretrained_is_the_library_download_and_only_when_asked(monkeypatch, sample_protocol, name, kwargs):
    cls = type(create_backbone(name, **kwargs))
    calls = []

    def fake_download(self):  # what the library would download, without the network
        calls.append(self.name)
        return _library_model(name, **kwargs).state_dict()

    monkeypatch.setattr(cls, "pretrained_state_dict", fake_download)
    assert calls == [] and create_backbone(name, **kwargs).has_pretrained()
    config = _config(sample_protocol, backbone=name, backbone_kwargs=kwargs, backbone_weights=PRETRAINED, image_size=32)
    state = torch.get_rng_state()
    config.validate()
    assert calls == [], "validation never downloads"
    assert torch.equal(torch.get_rng_state(), state)
    backbone = create_backbone(name, **kwargs)
    load_backbone_weights(backbone, PRETRAINED)
    assert calls == [name]
    expected = _library_model(name, **kwargs).state_dict()
    assert all(torch.equal(v, expected[k.removeprefix("model.")]) for k, v in backbone.state_dict().items() if k.startswith("model."))


@pytest.mark.parametrize("name, kwargs", PER_LIBRARY)
@pytest.mark.parametrize("method, method_kwargs", [
    ("protonet", {}), ("maml", {"inner_steps": 1, "adapt_steps": 1}), ("anil", {"inner_steps": 1, "adapt_steps": 1}),
    ("matching", {"fce": True}), ("mann", {"memory_slots": 16, "memory_size": 8, "controller_size": 16, "n_reads": 1}),
])
def test_every_method_trains_and_adapts_on_an_external_backbone(name, kwargs, method, method_kwargs):
    from medmeta.methods import create_method

    torch.manual_seed(0)
    learner = create_method(method, create_backbone(name, in_channels=1, **kwargs), **method_kwargs).train()
    xs, ys, xq, yq = toy_episode(3, size=32)
    loss, logits = learner.episode_loss(xs, ys, xq, yq)
    assert torch.isfinite(loss) and logits.shape == (len(yq), 3)
    loss.backward()
    learner.eval()
    with torch.no_grad():
        assert torch.isfinite(learner.fit_support(xs, ys).predict_query(xq)).all()


def test_a_vit_at_another_image_size_is_refused_before_any_work(sample_protocol):
    if PROBLEMS["timm"] is not None:
        pytest.skip(f"timm unusable here: {PROBLEMS['timm']}")
    with pytest.raises(ConfigError, match="cannot embed 48x48 images") as caught:
        _config(sample_protocol, backbone="timm:test_vit3", backbone_kwargs={}, image_size=48).validate()
    assert caught.value.field == "image_size"


def test_a_method_that_cannot_train_on_the_backbone_is_refused_before_any_work(sample_protocol):
    if PROBLEMS["torchvision"] is not None:
        pytest.skip(f"torchvision unusable here: {PROBLEMS['torchvision']}")
    config = _config(
        sample_protocol, method="maml", method_kwargs={"inner_steps": 1}, backbone="torchvision:mobilenet_v3_small",
        backbone_kwargs={"width_mult": 0.25}, image_size=32,
    )
    with pytest.raises(ConfigError, match="method maml cannot train on torchvision:mobilenet_v3_small .*--method fomaml") as caught:
        config.validate()
    assert caught.value.field == "method"
    replace(config, method="fomaml").validate()  # first-order: no second derivatives


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("the network is closed in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", PER_LIBRARY)
def test_train_with_brought_weights_then_load_and_diagnose_offline(tmp_path, sample_protocol, no_network, name, kwargs):
    import medmeta
    from medmeta.checkpoint import load_tensors
    from medmeta.cli.main import app

    weights = tmp_path / "brought.safetensors"
    save_file({k: v.contiguous() for k, v in _library_model(name, **kwargs).state_dict().items()}, str(weights))
    out = tmp_path / "run"
    args = [
        "train", "--protocol", sample_protocol, "--out", out, "--backbone", name, "--backbone-weights", weights,
        "--method", "matching", "--method-option", "fce=true", "--backbone-lr", 0, "--channels", 1, "--image-size", 32,
        "--episodes", 2, "--pretrain-epochs", 0, "--val-interval", 2, "--val-episodes", 2, "--calibration-episodes", 4,
        "--device", "cpu", "--seed", 3,
    ]
    args += [a for key, value in kwargs.items() for a in ("--backbone-option", f"{key}={value}")]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "classifier entries" in result.output
    # the backbone was frozen (--backbone-lr 0): the checkpoint holds exactly the brought weights
    brought = read_state_dict(weights)
    saved = load_tensors(out / "best.safetensors")
    feature_keys = [k for k in saved if k.startswith("backbone.model.")]
    assert feature_keys and all(torch.equal(saved[k], brought[k.removeprefix("backbone.model.")]) for k in feature_keys)
    weights.unlink()  # a checkpoint never needs the file (nor the network) again
    run = medmeta.load_run(out, device="cpu")
    assert run.backbone == name
    diagnosis = medmeta.adapt(run, SAMPLE_CASES, stability=False)
    assert len(diagnosis.cases) == 30 and torch.isfinite(torch.as_tensor(diagnosis.probabilities)).all()


def test_pickle_module_is_not_needed_for_safetensors(tmp_path, monkeypatch):
    """A safetensors file is read without unpickling anything."""
    path = tmp_path / "w.safetensors"
    save_file(_conv4(seed=1).state_dict(), str(path))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    assert read_state_dict(path).keys() == _conv4().state_dict().keys()


def test_errors_are_medmeta_errors():
    assert issubclass(WeightsError, MedmetaError) and issubclass(BackboneError, MedmetaError)
