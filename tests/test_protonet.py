"""ProtoNet: exact prototypes and logits on hand-made inputs, and the training signal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medmeta.backbones import create_backbone
from medmeta.methods import create_method, list_methods
from medmeta.methods.protonet import compute_prototypes, squared_distances


def identity_protonet(scale: float = 1.0):
    return create_method("protonet", nn.Flatten(), scale=scale)


def test_exact_prototypes_and_logits_on_a_tiny_input():
    # four 1x1x2 "images", two per class: flattened embeddings are the pixel pairs
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 2.0]]).view(4, 1, 1, 2)
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]]).view(3, 1, 1, 2)
    learner = identity_protonet().fit_support(support, labels)
    torch.testing.assert_close(learner.prototypes_, torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    logits = learner.predict_query(query)
    # squared distances to (1,0) and (0,3): q0 -> 0, 10; q1 -> 10, 0; q2 -> 1, 5
    torch.testing.assert_close(logits, -torch.tensor([[0.0, 10.0], [10.0, 0.0], [1.0, 5.0]]))
    torch.testing.assert_close(identity_protonet(scale=2.0).fit_support(support, labels).predict_query(query), logits / 2)
    torch.testing.assert_close(learner.support_distance(query), torch.tensor([0.0, 0.0, 1.0]))


def test_episode_loss_is_cross_entropy_of_negative_distances():
    support = torch.tensor([[0.0], [2.0]]).view(2, 1, 1, 1)
    query = torch.tensor([[0.5]]).view(1, 1, 1, 1)
    loss, logits = identity_protonet().episode_loss(support, torch.tensor([0, 1]), query, torch.tensor([0]))
    expected = -torch.log_softmax(torch.tensor([-0.25, -2.25]), dim=0)[0]
    torch.testing.assert_close(loss, expected)
    assert logits.shape == (1, 2)


def test_seeded_conv4_protonet_logits_are_reproducible_and_every_parameter_learns():
    def run():
        torch.manual_seed(3)
        learner = create_method("protonet", create_backbone("conv4", in_channels=1, hidden=8))
        x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
        loss, logits = learner.episode_loss(x[:4], torch.tensor([0, 0, 1, 1]), x[4:], torch.tensor([0, 1]))
        loss.backward()
        return learner, logits

    a, logits_a = run()
    b, logits_b = run()
    torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=0)
    assert logits_a.shape == (2, 2) and torch.isfinite(logits_a).all()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a.parameters())


def test_prototype_helpers_shapes():
    emb = torch.randn(10, 7)
    labels = torch.arange(5).repeat_interleave(2)
    protos = compute_prototypes(emb, labels)
    assert protos.shape == (5, 7)
    torch.testing.assert_close(protos[2], emb[4:6].mean(0))
    assert squared_distances(torch.randn(3, 7), protos).shape == (3, 5)


def test_predict_before_fit_is_an_error():
    with pytest.raises(RuntimeError, match="fit_support"):
        identity_protonet().predict_query(torch.zeros(1, 1, 1, 1))


def test_registry_lists_protonet():
    assert "protonet" in list_methods()


def test_euclidean_distance_logits_by_hand_and_same_predictions():
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 2.0]]).view(4, 1, 1, 2)
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0], [4.0, 3.0]]).view(4, 1, 1, 2)
    learner = create_method("protonet", nn.Flatten(), scale=2.0, distance="euclidean").fit_support(support, labels)
    # distances to (1,0) and (0,3): q0 -> 0, sqrt 10; q1 -> sqrt 10, 0; q2 -> 1, sqrt 5; q3 -> sqrt 18, 4
    expected = -torch.tensor([[1e-6, 10**0.5], [10**0.5, 1e-6], [1.0, 5**0.5], [18**0.5, 4.0]]) / 2
    torch.testing.assert_close(learner.predict_query(query), expected)
    squared = identity_protonet().fit_support(support, labels).predict_query(query)
    assert torch.equal(squared.argmax(1), learner.predict_query(query).argmax(1))
    assert learner.hparams() == {"scale": 2.0, "distance": "euclidean"}
    # a query on a prototype still gets a finite gradient
    on_prototype = torch.tensor([[1.0, 0.0]], requires_grad=True)
    learner.fit_support(support, labels).predict_query(on_prototype.view(1, 1, 1, 2)).sum().backward()
    assert torch.isfinite(on_prototype.grad).all()
    with pytest.raises(ValueError, match="distance"):
        create_method("protonet", nn.Flatten(), distance="cosine")


@pytest.mark.parametrize("distance", ["squared", "euclidean"])
def test_held_out_logits_correct_the_own_class_for_the_missing_scan(distance):
    import numpy as np

    learner = create_method("protonet", nn.Flatten(), distance=distance)
    logits = -np.array([[4.0, 9.0, 1.0], [2.0, 8.0, 3.0], [5.0, 6.0, 7.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    labels = np.array([0, 0, 1, 1, 1])  # class 0 has 2 scans, class 1 has 3 (class 2 none here)
    # squared distance to a mean of K - 1 scans -> to a mean of K: factor (K^2 - 1) / K^2
    factor = {2: 3 / 4, 3: 8 / 9}
    expected = logits.copy()
    for row, label in enumerate(labels):
        f = factor[2 if label == 0 else 3]
        expected[row, label] *= f if distance == "squared" else f**0.5
    np.testing.assert_allclose(learner.correct_held_out_logits(logits, labels), expected)
    np.testing.assert_array_equal(logits[0], -np.array([4.0, 9.0, 1.0]))  # the input is not modified


def test_corrected_held_out_distances_match_the_cases_distances_on_average():
    """Gaussian classes, 5 scans each: the held-out scan's squared distance to its own class's
    4-scan prototype is 25/24 of a case's to the 5-scan prototype on average; corrected, equal."""
    import numpy as np

    from medmeta.leave_one_out import leave_one_out

    g = torch.Generator().manual_seed(0)
    learner = create_method("protonet", nn.Flatten()).eval()
    held_out, raw, cases = [], [], []
    for _ in range(600):
        centres = 3 * torch.randn(2, 8, generator=g)
        labels = torch.tensor([0] * 5 + [1] * 5)
        support = centres[labels] + torch.randn(10, 8, generator=g)
        query = centres[labels] + torch.randn(10, 8, generator=g)
        loo = leave_one_out(learner, support.view(10, 1, 1, 8), labels)
        held_out.append(-loo.support_logits[np.arange(10), labels.numpy()])
        raw.append(held_out[-1] * 25 / 24)
        logits = learner.fit_support(support.view(10, 1, 1, 8), labels).predict_query(query.view(10, 1, 1, 8))
        cases.append(-logits[torch.arange(10), labels].numpy())
    # expected 8 * (1 + 1/5) = 9.6 for cases; 8 * (1 + 1/4) = 10 uncorrected
    assert np.mean(cases) == pytest.approx(9.6, rel=0.02)
    assert np.mean(held_out) == pytest.approx(np.mean(cases), rel=0.02)
    assert np.mean(raw) == pytest.approx(10.0, rel=0.02) and np.mean(raw) > 1.03 * np.mean(cases)
