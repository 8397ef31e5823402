"""Data sources: class folders, MedMNIST ``.npz`` files and CSV manifests.

Each loader returns a list of :class:`~medmeta.data.records.ImageRecord` (nothing is decoded
here). Errors name the file and the reason.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from typing import Any
from pathlib import Path

import numpy as np

from medmeta.data.reading import DICOM_SUFFIXES, IMAGE_SUFFIXES, NIFTI_SUFFIXES, SIDECAR_SUFFIXES
from medmeta.data.records import ImageRecord
from medmeta.errors import ProtocolError

MEDMNIST_SPLITS = ("train", "val", "test")
#: The keys of a source's mapping form (:func:`load_source`).
SOURCE_OPTIONS = {"path", "patients", "image_column", "patient_column", "labels", "slice"}
SCAN_SUFFIXES = (*NIFTI_SUFFIXES, *DICOM_SUFFIXES, *IMAGE_SUFFIXES)


def _is_candidate(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and not path.name.lower().endswith(SIDECAR_SUFFIXES)


def class_folder_records(
    root: str | Path, patient_ids: Mapping[str, str] | None = None, spatial_dims: int = 2
) -> list[ImageRecord]:
    """Records from a tree of class folders.

    A class is the name of the folder that directly holds its files, so split folders above it
    (``Train/``/``Test/``, ``Training/``/``Testing/``, ``train/val/test``) merge into one class.
    Names with spaces work. ``patient_ids`` maps a file stem (``ISIC_0024306``) to its patient
    or lesion id. Files directly in ``root`` have no class and are ignored.

    With ``spatial_dims=3`` a folder of DICOM files is one volume (a series,
    :func:`~medmeta.data.volumes.group_series`) whose class is the folder that holds it
    (``<class>/<series folder>/<slices>``); a NIfTI file is a volume of its folder's class.
    """
    root = Path(root)
    if not root.is_dir():
        raise ProtocolError(f"{root}: class-folder source is not a directory")
    records = []
    for path in sorted(root.rglob("*")):
        if path.parent == root or not _is_candidate(path):
            continue
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        pid = patient_ids.get(_stem(path)) if patient_ids else None
        records.append(ImageRecord(key=str(path), label=path.parent.name, path=path, patient_id=pid))
    if spatial_dims == 3:
        from medmeta.data.volumes import group_series

        volumes = group_series([r.path for r in records if r.path is not None])
        records = [
            ImageRecord(key=str(v), label=v.parent.name, path=v, patient_id=patient_ids.get(_stem(v)) if patient_ids else None)
            for v in volumes if v.parent != root
        ]
    if not records:
        raise ProtocolError(f"{root}: no image files found in class folders")
    return records


def _stem(path: Path) -> str:
    """File name without its scan extension (``.nii.gz`` counts as one). Other dots are kept,
    so DICOM files named by UID (``1.2.840.1.dcm`` or extension-less) keep their whole UID."""
    lower = path.name.lower()
    for suffix in SCAN_SUFFIXES:
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def patient_map_from_csv(path: str | Path, image_column: str, patient_column: str) -> dict[str, str]:
    """Read ``image id -> patient id`` from a metadata CSV (e.g. HAM10000's ``lesion_id``)."""
    path = Path(path)
    rows = _read_csv(path)
    for column in (image_column, patient_column):
        if rows and column not in rows[0]:
            raise ProtocolError(f"{path}: no column '{column}' (columns: {', '.join(rows[0])})")
    return {row[image_column].strip(): row[patient_column].strip() for row in rows}


def medmnist_records(
    path: str | Path,
    splits: tuple[str, ...] = MEDMNIST_SPLITS,
    labels: Sequence[str] | None = None,
    spatial_dims: int = 2,
    slice: str | None = None,
) -> list[ImageRecord]:
    """Records from a MedMNIST ``.npz`` (keys ``train_images``, ``train_labels``, ``val_*``, ``test_*``).

    Labels may be 1-D or ``(n, 1)``. Class names are ``labels[i]`` for integer label ``i`` when
    ``labels`` is given (the names in label order, as MedMNIST's ``INFO`` lists them), else
    from the ``medmnist`` package's ``INFO`` when it is installed (the flag is the file stem,
    e.g. ``breastmnist``), else ``class_<i>``. MedMNIST carries no patient ids.

    MedMNIST 3D files hold volumes ``(n, D, H, W)``: a 3D protocol (``spatial_dims=3``) reads
    them whole; a 2D protocol refuses them unless ``slice="middle"`` asks for each volume's
    middle slice along its first axis (a 2D baseline, chosen explicitly).
    """
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ProtocolError(f"{path}: cannot read as a MedMNIST .npz ({exc})") from None
    names = _label_names(path, labels) if labels is not None else _medmnist_class_names(path.stem)
    if slice not in (None, "middle"):
        raise ProtocolError(f"{path}: slice must be 'middle' (the middle slice of each volume), got {slice!r}")
    records = []
    found = False
    for split in splits:
        if f"{split}_images" not in data:
            continue
        found = True
        images = data[f"{split}_images"]
        if f"{split}_labels" not in data:
            raise ProtocolError(f"{path}: has '{split}_images' but no '{split}_labels'")
        labels = np.asarray(data[f"{split}_labels"])
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise ProtocolError(f"{path}: '{split}_labels' has shape {labels.shape}; multi-label sets are not supported")
        if len(labels) != len(images):
            raise ProtocolError(f"{path}: {len(images)} {split} images but {len(labels)} labels")
        images = _as_dims(images, path, split, spatial_dims, slice)
        for i, (image, label) in enumerate(zip(images, labels)):
            if int(label) not in names and names:
                raise ProtocolError(f"{path}: {split} label {int(label)} has no name ({len(names)} names given in 'labels')")
            name = names.get(int(label), f"class_{int(label)}")
            records.append(ImageRecord(key=f"{path}::{split}::{i}", label=name, array=image))
    if not found:
        raise ProtocolError(f"{path}: no '<split>_images' arrays (expected MedMNIST keys train_images, ...)")
    return records


def _label_names(path: Path, labels: Any) -> dict[int, str]:
    """``{integer label: name}`` from a source's ``labels`` list."""
    if not isinstance(labels, list) or not labels or not all(isinstance(n, str) and n.strip() for n in labels):
        raise ProtocolError(f"{path}: 'labels' must be a list of class names in label order, e.g. [normal, tumour]")
    if len(set(labels)) < len(labels):
        raise ProtocolError(f"{path}: 'labels' names a class twice")
    if any("/" in n for n in labels):
        raise ProtocolError(f"{path}: a class name in 'labels' may not contain '/'")
    return {i: name.strip() for i, name in enumerate(labels)}


def _is_volume_stack(images: np.ndarray) -> bool:
    """``(n, D, H, W)`` volumes, as MedMNIST 3D stores them (2D colour is ``(n, H, W, 3)``)."""
    return images.ndim == 4 and images.shape[-1] > 4


def _as_dims(images: np.ndarray, path: Path, split: str, spatial_dims: int, slice: str | None) -> np.ndarray:
    """The split's array as the protocol reads it: volumes for 3D, images for 2D."""
    volumes = _is_volume_stack(images)
    if spatial_dims == 3 and not volumes:
        raise ProtocolError(f"{path}: '{split}_images' holds 2D images {images.shape[1:]}, but the protocol reads volumes (spatial_dims: 3)")
    if spatial_dims == 2 and volumes:
        if slice != "middle":
            raise ProtocolError(
                f"{path}: '{split}_images' holds volumes {images.shape[1:]}; set episodes.spatial_dims: 3 to read them whole, "
                "or 'slice: middle' on this source for their middle slices (a 2D baseline)"
            )
        return images[:, images.shape[1] // 2]
    return images


def _medmnist_class_names(flag: str) -> dict[int, str]:
    try:
        from medmnist import INFO  # optional dependency
    except ImportError:
        return {}
    info = INFO.get(flag.lower())
    if not info:
        return {}
    return {int(k): str(v) for k, v in info["label"].items()}


def csv_manifest_records(path: str | Path) -> list[ImageRecord]:
    """Records from a CSV with columns ``path,label`` and optional ``patient_id``, ``split``.

    Paths are relative to the CSV's folder (absolute paths are kept).
    """
    path = Path(path)
    rows = _read_csv(path)
    if not rows or "path" not in rows[0] or "label" not in rows[0]:
        raise ProtocolError(f"{path}: a manifest needs the columns 'path' and 'label'")
    records = []
    for line, row in enumerate(rows, start=2):
        if not (row.get("path") or "").strip() or not (row.get("label") or "").strip():
            raise ProtocolError(f"{path}, line {line}: empty path or label")
        file = Path(row["path"].strip())
        file = file if file.is_absolute() else path.parent / file
        pid = (row.get("patient_id") or "").strip() or None
        records.append(ImageRecord(key=str(file), label=row["label"].strip(), path=file, patient_id=pid))
    return records


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ProtocolError(f"{path}: cannot read CSV ({exc})") from None


def load_source(spec: str | Path | Mapping, base: Path | None = None, spatial_dims: int = 2) -> list[ImageRecord]:
    """Load a source given as a path (folder, ``.npz`` or ``.csv``) or a mapping.

    The mapping form is ``{path: ..., patients: metadata.csv, image_column: image_id,
    patient_column: lesion_id}`` for class folders whose patient ids live in a metadata CSV;
    for a ``.npz``, ``{path: ..., labels: [names in label order], slice: middle}`` (see
    :func:`medmnist_records`). Relative paths are resolved against ``base``.
    """
    base = base or Path.cwd()
    options: Mapping = spec if isinstance(spec, Mapping) else {"path": spec}
    if not options.get("path"):
        raise ProtocolError("the source has no path (give a folder, a .npz or a .csv)")
    path = (base / str(options["path"])).resolve()
    if not path.exists():
        raise ProtocolError(f"{path}: source not found")
    name = path.name.lower()
    unknown = set(options) - SOURCE_OPTIONS
    if unknown:
        raise ProtocolError(f"{path}: unknown source option(s) {sorted(unknown)} (known: {', '.join(sorted(SOURCE_OPTIONS))})")
    if name.endswith(".npz"):
        return medmnist_records(path, labels=options.get("labels"), spatial_dims=spatial_dims, slice=options.get("slice"))
    if options.get("labels") is not None or options.get("slice") is not None:
        raise ProtocolError(f"{path}: 'labels' and 'slice' apply to a MedMNIST .npz source only")
    if name.endswith(".csv"):
        return csv_manifest_records(path)
    patients = None
    if options.get("patients"):
        patients = patient_map_from_csv(
            base / str(options["patients"]),
            image_column=str(options.get("image_column", "image_id")),
            patient_column=str(options.get("patient_column", "patient_id")),
        )
    return class_folder_records(path, patients, spatial_dims=spatial_dims)
