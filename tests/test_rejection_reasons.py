"""Rejection reasons are fixed wording: they never copy a header value or a decoder's message.

The reason a scan is refused goes into rejected.csv, report.json and report.html. Before this
was fixed, ``ScanReader`` repeated the raw text of pydicom / PIL / nibabel exceptions, which quote
header values. Checked with crafted files before the change, these reasons leaked:

- PhotometricInterpretation ``SENTINELPI``: ``cannot decode as dicom: Unknown (0028,0004)
  'Photometric Interpretation' value 'SENTINELPI'``;
- an unknown TransferSyntaxUID: ``... a (0002,0010) 'Transfer Syntax UID' value of
  '1.2.826.0.1.999.7357' is not supported``;
- SamplesPerPixel / PixelRepresentation stored as text: ``A (0028,0002) 'Samples per Pixel'
  value of 'SENTINELSamplesPerPixel' is invalid, it must be 1 or 3``; out-of-range numbers the
  same way (``A (0028,0100) 'Bits Allocated' value of '12' is invalid ...``);
- NumberOfFrames stored as text: ``invalid literal for int() with base 10: 'SENTINELNumberOfFrames'``;
- an unparsable header: ``not a readable DICOM file: Unknown Value Representation 'ZZ' in tag
  (0002,0010)`` (header bytes);
- any decoder message at all (``cannot decode as image: header says LEAK^SENTINEL; and more``);
- and the decoders' messages repeated the file's own path (``cannot identify image file
  '/.../SENTINEL.png'``, ``Cannot work out file type of "..."``, ``dicom data: ... does not
  have pixel_array``).

Rows or BitsAllocated stored as text, a short or missing PixelData, and a sentinel in
PatientName, ImageComments or a private element did not leak then (pydicom's message held only
byte counts or the path); they are checked here so that they never do, and so that each names
its element.
"""

from __future__ import annotations

import gzip
import re
import string
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medmeta.data.reading import (
    REJECTION_REASON_FIELDS,
    REJECTION_REASONS,
    Preprocessing,
    ScanReader,
    is_rejection_reason,
    rejection_reason_pattern,
)
from medmeta.errors import ScanReadError
from test_reading import _random_bytes, _truncated_copy, marker_image, write_dicom

SENTINEL = "SENTINEL"
PATIENT = "LEAK^SENTINEL"
UNKNOWN_SYNTAX = "1.2.826.0.1.999.7357"

# the crafted DICOMs are malformed on purpose: pydicom's warnings about them are expected
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- helpers ---------------------------------------------------------------------------------
def rejection(path: Path) -> str:
    """The reason ``ScanReader`` refuses ``path`` with (it must refuse it)."""
    with pytest.raises(ScanReadError) as excinfo:
        ScanReader(Preprocessing(image_size=8, channels=1))(path)
    assert excinfo.value.path == str(path)
    return excinfo.value.reason


def assert_fixed(reason: str, expected: str) -> None:
    """``reason`` is ``expected`` exactly, one of the vocabulary, and free of every sentinel."""
    assert reason == expected
    assert is_rejection_reason(reason)
    assert SENTINEL not in reason.upper() and "999.7357" not in reason and "\n" not in reason


def crafted_dicom(path: Path, edit, **write) -> Path:
    """A small valid DICOM (written with ``write_dicom``) that carries the sentinel in PatientName,
    ImageComments and a private element, then changed by ``edit(dataset)``."""
    write_dicom(path, marker_image(8, 8, high=1000), **write)
    dataset = pydicom.dcmread(path)
    dataset.PatientName = PATIENT
    dataset.ImageComments = f"{SENTINEL} comment"
    dataset.private_block(0x0009, f"{SENTINEL} CREATOR", create=True).add_new(0x10, "LO", f"{SENTINEL} private")
    edit(dataset)
    dataset.save_as(path, implicit_vr=False, little_endian=True)
    return path


def as_text(keyword: str, text: str):
    """An edit that stores ``text`` in a numeric element (as LO, so the file still parses)."""
    return lambda dataset: dataset.add_new(pydicom.datadict.tag_for_keyword(keyword), "LO", text)


def set_value(keyword: str, value):
    return lambda dataset: setattr(dataset, keyword, value)


def delete(keyword: str):
    return lambda dataset: delattr(dataset, keyword)


def element(keyword: str, tag: str) -> str:
    return f"DICOM element {keyword} ({tag}) is missing or invalid"


# -- the vocabulary --------------------------------------------------------------------------
def test_every_reason_is_one_fixed_line_whose_fields_are_declared():
    for key, template in REJECTION_REASONS.items():
        assert "\n" not in template and template == template.strip(), key
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
        assert fields <= set(REJECTION_REASON_FIELDS), key
        assert rejection_reason_pattern(key).pattern  # compiles


@pytest.mark.parametrize(
    "reason",
    [
        "cannot decode as DICOM (ValueError): invalid literal for int() with base 10: 'SENTINEL'",
        "cannot decode as dicom: Unknown (0028,0004) 'Photometric Interpretation' value 'SENTINELPI'",
        "DICOM element SENTINEL is missing or invalid",
        "DICOM element Rows (0028,0010) is missing or invalid: 'SENTINEL'",
        "compressed pixel data in 1.2.826.0.1.999.7357 that no installed codec can decode",
        "empty or degenerate image of shape SENTINEL",
        "",
    ],
)
def test_free_text_is_not_in_the_vocabulary(reason):
    assert not is_rejection_reason(reason)


# -- DICOM header values ---------------------------------------------------------------------
def test_unknown_photometric_interpretation_is_named_not_quoted(tmp_path):
    """Leaked before: ``... 'Photometric Interpretation' value 'SENTINELPI'``."""
    path = crafted_dicom(tmp_path / "pi.dcm", set_value("PhotometricInterpretation", "SENTINELPI"))
    assert_fixed(rejection(path), "unsupported PhotometricInterpretation (0028,0004)")


def test_unknown_transfer_syntax_is_not_quoted(tmp_path):
    """Leaked before: ``... 'Transfer Syntax UID' value of '1.2.826.0.1.999.7357' is not supported``."""
    def unknown_syntax(dataset):
        dataset.file_meta.TransferSyntaxUID = UNKNOWN_SYNTAX

    path = crafted_dicom(tmp_path / "syntax.dcm", unknown_syntax)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == UNKNOWN_SYNTAX
    assert_fixed(rejection(path), "compressed pixel data in an unknown transfer syntax that no installed codec can decode")


@pytest.mark.parametrize(
    "keyword, tag",
    [
        ("Rows", "0028,0010"),
        ("Columns", "0028,0011"),
        ("SamplesPerPixel", "0028,0002"),
        ("BitsAllocated", "0028,0100"),
        ("BitsStored", "0028,0101"),
        ("PixelRepresentation", "0028,0103"),
        ("NumberOfFrames", "0028,0008"),
        ("PhotometricInterpretation", "0028,0004"),
    ],
)
def test_text_in_a_pixel_module_element_names_the_element_only(keyword, tag, tmp_path):
    """Leaked before for SamplesPerPixel, PixelRepresentation and NumberOfFrames (the text
    quoted); Rows, Columns, BitsAllocated and BitsStored gave a TypeError's words instead."""
    # PhotometricInterpretation as a two-valued string: not one value pydicom knows
    text = f"{SENTINEL}\\{SENTINEL}" if keyword == "PhotometricInterpretation" else f"{SENTINEL}{keyword}"
    path = crafted_dicom(tmp_path / "text.dcm", as_text(keyword, text))
    assert_fixed(rejection(path), element(keyword, tag))


@pytest.mark.parametrize(
    "keyword, tag, value",
    [
        ("Rows", "0028,0010", 0),
        ("BitsAllocated", "0028,0100", 12),  # pydicom: 1 or a multiple of 8
        ("BitsStored", "0028,0101", 17),  # more than BitsAllocated 16
        ("SamplesPerPixel", "0028,0002", 2),
        ("PixelRepresentation", "0028,0103", 2),
    ],
)
def test_out_of_range_pixel_module_value_names_the_element(keyword, tag, value, tmp_path):
    """pydicom's message quoted the value (``... 'Bits Allocated' value of '12' is invalid``)."""
    path = crafted_dicom(tmp_path / "range.dcm", set_value(keyword, value))
    assert_fixed(rejection(path), element(keyword, tag))


@pytest.mark.parametrize(
    "keyword, tag",
    [
        ("Columns", "0028,0011"),
        ("BitsAllocated", "0028,0100"),
        ("SamplesPerPixel", "0028,0002"),
        ("PhotometricInterpretation", "0028,0004"),
        # not required of float pixel data: named once decoding integer PixelData fails
        ("BitsStored", "0028,0101"),
        ("PixelRepresentation", "0028,0103"),
    ],
)
def test_missing_pixel_module_element_is_named(keyword, tag, tmp_path):
    """Before: MONAI's ``dicom data: <path> does not have pixel_array``, naming nothing."""
    path = crafted_dicom(tmp_path / "missing.dcm", delete(keyword))
    assert_fixed(rejection(path), element(keyword, tag))


def test_short_pixel_data_names_pixel_data(tmp_path):
    """No leak before (pydicom's message held byte counts); PatientName and the rest stay out."""
    def truncate(dataset):
        dataset.PixelData = dataset.PixelData[:50]

    path = crafted_dicom(tmp_path / "short.dcm", truncate)
    assert_fixed(
        rejection(path),
        "PixelData (7FE0,0010) does not hold the pixels Rows x Columns x frames x BitsAllocated declare (truncated or corrupt)",
    )


def test_missing_pixel_data_is_told_from_the_file(tmp_path):
    """Before: ``dicom data: <path> does not have pixel_array`` (the path, no sentinel)."""
    path = crafted_dicom(tmp_path / "no pixels.dcm", delete("PixelData"))
    assert_fixed(rejection(path), "PixelData (7FE0,0010) is missing (no pixel data, or the file ends before it)")


def test_sentinels_elsewhere_in_the_header_do_not_stop_a_valid_file(tmp_path):
    path = crafted_dicom(tmp_path / "valid.dcm", lambda dataset: None)
    out = ScanReader(Preprocessing(image_size=8, channels=1))(path)
    assert tuple(out.shape) == (1, 8, 8)


def test_missing_codec_names_the_transfer_syntax_from_pydicoms_dictionary(tmp_path, without_pyjpegls):
    from test_cli_edges import _jpeg_ls_decodable, write_jpeg_ls_dicom

    if _jpeg_ls_decodable():
        pytest.skip("a JPEG-LS codec is installed: the missing-codec reason cannot be produced")
    path = write_jpeg_ls_dicom(tmp_path / "jpeg-ls.dcm")
    dataset = pydicom.dcmread(path)
    dataset.PatientName = PATIENT
    dataset.save_as(path)
    reason = rejection(path)
    assert_fixed(reason, reason)
    assert reason.startswith("compressed pixel data in JPEG-LS Lossless Image Compression that no installed codec can decode")
    assert rejection_reason_pattern("dicom_codec").fullmatch(reason)


def test_unparsable_header_bytes_are_not_quoted(tmp_path):
    """Before: ``not a readable DICOM file: Unknown Value Representation 'ZZ' in tag (0002,0010)``
    (bytes of the header quoted)."""
    path = tmp_path / "bad vr.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00ZZ\x08\x00" + SENTINEL.encode() + b"\x08\x00\x60\x00CS\x02\x00CT")
    assert_fixed(rejection(path), "not a readable DICOM file (the header cannot be parsed)")


def test_decoder_message_is_never_repeated(tmp_path, monkeypatch):
    """Whatever a decoder says, only its exception's class reaches the reason (before: the whole
    message, ``cannot decode as image: header says LEAK^SENTINEL; and more``)."""
    path = tmp_path / "scan.png"
    Image.fromarray(marker_image()).save(path)
    reader = ScanReader(Preprocessing(image_size=8, channels=1))
    loader, image_reader = reader._loaders["image"]

    def leaky(*args, **kwargs):
        raise ValueError(f"header says {PATIENT}\nand more")

    monkeypatch.setitem(reader._loaders, "image", (leaky, image_reader))
    with pytest.raises(ScanReadError) as excinfo:
        reader(path)
    assert_fixed(excinfo.value.reason, "cannot decode as PNG/JPEG/BMP/TIFF (ValueError)")


# -- corrupt files of every format -----------------------------------------------------------
def _png(path: Path) -> Path:
    Image.fromarray((np.random.default_rng(1).random((64, 64)) * 255).astype(np.uint8)).save(path)
    return path


def _nifti(path: Path) -> Path:
    import nibabel

    volume = np.random.default_rng(0).random((16, 16, 8)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), path)
    return path


def _text(path: Path) -> Path:
    path.write_text(f"{PATIENT} {SENTINEL}\n" * 40)
    return path


# [file name, how to make it, expected reason]
CORRUPT = [
    ["random.dcm", _random_bytes, "not a DICOM file (the 'DICM' prefix or the file meta header is missing)"],
    [f"{SENTINEL}.dcm", _text, "not a DICOM file (the 'DICM' prefix or the file meta header is missing)"],
    ["random.png", _random_bytes, "not a PNG/JPEG/BMP/TIFF image (content not recognised)"],
    [f"{SENTINEL}.png", _text, "not a PNG/JPEG/BMP/TIFF image (content not recognised)"],
    ["random.jpg", _random_bytes, "not a PNG/JPEG/BMP/TIFF image (content not recognised)"],
    ["random.tif", _random_bytes, "not a PNG/JPEG/BMP/TIFF image (content not recognised)"],
    ["truncated.png", lambda p: _truncated_copy(_png(p.with_name("whole.png")), p, keep=0.5), "the image file is truncated or corrupt"],
    ["random.nii", _random_bytes, "not a NIfTI file (header not recognised)"],
    [f"{SENTINEL}.nii", _text, "not a NIfTI file (header not recognised)"],
    ["random.nii.gz", _random_bytes, "not a NIfTI file (header not recognised)"],
    ["truncated.nii", lambda p: _truncated_copy(_nifti(p.with_name("whole.nii")), p, keep=0.5), "the image file is truncated or corrupt"],
    ["truncated.nii.gz", lambda p: _truncated_copy(_nifti(p.with_name("whole.nii.gz")), p, keep=0.5), "compressed data is truncated or corrupt"],
    ["gzip of random.nii.gz", lambda p: p.write_bytes(gzip.compress(_random_bytes(p).read_bytes())) and p, "not a NIfTI file (header not recognised)"],
]


@pytest.mark.parametrize("name, make, expected", CORRUPT, ids=[row[0] for row in CORRUPT])
def test_corrupt_files_get_a_reason_from_the_vocabulary(name, make, expected, tmp_path):
    """Before: the decoders' words, with the path (``SENTINEL.png`` and ``SENTINEL.nii`` leaked
    through it); the DICOMs said ``DICOM file has no image`` (no leak)."""
    path = make(tmp_path / name)
    reason = rejection(path)
    assert_fixed(reason, expected)
    assert str(tmp_path) not in reason  # decoders used to repeat the path
    key = next(k for k, template in REJECTION_REASONS.items() if template == expected)
    assert rejection_reason_pattern(key).fullmatch(reason)
    assert re.fullmatch(r"[^\n]+", reason)
