"""One contract for every registered meta-learner (timm-style), parametrized over the registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medmeta.adaptation import adapt
from medmeta.backbones import create_backbone
from medmeta.checkpoint import build_learner, load_checkpoint, save_checkpoint
from medmeta.methods import create_method, list_methods
from medmeta.methods.registry import METHODS
from conftest import toy_episode as episode

SAMPLE_CASES = Path(__file__).resolve().parents[1] / "sample_data" / "cases"
# Small, fast settings per method (CPU); methods not listed here use their defaults.
SMALL = {
    "maml": {"inner_steps": 2, "adapt_steps": 3},
    "fomaml": {"inner_steps": 2, "adapt_steps": 3},
    "anil": {"inner_steps": 2, "adapt_steps": 3},
    "mann": {"memory_slots": 16, "memory_size": 8, "controller_size": 16, "n_reads": 1},
}
VARIANTS = [(name, SMALL.get(name, {})) for name in list_methods()]
if "maml" in list_methods():
    VARIANTS.append(("maml", {**SMALL["maml"], "learn_inner_lr": True}))
if "matching" in list_methods():
    VARIANTS.append(("matching", {"fce": True}))
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items() if k in ('fce', 'learn_inner_lr')) or 'default'}" for name, kw in VARIANTS]


def make(name: str, kwargs: dict, seed: int = 0):
    torch.manual_seed(seed)
    backbone_kwargs = {"in_channels": 1, "hidden": 8, **getattr(METHODS.get(name), "backbone_defaults", {})}
    return create_method(name, create_backbone("conv4", **backbone_kwargs), **kwargs), backbone_kwargs




@pytest.mark.parametrize("name, kwargs", VARIANTS, ids=IDS)
def test_finite_logits_and_every_parameter_gets_a_gradient(name, kwargs):
    learner, _ = make(name, kwargs)
    learner.train()
    xs, ys, xq, yq = episode(3)
    loss, logits = learner.episode_loss(xs, ys, xq, yq)
    assert logits.shape == (len(yq), 3) and torch.isfinite(logits).all() and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in learner.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []


@pytest.mark.parametrize("name, kwargs", VARIANTS, ids=IDS)
@pytest.mark.parametrize("way", [2, 4])
def test_adapts_to_any_number_of_conditions_without_changing_its_weights(name, kwargs, way):
    learner, _ = make(name, kwargs)
    learner.eval()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    xs, ys, xq, _ = episode(way)
    with torch.no_grad():
        logits = learner.fit_support(xs, ys).predict_query(xq)
        distance = learner.support_distance(xq)
    assert logits.shape == (len(xq), way) and torch.isfinite(logits).all()
    assert distance.shape == (len(xq),)
    after = learner.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name, kwargs", VARIANTS, ids=IDS)
def test_deterministic_under_a_seed(name, kwargs):
    def run():
        learner, _ = make(name, kwargs, seed=4)
        learner.train()
        torch.manual_seed(9)
        xs, ys, xq, yq = episode(3)
        loss, logits = learner.episode_loss(xs, ys, xq, yq)
        loss.backward()
        return logits.detach(), [p.grad.clone() for p in learner.parameters() if p.grad is not None]

    (la, ga), (lb, gb) = run(), run()
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _save(tmp_path: Path, name: str, kwargs: dict):
    learner, backbone_kwargs = make(name, kwargs)
    learner.train()
    xs, ys, xq, yq = episode(3)
    learner.episode_loss(xs, ys, xq, yq)[0].backward()  # touch BatchNorm statistics, if any
    meta = {
        "method": {"name": name, "hparams": learner.hparams()},
        "backbone": {"name": "conv4", "kwargs": backbone_kwargs},
        "preprocessing": {"image_size": 16, "channels": 1},
        "calibration": {"method": "temperature", "temperature": 1.3},
    }
    return learner.eval(), save_checkpoint(tmp_path / "best.json", learner, meta)


@pytest.mark.parametrize("name, kwargs", VARIANTS, ids=IDS)
def test_checkpoint_round_trip_gives_identical_predictions(tmp_path, name, kwargs):
    learner, path = _save(tmp_path, name, kwargs)
    rebuilt = build_learner(load_checkpoint(path))
    xs, ys, xq, _ = episode(3, seed=7)
    with torch.no_grad():
        expected = learner.fit_support(xs, ys).predict_query(xq)
        actual = rebuilt.fit_support(xs, ys).predict_query(xq)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name, kwargs", VARIANTS, ids=IDS)
def test_adapt_works_from_a_saved_checkpoint(tmp_path, name, kwargs):
    _, path = _save(tmp_path, name, kwargs)
    result = adapt(path, SAMPLE_CASES, device="cpu")
    assert result.conditions == ["concentric_rings", "gradient_halo", "triangle_mass"]
    assert len(result.cases) == 30 and not result.rejected
    assert result.metadata["stability"]["computed"]  # leave-one-out refits work for every method
    for case in result.cases:
        assert sum(case.probabilities) == pytest.approx(1.0, abs=1e-6)
        assert 0.0 <= case.stability_max_change <= 1.0


@pytest.mark.parametrize("name, kwargs", VARIANTS, ids=IDS)
def test_logits_and_distances_together_equal_each_alone(name, kwargs):
    learner, _ = make(name, kwargs)
    learner.eval()
    xs, ys, xq, _ = episode(3)
    with torch.no_grad():
        learner.fit_support(xs, ys)
        logits, distances = learner.predict_with_distance(xq)
        assert torch.equal(logits, learner.predict_query(xq))
        torch.testing.assert_close(distances, learner.support_distance(xq), rtol=0, atol=0, equal_nan=True)


def toy_volumes(way: int, shot: int = 2, query: int = 2, size: int = 16, seed: int = 1):
    """A learnable ``way``-way task of ``size``^3 one-channel volumes (class means plus noise)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(way, 1, size, size, size, generator=g)

    def draw(n):
        labels = torch.arange(way).repeat_interleave(n)
        return centres[labels] + 0.1 * torch.randn(len(labels), 1, size, size, size, generator=g), labels

    (xs, ys), (xq, yq) = draw(shot), draw(query)
    return xs, ys, xq, yq


@pytest.mark.parametrize("name, kwargs", VARIANTS, ids=IDS)
def test_volumes_train_and_adapt_with_a_3d_backbone(name, kwargs):
    """Every method meta-trains (finite loss, a gradient for every parameter) and adapts on
    volumes ``(n, 1, D, H, W)`` through a conv4 built with ``spatial_dims=3``."""
    torch.manual_seed(0)
    backbone_kwargs = {"in_channels": 1, "hidden": 8, "spatial_dims": 3, **getattr(METHODS.get(name), "backbone_defaults", {})}
    learner = create_method(name, create_backbone("conv4", **backbone_kwargs), **kwargs).train()
    xs, ys, xq, yq = toy_volumes(3)
    loss, logits = learner.episode_loss(xs, ys, xq, yq)
    assert logits.shape == (len(yq), 3) and torch.isfinite(logits).all() and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in learner.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []
    learner.eval()
    with torch.no_grad():
        adapted = learner.fit_support(xs, ys).predict_query(xq)
        distance = learner.support_distance(xq)
    assert adapted.shape == (len(xq), 3) and torch.isfinite(adapted).all() and distance.shape == (len(xq),)


@pytest.mark.parametrize("name", ["protonet", "anil"])
def test_volumes_train_on_a_3d_resnet12(name):
    torch.manual_seed(0)
    backbone = create_backbone("resnet12", in_channels=1, spatial_dims=3, channels=(4, 4, 8, 8),
                               **getattr(METHODS.get(name), "backbone_defaults", {}))
    learner = create_method(name, backbone, **SMALL.get(name, {})).train()
    xs, ys, xq, yq = toy_volumes(3)
    loss, logits = learner.episode_loss(xs, ys, xq, yq)
    loss.backward()
    assert logits.shape == (len(yq), 3) and torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.parameters() if p.requires_grad)
