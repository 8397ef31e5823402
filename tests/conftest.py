"""Shared fixtures: paths to the repository, the demo data and the shared public datasets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"
SHARED = REPO.parent / "shared"
DATASETS = SHARED / "datasets"
PROTOCOLS = SHARED / "protocols"


def require_shared(*parts: str) -> Path:
    """Path under ``../shared``; skips the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared dataset not available: {path} (present on the project's machines, not on users')")
    return path


def require_dataset(*parts: str) -> Path:
    """Path under ``../shared/datasets``; skips the test with the reason when it is absent."""
    return require_shared("datasets", *parts)


def toy_episode(way: int, shot: int = 2, query: int = 2, seed: int = 1, size: int = 16, normal_centres: bool = False):
    """A learnable ``way``-way task of ``size`` x ``size`` one-channel images: class-dependent
    means (uniform, or standard normal) plus noise.

    Returns ``(support (way*shot, 1, size, size), support labels, query (way*query, 1, size, size), query labels)``.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    draw_centres = torch.randn if normal_centres else torch.rand
    centres = draw_centres(way, 1, size, size, generator=g)

    def draw(n):
        labels = torch.arange(way).repeat_interleave(n)
        return centres[labels] + 0.1 * torch.randn(len(labels), 1, size, size, generator=g), labels

    (xs, ys), (xq, yq) = draw(shot), draw(query)
    return xs, ys, xq, yq


@pytest.fixture
def without_pyjpegls(monkeypatch):
    """pydicom as on a machine without pyjpegls, the JPEG-LS codec highdicom (a dependency, for
    ``--dicom-sr``) installs: the missing-codec rejection can then still be tested. Codecs the
    user installs (the ``dicom-codecs`` extra, GDCM) stay as they are."""
    from pydicom.pixels.decoders import JPEGLSLosslessDecoder, JPEGLSNearLosslessDecoder

    for decoder in (JPEGLSLosslessDecoder, JPEGLSNearLosslessDecoder):
        available = {k: v for k, v in decoder._available.items() if k != "pyjpegls"}
        unavailable = dict(decoder._unavailable)
        if "pyjpegls" in decoder._available:
            unavailable["pyjpegls"] = ("pyjpegls (hidden by the test)",)
        monkeypatch.setattr(decoder, "_available", available)
        monkeypatch.setattr(decoder, "_unavailable", unavailable)


@pytest.fixture(scope="session")
def sample_protocol() -> Path:
    return SAMPLE_DATA / "protocol.yaml"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, sample_protocol) -> Path:
    """A short ProtoNet run on sample_data (pre-training + episodes), shared by the tests."""
    from medmeta.training import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(
        protocol=str(sample_protocol), out=str(out), episodes=60, pretrain_epochs=6, val_interval=30,
        val_episodes=30, calibration_episodes=40, tuning_episodes=4, image_size=48, device="cpu", seed=0,
    )
    train(config, quiet=True)
    return out


@pytest.fixture(scope="session")
def report(trained_run, tmp_path_factory) -> Path:
    """The report folder ``medmeta adapt`` writes for ``trained_run`` on sample_data's cases with
    their labels (thumbnails as files beside report.html)."""
    from typer.testing import CliRunner

    from medmeta.cli.main import app

    out = tmp_path_factory.mktemp("report") / "out"
    cases = SAMPLE_DATA / "cases"
    done = CliRunner().invoke(app, ["adapt", "--checkpoint", str(trained_run), "--cases", str(cases), "--out", str(out),
                                    "--labels", str(cases / "labels.csv")])
    assert done.exit_code == 0, done.output
    return out


class CountingBackbone(torch.nn.Module):
    """Wraps a backbone and counts the images it embeds (``images_seen``)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.images_seen = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images_seen += len(x)
        return self.inner(x)
