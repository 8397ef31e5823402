"""EpisodeSampler (shapes, seeding, patient separation, manifests), ImageStore and Augmenter."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medmeta.data.augment import AUGMENTATIONS, Augmenter
from medmeta.data.episodes import Episode, EpisodeSampler
from medmeta.data.reading import Preprocessing, ScanReader
from medmeta.data.records import ImageRecord
from medmeta.data.sources import class_folder_records, patient_map_from_csv
from medmeta.data.store import ImageStore
from medmeta.errors import ProtocolError, ScanReadError
from conftest import require_dataset as shared

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"




def synthetic_classes(n_classes: int = 6, per_class: int = 12) -> dict[str, list[ImageRecord]]:
    return {
        f"src/c{k}": [ImageRecord(key=f"c{k}/img{i:02d}", label=f"src/c{k}") for i in range(per_class)]
        for k in range(n_classes)
    }


def keys(episode: Episode) -> tuple[list[str], list[str], list[str]]:
    return episode.classes, [r.key for r in episode.support], [r.key for r in episode.query]


# == EpisodeSampler: shapes ===================================================================
# [kwargs, expected support_labels shape, expected query_labels shape]
SHAPE_CASES = [
    [{"way": 2, "shot": 1, "query": 1}, (2,), (2,)],
    [{"way": 3, "shot": 1, "query": 5}, (3,), (15,)],
    [{"way": 3, "shot": 5, "query": 7}, (15,), (21,)],
    [{"way": 5, "shot": 2, "query": 3}, (10,), (15,)],
    [{"way": 6, "shot": 4, "query": 8}, (24,), (48,)],
]


@pytest.mark.parametrize("kwargs, support_shape, query_shape", SHAPE_CASES)
def test_episode_shapes_and_labels(kwargs, support_shape, query_shape):
    data = synthetic_classes()
    sampler = EpisodeSampler(data, seed=3, **kwargs)
    way, shot, query = kwargs["way"], kwargs["shot"], kwargs["query"]
    for index in (0, 1, 17):
        ep = sampler.episode(index)
        assert ep.index == index
        assert len(ep.classes) == way == len(set(ep.classes))
        assert set(ep.classes) <= set(data)
        assert tuple(ep.support_labels.shape) == support_shape and ep.support_labels.dtype == torch.int64
        assert tuple(ep.query_labels.shape) == query_shape and ep.query_labels.dtype == torch.int64
        assert ep.support_labels.tolist() == [c for c in range(way) for _ in range(shot)]
        assert ep.query_labels.tolist() == [c for c in range(way) for _ in range(query)]
        assert len(ep.support) == way * shot and len(ep.query) == way * query
        # label i means classes[i]: every record sits under its own class
        for record, label in zip(ep.support, ep.support_labels.tolist()):
            assert record.label == ep.classes[label]
        for record, label in zip(ep.query, ep.query_labels.tolist()):
            assert record.label == ep.classes[label]
        support_keys = [r.key for r in ep.support]
        query_keys = [r.key for r in ep.query]
        assert len(set(support_keys)) == len(support_keys) and len(set(query_keys)) == len(query_keys)
        assert not set(support_keys) & set(query_keys)


def test_every_class_is_picked_over_many_episodes():
    sampler = EpisodeSampler(synthetic_classes(6), way=2, shot=1, query=1, seed=0)
    seen = {name for i in range(60) for name in sampler.episode(i).classes}
    assert seen == set(sampler.class_names)
    # the class order inside an episode varies too (label 0 is not always the smallest name)
    assert any(sampler.episode(i).classes != sorted(sampler.episode(i).classes) for i in range(20))


# == EpisodeSampler: seeding ==================================================================
def test_same_seed_gives_identical_episodes():
    a = EpisodeSampler(synthetic_classes(), way=3, shot=2, query=4, seed=11)
    b = EpisodeSampler(synthetic_classes(), way=3, shot=2, query=4, seed=11)
    for index in range(10):
        assert keys(a.episode(index)) == keys(b.episode(index))
        assert keys(a.episode(index)) == keys(a.episode(index))  # drawing twice changes nothing


def test_different_seed_gives_different_episodes():
    a = EpisodeSampler(synthetic_classes(), way=3, shot=2, query=4, seed=0)
    b = EpisodeSampler(synthetic_classes(), way=3, shot=2, query=4, seed=1)
    differing = sum(keys(a.episode(i)) != keys(b.episode(i)) for i in range(10))
    assert differing >= 9
    # and consecutive episodes of one seed differ from each other
    assert len({tuple(keys(a.episode(i))[1]) for i in range(10)}) == 10


def test_episode_depends_only_on_seed_and_index():
    fresh = EpisodeSampler(synthetic_classes(), way=3, shot=2, query=4, seed=5)
    used = EpisodeSampler(synthetic_classes(), way=3, shot=2, query=4, seed=5)
    drawn = [used.episode(i) for i in range(5)]  # episodes 0..4 first
    assert keys(fresh.episode(5)) == keys(used.episode(5))
    assert keys(fresh.episode(2)) == keys(drawn[2])
    # iteration yields episode 0, 1, 2, ... with the same content
    iterated = list(itertools.islice(iter(fresh), 6))
    assert [ep.index for ep in iterated] == list(range(6))
    assert keys(iterated[5]) == keys(used.episode(5))
    # resuming at a later index, in any order
    assert [keys(fresh.episode(i)) for i in (9, 7, 8)] == [keys(used.episode(i)) for i in (9, 7, 8)]


def test_class_dict_order_does_not_matter():
    data = synthetic_classes()
    reordered = dict(reversed(list(data.items())))
    a = EpisodeSampler(data, way=3, shot=1, query=2, seed=4)
    b = EpisodeSampler(reordered, way=3, shot=1, query=2, seed=4)
    assert a.class_names == b.class_names == sorted(data)
    assert [keys(a.episode(i)) for i in range(5)] == [keys(b.episode(i)) for i in range(5)]


def test_sampler_copies_its_input():
    data = synthetic_classes()
    sampler = EpisodeSampler(data, way=2, shot=1, query=2, seed=0)
    before = keys(sampler.episode(3))
    data["src/c0"].clear()
    data["src/extra"] = []
    assert keys(sampler.episode(3)) == before


# == EpisodeSampler: patient separation =======================================================
def patient_classes(n_classes: int = 5, patients_per_class: int = 6, images_per_patient: int = 3) -> dict[str, list[ImageRecord]]:
    data = {}
    for k in range(n_classes):
        data[f"src/c{k}"] = [
            ImageRecord(key=f"c{k}/p{p}/img{i}", label=f"src/c{k}", patient_id=f"c{k}-p{p}")
            for p in range(patients_per_class)
            for i in range(images_per_patient)
        ]
    return data


def assert_patients_apart(episode: Episode) -> None:
    support = {r.patient_id for r in episode.support if r.patient_id is not None}
    query = {r.patient_id for r in episode.query if r.patient_id is not None}
    assert not support & query, f"episode {episode.index}: patients {sorted(support & query)} in support and query"


def test_no_patient_in_both_support_and_query_over_200_episodes():
    sampler = EpisodeSampler(patient_classes(), way=3, shot=2, query=6, seed=0)
    query_sizes = set()
    for index in range(200):
        ep = sampler.episode(index)
        assert_patients_apart(ep)
        query_sizes.add(len(ep.query))
    assert query_sizes == {18}


def test_patients_spanning_two_classes_are_kept_apart_too():
    data = patient_classes(n_classes=3, patients_per_class=5, images_per_patient=3)
    # patient "both" has images in c0 and in c1: drawn into c0's support it must not be in c1's query
    data["src/c0"] += [ImageRecord(key=f"c0/both/img{i}", label="src/c0", patient_id="both") for i in range(3)]
    data["src/c1"] += [ImageRecord(key=f"c1/both/img{i}", label="src/c1", patient_id="both") for i in range(3)]
    sampler = EpisodeSampler(data, way=3, shot=3, query=6, seed=2)
    used_both = 0
    for index in range(200):
        ep = sampler.episode(index)
        assert_patients_apart(ep)
        used_both += any(r.patient_id == "both" for r in ep.support + ep.query)
    assert used_both > 0  # the shared patient is still used, only never on both sides


def test_records_without_patient_ids_mix_freely():
    data = patient_classes(n_classes=3, patients_per_class=4, images_per_patient=2)
    data["src/c2"] = [ImageRecord(key=f"c2/{i}", label="src/c2") for i in range(5)]  # no ids
    sampler = EpisodeSampler(data, way=3, shot=1, query=4, seed=0)
    for index in range(50):
        ep = sampler.episode(index)
        assert_patients_apart(ep)
        assert len(ep.query) == 12


def test_too_few_distinct_patients_is_refused_with_the_classes():
    data = {
        "src/a": [ImageRecord(key=f"a{i}", label="src/a", patient_id="only-one") for i in range(6)],
        "src/b": [ImageRecord(key=f"b{i}", label="src/b", patient_id=f"b{i}") for i in range(6)],
    }
    sampler = EpisodeSampler(data, way=2, shot=1, query=2, seed=0)
    with pytest.raises(ProtocolError) as excinfo:
        sampler.episode(4)
    message = str(excinfo.value)
    assert message.startswith("cannot draw episode 4: too few distinct patients in ")
    assert "'src/a'" in message and "'src/b'" in message
    assert message.endswith("to keep support and query apart")


def test_ham10000_sample_lesions_stay_apart():
    root = shared("ham10000-sample")
    patients = patient_map_from_csv(root / "HAM10000_metadata_sample.csv", "image_id", "lesion_id")
    records = class_folder_records(root, patients)
    by_class: dict[str, list[ImageRecord]] = {}
    for record in records:
        by_class.setdefault(record.label, []).append(record)
    assert all(r.patient_id is not None for r in records)
    sampler = EpisodeSampler(by_class, way=3, shot=2, query=5, seed=0)
    for index in range(100):
        ep = sampler.episode(index)
        assert_patients_apart(ep)
        assert all(r.patient_id.startswith("HAM_") for r in ep.support + ep.query)


# == EpisodeSampler: manifests and refusals ===================================================
@pytest.mark.parametrize("way, shot, query", [(2, 1, 3), (3, 5, 2), (4, 2, 2)])
def test_save_manifest(tmp_path, way, shot, query):
    data = patient_classes(n_classes=4, patients_per_class=5, images_per_patient=2)
    data["src/c3"] = [ImageRecord(key=f"c3/{i}", label="src/c3") for i in range(10)]  # no patient ids
    sampler = EpisodeSampler(data, way=way, shot=shot, query=query, seed=9)
    path = tmp_path / "nested" / "folder" / "episodes.csv"  # parent folders are created
    indices = [0, 3, 4]
    sampler.save_manifest(path, indices)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["episode", "role", "class", "label", "key", "patient_id"]
    body = rows[1:]
    assert len(body) == len(indices) * way * (shot + query)
    for index in indices:
        ep = sampler.episode(index)
        mine = [row for row in body if row[0] == str(index)]
        assert len(mine) == way * (shot + query)
        expected = [
            [str(index), role, ep.classes[label], str(label), record.key, record.patient_id or ""]
            for role, records, labels in (("support", ep.support, ep.support_labels), ("query", ep.query, ep.query_labels))
            for record, label in zip(records, labels.tolist())
        ]
        assert mine == expected
    assert sorted({row[0] for row in body}) == ["0", "3", "4"]
    assert [p.name for p in path.parent.iterdir()] == ["episodes.csv"]  # no temporary file left behind


def test_save_manifest_accepts_a_range_and_overwrites(tmp_path):
    sampler = EpisodeSampler(synthetic_classes(), way=2, shot=1, query=1, seed=0)
    path = tmp_path / "m.csv"
    sampler.save_manifest(path, range(5))
    assert len(path.read_text(encoding="utf-8").splitlines()) == 1 + 5 * 2 * 2
    sampler.save_manifest(path, range(2))
    assert len(path.read_text(encoding="utf-8").splitlines()) == 1 + 2 * 2 * 2


def test_refuses_a_class_with_too_few_images():
    data = synthetic_classes(3, per_class=10)
    data["src/c1"] = data["src/c1"][:4]
    with pytest.raises(ProtocolError) as excinfo:
        EpisodeSampler(data, way=2, shot=2, query=3)
    assert str(excinfo.value) == "class 'src/c1' has 4 images, fewer than shot + query = 5"
    EpisodeSampler(data, way=2, shot=1, query=3)  # exactly enough


def test_refuses_too_few_classes_and_way_below_two():
    with pytest.raises(ProtocolError, match=r"^5-way episodes need 5 classes, only 3 available$"):
        EpisodeSampler(synthetic_classes(3), way=5, shot=1, query=1)
    with pytest.raises(ProtocolError, match=r"^an episode needs way >= 2$"):
        EpisodeSampler(synthetic_classes(3), way=1, shot=1, query=1)


# == ImageStore ===============================================================================
class CountingReader:
    """Wraps a ScanReader and records every call, to see real decodes."""

    def __init__(self, reader: ScanReader):
        self.reader = reader
        self.calls: list[str] = []

    def __call__(self, source, name=None):
        self.calls.append(str(name))
        return self.reader(source, name=name)


@pytest.fixture
def store_records(tmp_path) -> list[ImageRecord]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(3):
        path = tmp_path / f"scan {i}.png"
        Image.fromarray((rng.random((12, 10)) * 255).astype(np.uint8)).save(path)
        records.append(ImageRecord(key=str(path), label="c", path=path))
    records.append(ImageRecord(key="mnist::train::0", label="c", array=(rng.random((28, 28)) * 255).astype(np.uint8)))
    return records


@pytest.fixture
def bad_record(tmp_path) -> ImageRecord:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return ImageRecord(key=str(path), label="c", path=path)


def test_store_decodes_each_record_once(store_records):
    reader = ScanReader(Preprocessing(image_size=8, channels=1))
    spy = CountingReader(reader)
    store = ImageStore(spy)
    first = store.stack(store_records)
    assert tuple(first.shape) == (4, 1, 8, 8) and first.dtype == torch.float32
    assert store.n_decoded == 4 and len(spy.calls) == 4 and len(store) == 4
    for _ in range(3):
        again = store.stack(store_records[::-1])
        for record in store_records:
            store.get(record)
    assert store.n_decoded == 4 and len(spy.calls) == 4
    torch.testing.assert_close(again.flip(0), first, rtol=0, atol=0)
    # a record with the same key (e.g. the same file in two protocols) is the same cache entry
    twin = ImageRecord(key=store_records[0].key, label="other", path=store_records[0].path)
    store.get(twin)
    assert store.n_decoded == 4


def test_store_values_match_the_reader_within_float16(store_records):
    reader = ScanReader(Preprocessing(image_size=8, channels=3))
    store = ImageStore(reader)
    for record in store_records:
        got = store.get(record)
        assert got.dtype == torch.float32 and tuple(got.shape) == (3, 8, 8)
        torch.testing.assert_close(got, reader(record.source, name=record.key), rtol=0, atol=1e-3)
    # handed-out tensors are copies: modifying one does not corrupt the cache
    got = store.get(store_records[0])
    got.fill_(5.0)
    assert float(store.get(store_records[0]).max()) <= 1.0


def test_warm_reports_bad_files_once_and_never_retries(store_records, bad_record):
    spy = CountingReader(ScanReader(Preprocessing(image_size=8, channels=1)))
    store = ImageStore(spy)
    ticks = []
    records = [store_records[0], bad_record, store_records[1]]
    good, bad = store.warm(records, on_progress=lambda: ticks.append(1))
    assert good == [store_records[0], store_records[1]]
    assert len(bad) == 1 and bad[0][0] == bad_record
    assert bad[0][1] == "the image file is truncated or corrupt"
    assert len(ticks) == 3
    assert store.n_decoded == 3 and len(spy.calls) == 3 and len(store) == 2
    # asking again: the same reason, from memory
    with pytest.raises(ScanReadError) as excinfo:
        store.get(bad_record)
    assert excinfo.value.path == bad_record.key and excinfo.value.reason == bad[0][1]
    good2, bad2 = store.warm(records)
    assert good2 == good and [(r.key, why) for r, why in bad2] == [(bad_record.key, bad[0][1])]
    with pytest.raises(ScanReadError, match="broken.png"):
        store.stack([store_records[1], bad_record])
    assert store.n_decoded == 3 and len(spy.calls) == 3


def test_warm_without_progress_callback(store_records):
    store = ImageStore(ScanReader(Preprocessing(image_size=8, channels=1)))
    good, bad = store.warm(iter(store_records))  # any iterable
    assert good == store_records and bad == []
    assert store.n_decoded == len(store) == 4


# == Augmenter ================================================================================
@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=generator)
    images[:, :, :4, :] = 1.0  # an asymmetric structure so that flips and rotations show
    return images


@pytest.mark.parametrize("level", ["light", "strong"])
def test_same_seed_and_step_give_identical_output(batch, level):
    a = Augmenter(level, seed=3)
    b = Augmenter(level, seed=3)
    out = a(batch.clone(), step=7)
    torch.testing.assert_close(a(batch.clone(), step=7), out, rtol=0, atol=0)
    a(batch.clone(), step=8)
    a(batch.clone(), step=9)
    torch.testing.assert_close(a(batch.clone(), step=7), out, rtol=0, atol=0)  # resumable at any step
    torch.testing.assert_close(b(batch.clone(), step=7), out, rtol=0, atol=0)  # and across instances


@pytest.mark.parametrize("level", ["light", "strong"])
def test_different_step_or_seed_gives_different_output(batch, level):
    aug = Augmenter(level, seed=3)
    out = aug(batch.clone(), step=7)
    assert not torch.equal(aug(batch.clone(), step=8), out)
    assert not torch.equal(Augmenter(level, seed=4)(batch.clone(), step=7), out)
    assert not torch.equal(out, batch)


# [kwargs, input_shape, expected_shape]
AUG_SHAPES = [
    [{"level": "none"}, (2, 1, 8, 8), (2, 1, 8, 8)],
    [{"level": "light"}, (2, 1, 8, 8), (2, 1, 8, 8)],
    [{"level": "light"}, (5, 3, 16, 16), (5, 3, 16, 16)],
    [{"level": "strong"}, (3, 3, 12, 12), (3, 3, 12, 12)],
    [{"level": "strong"}, (1, 1, 20, 20), (1, 1, 20, 20)],
]


@pytest.mark.parametrize("kwargs, input_shape, expected_shape", AUG_SHAPES)
def test_augmenter_preserves_shape_dtype_and_range(kwargs, input_shape, expected_shape):
    images = torch.rand(input_shape, generator=torch.Generator().manual_seed(1))
    before = images.clone()
    out = Augmenter(seed=0, **kwargs)(images, step=1)
    assert tuple(out.shape) == expected_shape
    assert out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert isinstance(out, torch.Tensor)
    if kwargs["level"] != "none":
        assert type(out) is torch.Tensor  # a plain tensor, not a MONAI MetaTensor
    torch.testing.assert_close(images, before, rtol=0, atol=0)  # the input is not modified


def test_none_is_the_identity(batch):
    aug = Augmenter("none", seed=123)
    for step in (0, 1, 99):
        out = aug(batch, step=step)
        torch.testing.assert_close(out, batch, rtol=0, atol=0)


def test_light_keeps_the_image_content(batch):
    # flips, 90-degree turns and a mild affine move pixels but keep the overall intensity
    out = Augmenter("light", seed=0)(batch.clone(), step=0)
    assert abs(float(out.mean()) - float(batch.mean())) < 0.1


def test_augmenter_accepts_store_output(store_records):
    store = ImageStore(ScanReader(Preprocessing(image_size=16, channels=3)))
    images = store.stack(store_records)
    out = Augmenter("strong", seed=0)(images, step=2)
    assert tuple(out.shape) == (4, 3, 16, 16) and type(out) is torch.Tensor
    torch.testing.assert_close(Augmenter("strong", seed=0)(store.stack(store_records), step=2), out, rtol=0, atol=0)


def test_unknown_augmentation_level():
    assert AUGMENTATIONS == ("none", "light", "strong")
    with pytest.raises(ValueError, match=r"augmentation must be one of \('none', 'light', 'strong'\), got 'heavy'"):
        Augmenter("heavy")


def test_grayscale_augmentation_is_the_luminance_and_seeded():
    from medmeta.data.augment import RandGrayscale

    image = torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(0))
    always = RandGrayscale(prob=1.0)
    gray = torch.as_tensor(always(image))
    expected = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    for channel in range(3):
        torch.testing.assert_close(gray[channel], expected)
    assert torch.equal(RandGrayscale(prob=0.0)(image), image)
    one_channel = image[:1]
    assert torch.equal(torch.as_tensor(always(one_channel)), one_channel)
    batch = torch.rand(40, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    first = Augmenter("none", seed=2, grayscale=0.5)(batch, step=7)
    again = Augmenter("none", seed=2, grayscale=0.5)(batch, step=7)
    assert torch.equal(first, again)
    turned = [bool(torch.equal(img[0], img[1])) for img in first]
    assert 5 <= sum(turned) <= 35  # about half, and only those: the others are untouched
    for img, original, is_gray in zip(first, batch, turned):
        assert is_gray or torch.equal(img, original)
    with pytest.raises(ValueError, match="grayscale probability"):
        Augmenter("light", grayscale=2.0)


@pytest.mark.parametrize("level", ["light", "strong"])
def test_augmenter_matches_monai_with_metadata_tracking_and_restores_the_setting(batch, level):
    # the augmenter runs MONAI's transforms on plain tensors for speed; the values must be those
    # of the same transforms on MetaTensors, and MONAI's global tracking must be left as it was
    from monai.data import get_track_meta, set_track_meta

    aug = Augmenter(level, seed=3, grayscale=0.5)
    out = aug(batch.clone(), step=7)
    assert get_track_meta() is True
    aug._transform.set_random_state(seed=int(np.random.SeedSequence([3, 7]).generate_state(1)[0]))
    reference = torch.stack([torch.as_tensor(aug._transform(img)) for img in batch.clone()]).clamp(0.0, 1.0)
    torch.testing.assert_close(out, reference.as_subclass(torch.Tensor), rtol=0, atol=0)
    set_track_meta(False)
    try:
        aug(batch.clone(), step=8)
        assert get_track_meta() is False
    finally:
        set_track_meta(True)
