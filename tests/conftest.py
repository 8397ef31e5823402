"""Shared fixtures: paths to the repository, the demo data and the shared public datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

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
        val_episodes=30, calibration_episodes=40, image_size=48, device="cpu", seed=0,
    )
    train(config, quiet=True)
    return out
