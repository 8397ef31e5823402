"""Data sources (class folders, MedMNIST .npz, CSV manifests) and protocol loading / refusals.

Nothing here decodes an image: class folders are filled with placeholder files, so the tests
are fast. The real shared datasets and protocols are used when present (skipped otherwise).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

from medmeta.data.protocol import EpisodeSettings, Protocol, group_by_patient, load_protocol
from medmeta.data.records import ImageRecord
from medmeta.data.sources import (
    class_folder_records,
    csv_manifest_records,
    load_source,
    medmnist_records,
    patient_map_from_csv,
)
from medmeta.errors import MedmetaError, ProtocolError
from conftest import require_shared as shared

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATASETS = SHARED / "datasets"




# -- builders --------------------------------------------------------------------------------
def make_tree(root: Path, layout: dict[str, int | list[str]], suffix: str = ".png") -> Path:
    """``{"Train/nevus": 3, "x/y": ["a.jpg", "b.jpg"]}``: placeholder files (never decoded)."""
    for folder, files in layout.items():
        directory = root / folder
        directory.mkdir(parents=True, exist_ok=True)
        names = files if isinstance(files, list) else [f"{directory.name.replace(' ', '_')}_{i:03d}{suffix}" for i in range(files)]
        for name in names:
            (directory / name).write_bytes(b"not decoded in these tests")
    return root


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_protocol(folder: Path, sources: dict, classes: dict, episodes: dict | None = None, name: str = "tiny") -> Path:
    path = folder / f"{name}.yaml"
    spec = {"name": name, "sources": sources, "classes": classes}
    if episodes is not None:
        spec["episodes"] = episodes
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


EPISODES = {"way": 2, "shot": [1, 2], "query": 3, "test_episodes": 10}


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A folder source ``derm`` with 6 classes x 5 images (split folders, spaces) beside the protocol."""
    make_tree(
        tmp_path / "data" / "derm",
        {
            "Train/nevus": 3,
            "Test/nevus": 2,
            "Train/melanoma": 5,
            "Train/basal cell carcinoma": 5,
            "Train/seborrheic keratosis": 5,
            "Test/dermatofibroma": 5,
            "Test/vascular lesion": 5,
        },
    )
    return tmp_path


def tiny_protocol(folder: Path, classes: dict | None = None, episodes: dict | None = None, sources: dict | None = None) -> Path:
    return write_protocol(
        folder,
        sources if sources is not None else {"derm": "data/derm"},
        classes
        or {
            "train": ["derm/nevus", "derm/melanoma"],
            "val": ["derm/seborrheic keratosis"],
            "test": ["derm/dermatofibroma", "derm/vascular lesion"],
        },
        EPISODES if episodes is None else episodes,
    )


def refusal(path: Path) -> str:
    with pytest.raises(ProtocolError) as excinfo:
        load_protocol(path)
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# == class_folder_records =====================================================================
def test_split_folders_merge_into_one_class_and_spaces_work(tmp_path):
    root = make_tree(
        tmp_path / "isic",
        {"Train/basal cell carcinoma": 3, "Test/basal cell carcinoma": 2, "Train/nevus": 1, "Training/nevus": 1, "val/nevus": 1},
    )
    records = class_folder_records(root)
    by_label: dict[str, list[ImageRecord]] = {}
    for record in records:
        by_label.setdefault(record.label, []).append(record)
    assert sorted(by_label) == ["basal cell carcinoma", "nevus"]
    assert len(by_label["basal cell carcinoma"]) == 5
    assert len(by_label["nevus"]) == 3
    for record in records:
        assert record.path is not None and record.path.is_file()
        assert record.key == str(record.path)
        assert record.patient_id is None and record.array is None
        assert record.source == record.path
    # deterministic order (sorted paths), so runs are reproducible
    assert [r.key for r in records] == sorted(r.key for r in records)
    assert class_folder_records(root) == records


def test_hidden_files_sidecars_and_root_files_are_skipped(tmp_path):
    root = make_tree(tmp_path / "src", {"a": ["x.png", "y.dcm", "scan-without-suffix"], "b": ["z.jpg"]})
    for junk in ("a/.DS_Store", "a/._x.png", "a/labels.csv", "a/notes.txt", "a/info.json", "b/readme.md", "b/meta.yaml"):
        (root / junk).write_bytes(b"junk")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.png").write_bytes(b"junk")
    (root / "a" / ".ipynb_checkpoints").mkdir()
    (root / "a" / ".ipynb_checkpoints" / "x.png").write_bytes(b"junk")
    (root / "loose.png").write_bytes(b"a file directly in the root has no class")
    records = class_folder_records(root)
    assert sorted((r.label, r.path.name) for r in records) == [
        ("a", "scan-without-suffix"),
        ("a", "x.png"),
        ("a", "y.dcm"),
        ("b", "z.jpg"),
    ]


def test_class_folder_records_with_patient_map(tmp_path):
    root = make_tree(tmp_path / "ham", {"bkl": ["ISIC_1.jpg", "ISIC_2.jpg"], "mel": ["ISIC_3.jpg", "ISIC_4.nii.gz"]})
    records = class_folder_records(root, {"ISIC_1": "HAM_A", "ISIC_2": "HAM_A", "ISIC_4": "HAM_B"})
    assert {r.path.name: r.patient_id for r in records} == {
        "ISIC_1.jpg": "HAM_A",
        "ISIC_2.jpg": "HAM_A",
        "ISIC_3.jpg": None,  # not in the map
        "ISIC_4.nii.gz": "HAM_B",  # double suffix stripped
    }


def test_patient_map_with_dotted_dicom_uid_file_names(tmp_path):
    root = make_tree(tmp_path / "cr", {"pneumonia": ["1.2.840.1.dcm", "1.2.840.2.dcm"]})
    records = class_folder_records(root, {"1.2.840.1": "P1", "1.2.840.2": "P2"})
    assert {r.path.name: r.patient_id for r in records} == {"1.2.840.1.dcm": "P1", "1.2.840.2.dcm": "P2"}


def test_class_folder_refusals(tmp_path):
    with pytest.raises(ProtocolError, match=r"no-such-dir: class-folder source is not a directory"):
        class_folder_records(tmp_path / "no-such-dir")
    empty = make_tree(tmp_path / "empty", {"a": ["labels.csv"]})
    with pytest.raises(ProtocolError, match=r"empty: no image files found in class folders"):
        class_folder_records(empty)


def test_real_isic9_class_folders_merge_train_and_test():
    root = shared("datasets", "isic9")
    records = class_folder_records(root)
    counts: dict[str, int] = {}
    for record in records:
        counts[record.label] = counts.get(record.label, 0) + 1
    assert counts == {
        "actinic keratosis": 130,
        "basal cell carcinoma": 394,
        "dermatofibroma": 111,
        "melanoma": 454,
        "nevus": 373,
        "pigmented benign keratosis": 478,
        "seborrheic keratosis": 80,
        "squamous cell carcinoma": 197,
        "vascular lesion": 142,
    }
    assert len(records) == 2359


# == patient_map_from_csv =====================================================================
def test_patient_map_from_csv_strips_and_validates_columns(tmp_path):
    meta = write_csv(tmp_path / "meta.csv", ["lesion_id", "image_id", "dx"], [[" HAM_1 ", "ISIC_1 ", "bkl"], ["HAM_1", "ISIC_2", "bkl"]])
    assert patient_map_from_csv(meta, "image_id", "lesion_id") == {"ISIC_1": "HAM_1", "ISIC_2": "HAM_1"}
    with pytest.raises(ProtocolError) as excinfo:
        patient_map_from_csv(meta, "image_id", "patient")
    assert str(excinfo.value) == f"{meta}: no column 'patient' (columns: lesion_id, image_id, dx)"
    with pytest.raises(ProtocolError, match=r"nothing\.csv: cannot read CSV"):
        patient_map_from_csv(tmp_path / "nothing.csv", "image_id", "lesion_id")


# == medmnist_records =========================================================================
@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "tinymnist.npz"
    np.savez(
        path,
        train_images=rng.integers(0, 256, (4, 5, 5), dtype=np.uint8),
        train_labels=np.array([0, 1, 1, 2]),  # 1-D
        val_images=rng.integers(0, 256, (3, 5, 5), dtype=np.uint8),
        val_labels=np.array([[2], [0], [1]]),  # (n, 1)
        test_images=rng.integers(0, 256, (2, 5, 5, 3), dtype=np.uint8),  # RGB MedMNIST layout
        test_labels=np.array([[1], [1]]),
    )
    return path


def test_medmnist_records_from_tiny_npz(tiny_npz):
    data = np.load(tiny_npz)
    records = medmnist_records(tiny_npz)
    assert [r.key for r in records] == [
        *(f"{tiny_npz}::train::{i}" for i in range(4)),
        *(f"{tiny_npz}::val::{i}" for i in range(3)),
        *(f"{tiny_npz}::test::{i}" for i in range(2)),
    ]
    assert [r.label for r in records] == [
        "class_0", "class_1", "class_1", "class_2",
        "class_2", "class_0", "class_1",
        "class_1", "class_1",
    ]  # fmt: skip
    assert all(r.path is None and r.patient_id is None for r in records)
    np.testing.assert_array_equal(records[0].array, data["train_images"][0])
    np.testing.assert_array_equal(records[5].source, data["val_images"][1])
    assert records[-1].array.shape == (5, 5, 3)


def test_medmnist_records_selected_splits(tiny_npz):
    records = medmnist_records(tiny_npz, splits=("val",))
    assert [r.key.rsplit("::", 2)[1:] for r in records] == [["val", "0"], ["val", "1"], ["val", "2"]]


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"train_images": np.zeros((2, 4, 4)), "train_labels": np.zeros((2, 3))}, "'train_labels' has shape (2, 3); multi-label sets are not supported"),
        ({"train_images": np.zeros((2, 4, 4)), "train_labels": np.zeros(3)}, "2 train images but 3 labels"),
        ({"train_images": np.zeros((2, 4, 4))}, "has 'train_images' but no 'train_labels'"),
        ({"images": np.zeros((2, 4, 4)), "labels": np.zeros(2)}, "no '<split>_images' arrays (expected MedMNIST keys train_images, ...)"),
    ],
)
def test_medmnist_refusals(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ProtocolError) as excinfo:
        medmnist_records(path)
    assert str(excinfo.value) == f"{path}: {message}"


def test_medmnist_not_an_npz(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(ProtocolError, match=r"broken\.npz: cannot read as a MedMNIST \.npz"):
        medmnist_records(path)


def test_real_breastmnist_npz():
    path = shared("datasets", "breastmnist", "breastmnist.npz")
    records = medmnist_records(path)
    splits = [r.key.split("::")[1] for r in records]
    assert len(records) == 546 + 78 + 156
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (546, 78, 156)
    assert len({r.label for r in records}) == 2
    assert len({r.key for r in records}) == len(records)
    assert all(r.array.shape == (28, 28) and r.array.dtype == np.uint8 for r in records)
    data = np.load(path)
    labels = np.concatenate([data[f"{s}_labels"].reshape(-1) for s in ("train", "val", "test")])
    per_class = sorted(np.unique(labels, return_counts=True)[1].tolist())
    counts: dict[str, int] = {}
    for record in records:
        counts[record.label] = counts.get(record.label, 0) + 1
    assert sorted(counts.values()) == per_class


# == csv_manifest_records =====================================================================
def test_csv_manifest_relative_absolute_and_patient_ids(tmp_path):
    absolute = tmp_path / "elsewhere" / "abs scan.dcm"
    manifest = write_csv(
        tmp_path / "lists" / "manifest.csv",
        ["path", "label", "patient_id", "split"],
        [
            ["images/a 1.png", "pneumonia", "P1", "train"],
            [" images/b.png ", " normal ", "", "test"],
            [str(absolute), "normal", "P2", ""],
        ],
    )
    records = csv_manifest_records(manifest)
    assert [(r.path, r.label, r.patient_id) for r in records] == [
        (tmp_path / "lists" / "images" / "a 1.png", "pneumonia", "P1"),
        (tmp_path / "lists" / "images" / "b.png", "normal", None),
        (absolute, "normal", "P2"),
    ]
    assert [r.key for r in records] == [str(r.path) for r in records]


def test_csv_manifest_without_patient_column(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", ["label", "path"], [["x", "a.png"]])
    (record,) = csv_manifest_records(manifest)
    assert (record.label, record.path, record.patient_id) == ("x", tmp_path / "a.png", None)


def test_csv_manifest_refusals(tmp_path):
    no_label = write_csv(tmp_path / "no_label.csv", ["path", "diagnosis"], [["a.png", "x"]])
    with pytest.raises(ProtocolError) as excinfo:
        csv_manifest_records(no_label)
    assert str(excinfo.value) == f"{no_label}: a manifest needs the columns 'path' and 'label'"
    empty = write_csv(tmp_path / "empty.csv", ["path", "label"], [])
    with pytest.raises(ProtocolError, match="needs the columns 'path' and 'label'"):
        csv_manifest_records(empty)
    blank = write_csv(tmp_path / "blank.csv", ["path", "label"], [["a.png", "x"], ["b.png", "  "]])
    with pytest.raises(ProtocolError) as excinfo:
        csv_manifest_records(blank)
    assert str(excinfo.value) == f"{blank}, line 3: empty path or label"
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81path,label\n")
    with pytest.raises(ProtocolError, match=r"binary\.csv: cannot read CSV"):
        csv_manifest_records(binary)


# == load_source ==============================================================================
def test_load_source_dispatches_on_path_and_mapping(tmp_path, tiny_npz):
    make_tree(tmp_path / "folders", {"a": 2})
    manifest = write_csv(tmp_path / "m.csv", ["path", "label"], [["x.png", "k"]])
    assert [r.label for r in load_source("folders", tmp_path)] == ["a", "a"]
    assert len(load_source(tiny_npz.name, tmp_path)) == 9
    assert load_source({"path": "m.csv"}, tmp_path)[0].path == manifest.parent / "x.png"
    with pytest.raises(ProtocolError, match=r"has no path"):
        load_source({"patients": "meta.csv"}, tmp_path)
    with pytest.raises(ProtocolError, match=r"missing: source not found"):
        load_source("missing", tmp_path)


# == load_protocol: a valid protocol ==========================================================
def test_tiny_protocol_loads(tiny):
    protocol = load_protocol(tiny_protocol(tiny))
    assert protocol.name == "tiny"
    assert protocol.path == (tiny / "tiny.yaml").resolve()
    assert protocol.classes == {
        "train": ["derm/nevus", "derm/melanoma"],
        "val": ["derm/seborrheic keratosis"],
        "test": ["derm/dermatofibroma", "derm/vascular lesion"],
    }
    assert protocol.episodes == EpisodeSettings(way=2, shot=[1, 2], query=3, test_episodes=10)
    assert {name: len(recs) for name, recs in protocol.records.items()} == {
        "derm/nevus": 5,  # Train/nevus (3) + Test/nevus (2)
        "derm/melanoma": 5,
        "derm/seborrheic keratosis": 5,
        "derm/dermatofibroma": 5,
        "derm/vascular lesion": 5,
    }
    # records are relabelled with the qualified class name
    assert all(r.label == name for name, recs in protocol.records.items() for r in recs)
    assert "derm/basal cell carcinoma" not in protocol.records  # unused classes are not kept
    assert list(protocol.split_records("val")) == ["derm/seborrheic keratosis"]
    data = protocol.to_dict()
    assert data["name"] == "tiny" and data["path"] == str(protocol.path)
    assert data["episodes"] == {"way": 2, "shot": [1, 2], "query": 3, "test_episodes": 10}
    assert data["class_counts"]["derm/nevus"] == 5
    yaml.safe_dump(data)  # plain data, storable in a checkpoint


def test_wildcard_expands_sorted_and_duplicates_are_kept_once(tiny):
    path = tiny_protocol(
        tiny,
        {
            "train": ["derm/*a*", "derm/melanoma", "derm/nevus"],
            "val": ["derm/seborrheic keratosis"],
            "test": ["derm/dermatofibroma", "derm/vascular lesion"],
        },
    )
    # derm/*a* also matches 'seborrheic keratosis', which val claims
    assert refusal(path) == f"{path}: class 'derm/seborrheic keratosis' is in both train and val"
    path = tiny_protocol(
        tiny,
        {"train": ["derm/[mn]*", "derm/nevus"], "val": ["derm/seborrheic keratosis"], "test": ["derm/d*", "derm/v*"]},
    )
    protocol = load_protocol(path)
    assert protocol.classes["train"] == ["derm/melanoma", "derm/nevus"]
    assert protocol.classes["test"] == ["derm/dermatofibroma", "derm/vascular lesion"]


def test_single_shot_and_default_episodes(tiny):
    protocol = load_protocol(tiny_protocol(tiny, episodes={"way": 2, "shot": 2, "query": 3}))
    assert protocol.episodes.shot == [2]
    assert protocol.episodes.test_episodes == 600
    # no episodes section: 5-way defaults need 5 train classes -> refused with the reason
    message = refusal(tiny_protocol(tiny, episodes={}))
    assert "train has 2 classes, fewer than way = 5" in message


def test_val_may_have_fewer_classes_than_way(tiny):
    path = tiny_protocol(
        tiny,
        {
            "train": ["derm/nevus", "derm/melanoma", "derm/basal cell carcinoma"],
            "val": ["derm/seborrheic keratosis"],
            "test": ["derm/dermatofibroma", "derm/vascular lesion"],
        },
        episodes={"way": 2, "shot": 1, "query": 2},
    )
    assert load_protocol(path).classes["val"] == ["derm/seborrheic keratosis"]


def test_check_counts_names_every_short_class(tiny):
    protocol = load_protocol(tiny_protocol(tiny))
    protocol.check_counts(shot=2, query=3)  # exactly enough: 5 images
    with pytest.raises(ProtocolError) as excinfo:
        protocol.check_counts(shot=3, query=3, splits=("val", "test"))
    assert str(excinfo.value) == (
        f"{protocol.path}: 3 class(es) have fewer images than shot + query = 3 + 3: "
        "'derm/seborrheic keratosis' (5 images), 'derm/dermatofibroma' (5 images), 'derm/vascular lesion' (5 images)"
    )


# == load_protocol: refusals ==================================================================
def test_refuses_a_class_in_two_splits(tiny):
    path = tiny_protocol(
        tiny,
        {"train": ["derm/nevus", "derm/melanoma"], "val": ["derm/nevus"], "test": ["derm/dermatofibroma", "derm/vascular lesion"]},
    )
    assert refusal(path) == f"{path}: class 'derm/nevus' is in both train and val"


def test_refuses_a_wildcard_overlapping_an_explicit_class(tiny):
    path = tiny_protocol(
        tiny, {"train": ["derm/*"], "val": ["derm/melanoma"], "test": ["derm/dermatofibroma", "derm/vascular lesion"]}
    )
    assert refusal(path) == f"{path}: class 'derm/melanoma' is in both train and val"
    # and the other way round: explicit first, wildcard later
    path = tiny_protocol(
        tiny, {"train": ["derm/nevus", "derm/melanoma"], "val": ["derm/seborrheic keratosis"], "test": ["derm/*"]}
    )
    assert refusal(path) == f"{path}: class 'derm/melanoma' is in both train and test"


def test_refuses_an_unknown_source(tiny):
    path = tiny_protocol(
        tiny,
        {"train": ["derm/nevus", "derm/melanoma"], "val": ["blood/basophil"], "test": ["derm/dermatofibroma", "derm/vascular lesion"]},
    )
    assert refusal(path) == f"{path}: class 'blood/basophil' names unknown source 'blood' (sources: derm)"


def test_refuses_an_unknown_class(tiny):
    path = tiny_protocol(
        tiny,
        {"train": ["derm/nevus", "derm/melanoma"], "val": ["derm/psoriasis"], "test": ["derm/dermatofibroma", "derm/vascular lesion"]},
    )
    assert refusal(path) == (
        f"{path}: unknown class 'derm/psoriasis' (source 'derm' has: basal cell carcinoma, dermatofibroma, "
        "melanoma, nevus, seborrheic keratosis, vascular lesion)"
    )


def test_refuses_a_wildcard_that_matches_nothing_and_unqualified_classes(tiny):
    path = tiny_protocol(
        tiny,
        {"train": ["derm/nevus", "derm/melanoma"], "val": ["derm/z*"], "test": ["derm/dermatofibroma", "derm/vascular lesion"]},
    )
    assert refusal(path) == f"{path}: 'derm/z*' matches no class"
    path = tiny_protocol(
        tiny, {"train": ["nevus", "derm/melanoma"], "val": ["derm/seborrheic keratosis"], "test": ["derm/dermatofibroma"]}
    )
    assert refusal(path) == f"{path}: class 'nevus' must be written 'source/class' or 'source/*'"


def test_refuses_a_class_with_too_few_images(tiny):
    make_tree(tiny / "data" / "derm", {"Train/rare": 4})
    path = tiny_protocol(
        tiny,
        {
            "train": ["derm/nevus", "derm/melanoma"],
            "val": ["derm/seborrheic keratosis"],
            "test": ["derm/dermatofibroma", "derm/rare"],
        },
    )
    # max(shot) + query = 2 + 3 = 5 > 4
    assert refusal(path) == (
        f"{path.resolve()}: 1 class(es) have fewer images than shot + query = 2 + 3: 'derm/rare' (4 images)"
    )


def test_refuses_a_patient_in_two_splits(tmp_path):
    rows = [[f"img/{c}_{i}.png", c, f"{c}-p{i}"] for c in ("a", "b", "c", "d", "e") for i in range(5)]
    rows[0][2] = "shared"  # image 0 of class a ...
    rows[17][2] = "shared"  # ... and image 2 of class d belong to one patient
    write_csv(tmp_path / "manifest.csv", ["path", "label", "patient_id"], rows)
    path = write_protocol(
        tmp_path, {"m": "manifest.csv"}, {"train": ["m/a", "m/b"], "val": ["m/c"], "test": ["m/d", "m/e"]}, {"way": 2, "shot": 1, "query": 2}
    )
    assert refusal(path) == (
        f"{path.resolve()}: patient 'shared' has images in train class 'm/a' and test class 'm/d'; "
        "a patient must stay in one split"
    )


def test_a_patient_within_one_split_is_accepted(tmp_path):
    rows = [[f"img/{c}_{i}.png", c, f"{c}-p{i // 2}"] for c in ("a", "b", "c", "d", "e") for i in range(4)]
    rows[4][2] = "a-p0"  # patient a-p0 also has an image in class b: same split (train), allowed
    write_csv(tmp_path / "manifest.csv", ["path", "label", "patient_id"], rows)
    path = write_protocol(
        tmp_path, {"m": "manifest.csv"}, {"train": ["m/a", "m/b"], "val": ["m/c"], "test": ["m/d", "m/e"]}, {"way": 2, "shot": 1, "query": 2}
    )
    protocol = load_protocol(path)
    assert [r.patient_id for r in protocol.records["m/b"]][:2] == ["a-p0", "b-p0"]


def test_refuses_malformed_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nsources: {derm: data/derm\nclasses: [\n", encoding="utf-8")
    message = refusal(path)
    assert message.startswith(f"{path}: not valid YAML (")


@pytest.mark.parametrize(
    "text, message",
    [
        ("- just\n- a list\n", "a protocol is a mapping with 'sources', 'classes' and 'episodes'"),
        ("", "a protocol is a mapping with 'sources', 'classes' and 'episodes'"),
        ("classes: {train: [a/b], val: [a/b], test: [a/b]}\n", "missing or empty 'sources'"),
        ("sources: {derm: data/derm}\nclasses: {}\n", "missing or empty 'classes'"),
        ("sources: {derm: data/derm}\nclasses: {train: [derm/nevus], test: []}\n", "'classes' needs non-empty lists for val, test"),
        (
            "sources: {derm: data/derm}\nclasses: {train: [derm/a], val: [derm/b], test: [derm/c]}\nepisodes: {ways: 3}\n",
            "unknown episode settings ['ways']",
        ),
        (
            "sources: {derm: data/derm}\nclasses: {train: [derm/a], val: [derm/b], test: [derm/c]}\nepisodes: {way: 1}\n",
            "episodes need way >= 2, shot >= 1, query >= 1, test_episodes >= 1",
        ),
        (
            "sources: {derm: data/derm}\nclasses: {train: [derm/a], val: [derm/b], test: [derm/c]}\nepisodes: {shot: [0, 5]}\n",
            "episodes need way >= 2, shot >= 1, query >= 1, test_episodes >= 1",
        ),
    ],
)
def test_refuses_malformed_protocols(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    assert refusal(path) == f"{path}: {message}"


def test_refuses_a_missing_protocol_file(tmp_path):
    path = tmp_path / "nowhere" / "protocol.yaml"
    assert refusal(path) == f"{path}: protocol file not found"
    assert refusal(tmp_path) == f"{tmp_path}: protocol file not found"  # a folder is not a protocol


def test_refuses_a_missing_source_naming_it(tiny):
    path = tiny_protocol(tiny, sources={"derm": "data/derm", "blood": "data/no-blood"})
    message = refusal(path)
    assert message.startswith(f"{path}: source 'blood': ")
    assert message.endswith(f"{(tiny / 'data' / 'no-blood').resolve()}: source not found")


def test_protocol_error_is_a_medmeta_error():
    assert issubclass(ProtocolError, MedmetaError)


# == mapping source with a patients CSV (HAM10000 style) ======================================
def test_mapping_source_with_patients_csv(tmp_path):
    make_tree(
        tmp_path / "ham",
        {c: [f"ISIC_{c}_{i}.jpg" for i in range(4)] for c in ("akiec", "bcc", "bkl", "df", "mel")},
    )
    rows = [[f"HAM_{c}_{i // 2}", f"ISIC_{c}_{i}", c] for c in ("akiec", "bcc", "bkl", "df", "mel") for i in range(4)]
    write_csv(tmp_path / "meta" / "ham_meta.csv", ["lesion_id", "image_id", "dx"], rows)
    source = {"path": "ham", "patients": "meta/ham_meta.csv", "image_column": "image_id", "patient_column": "lesion_id"}
    path = write_protocol(
        tmp_path,
        {"ham": source},
        {"train": ["ham/akiec", "ham/bcc"], "val": ["ham/bkl"], "test": ["ham/df", "ham/mel"]},
        {"way": 2, "shot": 1, "query": 2},
    )
    protocol = load_protocol(path)
    for name, records in protocol.records.items():
        c = name.split("/")[1]
        assert [(r.path.name, r.patient_id) for r in records] == [
            (f"ISIC_{c}_{i}.jpg", f"HAM_{c}_{i // 2}") for i in range(4)
        ]
    groups = group_by_patient(protocol.records["ham/df"])
    assert {k: [r.path.name for r in v] for k, v in groups.items()} == {
        "HAM_df_0": ["ISIC_df_0.jpg", "ISIC_df_1.jpg"],
        "HAM_df_1": ["ISIC_df_2.jpg", "ISIC_df_3.jpg"],
    }


def test_mapping_source_with_a_bad_patient_column(tmp_path):
    make_tree(tmp_path / "ham", {"a": 3, "b": 3})
    write_csv(tmp_path / "meta.csv", ["lesion_id", "image_id"], [["L1", "a_000"]])
    path = write_protocol(
        tmp_path,
        {"ham": {"path": "ham", "patients": "meta.csv", "patient_column": "patient"}},
        {"train": ["ham/a", "ham/b"], "val": ["ham/a"], "test": ["ham/b"]},
    )
    assert refusal(path) == f"{path}: source 'ham': {tmp_path / 'meta.csv'}: no column 'patient' (columns: lesion_id, image_id)"


def test_group_by_patient_keeps_unknown_patients_apart():
    records = [ImageRecord("k1", "c", patient_id="P"), ImageRecord("k2", "c"), ImageRecord("k3", "c", patient_id="P")]
    groups = group_by_patient(records)
    assert {k: [r.key for r in v] for k, v in groups.items()} == {"P": ["k1", "k3"], "__record__k2": ["k2"]}


def test_real_ham10000_sample_gets_every_lesion_id(tmp_path):
    root = shared("datasets", "ham10000-sample")
    meta = root / "HAM10000_metadata_sample.csv"
    with open(meta, newline="", encoding="utf-8") as handle:
        lesion_of = {row["image_id"]: row["lesion_id"] for row in csv.DictReader(handle)}
    path = write_protocol(
        tmp_path,
        {"ham": {"path": str(root), "patients": str(meta), "image_column": "image_id", "patient_column": "lesion_id"}},
        {"train": ["ham/akiec", "ham/bcc", "ham/bkl"], "val": ["ham/df"], "test": ["ham/mel", "ham/nv", "ham/vasc"]},
        {"way": 3, "shot": [1, 5], "query": 5},
    )
    protocol = load_protocol(path)
    records = [r for recs in protocol.records.values() for r in recs]
    assert len(records) == 70
    for record in records:
        assert record.patient_id is not None, record.key
        assert record.patient_id == lesion_of[record.path.stem]
        assert record.patient_id.startswith("HAM_")


# == the real derm-rare protocol ==============================================================
@pytest.fixture(scope="module")
def derm_rare() -> Protocol:
    return load_protocol(shared("protocols", "derm-rare.yaml"))


def test_real_derm_rare_protocol(derm_rare):
    shared("datasets", "isic9")
    assert derm_rare.name == "derm-rare"
    assert {split: len(names) for split, names in derm_rare.classes.items()} == {"train": 16, "val": 2, "test": 3}
    assert len([n for n in derm_rare.classes["train"] if n.startswith("blood/")]) == 8
    assert len([n for n in derm_rare.classes["train"] if n.startswith("brain/")]) == 4
    assert derm_rare.classes["val"] == ["isic9/seborrheic keratosis", "isic9/squamous cell carcinoma"]
    assert derm_rare.classes["test"] == ["isic9/actinic keratosis", "isic9/dermatofibroma", "isic9/vascular lesion"]
    counts = {name: len(recs) for name, recs in derm_rare.records.items()}
    assert counts["isic9/dermatofibroma"] == 111
    assert counts["isic9/seborrheic keratosis"] == 80
    assert counts["blood/basophil"] == 250
    assert counts["brain/glioma"] == 400  # Training 300 + Testing 100
    assert derm_rare.episodes == EpisodeSettings(way=3, shot=[1, 5], query=15, test_episodes=600)
    # no class shared between splits
    seen = [n for names in derm_rare.classes.values() for n in names]
    assert len(seen) == len(set(seen)) == len(derm_rare.records)


def test_real_derm_rare_check_counts_names_the_short_class(derm_rare):
    shared("datasets", "isic9")
    with pytest.raises(ProtocolError) as excinfo:
        derm_rare.check_counts(shot=70, query=15, splits=("val",))
    assert str(excinfo.value).endswith(
        "1 class(es) have fewer images than shot + query = 70 + 15: 'isic9/seborrheic keratosis' (80 images)"
    )
