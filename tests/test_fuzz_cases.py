"""Issue 10: a fuzzed cases folder. Over 200 hostile paths (truncated, corrupt, random, empty,
huge declared sizes, decompression bombs, wrong extensions, malformed DICOM headers, links,
FIFOs, hidden files, hostile names) beside the valid demo scans, through ``medmeta adapt`` in its
own process. Every path must be accounted for exactly once, with a reason from the documented
vocabulary, no traceback, and the process's peak memory under :data:`PEAK_MEMORY_MB`.

The batch is generated from a fixed seed, so a failure reproduces.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from PIL import Image

from medmeta.data.reading import is_rejection_reason
from medmeta.pipeline.discovery import DISCOVERY_REASONS, display_path
from test_pixel_cap import deflate_bomb
from test_reading import write_dicom
from test_rejection_reasons import as_text, crafted_dicom, delete, set_value

SAMPLE_CASES = Path(__file__).resolve().parents[1] / "sample_data" / "cases"

#: Bound on the peak resident memory of the whole ``medmeta adapt`` process (Python, torch, the
#: model and the largest scan within the default 50-million-pixel cap: a 6000 x 6000 PNG).
PEAK_MEMORY_MB = 1500

REJECTED, READ, EITHER = "rejected", "read", "either"


class Batch:
    """The hostile cases folder being built: each path and what must become of it."""

    def __init__(self, root: Path, seed: int = 2026) -> None:
        self.root, self.rng = root, np.random.default_rng(seed)
        self.expected: dict[str, str] = {}
        self.valid = {
            ".png": next((SAMPLE_CASES / "query").rglob("*.png")).read_bytes(),
            ".dcm": next((SAMPLE_CASES / "query").rglob("*.dcm")).read_bytes(),
            ".nii.gz": next((SAMPLE_CASES / "query").rglob("*.nii.gz")).read_bytes(),
        }
        jpg = root.parent / "valid.jpg"
        Image.open(next((SAMPLE_CASES / "query").rglob("*.png"))).convert("L").save(jpg, quality=90)
        self.valid[".jpg"] = jpg.read_bytes()

    def file(self, rel: str | bytes, data: bytes, expect: str) -> Path:
        path = Path(os.fsdecode(os.fsencode(self.root) + b"/" + (rel if isinstance(rel, bytes) else rel.encode())))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.expect(path, expect)
        return path

    def expect(self, path: Path, outcome: str) -> None:
        key = display_path(path.relative_to(self.root))
        assert key not in self.expected, key
        self.expected[key] = outcome

    def random(self, n: int) -> bytes:
        return self.rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` but holds one tiny IDAT chunk."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _jpeg_with_size(data: bytes, size: int) -> bytes:
    """``data`` (a baseline JPEG) with its frame header claiming ``size`` x ``size``."""
    at = data.index(b"\xff\xc0") + 5
    return data[:at] + struct.pack(">HH", size, size) + data[at + 4:]


def _dicom(path: Path, edit=None, **kwargs) -> bytes:
    pixels = (np.arange(16 * 16).reshape(16, 16) * 7 % 4000).astype(np.uint16)
    write_dicom(path, pixels, **kwargs)
    if edit is not None:
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path)
    data = path.read_bytes()
    path.unlink()
    return data


def _huge_dicom(ds) -> None:
    """Rows x Columns x frames of 65535 x 65535 x 5000 over 512 bytes of pixel data."""
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 5000


def _nifti_bomb(path: Path) -> None:
    """A .nii.gz of about 0.3 MB whose header declares 1024 x 1024 x 64 float32 voxels, all
    present as zeros (268 MB once inflated)."""
    import gzip

    header = nibabel.Nifti1Header()
    header.set_data_shape((1024, 1024, 64))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    with gzip.open(path, "wb", compresslevel=1) as handle:
        handle.write(header.binaryblock + b"\0" * 4)
        zeros = bytes(1 << 22)
        for _ in range(64):
            handle.write(zeros)


def build(batch: Batch, outside: Path) -> None:
    q = "query/fuzz"
    formats = list(batch.valid)
    # 1. truncated and 2. bit-flipped copies of valid scans
    for fmt in formats:
        data = batch.valid[fmt]
        for i, keep in enumerate(np.linspace(0.0, 0.9, 12)):
            batch.file(f"{q}/truncated/{i:02d}{fmt}", data[: int(len(data) * keep)], REJECTED)
        for i in range(10):
            flipped = bytearray(data)
            for at in batch.rng.integers(0, len(data), 1 + i * 3):
                flipped[at] ^= 1 << int(batch.rng.integers(0, 8))
            batch.file(f"{q}/flipped/{i:02d}{fmt}", bytes(flipped), EITHER)
    # 3. random bytes and 4. empty files under every scan extension
    for ext in (".dcm", ".png", ".jpg", ".nii", ".nii.gz", ".tif", ".bmp"):
        for i in range(3):
            batch.file(f"{q}/random/{i}{ext}", batch.random(int(batch.rng.integers(1, 5000))), REJECTED)
        batch.file(f"{q}/empty/empty{ext}", b"", REJECTED)
    # 5. huge declared sizes
    for i, side in enumerate((60_000, 20_000)):
        batch.file(f"{q}/huge/declared_{i}.png", _png_with_size(side, side), REJECTED)
        batch.file(f"{q}/huge/declared_{i}.jpg", _jpeg_with_size(batch.valid[".jpg"], side), REJECTED)
        scratch = batch.root.parent / f"scratch_{i}.dcm"
        batch.file(f"{q}/huge/declared_{i}.dcm", _dicom(scratch, edit=_huge_dicom), REJECTED)
        header = nibabel.Nifti1Header()
        header.set_data_shape((side // 10, side // 10, side // 10))
        batch.file(f"{q}/huge/declared_{i}.nii", header.binaryblock + b"\0" * 4, REJECTED)
    # 6. decompression bombs, and the largest scan the cap lets through (blank, so rejected once decoded)
    bombs = batch.root / q / "bombs"
    bombs.mkdir(parents=True)
    Image.new("L", (7500, 7500)).save(bombs / "png_56M.png")
    Image.new("L", (6000, 6000)).save(bombs / "png_36M_within_cap.png")
    deflate_bomb(bombs / "deflated_600MB.dcm")
    _nifti_bomb(bombs / "nifti_268MB.nii.gz")
    for path in bombs.iterdir():
        batch.expect(path, REJECTED)
    # 7. wrong extensions
    for source, target in [(".png", ".dcm"), (".png", ".nii"), (".dcm", ".png"), (".dcm", ".jpg"), (".nii.gz", ".png"),
                           (".nii.gz", ".dcm"), (".jpg", ".png"), (".jpg", ".tif"), (".png", ".jpg"), (".nii.gz", ".nii")]:
        batch.file(f"{q}/misnamed/{source[1:].replace('.', '_')}_as{target}", batch.valid[source], EITHER)
    # 8. files that are not scans
    for name, data in [("notes.txt", b"hello"), ("table.csv", b"a,b\n1,2"), ("meta.json", b"{}"), ("cfg.yaml", b"a: *b"),
                       ("README", b"text without extension"), ("binary", batch.random(300)), ("page.html", b"<p>")]:
        batch.file(f"{q}/other/{name}", data, REJECTED)
    batch.file(f"{q}/other/dicom_without_extension", batch.valid[".dcm"], READ)
    # 9. malformed DICOM headers (each also carries a sentinel that must never reach a report)
    scratch = batch.root.parent / "scratch.dcm"
    for name, edit in [
        ("rows_text", as_text("Rows", "SENTINEL")),
        ("photometric", set_value("PhotometricInterpretation", "SENTINELPI")),
        ("bits_13", set_value("BitsAllocated", 13)),
        ("no_pixels", delete("PixelData")),
        ("short_pixels", set_value("PixelData", b"\0" * 10)),
        ("frames_text", as_text("NumberOfFrames", "SENTINEL")),
        ("unknown_syntax", lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", "1.2.826.0.1.999.7357")),
    ]:
        batch.file(f"{q}/dicom_header/{name}.dcm", crafted_dicom(scratch, edit).read_bytes(), REJECTED)
    # 10. links
    links = batch.root / q / "links"
    links.mkdir(parents=True)
    for i in range(5):
        (links / f"dangling_{i}.dcm").symlink_to(batch.root / f"gone_{i}.dcm")
        batch.expect(links / f"dangling_{i}.dcm", REJECTED)
    (links / "loop_up").symlink_to(links, target_is_directory=True)
    (links / "loop_root").symlink_to(batch.root / "query", target_is_directory=True)
    (links / "self.png").symlink_to(links / "self.png")
    for name in ("loop_up", "loop_root", "self.png"):
        batch.expect(links / name, REJECTED)
    valid_png = batch.file(f"{q}/links/target.png", batch.valid[".png"], READ)
    for i in range(3):
        (links / f"to_valid_{i}.png").symlink_to(valid_png)
        batch.expect(links / f"to_valid_{i}.png", READ)
    outside.mkdir()
    for i in range(5):
        (outside / f"outside_{i}.png").write_bytes(batch.valid[".png"])
        batch.expect(links / "outside_dir" / f"outside_{i}.png", READ)
    (links / "outside_dir").symlink_to(outside, target_is_directory=True)
    # 11. FIFOs
    for i in range(5):
        os.mkfifo(links / f"fifo_{i}.dcm")
        batch.expect(links / f"fifo_{i}.dcm", REJECTED)
    # 12. hostile names, valid content
    names = [b"caf\xe9.png", b"\xff\xfe.png", b"line\nbreak.png", b"comma,name.png", b'quote".png', b"=HYPERLINK(1).png",
             b"+1.png", b"-cmd.png", b"@SUM(1).png", b"tab\there.png", b"x" * 240 + b".png", "\u202egnp.exe.png".encode(),
             "\U0001f9e0 scan.png".encode(), b"<img src=x onerror=alert(1)>.png", b"semi;colon.png", b"back\\slash.png",
             b" leading space.png", b"trailing space .png", b"%s%n%x.png", b"{{ 7*7 }}.png"]
    for name in names:
        batch.file(b"query/fuzz/names/" + name, batch.valid[".png"], READ)
    # 13. hidden entries
    batch.file(f"{q}/.DS_Store", b"\0\0\0\1Bud1", REJECTED)
    batch.file(f"{q}/._resource.png", batch.random(100), REJECTED)
    hidden = batch.root / q / ".cache"
    hidden.mkdir()
    (hidden / "a.png").write_bytes(batch.valid[".png"])
    batch.expect(hidden, REJECTED)
    # 14. deep nesting
    batch.file("query/fuzz/" + "/".join(f"d{i}" for i in range(40)) + "/deep.png", batch.valid[".png"], READ)
    # 15. support/: a stray file, a hidden file and a corrupt scan beside the valid ones
    batch.file("support/stray.png", batch.valid[".png"], REJECTED)
    batch.file("support/concentric_rings/.hidden.png", batch.valid[".png"], REJECTED)
    batch.file("support/gradient_halo/corrupt.dcm", batch.random(700), REJECTED)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.skipif(os.name != "posix", reason="links, FIFOs and byte file names as POSIX makes them")
def test_a_fuzzed_batch_is_accounted_for_exactly_once(trained_run, tmp_path):
    cases = tmp_path / "cases"
    shutil.copytree(SAMPLE_CASES, cases)
    (cases / "labels.csv").unlink()
    batch = Batch(cases)
    for path in sorted(p for p in cases.rglob("*") if p.is_file()):
        batch.expect(path, READ)
    valid = len(batch.expected)
    build(batch, tmp_path / "outside")
    hostile = len(batch.expected) - valid
    assert hostile >= 200, hostile

    out = tmp_path / "report"
    log = tmp_path / "adapt.log"
    command = [sys.executable, "-m", "medmeta.cli", "adapt", "--checkpoint", str(trained_run), "--cases", str(cases),
               "--out", str(out), "--no-stability"]
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    output = log.read_bytes().decode("utf-8", "replace")
    assert os.waitstatus_to_exitcode(status) == 0, output[-3000:]
    assert "Traceback" not in output

    seen: dict[str, list[str]] = {}
    for name in ("predictions.csv", "support.csv", "rejected.csv"):
        for row in _rows(out / name):
            seen.setdefault(row["path"], []).append(name)
    twice = {path: files for path, files in seen.items() if len(files) > 1}
    assert not twice
    assert set(seen) == set(batch.expected), (set(seen) ^ set(batch.expected))
    for path, outcome in batch.expected.items():
        landed = seen[path][0]
        where = "support.csv" if path.startswith("support/") else "predictions.csv"
        assert landed in ({"rejected.csv"} if outcome == REJECTED else {where} if outcome == READ else {where, "rejected.csv"}), path
    for row in _rows(out / "rejected.csv"):
        assert row["reason"] in DISCOVERY_REASONS or is_rejection_reason(row["reason"]), row
        assert "SENTINEL" not in row["reason"]

    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert len(report["cases"]) == sum(1 for files in seen.values() if files == ["predictions.csv"])
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "SENTINEL" not in json.dumps(report["rejected"]) and "SENTINEL" not in html
    assert "<img src=x onerror" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html

    peak_mb = usage.ru_maxrss / 1024  # kilobytes on Linux
    print(f"fuzz batch: {len(batch.expected)} paths, {hostile} hostile; adapt peak memory {peak_mb:.0f} MB")
    assert peak_mb < PEAK_MEMORY_MB
