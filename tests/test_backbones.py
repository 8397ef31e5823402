"""Backbone contract: every registered backbone, 2D and 3D, finite output, gradients everywhere."""

from __future__ import annotations

import pytest
import torch

from medmeta.backbones import create_backbone, list_backbones

SMALL = {"conv4": {"hidden": 8}, "resnet12": {"channels": (4, 8, 8, 16)}}


@pytest.mark.parametrize("name", list_backbones())
def test_contract_finite_output_and_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = create_backbone(name, in_channels=3, **SMALL[name])
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, model.num_features)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert missing == []


@pytest.mark.parametrize("name", list_backbones())
def test_forward_features_is_a_spatial_map_that_forward_pools(name):
    model = create_backbone(name, in_channels=1, **SMALL[name]).eval()
    x = torch.randn(2, 1, 32, 32)
    fmap = model.forward_features(x)
    assert fmap.ndim == 4 and fmap.shape[1] == model.num_features
    torch.testing.assert_close(model(x), fmap.mean(dim=(2, 3)))


CASES = [
    ["conv4", {"in_channels": 3}, (2, 3, 64, 64), (2, 64)],
    ["conv4", {"in_channels": 1, "hidden": 16}, (3, 1, 28, 28), (3, 16)],
    ["conv4", {"in_channels": 1, "spatial_dims": 3, "hidden": 8}, (2, 1, 16, 16, 16), (2, 8)],
    ["conv4", {"in_channels": 3, "norm_kind": "instance", "hidden": 8}, (2, 3, 32, 32), (2, 8)],
    ["conv4", {"in_channels": 3, "norm_kind": "group", "hidden": 8}, (2, 3, 32, 32), (2, 8)],
    ["resnet12", {"in_channels": 3}, (2, 3, 32, 32), (2, 640)],
    ["resnet12", {"in_channels": 1, "spatial_dims": 3, "channels": (4, 4, 8, 8)}, (2, 1, 16, 16, 16), (2, 8)],
]


@pytest.mark.parametrize("name, kwargs, input_shape, expected_shape", CASES)
def test_output_shapes(name, kwargs, input_shape, expected_shape):
    model = create_backbone(name, **kwargs).eval()
    with torch.no_grad():
        assert tuple(model(torch.randn(*input_shape)).shape) == expected_shape


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match="conv4"):
        create_backbone("vgg99")


@pytest.mark.parametrize("spatial_dims, input_shape", [(2, (6, 3, 33, 33)), (3, (3, 1, 17, 17, 17))])
def test_conv4_pooling_before_relu_is_the_papers_block_bit_for_bit(spatial_dims, input_shape):
    """conv4 max-pools before its ReLU (cheaper); the papers' order (ReLU, then max-pool) gives
    the same outputs and gradients exactly, because ReLU commutes with a maximum."""
    torch.manual_seed(0)
    ours = create_backbone("conv4", spatial_dims=spatial_dims, in_channels=input_shape[1], hidden=8)
    papers = create_backbone("conv4", spatial_dims=spatial_dims, in_channels=input_shape[1], hidden=8)
    papers.load_state_dict(ours.state_dict())
    layers = list(papers.features)
    for i in range(0, len(layers), 4):  # [conv, norm, pool, relu] -> [conv, norm, relu, pool]
        layers[i + 2], layers[i + 3] = layers[i + 3], layers[i + 2]
    papers.features = torch.nn.Sequential(*layers)
    assert isinstance(papers.features[2], torch.nn.ReLU) and not isinstance(ours.features[2], torch.nn.ReLU)
    x = torch.randn(input_shape)
    a, b = ours(x), papers(x)
    (a**2).sum().backward()
    (b**2).sum().backward()
    assert torch.equal(a, b)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours.parameters(), papers.parameters()))
