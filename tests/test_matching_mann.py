"""Matching Networks and MANN: exact attention, FCE, LRU writes, memory state and the contract."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import medmeta.methods.mann  # noqa: F401  (registration)
import medmeta.methods.matching  # noqa: F401  (registration)
from medmeta.methods.mann import MANN, least_used_weights, lrua_write_weights
from medmeta.methods.matching import MatchingNetworks
from medmeta.methods.registry import METHODS, create_method
from conftest import toy_episode


class FlatBackbone(nn.Module):
    """Identity embedding: ``(n, C, H, W)`` -> ``(n, C*H*W)``."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class LinearBackbone(nn.Module):
    """A learnable linear embedding of the flattened image."""

    def __init__(self, in_features: int = 16, num_features: int = 8):
        super().__init__()
        self.num_features = num_features
        self.linear = nn.Linear(in_features, num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def points(*rows) -> torch.Tensor:
    """2-D points as ``(n, 1, 1, 2)`` images."""
    return torch.tensor(rows, dtype=torch.float32).view(len(rows), 1, 1, 2)


def episode(way: int, shot: int = 2, query: int = 2, seed: int = 1):
    return toy_episode(way, shot, query, seed, size=4, normal_centres=True)




SMALL_MANN = {"memory_slots": 16, "memory_size": 8, "controller_size": 16, "n_reads": 2, "max_way": 6}


def small_mann(seed: int = 0, **kwargs) -> MANN:
    torch.manual_seed(seed)
    return create_method("mann", LinearBackbone(), **{**SMALL_MANN, **kwargs})


def assert_every_parameter_learns(learner: nn.Module) -> None:
    missing = [n for n, p in learner.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


# ---- Matching Networks ---------------------------------------------------------------------------
def test_matching_registered_with_its_hparams():
    assert METHODS.get("matching") is MatchingNetworks and METHODS.get("mann") is MANN
    learner = create_method("matching", FlatBackbone(2), fce=False, fce_steps=3, scale=2.5)
    assert learner.hparams() == {"fce": False, "fce_steps": 3, "scale": 2.5}


def test_matching_exact_attention_on_two_support_points():
    support, labels = points([1.0, 0.0], [0.0, 1.0]), torch.tensor([0, 1])
    query = points([3.0, 1.0])
    learner = create_method("matching", FlatBackbone(2)).fit_support(support, labels)
    logits = learner.predict_query(query)
    cosines = torch.tensor([3.0, 1.0]) / math.sqrt(10.0)
    expected = torch.softmax(10.0 * cosines, dim=0)
    torch.testing.assert_close(logits.exp(), expected.view(1, 2))
    torch.testing.assert_close(torch.softmax(logits, dim=1), expected.view(1, 2))
    torch.testing.assert_close(learner.support_distance(query), 1.0 - cosines.max().view(1))


def test_matching_sums_attention_within_a_class_and_uses_the_scale():
    # class 0 has two supports; cosines of the query (2, 0) to the supports: 1, 0, 1/sqrt(2)
    support, labels = points([1.0, 0.0], [0.0, 2.0], [1.0, 1.0]), torch.tensor([0, 1, 0])
    query = points([2.0, 0.0], [0.0, 5.0])
    learner = create_method("matching", FlatBackbone(2), scale=2.0).fit_support(support, labels)
    a = torch.exp(2.0 * torch.tensor([[1.0, 0.0, 1 / math.sqrt(2)], [0.0, 1.0, 1 / math.sqrt(2)]]))
    a = a / a.sum(dim=1, keepdim=True)
    expected = torch.stack([a[:, 0] + a[:, 2], a[:, 1]], dim=1)
    torch.testing.assert_close(learner.predict_query(query).exp(), expected)
    # the training loss is the negative log-likelihood of the attention classifier
    loss, _ = learner.episode_loss(support, labels, query, torch.tensor([0, 1]))
    torch.testing.assert_close(loss, -(expected[0, 0].log() + expected[1, 1].log()) / 2)


def test_matching_predictions_do_not_depend_on_support_order_or_query_batching():
    torch.manual_seed(0)
    learner = create_method("matching", LinearBackbone()).eval()
    xs, ys, xq, _ = episode(4, shot=3)
    perm = torch.randperm(len(ys), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = learner.fit_support(xs, ys).predict_query(xq)
        distance = learner.support_distance(xq)
        single = torch.cat([learner.predict_query(xq[i : i + 1]) for i in range(len(xq))])
        permuted = learner.fit_support(xs[perm], ys[perm]).predict_query(xq)
        permuted_distance = learner.support_distance(xq)
    torch.testing.assert_close(permuted, logits)
    torch.testing.assert_close(permuted_distance, distance)
    torch.testing.assert_close(single, logits)


@pytest.mark.parametrize("way", [2, 5])
def test_matching_fce_shapes_and_every_parameter_gets_a_gradient(way):
    torch.manual_seed(0)
    learner = create_method("matching", LinearBackbone(), fce=True, fce_steps=3)
    assert learner.hparams()["fce"] is True
    xs, ys, xq, yq = episode(way)
    loss, logits = learner.episode_loss(xs, ys, xq, yq)
    assert logits.shape == (len(yq), way) and torch.isfinite(logits).all()
    loss.backward()
    assert_every_parameter_learns(learner)
    with torch.no_grad():
        learner.eval().fit_support(xs, ys)
        assert learner.predict_query(xq).shape == (len(xq), way)
        assert learner.support_distance(xq).shape == (len(xq),)
    assert not learner.support_embeddings_.requires_grad


def test_matching_fce_needs_num_features_and_fit_before_predict():
    with pytest.raises(ValueError, match="num_features"):
        create_method("matching", nn.Flatten(), fce=True)
    with pytest.raises(RuntimeError, match="fit_support"):
        create_method("matching", nn.Flatten()).predict_query(points([1.0, 0.0]))


# ---- MANN: LRU access --------------------------------------------------------------------------
def test_lru_write_weights_go_to_the_least_used_slot_and_sum_to_one():
    usage = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7])
    previous_reads = torch.tensor([[0.1, 0.1, 0.6, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(least_used_weights(usage, 2), torch.eye(5)[[1, 3]])
    # gate closed (sigmoid -> 0): each head writes to its own least-used slot
    write, least_used = lrua_write_weights(torch.tensor([-50.0, -50.0]), previous_reads, usage)
    torch.testing.assert_close(least_used, torch.eye(5)[[1, 3]])
    torch.testing.assert_close(write, torch.eye(5)[[1, 3]])
    # gate open: write where the head read last
    write, _ = lrua_write_weights(torch.tensor([50.0, 50.0]), previous_reads, usage)
    torch.testing.assert_close(write, previous_reads)
    # half-open: the exact interpolation, summing to one
    write, _ = lrua_write_weights(torch.tensor([0.0, math.log(3.0)]), previous_reads, usage)
    expected = torch.stack([0.5 * previous_reads[0] + 0.5 * torch.eye(5)[1], 0.75 * previous_reads[1] + 0.25 * torch.eye(5)[3]])
    torch.testing.assert_close(write, expected)
    torch.testing.assert_close(write.sum(dim=1), torch.ones(2))


def test_least_used_ties_go_to_the_lowest_index():
    torch.testing.assert_close(least_used_weights(torch.zeros(4), 2), torch.eye(4)[[0, 1]])


def test_mann_step_erases_writes_and_reads_with_usage_decay():
    learner = small_mann().eval()
    state = learner.initial_state(torch.zeros(1))
    assert state.read_weights.sum(dim=1).allclose(torch.ones(2))
    with torch.no_grad():
        after = learner._step(state, torch.randn(1, 8), torch.zeros(1, learner.max_way))
    assert after.memory.shape == (16, 8) and after.reads.shape == (1, 16)
    torch.testing.assert_close(after.read_weights.sum(dim=1), torch.ones(2))
    # usage = gamma * 0 + reads + writes, and writes sum to one per head: total mass 2 + 2
    torch.testing.assert_close(after.usage.sum(), torch.tensor(4.0))
    assert after.written.any()


# ---- MANN: the method --------------------------------------------------------------------------
@pytest.mark.parametrize("way", [2, 3, 5])
def test_mann_shapes_for_any_way(way):
    learner = small_mann()
    xs, ys, xq, yq = episode(way)
    loss, logits = learner.train().episode_loss(xs, ys, xq, yq)
    assert logits.shape == (len(yq), way) and torch.isfinite(logits).all() and torch.isfinite(loss)
    with torch.no_grad():
        learner.eval().fit_support(xs, ys)
        assert learner.predict_query(xq).shape == (len(xq), way)
        distance = learner.support_distance(xq)
    assert distance.shape == (len(xq),) and ((distance >= 0) & (distance <= 2)).all()


def test_mann_rejects_more_classes_than_label_slots():
    learner = small_mann(max_way=3)
    xs, ys, xq, yq = episode(4)
    with pytest.raises(ValueError, match="max_way=3"):
        learner.fit_support(xs, ys)
    with pytest.raises(ValueError, match="max_way=3"):
        learner.episode_loss(xs, ys, xq, yq)
    with pytest.raises(ValueError, match="n_reads"):
        create_method("mann", LinearBackbone(), memory_slots=2, n_reads=3)


def test_mann_fit_support_under_no_grad_keeps_the_state_dict():
    learner = small_mann().eval()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    xs, ys, xq, _ = episode(3)
    with torch.no_grad():
        logits = learner.fit_support(xs, ys).predict_query(xq)
    after = learner.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.isfinite(logits).all()
    assert all(not t.requires_grad for t in learner.state_)
    # fitting with autograd on also stores a detached state
    learner.fit_support(xs, ys)
    assert all(not t.requires_grad for t in learner.state_)
    assert learner.hparams() == {
        **SMALL_MANN, "gamma": 0.95, "sequence_loss": 1.0, "episode_norm": "support", "key_strength_init": 11.0
    }


def test_mann_every_parameter_gets_a_gradient_from_episode_loss():
    learner = small_mann().train()
    xs, ys, xq, yq = episode(3)
    loss, _ = learner.episode_loss(xs, ys, xq, yq)
    loss.backward()
    assert_every_parameter_learns(learner)


def test_mann_is_deterministic_under_a_seed_and_in_eval_mode():
    xs, ys, xq, yq = episode(3)

    def train_run(seed):
        learner = small_mann().train()
        torch.manual_seed(seed)
        loss, logits = learner.episode_loss(xs, ys, xq, yq)
        loss.backward()
        return logits.detach(), [p.grad.clone() for p in learner.parameters()]

    (la, ga), (lb, gb) = train_run(7), train_run(7)
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # training episodes draw label slots and order from the global RNG: another seed, other logits
    assert not torch.equal(train_run(8)[0], la)

    learner = small_mann().eval()
    with torch.no_grad():
        torch.manual_seed(1)
        first = learner.fit_support(xs, ys).predict_query(xq)
        torch.manual_seed(2)
        second = learner.fit_support(xs, ys).predict_query(xq)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(learner.label_slots_, torch.arange(3))


def test_mann_memory_is_cleared_between_episodes_and_queries_are_independent():
    learner = small_mann().eval()
    xs_a, ys_a, _, _ = episode(4, seed=1)
    xs_b, ys_b, xq, _ = episode(3, seed=2)
    with torch.no_grad():
        learner.fit_support(xs_a, ys_a).fit_support(xs_b, ys_b)
        reused = learner.predict_query(xq)
        reused_distance = learner.support_distance(xq)
        single = torch.cat([learner.predict_query(xq[i : i + 1]) for i in range(len(xq))])
        fresh_learner = small_mann().eval()
        fresh = fresh_learner.fit_support(xs_b, ys_b).predict_query(xq)
        fresh_distance = fresh_learner.support_distance(xq)
        other = small_mann().eval().fit_support(xs_a, ys_a).predict_query(xq)
    torch.testing.assert_close(reused, fresh, rtol=0, atol=0)
    torch.testing.assert_close(reused_distance, fresh_distance, rtol=0, atol=0)
    torch.testing.assert_close(single, reused)
    assert other.shape == (len(xq), 4)


def test_mann_episode_loss_in_eval_mode_matches_fit_and_predict():
    learner = small_mann(sequence_loss=0.0).eval()
    xs, ys, xq, yq = episode(3)
    loss, logits = learner.episode_loss(xs, ys, xq, yq)
    with torch.no_grad():
        expected = learner.fit_support(xs, ys).predict_query(xq)
    torch.testing.assert_close(logits.detach(), expected)
    torch.testing.assert_close(loss.detach(), F.cross_entropy(expected, yq))


def test_mann_sequence_loss_adds_the_weighted_per_step_support_loss():
    xs, ys, xq, yq = episode(3)
    query_only, _ = small_mann(sequence_loss=0.0).eval().episode_loss(xs, ys, xq, yq)
    learner = small_mann(sequence_loss=0.5).eval()
    loss, _ = learner.episode_loss(xs, ys, xq, yq)
    with torch.no_grad():
        _, slots, _, step_logits, step_slots = learner.encode_support(xs, ys)
    # eval mode: identity slots, support in the fixed order; one prediction per support scan
    order = torch.randperm(len(ys), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(step_slots, ys[order])
    assert step_logits.shape == (len(ys), learner.max_way)
    torch.testing.assert_close(loss.detach(), query_only.detach() + 0.5 * F.cross_entropy(step_logits, step_slots))


def test_mann_support_norm_exact_values():
    learner = small_mann()
    mean, scale = learner.support_norm(torch.tensor([[0.0, 0.0], [4.0, 0.0], [2.0, 3.0]]))
    torch.testing.assert_close(mean, torch.tensor([[2.0, 1.0]]))
    torch.testing.assert_close(scale, torch.tensor(math.sqrt(14.0 / 3.0)))
    # a single scan has no spread: scale 1, not a division by zero
    mean, scale = learner.support_norm(torch.tensor([[3.0, -1.0]]))
    torch.testing.assert_close(scale, torch.tensor(1.0))
    mean, scale = small_mann(episode_norm="none").support_norm(torch.tensor([[3.0, -1.0], [1.0, 1.0]]))
    torch.testing.assert_close(mean, torch.zeros(1, 2))
    torch.testing.assert_close(scale, torch.tensor(1.0))


@pytest.mark.parametrize("norm, invariant", [("support", True), ("none", False)])
def test_mann_episode_norm_makes_predictions_invariant_to_shift_and_scale_of_the_embedding(norm, invariant):
    torch.manual_seed(0)
    learner = create_method("mann", FlatBackbone(16), **SMALL_MANN, episode_norm=norm).eval()
    xs, ys, xq, _ = episode(3)
    with torch.no_grad():
        logits = learner.fit_support(xs, ys).predict_query(xq)
        moved = learner.fit_support(3.0 * xs + 5.0, ys).predict_query(3.0 * xq + 5.0)
    assert torch.allclose(moved, logits, atol=1e-5) is invariant


def test_mann_heads_start_with_the_requested_key_strength_and_options_are_checked():
    learner = small_mann(key_strength_init=4.0)
    _, _, strengths = learner._heads(torch.zeros(1, learner.controller_size))
    torch.testing.assert_close(strengths, torch.full((1, 2), 4.0))
    for bad, match in [({"sequence_loss": -1.0}, "sequence_loss"), ({"episode_norm": "batch"}, "episode_norm"),
                       ({"key_strength_init": 1.0}, "key_strength_init")]:
        with pytest.raises(ValueError, match=match):
            small_mann(**bad)

