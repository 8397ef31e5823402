"""MAML / FOMAML / ANIL: the meta-gradient against finite differences, the first-order
approximation, adaptation without touching the checkpoint, Meta-SGD step sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import medmeta.methods.maml  # noqa: F401  (registration of maml, fomaml, anil)
from medmeta.backbones import create_backbone
from medmeta.methods import create_method
from medmeta.methods.maml import HEAD_BIAS, HEAD_WEIGHT, prototype_head
from medmeta.methods.protonet import squared_distances
from medmeta.methods.registry import METHODS
from conftest import toy_episode as image_episode

NAMES = ("maml", "fomaml", "anil")
INNER_LR = 0.5


class TinyBackbone(nn.Module):
    """``(n, 1, 2, 2)`` -> ``(n, 3)``: tanh of a linear map of the 4 pixels."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.num_features = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x.flatten(1)))


def tiny(name: str, **kwargs):
    torch.manual_seed(0)
    return create_method(name, TinyBackbone().double(), inner_steps=2, inner_lr=INNER_LR, **kwargs)


def tiny_episode():
    """2-way, 2-shot, 3-query float64 episode of 1x2x2 images."""
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64)
    xq = torch.randn(6, 1, 2, 2, generator=g, dtype=torch.float64)
    return xs, torch.tensor([0, 0, 1, 1]), xq, torch.tensor([0, 0, 0, 1, 1, 1])


def meta_gradient(learner, episode) -> dict[str, torch.Tensor]:
    learner.zero_grad(set_to_none=True)
    learner.episode_loss(*episode)[0].backward()
    return {n: p.grad.clone() for n, p in learner.named_parameters()}


def conv4_learner(name: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    backbone = create_backbone("conv4", in_channels=1, hidden=8, **{**METHODS.get(name).backbone_defaults, **kwargs.pop("backbone", {})})
    return create_method(name, backbone, **{"inner_steps": 2, "adapt_steps": 3, **kwargs})




# ---- the meta-gradient -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, kwargs",
    [("maml", {}), ("anil", {}), ("maml", {"learn_inner_lr": True})],
    ids=["maml", "anil", "maml-learn_inner_lr"],
)
def test_second_order_meta_gradient_matches_finite_differences(name, kwargs):
    learner = tiny(name, **kwargs)
    episode = tiny_episode()
    grads = meta_gradient(learner, episode)
    params = dict(learner.named_parameters())
    probes = [("backbone.linear.weight", (0, 1)), ("backbone.linear.weight", (2, 3)), ("backbone.linear.bias", (1,))]
    if kwargs.get("learn_inner_lr"):
        probes += [("inner_lrs.backbone__linear__weight", (1, 2)), ("inner_lrs.head__weight", (0, 0)), ("inner_lrs.head__bias", (0,))]
    eps = 1e-6
    for name_, index in probes:
        p = params[name_]
        original = p[index].item()
        values = []
        for shift in (eps, -eps):
            with torch.no_grad():
                p[index] = original + shift
            values.append(learner.episode_loss(*episode)[0].item())
        with torch.no_grad():
            p[index] = original
        finite_difference = (values[0] - values[1]) / (2 * eps)
        assert grads[name_][index].item() == pytest.approx(finite_difference, rel=1e-4, abs=1e-9), name_


def first_order_reference(learner, episode) -> dict[str, torch.Tensor]:
    """The FOMAML gradient computed independently of the method's code: run the inner loop on
    detached leaves, take the query gradient at the adapted weights, and apply it to the initial
    weights (identity Jacobian), plus the head's path through its prototype initialisation."""
    xs, ys, xq, yq = episode
    backbone = learner.backbone
    theta = {n: p.detach().clone().requires_grad_() for n, p in backbone.named_parameters()}

    def embed(weights, x):
        return functional_call(backbone, weights, (x,))

    with torch.no_grad():
        c = torch.stack([embed(theta, xs)[ys == k].mean(0) for k in range(2)])
    fast = {**{n: t.detach().clone().requires_grad_() for n, t in theta.items()}, "W": (2 * c).requires_grad_(), "b": (-(c**2).sum(1)).requires_grad_()}
    for _ in range(learner.inner_steps):
        backbone_weights = {n: fast[n] for n in theta}
        loss = F.cross_entropy(embed(backbone_weights, xs) @ fast["W"].T + fast["b"], ys)
        g = dict(zip(fast, torch.autograd.grad(loss, list(fast.values()))))
        fast = {n: (fast[n] - learner.inner_lr * g[n]).detach().requires_grad_() for n in fast}
    query_loss = F.cross_entropy(embed({n: fast[n] for n in theta}, xq) @ fast["W"].T + fast["b"], yq)
    g = dict(zip(fast, torch.autograd.grad(query_loss, list(fast.values()))))
    # d W_K / d W_0 = I: the head's query gradient flows into the prototypes, hence the backbone
    c0 = torch.stack([embed(theta, xs)[ys == k].mean(0) for k in range(2)])
    through_head = ((2 * c0) * g["W"]).sum() + ((-(c0**2).sum(1)) * g["b"]).sum()
    chain = dict(zip(theta, torch.autograd.grad(through_head, list(theta.values()))))
    return {f"backbone.{n}": g[n] + chain[n] for n in theta}


def test_first_order_differs_from_second_order_as_documented():
    episode = tiny_episode()
    second = tiny("maml")
    first = tiny("fomaml")
    assert first.first_order and not second.first_order
    # same forward computation: same loss value
    assert first.episode_loss(*episode)[0].item() == pytest.approx(second.episode_loss(*episode)[0].item(), rel=1e-12)
    g2, g1 = meta_gradient(second, episode), meta_gradient(first, episode)
    expected = first_order_reference(first, episode)
    for name in expected:
        torch.testing.assert_close(g1[name], expected[name], rtol=1e-9, atol=1e-12)
        assert not torch.allclose(g1[name], g2[name], rtol=1e-3, atol=1e-6), name
    # with learned step sizes the first-order gradient still reaches them
    meta_sgd = tiny("fomaml", learn_inner_lr=True)
    grads = meta_gradient(meta_sgd, episode)
    assert all(grads[n].abs().sum() > 0 for n, _ in meta_sgd.inner_lrs.named_parameters(prefix="inner_lrs"))


def test_zero_inner_steps_is_protonet_up_to_a_per_query_constant():
    learner = tiny("maml", adapt_steps=0)
    xs, ys, xq, _ = tiny_episode()
    with torch.no_grad():
        logits = learner.fit_support(xs, ys).predict_query(xq)
        embeddings = learner.backbone(xq)
        c = torch.stack([learner.backbone(xs)[ys == k].mean(0) for k in range(2)])
    torch.testing.assert_close(logits, -squared_distances(embeddings, c) + embeddings.pow(2).sum(1, keepdim=True))
    weight, bias = prototype_head(learner.backbone(xs), ys)
    assert weight.shape == (2, 3) and bias.shape == (2,)


# ---- adaptation ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_fit_support_never_changes_the_weights_and_works_without_grad(name):
    learner = conv4_learner(name, learn_inner_lr=True)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    xs, ys, xq, _ = image_episode(3)
    with torch.no_grad():
        logits = learner.fit_support(xs, ys).predict_query(xq)
    assert logits.shape == (len(xq), 3) and torch.isfinite(logits).all()
    assert all(p.grad is None for p in learner.parameters())
    assert set(learner.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in learner.state_dict().items())
    assert not any(isinstance(v, nn.Parameter) or v.requires_grad for v in learner.fast_params_.values())


def test_batchnorm_running_statistics_are_untouched_by_adaptation_even_in_train_mode():
    learner = conv4_learner("maml", backbone={"norm_kind": "batch"}).train()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    xs, ys, xq, _ = image_episode(2)
    learner.fit_support(xs, ys).predict_query(xq)
    learner.support_distance(xq)
    assert all(torch.equal(before[k], v) for k, v in learner.state_dict().items())


@pytest.mark.parametrize("name", NAMES)
def test_any_number_of_conditions_after_training_with_three(name):
    learner = conv4_learner(name)
    learner.train()
    learner.episode_loss(*image_episode(3))[0].backward()
    learner.eval()
    for way in (2, 3, 5):
        xs, ys, xq, _ = image_episode(way, query=3, seed=way)
        with torch.no_grad():
            logits = learner.fit_support(xs, ys).predict_query(xq)
            distance = learner.support_distance(xq)
        assert logits.shape == (3 * way, way) and torch.isfinite(logits).all()
        assert distance.shape == (3 * way,) and (distance >= 0).all()
        assert learner.fast_params_[HEAD_WEIGHT].shape == (way, 8) and learner.fast_params_[HEAD_BIAS].shape == (way,)


def test_anil_adapts_only_the_head_and_maml_adapts_the_backbone():
    xs, ys, _, _ = image_episode(3)
    for name, backbone_moves in (("anil", False), ("maml", True)):
        learner = conv4_learner(name).eval()
        originals = {n: p.detach() for n, p in learner.named_parameters()}
        with torch.no_grad():
            fast = learner.fit_support(xs, ys).fast_params_
            initial_weight, _ = prototype_head(learner.backbone(xs), ys)
        backbone = [n for n in fast if n.startswith("backbone.")]
        assert sorted(backbone) == sorted(n for n in originals if n.startswith("backbone."))
        assert all(torch.equal(fast[n], originals[n]) for n in backbone) is not backbone_moves, name
        assert not torch.allclose(fast[HEAD_WEIGHT], initial_weight), name


def test_predict_before_fit_is_an_error():
    with pytest.raises(RuntimeError, match="fit_support"):
        tiny("maml").predict_query(torch.zeros(1, 1, 2, 2, dtype=torch.float64))


# ---- options ---------------------------------------------------------------------------------
def test_learned_step_sizes_are_named_parameters_that_learn_and_drive_adaptation():
    learner = conv4_learner("maml", learn_inner_lr=True)
    keys = [k for k in learner.state_dict() if k.startswith("inner_lrs.")]
    expected = [f"inner_lrs.backbone__{n.replace('.', '__')}" for n, _ in learner.backbone.named_parameters()]
    assert keys == expected + ["inner_lrs.head__weight", "inner_lrs.head__bias"]
    assert learner.inner_lrs["head__weight"].shape == (1, 8)
    assert all(torch.equal(p, torch.full_like(p, learner.inner_lr)) for p in learner.inner_lrs.values())
    learner.episode_loss(*image_episode(3))[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.inner_lrs.values())
    assert "inner_lrs.head__weight" not in conv4_learner("maml").state_dict()
    assert [k for k in conv4_learner("anil", learn_inner_lr=True).state_dict() if k.startswith("inner_lrs.")] == [
        "inner_lrs.head__weight", "inner_lrs.head__bias",
    ]
    # zero step sizes: adaptation leaves the prototype head and the backbone as they are
    with torch.no_grad():
        for p in learner.inner_lrs.values():
            p.zero_()
    xs, ys, _, _ = image_episode(3)
    with torch.no_grad():
        fast = learner.fit_support(xs, ys).fast_params_
        initial_weight, _ = prototype_head(learner.backbone(xs), ys)
    torch.testing.assert_close(fast[HEAD_WEIGHT], initial_weight)
    assert all(torch.equal(fast[n], p) for n, p in learner.named_parameters() if n.startswith("backbone."))


def test_hyperparameters_round_trip_and_variants_defaults():
    learner = conv4_learner("maml", inner_steps=3, inner_lr=0.05, adapt_steps=7, adapt_lr=0.02, learn_inner_lr=True)
    hp = learner.hparams()
    assert hp == {
        "inner_steps": 3, "inner_lr": 0.05, "adapt_steps": 7, "adapt_lr": 0.02,
        "first_order": False, "learn_inner_lr": True, "head_only": False,
    }
    rebuilt = create_method("maml", create_backbone("conv4", in_channels=1, hidden=8, norm_kind="group"), **hp)
    rebuilt.load_state_dict(learner.state_dict(), strict=True)
    assert conv4_learner("fomaml").hparams()["first_order"] is True
    assert conv4_learner("anil").hparams()["head_only"] is True
    assert conv4_learner("anil").hparams()["first_order"] is False
    assert all(METHODS.get(n).backbone_defaults == {"norm_kind": "group"} for n in NAMES)
    with pytest.raises(ValueError):
        conv4_learner("maml", inner_steps=-1)
    with pytest.raises(ValueError):
        conv4_learner("maml", inner_lr=0.0)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_a_seed_and_every_parameter_learns(name):
    def run():
        learner = conv4_learner(name, seed=4, learn_inner_lr=True).train()
        loss, logits = learner.episode_loss(*image_episode(3))
        loss.backward()
        return logits.detach(), {n: p.grad.clone() for n, p in learner.named_parameters()}

    (la, ga), (lb, gb) = run(), run()
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=0, atol=0)
        assert torch.isfinite(ga[n]).all() and ga[n].abs().sum() > 0, n
