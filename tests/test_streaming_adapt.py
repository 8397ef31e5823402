"""``adapt`` at archive scale (medmeta.pipeline.cases.stream_queries): cases read by workers and
diagnosed in chunks give the results of one whole batch; thumbnails are written as cases are
diagnosed and their pixels dropped; an unreadable case is skipped in any chunk."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medmeta import load_run
from medmeta.adaptation import adapt, auto_chunk_cases
from medmeta.data.reading import Preprocessing, ScanReader
from medmeta.errors import CasesError
from medmeta.pipeline.cases import open_cases, read_cases, stream_queries

from conftest import SAMPLE_DATA

CASES = SAMPLE_DATA / "cases"


@pytest.fixture(scope="module")
def loaded(trained_run):
    return load_run(trained_run)


def _rows(result):
    return [(c.path, c.predicted, c.prediction_set, c.refer, c.refer_reason, c.sha256) for c in result.cases]


@pytest.mark.parametrize("head", ["prototype", "method", "logistic"])
def test_chunks_and_workers_give_the_whole_batch_results(loaded, head):
    whole = adapt(loaded, CASES, chunk_cases=10_000, workers=0, head=head)
    chunked = adapt(loaded, CASES, chunk_cases=7, workers=2, head=head)
    assert len(whole.cases) == 30
    assert _rows(chunked) == _rows(whole)
    np.testing.assert_allclose(chunked.probabilities, whole.probabilities, rtol=0, atol=1e-12)
    stable = np.array([(c.stability_max_change, c.distance) for c in whole.cases], dtype=float)
    np.testing.assert_allclose(np.array([(c.stability_max_change, c.distance) for c in chunked.cases], dtype=float), stable, atol=1e-12)
    assert chunked.metadata["notes"] == whole.metadata["notes"]


def test_thumbnails_are_written_as_cases_are_diagnosed(loaded, tmp_path):
    result = adapt(loaded, CASES, chunk_cases=4, workers=0, thumbnail_dir=tmp_path / "thumbnails")
    files = sorted(p.name for p in (tmp_path / "thumbnails").glob("*.png"))
    assert files == [f"{i:06d}.png" for i in range(30)]
    assert len(list((tmp_path / "thumbnails" / "support").glob("*.png"))) == 15  # and the support scans' (once)
    assert all(c.image is None for c in result.cases)
    assert [c.thumbnail for c in result.cases] == [f"thumbnails/{name}" for name in files]
    kept = adapt(loaded, CASES, workers=0)
    assert all(c.image is not None and c.thumbnail is None for c in kept.cases)
    from medmeta.reports.thumbnails import thumbnail_png

    assert (tmp_path / "thumbnails" / "000003.png").read_bytes() == thumbnail_png(kept.cases[3].image)


def test_an_unreadable_case_is_skipped_in_any_chunk(loaded, tmp_path):
    cases = tmp_path / "cases"
    shutil.copytree(CASES, cases)
    queries = sorted((cases / "query").rglob("*.*"))
    (queries[5].parent / "broken.png").write_bytes(b"not an image")
    whole = adapt(loaded, cases, chunk_cases=100, workers=0)
    chunked = adapt(loaded, cases, chunk_cases=3, workers=2)
    assert _rows(chunked) == _rows(whole)
    assert [r for r in chunked.rejected if r[0].endswith("broken.png")] == [
        (str((queries[5].parent / "broken.png").relative_to(cases)), "not a PNG/JPEG/BMP/TIFF image (content not recognised)")
    ]


def test_no_readable_case_is_an_error_naming_the_folder(tmp_path):
    cases = tmp_path / "cases"
    shutil.copytree(CASES / "support", cases / "support")
    (cases / "query").mkdir()
    (cases / "query" / "a.png").write_bytes(b"junk")
    source = open_cases(cases, ScanReader(Preprocessing()))
    with pytest.raises(CasesError, match=r"query: none of the 1 case file\(s\) could be read"):
        list(stream_queries(source, ScanReader(Preprocessing()), chunk_cases=2, workers=2))


def test_stream_yields_chunks_in_order():
    reader = ScanReader(Preprocessing(image_size=16))
    source = open_cases(CASES, reader)
    chunks = list(stream_queries(source, reader, chunk_cases=8, workers=2))
    assert [len(c) for c in chunks] == [8, 8, 8, 6]
    whole = read_cases(CASES, reader)
    assert [q.path for c in chunks for q in c] == whole.query_paths
    assert torch.equal(torch.stack([q.image for c in chunks for q in c]), whole.task.query_images)


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((3, 64, 64), 512),  # 48 KiB a scan: the case cap
        ((1, 28, 28, 28), 512),
        ((1, 64, 64, 64), 64),  # 1 MiB a volume: 64 MiB of them
        ((3, 1024, 1024), 5),
    ],
)
def test_auto_chunk_size(shape, expected):
    assert auto_chunk_cases(torch.zeros(shape)) == expected


def test_cli_writes_thumbnail_files(trained_run, tmp_path):
    from typer.testing import CliRunner

    from medmeta.cli.main import app

    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["adapt", "--checkpoint", str(trained_run), "--cases", str(CASES), "--out", str(out), "--chunk-cases", "8", "--workers", "2"]
    )
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text()
    assert html.count('class="thumb" src="thumbnails/') == 30 and "data:image/png" not in html
    assert len(list((out / "thumbnails").glob("*.png"))) == 30
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary folder became the report
    assert Path(out / "predictions.csv").read_text().count("\n") == 31


def test_each_case_goes_through_the_backbone_once(loaded):
    """The embedding head's prediction and its leave-one-out refits share one embedding of each
    scan: 15 support scans and 30 cases are 45 images through the backbone. The saliency maps
    add, per case, its 49 occluded copies (48 px: 7 x 7 windows of 12 px in steps of 6) and one
    unoccluded pass."""
    for saliency, expected in ((False, 15 + 30), (True, 15 + 30 + 30 * (49 + 1))):
        seen = []
        hook = loaded.learner.backbone.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
        try:
            result = adapt(loaded, CASES, workers=0, head="prototype", saliency=saliency)
        finally:
            hook.remove()
        assert result.cases[0].stability_max_change is not None
        assert sum(seen) == expected, saliency
