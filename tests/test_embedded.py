"""Episodes on cached embeddings: each scan through the backbone once, the same outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medmeta.backbones import create_backbone
from medmeta.data.episodes import EpisodeSampler
from medmeta.data.protocol import load_protocol
from medmeta.data.reading import Preprocessing, ScanReader
from medmeta.data.store import ImageStore
from medmeta.embedded import EmbeddingCache, adapts_on_embeddings
from medmeta.evaluation import run_episodes
from medmeta.heads import EmbeddingNormaliser, adapting_learner, create_head
from medmeta.methods import create_method
from conftest import SAMPLE_DATA, CountingBackbone


class _ImagesOnly(nn.Module):
    """The learner's image interface alone: episodes run every scan through the backbone."""

    def __init__(self, learner: nn.Module):
        super().__init__()
        self.learner = learner

    def fit_support(self, images, labels):
        self.learner.fit_support(images, labels)
        return self

    def predict_with_distance(self, images):
        return self.learner.predict_with_distance(images)

    def predict_query(self, images):
        return self.learner.predict_query(images)

    def correct_held_out_logits(self, logits, labels):
        return self.learner.correct_held_out_logits(logits, labels)


@pytest.fixture(scope="module")
def val_episodes():
    protocol = load_protocol(SAMPLE_DATA / "protocol.yaml")
    val = {c: protocol.records[c] for c in protocol.classes["val"]}
    store = ImageStore(ScanReader(Preprocessing(image_size=16, channels=1)))
    return store, EpisodeSampler(val, 2, 3, 4, seed=5), sum(len(r) for r in val.values())


def _learners():
    torch.manual_seed(0)
    protonet = create_method("protonet", CountingBackbone(create_backbone("conv4", in_channels=1, hidden=8))).eval()
    normaliser = EmbeddingNormaliser("center_l2").fit(torch.randn(20, 8, dtype=torch.float64))
    with_head = adapting_learner(protonet, create_head("logistic"), normaliser)
    return {"protonet": (protonet, protonet.backbone), "logistic head": (with_head, protonet.backbone)}


@pytest.mark.parametrize("name", ["protonet", "logistic head"])
def test_cached_episodes_embed_each_scan_once_with_the_same_outputs(val_episodes, name):
    store, sampler, n_scans = val_episodes
    learner, backbone = _learners()[name]
    assert adapts_on_embeddings(learner)
    fast = run_episodes(learner, store, sampler, range(12), "cpu", support_loo=True)
    assert backbone.images_seen <= n_scans  # 12 episodes of 14 scans: each scan at most once
    backbone.images_seen = 0
    slow = run_episodes(_ImagesOnly(learner), store, sampler, range(12), "cpu", support_loo=True)
    assert backbone.images_seen > 12 * 14  # the episodes' scans, and the refits'
    for a, b in zip(fast.logits + fast.support_logits, slow.logits + slow.support_logits):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(fast.distances, slow.distances):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert all(np.array_equal(a, b) for a, b in zip(fast.labels, slow.labels))


def test_the_cache_embeds_on_first_use_in_evaluation_mode(val_episodes):
    store, sampler, _ = val_episodes
    learner, backbone = _learners()["protonet"]
    cache = EmbeddingCache(learner, store, "cpu", batch_size=5)
    records = sampler.episode(0).support
    first = cache.stack(records)
    assert first.shape == (len(records), 8) and len(cache) == len(records) and not first.requires_grad
    seen = backbone.images_seen
    again = cache.stack(list(reversed(records)))
    assert backbone.images_seen == seen  # nothing embedded twice
    torch.testing.assert_close(again, first.flip(0))
    torch.testing.assert_close(first, learner.embed(store.stack(records)).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["maml", "matching", "mann"])
def test_learners_without_an_embedding_adaptation_keep_the_image_path(method):
    torch.manual_seed(0)
    assert not adapts_on_embeddings(create_method(method, create_backbone("conv4", in_channels=1, hidden=8)))


# [values per scan, scans per backbone pass]
EMBED_BATCHES = [
    [3 * 64 * 64, 256],  # the 2D default: unchanged
    [1 * 16 * 16, 256],  # never more than EMBED_BATCH
    [3 * 84 * 84, 148],
    [1 * 28**3, 143],  # a MedMNIST 3D volume
    [1 * 64**3, 12],
    [3 * 256**3, 1],  # never fewer than one
]


@pytest.mark.parametrize("values, expected", EMBED_BATCHES)
def test_embedding_passes_shrink_with_the_scan(values, expected):
    from medmeta.embedded import embed_batch_size

    assert embed_batch_size(values) == expected


class _Volumes:
    """A store of ``n`` random 1 x 28^3 volumes (the interface EmbeddingCache uses)."""

    def __init__(self, n: int):
        generator = torch.Generator().manual_seed(0)
        self.volumes = {f"v{i}": torch.rand(1, 28, 28, 28, generator=generator) for i in range(n)}

    def get(self, record):
        return self.volumes[record.key]

    def stack(self, records):
        return torch.stack([self.volumes[r.key] for r in records])


def test_the_cache_embeds_volumes_in_smaller_passes():
    """256 volumes of 28^3 in one pass of a 3D conv4-32 took 3.6 GiB; the cache now embeds 143
    at a time, with the same embeddings."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_channels=1, spatial_dims=3, hidden=4)
    passes: list[int] = []
    learner = SimpleNamespace(embed=lambda x: passes.append(len(x)) or backbone(x))
    store, records = _Volumes(150), [SimpleNamespace(key=f"v{i}") for i in range(150)]
    backbone.eval()
    embedded = EmbeddingCache(learner, store, "cpu").stack(records)
    assert passes == [143, 7]
    with torch.no_grad():
        torch.testing.assert_close(embedded, backbone(store.stack(records)), rtol=1e-5, atol=1e-5)
