"""Write the synthetic 3D demo set: training volumes, a protocol and a cases folder.

Everything here is synthetic (a seeded random generator; no patient, no scanner). Each
volume is a 16x16x16 "scan": a body-like ellipsoid with a smooth texture and noise, plus
one randomly rotated, placed and sized 3D pattern that defines the condition. Output, under
``sample_data/volumes/`` by default:

- ``train/volumes.npz``: MedMNIST-3D-style arrays ``{train,val,test}_images (n, 16, 16, 16)``
  uint8 and ``_labels (n, 1)``, 24 volumes per condition (all in ``train_*``);
- ``protocol.yaml``: 6 meta-train, 2 meta-val and 3 meta-test conditions,
  ``episodes.spatial_dims: 3``, class names given with ``labels:``;
- ``cases/support/<condition>/``: 4 NIfTI volumes and one DICOM series folder (16 MR slices)
  per test condition; ``cases/query/``: 9 NIfTI volumes and 3 DICOM series folders (slices
  in shuffled file order), ``cases/labels.csv``.

Dependencies: numpy, pydicom, nibabel.

    python sample_data/make_sample_volumes.py
"""

from __future__ import annotations

import argparse
import csv
import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

SIZE = 16
SEED, CASES_SEED = 31, 32
TRAIN = ["solid_ball", "hollow_shell", "straight_rod", "twin_balls", "flat_slab", "cube_block"]
VAL = ["ring_torus", "dot_cluster"]
TEST = ["hollow_tube", "ball_on_rod", "double_shell"]
CONDITIONS = TRAIN + VAL + TEST
PER_CLASS = 24
UID_ROOT = "medmeta-synthetic-volumes"


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A random 3D rotation matrix (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _soft(x: np.ndarray, width: float = 0.7) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(np.clip(x / width, -30, 30)))


def _pattern(name: str, rng: np.random.Generator) -> np.ndarray:
    """The condition's pattern in ``[0, 1]``, randomly rotated, scaled and shifted."""
    grid = np.stack(np.meshgrid(*[np.arange(SIZE) - (SIZE - 1) / 2] * 3, indexing="ij"), -1)
    centre = rng.uniform(-1.5, 1.5, 3)
    p = (grid - centre) @ _rotation(rng).T / rng.uniform(0.85, 1.15)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    r = np.linalg.norm(p, axis=-1)
    if name == "solid_ball":
        return _soft(r - 3.5)
    if name == "hollow_shell":
        return _soft(np.abs(r - 4.0) - 0.8)
    if name == "straight_rod":
        return _soft(np.hypot(x, y) - 1.3) * _soft(np.abs(z) - 5.5)
    if name == "twin_balls":
        return np.maximum(_soft(np.linalg.norm(p - [2.8, 0, 0], axis=-1) - 2.0), _soft(np.linalg.norm(p + [2.8, 0, 0], axis=-1) - 2.0))
    if name == "flat_slab":
        return _soft(np.abs(z) - 1.0) * _soft(np.maximum(np.abs(x), np.abs(y)) - 4.5)
    if name == "cube_block":
        return _soft(np.max(np.abs(p), axis=-1) - 3.0)
    if name == "ring_torus":
        return _soft(np.hypot(np.hypot(x, y) - 3.8, z) - 1.0)
    if name == "dot_cluster":
        out = np.zeros(p.shape[:-1])
        for _ in range(int(rng.integers(6, 11))):
            out = np.maximum(out, _soft(np.linalg.norm(p - rng.uniform(-4, 4, 3), axis=-1) - 0.9))
        return out
    if name == "hollow_tube":
        return _soft(np.abs(np.hypot(x, y) - 2.8) - 0.7) * _soft(np.abs(z) - 5.0)
    if name == "ball_on_rod":
        rod = _soft(np.hypot(x, y) - 0.9) * _soft(np.abs(z) - 5.5)
        return np.maximum(rod, _soft(np.linalg.norm(p - [0, 0, 3.5], axis=-1) - 2.2))
    if name == "double_shell":
        return np.maximum(_soft(np.abs(r - 2.0) - 0.6), _soft(np.abs(r - 5.0) - 0.6))
    raise ValueError(name)


def synth_volume(name: str, rng: np.random.Generator) -> np.ndarray:
    """``(16, 16, 16)`` float in ``[0, 1]``: body, texture, pattern, noise."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, SIZE)] * 3, indexing="ij"), -1)
    body = _soft((np.linalg.norm(grid / rng.uniform(0.85, 1.0, 3), axis=-1) - 1.0) * 12)
    texture = np.kron(rng.normal(size=(4, 4, 4)), np.ones((4, 4, 4)))[:SIZE, :SIZE, :SIZE] * 0.04
    contrast = rng.uniform(0.35, 0.55)
    volume = body * (0.3 + texture) + contrast * _pattern(name, rng) * body
    return np.clip(volume + rng.normal(0, 0.03, volume.shape), 0, 1)


def make_train(out: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(CONDITIONS):
        for _ in range(PER_CLASS):
            images.append(np.round(synth_volume(name, rng) * 255).astype(np.uint8))
            labels.append(label)
    (out / "train").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out / "train" / "volumes.npz", train_images=np.stack(images), train_labels=np.asarray(labels, np.uint8)[:, None]
    )


def write_nifti(path: Path, volume: np.ndarray, rng: np.random.Generator) -> None:
    """A gzipped NIfTI in LPS voxel order (its affine flips x and y of RAS), 1.2 x 1.2 x 2 mm."""
    data = np.round(volume * rng.uniform(300, 900)).astype(np.int16)
    nii = nib.Nifti1Image(data, np.diag([-1.2, -1.2, 2.0, 1.0]))
    nii.header.set_xyzt_units("mm")
    nii.header["descrip"] = b"synthetic medmeta demo volume"
    path.write_bytes(gzip.compress(nii.to_bytes(), compresslevel=9, mtime=0))


def write_series(folder: Path, volume: np.ndarray, key: str, rng: np.random.Generator) -> None:
    """A DICOM MR series: one file per axial slice (z), files named in shuffled order."""
    folder.mkdir(parents=True)
    series_uid = generate_uid(entropy_srcs=[UID_ROOT, key, "series"])
    stored = np.round(volume * rng.uniform(1200, 3000)).astype(np.uint16)
    names = rng.permutation(SIZE)
    for z in range(SIZE):
        sop_uid = generate_uid(entropy_srcs=[UID_ROOT, key, str(z)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice_{names[z]:02d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, sop_uid, "MR"
        ds.PatientName, ds.PatientID = "Synthetic^Volume", f"SYNTH-V-{key}"
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[UID_ROOT, key, "study"])
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[UID_ROOT, key, "frame"])
        ds.SeriesDescription = "synthetic demo volume"
        ds.InstanceNumber = z + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-9.0, -9.0, 2.0 * z]
        ds.PixelSpacing, ds.SliceThickness = [1.2, 1.2], 2.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = SIZE, SIZE
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.ascontiguousarray(stored[:, :, z].T).tobytes()  # rows = y, columns = x
        ds.save_as(path, enforce_file_format=True)


def make_cases(out: Path, seed: int, n_nifti_support: int = 4, n_query: int = 4) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    cases = out / "cases"
    labels = []
    for name in TEST:
        support = cases / "support" / name
        support.mkdir(parents=True)
        for i in range(n_nifti_support):
            write_nifti(support / f"{name}_{i + 1}.nii.gz", synth_volume(name, rng), rng)
        write_series(support / f"{name}_series", synth_volume(name, rng), f"support-{name}", rng)
    query = cases / "query"
    query.mkdir(parents=True)
    order = [(name, i) for name in TEST for i in range(n_query)]
    rng.shuffle(order)
    for index, (name, i) in enumerate(order, start=1):
        volume = synth_volume(name, rng)
        if i == 0:  # one case per condition is a DICOM series folder
            path = f"case_{index:02d}_series"
            write_series(query / path, volume, f"query-{index}", rng)
        else:
            path = f"case_{index:02d}.nii.gz"
            write_nifti(query / path, volume, rng)
        labels.append((f"query/{path}", name))
    with open(cases / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label"])
        writer.writerows(labels)
    return labels


def write_protocol(out: Path) -> None:
    quoted = lambda names: "[" + ", ".join(f'"synth/{n}"' for n in names) + "]"  # noqa: E731
    (out / "protocol.yaml").write_text(
        "# Synthetic 3D demo protocol (sample_data/make_sample_volumes.py). Paths are relative to this file.\n"
        "name: sample-synthetic-volumes\n"
        "sources:\n"
        f"  synth: {{path: train/volumes.npz, labels: [{', '.join(CONDITIONS)}]}}\n"
        "classes:\n"
        f"  train: {quoted(TRAIN)}\n"
        f"  val: {quoted(VAL)}\n"
        f"  test: {quoted(TEST)}\n"
        "episodes:\n"
        "  way: 3\n"
        "  shot: [1, 5]\n"
        "  query: 10\n"
        "  test_episodes: 100\n"
        "  spatial_dims: 3\n"
    )


def main(argv=None) -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=here / "volumes", help="output folder (default: sample_data/volumes)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    for sub in ("train", "cases"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)
    make_train(out, SEED)
    labels = make_cases(out, CASES_SEED)
    write_protocol(out)
    print(f"wrote {len(CONDITIONS) * PER_CLASS} training volumes, {len(labels)} query cases in {out}")


if __name__ == "__main__":
    main()
