"""The training input pipeline (medmeta.data.loading, medmeta.data.disk_cache): the loader gives
the episodes and batches of the serial sampler exactly, with or without workers; the on-disk
cache is keyed by content and preprocessing and read back safely."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medmeta.checkpoint import load_tensors
from medmeta.data.disk_cache import DiskCache
from medmeta.data.loading import MetaBatchIndices, PretrainImages, PretrainOrder, epoch_order, make_loader
from medmeta.data.reading import Preprocessing, ScanReader
from medmeta.data.records import ImageRecord
from medmeta.data.store import ImageStore
from medmeta.training import TrainConfig, train
from medmeta.training.config import ConfigError
from medmeta.training.distributed import Processes, check_distributed
from medmeta.training.loop import Run

# Episode 0 of seed 0 on sample_data: what the sampler drew before the loader existed (and must
# still draw): the classes, then the support files in order.
EPISODE_0_CLASSES = ["synth/diagonal_stripes", "synth/twin_blobs", "synth/horizontal_stripes"]
EPISODE_0_SUPPORT = [
    "diagonal_stripes_002.png", "diagonal_stripes_011.nii.gz", "diagonal_stripes_025.dcm", "diagonal_stripes_023.png",
    "diagonal_stripes_019.dcm", "twin_blobs_007.dcm", "twin_blobs_011.nii.gz", "twin_blobs_021.dcm", "twin_blobs_010.dcm",
    "twin_blobs_025.nii.gz", "horizontal_stripes_027.dcm", "horizontal_stripes_020.dcm", "horizontal_stripes_013.dcm",
    "horizontal_stripes_001.png", "horizontal_stripes_005.png",
]
EPISODE_2_QUERY_START = [
    "cross_shape_013.nii.gz", "cross_shape_009.nii.gz", "cross_shape_002.dcm", "cross_shape_021.nii.gz",
    "cross_shape_012.nii.gz", "cross_shape_022.nii.gz",
]


@pytest.fixture(scope="module")
def run(sample_protocol, tmp_path_factory) -> Run:
    config = TrainConfig(protocol=str(sample_protocol), out=str(tmp_path_factory.mktemp("load")), episodes=8, meta_batch=2, workers=0)
    run = Run(config, quiet=True)
    run.load_images()
    return run


def _serial(run: Run, index: int) -> tuple[list[str], torch.Tensor]:
    """Episode ``index`` as the training loop built it before the loader."""
    ep = run.train_episode(index)
    return [r.key for r in ep.support + ep.query], run.augment(run.store.stack(ep.support + ep.query), step=index)


def test_seed_0_draws_the_episodes_it_always_drew(run):
    ep0, ep2 = run.train_episode(0), run.train_episode(2)
    assert ep0.classes == EPISODE_0_CLASSES
    assert [Path(r.key).name for r in ep0.support] == EPISODE_0_SUPPORT
    assert [Path(r.key).name for r in ep2.query[:6]] == EPISODE_2_QUERY_START


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_gives_the_serial_episodes_exactly(run, workers):
    run.workers = workers
    try:
        items = list(run.episode_loader())
    finally:
        run.workers = 0
    assert [item.index for item in items] == list(range(8))
    for item in items:
        keys, images = _serial(run, item.index)
        ep = run.train_episode(item.index)
        assert torch.equal(item.images, images)  # bit for bit: augmentation seeded by the index alone
        assert item.n_support == len(ep.support) and torch.equal(item.query_labels, ep.query_labels)


def test_loader_resumes_mid_run_and_leaves_global_random_state(run):
    before = torch.random.get_rng_state()
    run.episode = 4
    try:
        items = list(run.episode_loader())
    finally:
        run.episode = 0
    assert [item.index for item in items] == [4, 5, 6, 7]
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize(
    "start, stop, meta_batch, rank, world, expected",
    [
        (0, 8, 4, 0, 1, [0, 1, 2, 3, 4, 5, 6, 7]),
        (0, 8, 4, 0, 2, [0, 2, 4, 6]),
        (0, 8, 4, 1, 2, [1, 3, 5, 7]),
        (4, 10, 2, 1, 2, [5, 7, 9]),
        (0, 5, 2, 0, 1, [0, 1, 2, 3, 4]),
    ],
)
def test_meta_batch_indices_share(start, stop, meta_batch, rank, world, expected):
    sampler = MetaBatchIndices(start, stop, meta_batch, Processes(rank=rank, world_size=world))
    assert list(sampler) == expected and len(sampler) == len(expected)


def test_pretrain_batches_match_the_serial_epoch(run):
    names = run.protocol.classes["train"]
    records = [r for n in names for r in run.protocol.records[n]]
    targets = torch.tensor([i for i, n in enumerate(names) for _ in run.protocol.records[n]])
    dataset = PretrainImages(records, targets, run.store, run.augment, seed=0, batch_size=16, second_view_offset=500_000)
    order = PretrainOrder(1, 3, 2)
    assert list(order) == [(1, 0), (1, 1), (2, 0), (2, 1)] and len(order) == 4
    items = list(make_loader(dataset, order, workers=2, seed=0))
    for item in items:
        idx = epoch_order(0, item.epoch, len(records))[item.batch * 16 : (item.batch + 1) * 16]
        raw = run.store.stack([records[i] for i in idx])
        assert torch.equal(item.targets, targets[idx])
        assert torch.equal(item.images, run.augment(raw, step=(item.epoch + 1) * 1_000_000 + item.batch))
        assert torch.equal(item.second, run.augment(raw, step=(item.epoch + 1) * 1_000_000 + 500_000 + item.batch))
        assert not torch.equal(item.images, item.second)
    half = PretrainImages(records, targets, run.store, run.augment, seed=0, batch_size=16, rank=1, world_size=2)
    assert torch.equal(half[(1, 0)].targets, items[0].targets[1::2])


def test_training_with_workers_and_a_disk_cache_gives_the_same_weights(sample_protocol, tmp_path):
    base = dict(
        protocol=str(sample_protocol), episodes=6, meta_batch=2, pretrain_epochs=1, val_interval=6, val_episodes=4,
        calibration_episodes=4, tuning_episodes=0, image_size=24, device="cpu", precision="fp32", pretrain_contrastive=0.5,
        backbone_kwargs={"hidden": 16},
    )
    train(TrainConfig(**base, out=str(tmp_path / "serial"), workers=0), quiet=True)
    train(TrainConfig(**base, out=str(tmp_path / "workers"), workers=2, cache_dir=str(tmp_path / "cache")), quiet=True)
    train(
        TrainConfig(**base, out=str(tmp_path / "disk"), workers=1, cache_dir=str(tmp_path / "cache"), cache_in_memory=False),
        quiet=True,
    )
    serial = load_tensors(tmp_path / "serial" / "last.safetensors")
    for other in ("workers", "disk"):
        tensors = load_tensors(tmp_path / other / "last.safetensors")
        assert serial.keys() == tensors.keys()
        assert all(torch.equal(serial[k], tensors[k]) for k in serial), other


# ---- the on-disk cache --------------------------------------------------------------------------


@pytest.fixture
def scans(tmp_path) -> list[ImageRecord]:
    from PIL import Image

    rng = np.random.default_rng(0)
    records = []
    for i in range(3):
        path = tmp_path / "scans" / f"scan_{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)
        records.append(ImageRecord(str(path), "a", path))
    return records


def test_disk_cache_is_reused_across_stores_and_keyed_by_content(scans, tmp_path):
    reader = ScanReader(Preprocessing(image_size=16))
    first = ImageStore(reader, cache_dir=tmp_path / "cache")
    good, bad = first.warm(scans)
    assert len(good) == 3 and not bad and first.n_decoded == 3
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3

    again = ImageStore(reader, cache_dir=tmp_path / "cache", in_memory=False)
    for record in scans:
        assert torch.equal(again.get(record), first.get(record))
    assert again.n_decoded == 0 and len(again) == 0  # read from disk, nothing held in memory

    copy = tmp_path / "scans" / "renamed.png"
    shutil.copy(scans[0].path, copy)
    renamed = ImageRecord(str(copy), "a", copy)
    assert again.disk.entry_path(renamed) == again.disk.entry_path(scans[0])  # same bytes, same entry
    copy.write_bytes(scans[1].path.read_bytes())
    assert again.disk.entry_path(renamed) == again.disk.entry_path(scans[1])  # edited in place: another entry

    other_size = DiskCache(tmp_path / "cache", ScanReader(Preprocessing(image_size=12)))
    assert other_size.entry_path(scans[0]) != again.disk.entry_path(scans[0])
    assert other_size.get(scans[0]).shape == (3, 12, 12) and other_size.n_decoded == 1


def test_disk_cache_entries_load_without_unpickling_code(scans, tmp_path):
    cache = DiskCache(tmp_path / "cache", ScanReader(Preprocessing(image_size=16)))
    image = cache.get(scans[0])
    entry = cache.entry_path(scans[0])
    assert torch.equal(torch.load(entry, weights_only=True)["image"], image) and image.dtype == torch.float16
    entry.write_bytes(b"not a tensor file")  # corrupt: decoded again, not trusted
    with pytest.warns(UserWarning, match="Corrupt cache file"):
        assert torch.equal(cache.get(scans[0]), image)
    assert cache.n_decoded == 2


def test_unreadable_scans_are_reported_not_cached(scans, tmp_path):
    bad = tmp_path / "scans" / "bad.png"
    bad.write_bytes(b"garbage")
    missing = tmp_path / "scans" / "missing.png"
    records = scans + [ImageRecord(str(bad), "a", bad), ImageRecord(str(missing), "a", missing)]
    for workers in (0, 2):
        store = ImageStore(ScanReader(Preprocessing(image_size=16)), cache_dir=tmp_path / f"cache{workers}")
        good, rejected = store.warm(records, workers=workers)
        assert good == scans
        assert [(r.path.name, reason) for r, reason in rejected] == [
            ("bad.png", "not a PNG/JPEG/BMP/TIFF image (content not recognised)"), ("missing.png", "file not found"),
        ]
        assert len(list((tmp_path / f"cache{workers}").glob("*.pt"))) == 3


def test_store_in_workers_equals_serial(scans, tmp_path):
    reader = ScanReader(Preprocessing(image_size=16))
    serial, parallel = ImageStore(reader), ImageStore(reader)
    serial.warm(scans)
    parallel.warm(scans, workers=2)
    assert parallel.n_decoded == 3 and len(parallel) == 3
    assert all(torch.equal(serial.get(r), parallel.get(r)) for r in scans)


# ---- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"workers": -1}, "workers"),
        ({"cache_in_memory": False}, "cache_in_memory"),
    ],
)
def test_bad_loader_settings_are_refused(sample_protocol, tmp_path, overrides, field):
    with pytest.raises(ConfigError) as info:
        TrainConfig(protocol=str(sample_protocol), out=str(tmp_path / "r"), **overrides).validate()
    assert info.value.field == field


def test_a_file_as_cache_dir_is_refused(sample_protocol, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        TrainConfig(protocol=str(sample_protocol), out=str(tmp_path / "r"), cache_dir=str(tmp_path / "file")).validate()


def test_pretrain_batch_smaller_than_the_processes_is_refused():
    with pytest.raises(ConfigError, match="--pretrain-batch-size 2 cannot be split across 4 processes"):
        check_distributed(Processes(rank=0, world_size=4), 4, 8, pretrain_batch_size=2)
    check_distributed(Processes(rank=0, world_size=4), 4, 8, pretrain_batch_size=4)


def test_cli_has_the_loader_options():
    from typer.testing import CliRunner

    from medmeta.cli.main import app

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    for option in ("--workers", "--cache-dir", "--no-cache-in-memory"):
        assert option in result.output
