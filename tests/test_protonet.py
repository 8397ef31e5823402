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
