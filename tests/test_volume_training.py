"""3D end to end: protocols of volumes, the run's settings, 3D augmentation, train -> adapt on
the synthetic volumes of ``sample_data/volumes`` (NIfTI files and DICOM series folders), the
report's three-plane thumbnails, and 2D/3D mismatches refused with a clear reason."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch

from medmeta.data.augment import Augmenter
from medmeta.data.protocol import load_protocol
from medmeta.errors import CasesError, ProtocolError
from medmeta.training import TrainConfig
from medmeta.training.config import ConfigError

VOLUMES = Path(__file__).resolve().parents[1] / "sample_data" / "volumes"
SHARED_PROTOCOLS = Path(__file__).resolve().parents[2] / "shared" / "protocols"


def write_npz(path: Path, n_per_class: int = 6, classes: int = 5, shape=(8, 8, 8)) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n_per_class * classes, *shape), dtype=np.uint8)
    labels = np.repeat(np.arange(classes), n_per_class)[:, None]
    np.savez(path, train_images=images, train_labels=labels)
    return path


def write_protocol(folder: Path, source: str, episodes: str = "{way: 2, shot: [1], query: 2, spatial_dims: 3}", extra: str = "") -> Path:
    path = folder / "p.yaml"
    path.write_text(
        f"sources:\n  s: {source}\nclasses:\n  train: ['s/a', 's/b']\n  val: ['s/c']\n  test: ['s/d', 's/e']\n"
        f"episodes: {episodes}\n{extra}"
    )
    return path


# -- protocols ----------------------------------------------------------------------------------
def test_a_medmnist_3d_source_names_its_labels_and_keeps_volumes(tmp_path):
    write_npz(tmp_path / "v.npz")
    path = tmp_path / "p.yaml"
    path.write_text(
        "sources:\n  s: {path: v.npz, labels: [a, b, c, d, e]}\n  t: {path: v.npz, labels: [f, g, h, i, j]}\nclasses:\n"
        "  train: ['s/a', 's/b']\n  val: ['s/c']\n  test: ['t/g', 't/h']\nepisodes: {way: 2, shot: [1], query: 2, spatial_dims: 3}\n"
    )
    protocol = load_protocol(path)
    assert protocol.spatial_dims == 3
    assert sorted(protocol.records) == ["s/a", "s/b", "s/c", "t/g", "t/h"]
    assert protocol.records["s/a"][0].array.shape == (8, 8, 8)
    assert protocol.to_dict()["episodes"]["spatial_dims"] == 3


@pytest.mark.parametrize(
    "source, episodes, message",
    [
        ("{path: v.npz}", "{way: 2, shot: [1], query: 2}", "holds volumes"),
        ("{path: v.npz, labels: [a, b, c]}", "{way: 2, shot: [1], query: 2, spatial_dims: 3}", "has no name"),
        ("{path: v.npz, labels: [a, a, c, d, e]}", "{way: 2, shot: [1], query: 2, spatial_dims: 3}", "names a class twice"),
        ("{path: v.npz, slice: first}", "{way: 2, shot: [1], query: 2}", "slice must be 'middle'"),
        ("{path: v.npz, labels: [a, b, c, d, e], flavour: x}", "{way: 2, shot: [1], query: 2, spatial_dims: 3}", "unknown source option"),
        ("{path: v.npz}", "{way: 2, shot: [1], query: 2, spatial_dims: 4}", "spatial_dims must be 2"),
    ],
)
def test_volume_protocol_refusals(tmp_path, source, episodes, message):
    write_npz(tmp_path / "v.npz")
    with pytest.raises(ProtocolError, match=message):
        load_protocol(write_protocol(tmp_path, source, episodes))


def test_a_2d_protocol_refuses_2d_medmnist_in_3d_and_takes_middle_slices_when_asked(tmp_path):
    write_npz(tmp_path / "flat.npz", shape=(8, 8))
    with pytest.raises(ProtocolError, match="holds 2D images"):
        load_protocol(write_protocol(tmp_path, "{path: flat.npz}"))
    write_npz(tmp_path / "v.npz")
    protocol = load_protocol(write_protocol(tmp_path, "{path: v.npz, slice: middle, labels: [a, b, c, d, e]}", "{way: 2, shot: [1], query: 2}"))
    data = np.load(tmp_path / "v.npz")
    record = protocol.records["s/a"][0]
    np.testing.assert_array_equal(record.array, data["train_images"][0][4])


def test_protocol_preprocessing_is_checked(tmp_path):
    write_npz(tmp_path / "v.npz")
    good = write_protocol(tmp_path, "{path: v.npz, labels: [a, b, c, d, e]}", extra="preprocessing: {image_size: 12, spacing: [1, 1, 2], intensity: ct}\n")
    assert load_protocol(good).preprocessing == {"image_size": 12, "spacing": [1, 1, 2], "intensity": "ct"}
    for bad, message in (("{intensity: hu}", "intensity must be one of"), ("{zoom: 2}", "unknown preprocessing")):
        path = write_protocol(tmp_path, "{path: v.npz, labels: [a, b, c, d, e]}", extra=f"preprocessing: {bad}\n")
        with pytest.raises(ProtocolError, match=message):
            load_protocol(path)


def test_class_folders_of_volumes_take_series_folders_and_nifti_files(tmp_path):
    from test_volumes import marker_volume, write_series

    root = tmp_path / "data"
    for name in ("a", "b"):
        for i in range(2):
            write_series(root / name / f"series{i}", marker_volume(z=3))
            nibabel.save(nibabel.Nifti1Image(marker_volume(), np.eye(4)), str(root / name / f"v{i}.nii.gz"))
    from medmeta.data.sources import class_folder_records

    records = class_folder_records(root, spatial_dims=3)
    assert sorted((r.label, Path(r.key).name) for r in records) == [
        ("a", "series0"), ("a", "series1"), ("a", "v0.nii.gz"), ("a", "v1.nii.gz"),
        ("b", "series0"), ("b", "series1"), ("b", "v0.nii.gz"), ("b", "v1.nii.gz"),
    ]


def test_the_shared_ct_fracture_protocol_loads_as_volumes():
    path = SHARED_PROTOCOLS / "ct-fracture-3d.yaml"
    if not path.is_file():
        pytest.skip(f"shared protocols absent: {path}")
    protocol = load_protocol(path)
    assert protocol.spatial_dims == 3
    assert protocol.classes["test"] == [
        "fracture/buckle rib fracture", "fracture/nondisplaced rib fracture", "fracture/displaced rib fracture"
    ]
    assert len(protocol.records["fracture/displaced rib fracture"]) == 238
    assert protocol.records["organ/heart"][0].array.shape == (28, 28, 28)


# -- the run's settings ------------------------------------------------------------------------
def test_a_volume_protocol_decides_the_run_settings(tmp_path):
    from medmeta.training.build import backbone_kwargs, resolve_for_protocol, run_preprocessing

    protocol = load_protocol(VOLUMES / "protocol.yaml")
    config = resolve_for_protocol(TrainConfig(protocol=str(VOLUMES / "protocol.yaml")), protocol)
    assert (config.spatial_dims, config.image_size, config.channels) == (3, 28, 1)
    assert backbone_kwargs(config) == {"in_channels": 1, "spatial_dims": 3, "hidden": 32}
    assert run_preprocessing(config, protocol).spatial_dims == 3
    # the volume schedule (docs/benchmarks.md, "Volumes"): the figures there are these defaults
    schedule = ("episodes", "pretrain_epochs", "val_episodes", "calibration_episodes", "tuning_episodes", "val_interval")
    assert tuple(getattr(config, name) for name in schedule) == (600, 5, 60, 50, 20, 200)
    mine = resolve_for_protocol(TrainConfig(episodes=900, tuning_episodes=0, backbone_kwargs={"hidden": 48}), protocol)
    assert (mine.episodes, mine.pretrain_epochs, mine.tuning_episodes) == (900, 5, 0)
    assert backbone_kwargs(mine)["hidden"] == 48
    assert backbone_kwargs(dataclasses.replace(config, backbone="resnet12")) == {"in_channels": 1, "spatial_dims": 3}
    with pytest.raises(ConfigError, match="does not match the protocol"):
        resolve_for_protocol(TrainConfig(spatial_dims=2), protocol)
    with pytest.raises(ConfigError, match="2D model"):
        resolve_for_protocol(TrainConfig(backbone="torchvision:resnet18"), protocol)
    flat = resolve_for_protocol(TrainConfig(), load_protocol(VOLUMES.parent / "protocol.yaml"))
    assert (flat.spatial_dims, flat.image_size, flat.channels) == (2, 64, 3)
    assert tuple(getattr(flat, name) for name in schedule) == (3200, 20, 300, 100, None, 200)
    assert backbone_kwargs(flat) == {"in_channels": 3}


# -- augmentation ------------------------------------------------------------------------------
def test_3d_augmentation_keeps_shape_is_seeded_and_never_mirrors():
    from monai.transforms import RandFlip, RandRotate90

    volumes = torch.rand(3, 1, 12, 12, 12)
    augment = Augmenter("strong", seed=3, spatial_dims=3)
    a, b = augment(volumes, step=5), augment(volumes, step=5)
    assert a.shape == volumes.shape and torch.equal(a, b) and not torch.equal(a, augment(volumes, step=6))
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    assert not any(isinstance(t, (RandFlip, RandRotate90)) for t in augment._transform.transforms)


# -- train -> adapt ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def volume_run(tmp_path_factory) -> Path:
    from medmeta.training import train

    out = tmp_path_factory.mktemp("run3d")
    config = TrainConfig(
        protocol=str(VOLUMES / "protocol.yaml"), out=str(out), image_size=16, backbone_kwargs={"hidden": 16},
        pretrain_epochs=4, episodes=30, val_interval=30, val_episodes=20, calibration_episodes=30, tuning_episodes=4,
        device="cpu", seed=0,
    )
    train(config, quiet=True)
    return out


def test_train_then_adapt_on_volumes_beats_chance(volume_run, tmp_path):
    from medmeta.adaptation import adapt
    from medmeta.reports import write_reports

    meta = json.loads((volume_run / "best.json").read_text())
    assert meta["preprocessing"]["spatial_dims"] == 3 and meta["backbone"]["kwargs"]["spatial_dims"] == 3
    cases = VOLUMES / "cases"
    result = adapt(volume_run, cases, labels=cases / "labels.csv", device="cpu")
    assert len(result.cases) == 12 and result.rejected == []
    assert result.metrics["accuracy"] >= 0.75  # chance is 1/3
    series = [c for c in result.cases if c.path.endswith("_series")]
    assert len(series) == 3 and all(c.volume["orientation"] == "LPS" for c in series)
    assert all(c.volume["spacing_mm"] == [1.2, 1.2, 2.0] for c in result.cases)
    write_reports(result, tmp_path / "report")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["cases"][0]["volume"]["shape"] == [16, 16, 16]
    assert report["metadata"]["preprocessing"]["spatial_dims"] == 3
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count("volume 16 × 16 × 16 voxels, spacing 1.2 × 1.2 × 2.0 mm") == 12
    assert "patient left on image right" in html


@pytest.mark.parametrize("head, refiner", [("prototype", None), ("logistic", None), ("finetune", None), ("prototype", "soft_kmeans")])
def test_every_adaptation_head_adapts_on_volumes(volume_run, head, refiner):
    from medmeta.adaptation import adapt

    result = adapt(
        volume_run, VOLUMES / "cases", labels=VOLUMES / "cases" / "labels.csv", device="cpu", head=head, transductive=refiner
    )
    assert result.metadata["head"] == head and result.metadata["transductive"] == refiner and len(result.cases) == 12
    assert result.metrics["accuracy"] >= 0.5


def test_a_volume_checkpoint_refuses_2d_cases_with_the_reason(volume_run):
    from medmeta.adaptation import adapt

    with pytest.raises(CasesError) as caught:
        adapt(volume_run, Path(__file__).resolve().parents[1] / "sample_data" / "cases", device="cpu")
    reasons = {reason for _, reason in caught.value.rejected}
    assert any("but this model reads volumes" in r for r in reasons)


def test_a_2d_checkpoint_refuses_volume_cases_instead_of_slicing(trained_run):
    """NIfTI volumes are refused with the reason, never reduced to a slice; the files of a DICOM
    series are single slices, which a 2D model reads as images, each its own case."""
    from medmeta.adaptation import adapt

    result = adapt(trained_run, VOLUMES / "cases", device="cpu")
    volumes = [(path, reason) for path, reason in result.rejected if path.endswith(".nii.gz")]
    assert len(volumes) == 12 + 9  # 4 support volumes per condition, 9 query volumes
    assert all(reason.startswith("a volume of shape (16, 16, 16), but this model reads 2D images") for _, reason in volumes)
    assert len(result.cases) == 3 * 16 and all(case.path.endswith(".dcm") and case.volume is None for case in result.cases)


# -- thumbnails --------------------------------------------------------------------------------
def test_volume_thumbnail_planes_follow_the_radiological_convention():
    """A voxel at the patient's left, anterior and superior: axial on the image's right and
    top half; coronal on the right and top; sagittal on the left (anterior) and top."""
    from medmeta.reports.thumbnails import montage, volume_planes

    volume = np.zeros((1, 9, 9, 9), dtype=np.float32)  # axes towards L, P, S
    volume[0, 7, 1, 7] = 1.0  # left (high L), anterior (low P), superior (high S)
    volume[0, 7, 1, 4] = volume[0, 7, 4, 7] = volume[0, 4, 1, 7] = 1.0  # on each mid-plane
    axial, coronal, sagittal = volume_planes(volume)
    assert np.argwhere(axial[0] == 1).tolist() == [[1, 7]]  # row 1 (anterior top), column 7 (left on right)
    assert np.argwhere(coronal[0] == 1).tolist() == [[1, 7]]  # row 1 (superior top), column 7 (left on right)
    assert np.argwhere(sagittal[0] == 1).tolist() == [[1, 1]]  # row 1 (superior top), column 1 (anterior left)
    assert montage([axial, coronal, sagittal]).shape == (1, 9, 9 * 3 + 2 * 2)


def test_a_volume_checkpoint_refuses_a_2d_protocol(volume_run):
    from medmeta.run import load_run

    run = load_run(volume_run, device="cpu", protocol=VOLUMES.parent / "protocol.yaml")
    with pytest.raises(ProtocolError, match=r"its scans are 2D images, but the model of .* reads volumes \(3D\)"):
        run.protocol


def test_evaluation_leaves_an_unreadable_test_scan_out_instead_of_stopping(trained_run, tmp_path):
    """A blank test image (here the middle slice of a volume whose middle is empty) is left
    out of the episodes and named in the notes; the evaluation runs."""
    from medmeta.evaluation import EvaluationSettings, evaluate_checkpoint

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 9, 16, 16), dtype=np.uint8)
    images[37, 4] = 0  # one test volume's middle slice is blank
    np.savez(tmp_path / "v.npz", train_images=images, train_labels=np.repeat(np.arange(5), 8)[:, None])
    path = tmp_path / "p.yaml"
    path.write_text(
        "sources:\n  s: {path: v.npz, slice: middle, labels: [a, b, c, d, e]}\nclasses:\n  train: ['s/a', 's/b']\n"
        "  val: ['s/c']\n  test: ['s/d', 's/e']\nepisodes: {way: 2, shot: [1], query: 3}\n"
    )
    result = evaluate_checkpoint(trained_run, EvaluationSettings(protocol=path, shot=1, episodes=4), device="cpu", quiet=True)
    assert result.summary.episodes == 4
    assert any(note.startswith("1 unreadable test scan(s) left out of the episodes, e.g. ") and "v.npz::train::37: blank image" in note
               for note in result.notes)


_OVERFLOW_PROBE = """<script>
window.addEventListener('load', () => {
  let over = 0, images = 0;
  for (const cell of document.querySelectorAll('tr.case td')) {
    const box = cell.getBoundingClientRect();
    for (const image of cell.querySelectorAll('img')) {
      images += 1;
      if (image.getBoundingClientRect().right > box.right + 1) over += 1;
    }
  }
  document.body.setAttribute('data-probe', images + ' images, ' + over + ' outside their cell');
});
</script>"""


@pytest.mark.slow
def test_a_volume_rows_images_stay_in_their_cells_in_a_browser(volume_run, tmp_path):
    """The three-plane thumbnail and saliency overlay of a volume fit their table cells (a fixed
    cell width once let the overlay run over the next column); the probe sees an overflow when
    that width is put back."""
    from test_worklist_report import _open

    from medmeta.adaptation import adapt
    from medmeta.reports import write_reports

    result = adapt(volume_run, VOLUMES / "cases", device="cpu", stability=False)
    write_reports(result, tmp_path / "report")
    page = (tmp_path / "report" / "report.html").read_text()
    page = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)  # let the probe run
    results = {}
    for name, extra in (("as written", ""), ("fixed width", "<style>tr.volume td.saliency { max-width: 110px; }</style>")):
        probe = tmp_path / f"{name.replace(' ', '-')}.html"
        probe.write_text(page.replace("</body>", extra + _OVERFLOW_PROBE + "</body>"))
        dom, _ = _open("--dump-dom", "--window-size=1400,2000", probe.as_uri())
        results[name] = re.search(r'data-probe="([^"]*)"', dom).group(1)
    assert results["as written"] == "60 images, 0 outside their cell"  # 12 cases: thumbnail, overlay, 3 nearest scans
    assert results["fixed width"] != results["as written"]
