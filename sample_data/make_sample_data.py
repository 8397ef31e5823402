#!/usr/bin/env python
"""Generate the small SYNTHETIC demo dataset shipped in ``sample_data/``.

Nothing here comes from a real person or a real scanner: every image is drawn
from a seeded random generator, so running the script twice gives the same
files.  The data only exist so that the tool can be tried end to end (meta-train,
evaluate, adapt to new cases) in a few minutes on a laptop; use real public data
sets for any real measurement.

Usage (from the repository root)::

    python sample_data/make_sample_data.py            # writes next to this file
    python sample_data/make_sample_data.py --out DIR  # writes into DIR
    python sample_data/make_sample_data.py --check    # also prints a raw-pixel
                                                      # nearest-class-mean score

Only the generated parts of the output folder are replaced: ``train/``,
``cases/`` and ``protocol.yaml``.  Anything else (e.g. README.md) is left alone.

Dependencies: numpy, pydicom, nibabel, pillow.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SIZE = 64
JITTER = 6             # max lesion offset from the image centre, pixels
SEED = 20240611          # seed of the meta-learning set in train/
CASES_SEED = 977         # different seed: the adapt cases are new images
UID_TAG = "medmeta-sample-data"

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


# --------------------------------------------------------------------------
# Class table
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Condition:
    name: str
    split: str            # "train" / "val" / "test" in the protocol
    modality: str         # DICOM modality used for this class' .dcm files
    nifti_dtype: str      # "int16" or "float32"
    nifti_3d: bool        # store NIfTI as (64, 64, 1) instead of (64, 64)
    signed_dicom: bool = False


CONDITIONS = [
    # 7 meta-training conditions
    Condition("bright_disc", "train", "MR", "int16", False),
    Condition("ring_lesion", "train", "MR", "float32", True),
    Condition("twin_blobs", "train", "OT", "int16", True),
    Condition("horizontal_stripes", "train", "MR", "int16", False),
    Condition("diagonal_stripes", "train", "MR", "float32", False),
    Condition("checker_patch", "train", "OT", "int16", False),
    Condition("cross_shape", "train", "MR", "int16", True),
    # 2 meta-validation conditions
    Condition("crescent_shadow", "val", "MR", "float32", False),
    Condition("speckle_cluster", "val", "MR", "int16", False, signed_dicom=True),
    # 3 "rare" meta-test conditions (also used for the adapt demo in cases/)
    Condition("gradient_halo", "test", "MR", "int16", False),
    Condition("triangle_mass", "test", "CT", "int16", True),
    Condition("concentric_rings", "test", "OT", "float32", False),
]
N_PER_SPLIT = {"train": 30, "val": 30, "test": 25}
FORMATS = ("dcm", "nii.gz", "png")


# --------------------------------------------------------------------------
# Image synthesis (float images in [0, 1], row-major: img[row, col])
# --------------------------------------------------------------------------

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)


def _soft(x, width=0.8):
    """Smooth step 0 -> 1 as x goes from negative to positive (anti-aliased edge)."""
    return 1.0 / (1.0 + np.exp(-np.clip(x / width, -30, 30)))


def _smooth_noise(rng, cells):
    """Low-frequency texture: a random (cells+1)^2 grid, bilinearly upsampled."""
    grid = rng.standard_normal((cells + 1, cells + 1))
    pos = np.linspace(0, cells, SIZE)
    i0 = np.minimum(pos.astype(int), cells - 1)
    f = pos - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]
    out = rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]
    return out / (np.abs(out).max() + 1e-9)


def _local(cx, cy, angle, scale=1.0):
    """Coordinates (u, v) of every pixel in a frame centred at (cx, cy), rotated."""
    dx, dy = _XX - cx, _YY - cy
    c, s = math.cos(angle), math.sin(angle)
    return (c * dx + s * dy) / scale, (-s * dx + c * dy) / scale


def _patient_background(rng):
    """Body outline and tissue texture shared by all scans of one patient."""
    cx = SIZE / 2 + rng.uniform(-2, 2)
    cy = SIZE / 2 + rng.uniform(-2, 2)
    ax, ay = rng.uniform(26, 31), rng.uniform(24, 31)
    body = _soft(1.0 - np.sqrt(((_XX - cx) / ax) ** 2 + ((_YY - cy) / ay) ** 2), 0.04)
    texture = 0.6 * _smooth_noise(rng, 3) + 0.4 * _smooth_noise(rng, 7)
    level = rng.uniform(0.26, 0.38)
    return body, texture, level


def _shape(name, rng):
    """Foreground mask in [0, 1] (roughly) for one condition, random pose."""
    cx = SIZE / 2 + rng.uniform(-JITTER, JITTER)
    cy = SIZE / 2 + rng.uniform(-JITTER, JITTER)
    theta = rng.uniform(0, 2 * math.pi)
    r = rng.uniform(7, 12)  # nominal radius in pixels
    u, v = _local(cx, cy, theta)
    rad = np.hypot(u, v)

    if name == "bright_disc":
        ecc = rng.uniform(0.85, 1.15)
        return _soft(r - np.hypot(u * ecc, v / ecc), 0.7)

    if name == "ring_lesion":
        t = r * rng.uniform(0.22, 0.35)
        return _soft(t / 2 - np.abs(rad - r), 0.6)

    if name == "twin_blobs":
        d = r * rng.uniform(0.8, 1.2)
        sig = r * rng.uniform(0.35, 0.5)
        a = np.exp(-((u - d) ** 2 + v ** 2) / (2 * sig ** 2))
        b = np.exp(-((u + d) ** 2 + v ** 2) / (2 * sig ** 2))
        return np.maximum(a, rng.uniform(0.6, 1.0) * b)

    if name in ("horizontal_stripes", "diagonal_stripes"):
        if name == "horizontal_stripes":
            ang = rng.uniform(-0.2, 0.2)
        else:
            ang = rng.choice([-1, 1]) * math.pi / 4 + rng.uniform(-0.2, 0.2)
        u, v = _local(cx, cy, ang)
        period = rng.uniform(5, 8)
        waves = 0.5 + 0.5 * np.cos(2 * math.pi * v / period + rng.uniform(0, 6.3))
        patch = _soft(1.0 - np.hypot(u / (1.6 * r), v / (1.3 * r)), 0.06)
        return waves * patch

    if name == "checker_patch":
        cell = rng.uniform(3.5, 5.5)
        board = (np.sin(math.pi * u / cell) * np.sin(math.pi * v / cell) > 0).astype(float)
        half = r * rng.uniform(1.0, 1.4)
        patch = _soft(half - np.abs(u), 0.7) * _soft(half - np.abs(v), 0.7)
        return board * patch

    if name == "cross_shape":
        arm, w = r * rng.uniform(1.1, 1.5), rng.uniform(1.6, 2.8)
        h = _soft(w - np.abs(v), 0.6) * _soft(arm - np.abs(u), 0.6)
        vbar = _soft(w - np.abs(u), 0.6) * _soft(arm - np.abs(v), 0.6)
        return np.maximum(h, vbar)

    if name == "crescent_shadow":
        off = r * rng.uniform(0.35, 0.55)
        outer = _soft(r - rad, 0.6)
        inner = _soft(r * rng.uniform(0.85, 1.0) - np.hypot(u - off, v), 0.6)
        return np.clip(outer - inner, 0, 1)

    if name == "speckle_cluster":
        out = np.zeros_like(u)
        for _ in range(rng.integers(8, 18)):
            rr = r * math.sqrt(rng.uniform(0, 1)) * 1.2
            aa = rng.uniform(0, 2 * math.pi)
            px, py = cx + rr * math.cos(aa), cy + rr * math.sin(aa)
            sig = rng.uniform(0.7, 1.3)
            out = np.maximum(out, np.exp(-((_XX - px) ** 2 + (_YY - py) ** 2) / (2 * sig ** 2)))
        return out

    if name == "gradient_halo":
        sx, sy = r * rng.uniform(0.7, 1.1), r * rng.uniform(0.4, 0.8)
        return np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))

    if name == "triangle_mass":
        out = np.ones_like(u)
        for k in range(3):
            a = theta + k * 2 * math.pi / 3 + rng.uniform(-0.15, 0.15)
            # half-plane: distance to an edge at 0.5 r from the centre
            out *= _soft(0.55 * r - ((_XX - cx) * math.cos(a) + (_YY - cy) * math.sin(a)), 0.6)
        return out

    if name == "concentric_rings":
        period = r * rng.uniform(0.4, 0.55)
        rings = 0.5 + 0.5 * np.cos(2 * math.pi * rad / period)
        return rings * _soft(1.25 * r - rad, 0.8)

    raise ValueError(name)


def synth_image(name, lesion_rng, background):
    """One float image in [0, 1]: background + condition-specific lesion + noise."""
    body, texture, level = background
    rng = lesion_rng
    tissue = level + rng.uniform(0.06, 0.14) * texture
    contrast = rng.uniform(0.22, 0.55)
    img = tissue + contrast * _shape(name, rng)
    img = img * body + 0.03 * (1 - body)
    img = img + rng.normal(0, rng.uniform(0.03, 0.07), img.shape)
    return np.clip(img, 0, 1)


# --------------------------------------------------------------------------
# Writers.  NIfTI arrays are stored as data[x, y] = img[row=y, col=x] (the
# usual NIfTI/DICOM axis convention), so every format shows the same picture.
# --------------------------------------------------------------------------

def _uid(*parts):
    return generate_uid(entropy_srcs=[UID_TAG, *map(str, parts)])


def write_png(path, img, rng, rgb=False):
    a = np.round(img * 255).astype(np.uint8)
    if rgb:  # lightly tinted RGB, to exercise channel conversion
        tint = 1.0 - rng.uniform(0.0, 0.08, size=3)
        a = np.round(img[..., None] * 255 * tint).astype(np.uint8)
        Image.fromarray(a, mode="RGB").save(path, optimize=True)
    else:
        Image.fromarray(a, mode="L").save(path, optimize=True)


def write_nifti(path, img, cond, rng):
    data = img.T  # (x, y)
    if cond.nifti_dtype == "int16":
        data = np.round(data * rng.uniform(800, 2000)).astype(np.int16)
    else:
        data = (data * rng.uniform(50, 300)).astype(np.float32)
        data = np.round(data * 16) / 16  # coarse floats keep the gzip small
        data = data.astype(np.float32)
    if cond.nifti_3d:
        data = data[:, :, None]
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    nii = nib.Nifti1Image(data, affine)
    nii.header.set_xyzt_units("mm")
    nii.header["descrip"] = b"synthetic medmeta demo image"
    path.write_bytes(gzip.compress(nii.to_bytes(), compresslevel=9, mtime=0))


def write_dicom(path, img, cond, rng, patient_id, key):
    meta = FileMetaDataset()
    sop_class = {"CT": CT_STORAGE, "MR": MR_STORAGE}.get(cond.modality, SC_STORAGE)
    sop_uid = _uid(key, "sop")
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _uid("implementation")
    meta.ImplementationVersionName = "MEDMETA_SYNTH"

    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = cond.modality
    ds.Manufacturer = "SYNTHETIC"
    ds.InstitutionName = "None (synthetic data)"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic demo study"
    ds.SeriesDescription = "synthetic " + cond.name.replace("_", " ")
    ds.PatientName = "Synthetic^Case"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = _uid(patient_id, "study")
    ds.SeriesInstanceUID = _uid(key, "series")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if cond.modality == "OT":
        ds.ConversionType = "WSD"
    else:
        ds.FrameOfReferenceUID = _uid(patient_id, "frame")
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [-25.6, -25.6, 0.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = 3.0
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PixelSpacing = [0.8, 0.8]

    if cond.modality == "CT":
        # Hounsfield-like: outside the body is air, tissue -100..+300 HU.
        hu = np.where(img < 0.06, -1000.0, -120.0 + img * 420.0)
        hu = hu + rng.normal(0, 4, img.shape)
        slope, intercept = 1.0, -1024.0
        stored = np.clip(np.round((hu - intercept) / slope), 0, 4095).astype(np.uint16)
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.KVP = 120
        bits_stored, signed = 12, False
    elif cond.signed_dicom:
        stored = np.round(img * rng.uniform(2000, 3000) - 400).astype(np.int16)
        bits_stored, signed = 16, True
    else:
        stored = np.round(img * rng.uniform(1200, 4000)).astype(np.uint16)
        bits_stored, signed = 12, False
        if cond.modality == "MR":
            ds.ScanningSequence, ds.SequenceVariant = "SE", "NONE"
            ds.ScanOptions, ds.MRAcquisitionType = "", "2D"
            ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = 20, 500, 1
            ds.MagneticFieldStrength = 1.5

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_image(path, img, cond, rng, patient_id, key, rgb=False):
    if path.name.endswith(".dcm"):
        write_dicom(path, img, cond, rng, patient_id, key)
    elif path.name.endswith(".nii.gz"):
        write_nifti(path, img, cond, rng)
    else:
        write_png(path, img, rng, rgb=rgb)


# --------------------------------------------------------------------------
# Dataset layout
# --------------------------------------------------------------------------

def _patients_for(n, rng):
    """Patient slot per image: ~20% of patients contribute two images."""
    n_pairs = round(0.2 * n)
    slots = [k for k in range(n_pairs) for _ in (0, 1)]
    slots += list(range(n_pairs, n - n_pairs))
    return rng.permutation(slots)


def _formats_for(n, rng):
    fmts = [FORMATS[i % 3] for i in range(n)]
    return [fmts[i] for i in rng.permutation(n)]


def make_train(out: Path, seed: int):
    root = out / "train"
    rows, next_patient = [], 1
    for ci, cond in enumerate(CONDITIONS):
        n = N_PER_SPLIT[cond.split]
        rng = np.random.default_rng([seed, ci])
        slots = _patients_for(n, rng)
        fmts = _formats_for(n, rng)
        pids = {k: f"SYNTH-{next_patient + k:04d}" for k in sorted(set(slots))}
        backgrounds = {k: _patient_background(np.random.default_rng([seed, ci, 1000 + k]))
                       for k in pids}
        next_patient += len(pids)
        (root / cond.name).mkdir(parents=True)
        for i in range(n):
            lesion_rng = np.random.default_rng([seed, ci, i])
            img = synth_image(cond.name, lesion_rng, backgrounds[slots[i]])
            rel = f"{cond.name}/{cond.name}_{i:03d}.{fmts[i]}"
            rgb = fmts[i] == "png" and i % 4 == 1
            write_image(root / rel, img, cond, lesion_rng, pids[slots[i]], ("train", cond.name, i), rgb)
            rows.append((rel, cond.name, pids[slots[i]], cond.split))
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "label", "patient_id", "split"])
        w.writerows(rows)
    return rows


def make_cases(out: Path, seed: int, n_support=5, n_query=10):
    """Adapt layout: labelled support scans + unlabelled query scans (new images)."""
    root = out / "cases"
    tests = [c for c in CONDITIONS if c.split == "test"]
    rng = np.random.default_rng([seed, 99])
    next_patient = 9001
    labels = []

    # support/<condition>/support_XX.<ext>
    for ti, cond in enumerate(tests):
        d = root / "support" / cond.name
        d.mkdir(parents=True)
        fmts = _formats_for(n_support, rng)
        for i in range(n_support):
            r = np.random.default_rng([seed, ti, i])
            bg = _patient_background(np.random.default_rng([seed, ti, 500 + i]))
            pid = f"SYNTH-{next_patient:04d}"
            next_patient += 1
            write_image(d / f"support_{i + 1:02d}.{fmts[i]}", synth_image(cond.name, r, bg),
                        cond, r, pid, ("support", cond.name, i), rgb=(fmts[i] == "png" and i == 2))

    # query: 10 per condition, shuffled; 4 patients with a folder of 2-3 scans
    items = [(ti, i) for ti in range(len(tests)) for i in range(n_query)]
    items = [items[k] for k in rng.permutation(len(items))]
    qroot = root / "query"
    qroot.mkdir(parents=True)
    fmts = _formats_for(len(items), rng)
    folders = []  # (folder name, list of item positions)
    by_cond = {ti: [p for p, it in enumerate(items) if it[0] == ti] for ti in range(len(tests))}
    for fi, (ti, k) in enumerate([(0, 2), (1, 3), (2, 2), (0, 2)]):
        taken = {p for _, ps in folders for p in ps}
        free = [p for p in by_cond[ti] if p not in taken]
        folders.append((f"patient_{[3, 7, 11, 14][fi]:02d}", free[:k]))
    in_folder = {p: (name, j) for name, ps in folders for j, p in enumerate(ps)}
    folder_bg = {name: _patient_background(np.random.default_rng([seed, 700 + fi]))
                 for fi, (name, _) in enumerate(folders)}
    folder_pid = {}
    case_no = 0
    for p, (ti, i) in enumerate(items):
        cond = tests[ti]
        r = np.random.default_rng([seed, ti, 100 + i])
        if p in in_folder:
            name, j = in_folder[p]
            if name not in folder_pid:
                folder_pid[name] = f"SYNTH-{next_patient:04d}"
                next_patient += 1
            pid, bg = folder_pid[name], folder_bg[name]
            (qroot / name).mkdir(exist_ok=True)
            rel = f"query/{name}/scan_{j + 1}.{fmts[p]}"
        else:
            case_no += 1
            pid = f"SYNTH-{next_patient:04d}"
            next_patient += 1
            bg = _patient_background(np.random.default_rng([seed, ti, 600 + i]))
            rel = f"query/case_{case_no:03d}.{fmts[p]}"
        write_image(root / rel, synth_image(cond.name, r, bg), cond, r, pid,
                    ("query", cond.name, i), rgb=(fmts[p] == "png" and p % 5 == 0))
        labels.append((rel, cond.name))

    labels.sort()
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "label"])
        w.writerows(labels)
    return labels


def write_protocol(out: Path):
    def fmt(split):
        return ", ".join(f'"synth/{c.name}"' for c in CONDITIONS if c.split == split)

    text = (
        "# Synthetic demo protocol (see sample_data/README.md). Paths are relative to this file.\n"
        "name: sample-synthetic\n"
        "sources:\n"
        "  synth: train/manifest.csv   # path,label,patient_id: patients kept apart in episodes\n"
        "classes:\n"
        f"  train: [{fmt('train')}]\n"
        f"  val: [{fmt('val')}]\n"
        f"  test: [{fmt('test')}]\n"
        "episodes:\n"
        "  way: 3\n"
        "  shot: [1, 5]\n"
        "  query: 10\n"
        "  test_episodes: 100\n"
    )
    (out / "protocol.yaml").write_text(text)


# --------------------------------------------------------------------------
# Optional sanity check (numpy + the writers' own libraries only)
# --------------------------------------------------------------------------

def _read_back(path: Path):
    """Image as float row-major (rows, cols), min-max scaled to [0, 1]."""
    name = path.name
    if name.endswith(".dcm"):
        ds = pydicom.dcmread(path)
        a = ds.pixel_array.astype(np.float64)
        a = a * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
        if getattr(ds, "Modality", "") == "CT":
            a = np.clip(a, -160, 240)  # soft-tissue window
    elif name.endswith(".nii.gz"):
        a = np.asarray(nib.load(path).dataobj, dtype=np.float64)
        a = a.reshape(a.shape[0], a.shape[1]).T
    else:
        a = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    return (a - a.min()) / (a.max() - a.min() + 1e-9)


def ncm_check(out: Path, rows):
    x = np.stack([_read_back(out / "train" / r[0]).ravel() for r in rows])
    names = [c.name for c in CONDITIONS]
    y = np.array([names.index(r[1]) for r in rows])
    sums = np.stack([x[y == k].sum(0) for k in range(len(names))])
    counts = np.bincount(y, minlength=len(names)).astype(float)
    correct = 0
    for i in range(len(x)):
        means = sums.copy()
        means[y[i]] -= x[i]
        means /= (counts - (np.arange(len(names)) == y[i]))[:, None]
        correct += int(np.argmin(((means - x[i]) ** 2).sum(1)) == y[i])
    acc = correct / len(x)
    print(f"raw-pixel nearest-class-mean (leave-one-out, {len(names)} classes): "
          f"{acc:.1%}  (chance {1 / len(names):.1%})")
    return acc


def main(argv=None):
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=here,
                    help="output folder (default: the folder holding this script)")
    ap.add_argument("--check", action="store_true",
                    help="print a raw-pixel nearest-class-mean accuracy afterwards")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("train", "cases"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)

    rows = make_train(out, SEED)
    labels = make_cases(out, CASES_SEED)
    write_protocol(out)
    n_pat = len({r[2] for r in rows})
    print(f"wrote {len(rows)} training images ({n_pat} patients) in {out / 'train'}")
    print(f"wrote {len(labels)} query cases + "
          f"{sum(1 for _ in (out / 'cases' / 'support').rglob('*.*'))} support scans in {out / 'cases'}")
    if args.check:
        ncm_check(out, rows)


if __name__ == "__main__":
    main()
