"""Occlusion saliency (medmeta.pipeline.saliency) and its overlay in the reports."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medmeta.pipeline.saliency import occlusion_saliency, window_size
from medmeta.reports.thumbnails import saliency_png, thumbnail_png


class RegionLearner(nn.Module):
    """Two conditions; condition 0's logit is ``10 x`` the spread (standard deviation) of the
    pixels in the top-left ``region`` x ``region`` block, condition 1's is 0: only the structure
    of that block can weaken a prediction of condition 0. A BatchNorm makes the mode matter."""

    def __init__(self, region: int = 8):
        super().__init__()
        self.region = region
        self.norm = nn.BatchNorm1d(1)
        self.eval()

    def fit_support(self, images, labels):
        return self

    def predict_query(self, images: torch.Tensor) -> torch.Tensor:
        block = images[:, :, : self.region, : self.region].flatten(1)
        spread = self.norm(block.std(dim=1, keepdim=True))
        return torch.cat([10 * spread, torch.zeros_like(spread)], dim=1)


def _striped(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g)


def test_the_map_lies_where_the_prediction_rests_and_nowhere_else():
    images = _striped()
    maps, peaks = occlusion_saliency(RegionLearner(8), images, np.zeros(2, dtype=int), temperature=1.0)
    assert maps.shape == (2, 32, 32) and maps.dtype == np.float32
    # an 8 x 8 window with half-window steps: windows touching the block start at rows/columns
    # 0 and 4, so no window covering a pixel at row or column >= 12 touches the block
    assert (maps[:, 12:, :] == 0).all() and (maps[:, :, 12:] == 0).all()
    assert (maps[:, :8, :8] > 0.01).all()
    assert peaks == pytest.approx(maps.reshape(2, -1).max(axis=1))


def test_a_region_that_does_not_count_gives_an_empty_map():
    learner = RegionLearner(8)
    images = _striped()
    images[:, :, :8, :8] = 0.5  # the block is flat: hiding any part of it changes nothing
    maps, peaks = occlusion_saliency(learner, images, np.zeros(2, dtype=int), temperature=1.0)
    assert (maps == 0).all() and (peaks == 0).all()


def test_the_log_odds_do_not_saturate():
    """A very confident prediction (p > 1 - 1e-9) still shows its region: its log-odds fall by
    the logit's fall, where its probability would hardly move."""
    images = _striped(1)
    learner = RegionLearner(8)
    strong, _ = occlusion_saliency(learner, images, np.zeros(1, dtype=int), temperature=0.1)
    weak, _ = occlusion_saliency(learner, images, np.zeros(1, dtype=int), temperature=1.0)
    assert torch.softmax(learner.predict_query(images).double() / 0.1, 1)[0, 0].item() > 1 - 1e-9
    np.testing.assert_allclose(strong, 10 * weak, rtol=1e-4, atol=1e-4)


def test_the_learner_stays_in_evaluation_mode_and_predicts_as_before():
    """MONAI's eval_mode puts back the training flag of what it was given on leaving: the
    wrapper must not leave the learner training (its BatchNorm would then use batch statistics)."""
    learner = RegionLearner(8)
    images = _striped(3)
    before = learner.predict_query(images)
    occlusion_saliency(learner, images, np.zeros(3, dtype=int), temperature=1.0)
    assert not any(module.training for module in learner.modules())
    torch.testing.assert_close(learner.predict_query(images), before, rtol=0, atol=0)


def test_a_transductive_refiner_is_set_aside_and_put_back():
    learner = RegionLearner(8)

    class Refiner:
        def refine(self, *args):
            raise AssertionError("the refiner must not see occluded copies")

    refiner = learner.refiner = Refiner()
    occlusion_saliency(learner, _striped(1), np.zeros(1, dtype=int), temperature=1.0)
    assert learner.refiner is refiner


@pytest.mark.parametrize(
    "spatial, window",
    [((64, 64), (16, 16)), ((84, 84), (21, 21)), ((30, 17), (8, 5)), ((28, 28, 28), (7, 7, 7)), ((3, 3), (1, 1))],
)
def test_window_size(spatial, window):
    assert window_size(spatial) == window


def test_volumes_get_a_map_of_their_own_shape():
    learner = RegionLearner(4)
    volume = torch.rand(1, 1, 8, 12, 16, generator=torch.Generator().manual_seed(1))
    learner.predict_query = lambda x: torch.cat(
        [10 * x[:, :, :4, :4, :4].flatten(1).std(1, keepdim=True), torch.zeros(len(x), 1)], 1
    )
    maps, _ = occlusion_saliency(learner, volume, np.zeros(1, dtype=int), temperature=1.0)
    assert maps.shape == (1, 8, 12, 16)
    assert maps[0, :4, :4, :4].max() > 0.1 and maps[0, 6:].max() == maps[0, :, 9:].max() == maps[0, :, :, 12:].max() == 0


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_overlay_colours_only_where_the_map_is_positive():
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(2))
    gray = _pixels(thumbnail_png(image.mean(0, keepdim=True)))
    heat = np.zeros((16, 16), dtype=np.float32)
    assert np.abs(_pixels(saliency_png(image, heat)) - gray).max() <= 1  # no map: the scan in gray
    heat[4:8, 4:8] = 3.0
    overlay = _pixels(saliency_png(image, heat))
    changed = np.abs(overlay - gray).max(axis=2) > 1
    inside = np.zeros((16, 16), dtype=bool)
    inside[4:8, 4:8] = True
    assert changed[inside].all() and not changed[~inside].any()


def test_a_weak_map_is_drawn_faintly():
    image = torch.zeros(1, 8, 8)
    strong, faint = np.zeros((8, 8), np.float32), np.zeros((8, 8), np.float32)
    strong[2, 2], faint[2, 2] = 2.0, 0.1
    assert _pixels(saliency_png(image, faint))[2, 2].sum() < _pixels(saliency_png(image, strong))[2, 2].sum() / 4


def test_volume_overlay_is_laid_out_as_its_thumbnail():
    volume = torch.rand(1, 10, 12, 14, generator=torch.Generator().manual_seed(3))
    heat = np.ones((10, 12, 14), np.float32)
    assert _pixels(saliency_png(volume, heat)).shape[:2] == _pixels(thumbnail_png(volume)).shape[:2]


# -- through adapt -----------------------------------------------------------------------------
def test_report_shows_each_cases_saliency(report):
    data = json.loads((report / "report.json").read_text())
    assert data["metadata"]["saliency"]["method"] == "occlusion"
    html = (report / "report.html").read_text()
    assert 'id="g-saliency"' in html
    for case in data["cases"]:
        saliency = case["saliency"]
        assert saliency["peak_log_odds_drop"] >= 0
        assert saliency["odds_factor"] == pytest.approx(math.exp(saliency["peak_log_odds_drop"]))
        assert (report / saliency["overlay"]).is_file()
        assert f'src="{saliency["overlay"]}"' in html
    # on sample_data the triangle's cases rest on the triangle: most predictions weaken somewhere
    drops = [case["saliency"]["peak_log_odds_drop"] for case in data["cases"]]
    assert sum(drop > 0.1 for drop in drops) >= len(drops) // 2


def test_saliency_changes_no_prediction_and_can_be_switched_off(trained_run, tmp_path):
    from medmeta import load_run
    from medmeta.adaptation import adapt
    from tests.conftest import SAMPLE_DATA

    run = load_run(trained_run, "cpu")
    cases = SAMPLE_DATA / "cases"
    on = adapt(run, cases, thumbnail_dir=tmp_path / "on" / "thumbnails", chunk_cases=7)
    off = adapt(run, cases, thumbnail_dir=tmp_path / "off" / "thumbnails", saliency=False, chunk_cases=7)
    np.testing.assert_array_equal(on.probabilities, off.probabilities)
    assert [c.refer for c in on.cases] == [c.refer for c in off.cases]
    assert [c.stability_max_change for c in on.cases] == [c.stability_max_change for c in off.cases]
    assert all(c.saliency_thumbnail and c.saliency_peak is not None for c in on.cases)
    assert all(c.saliency_thumbnail is None and c.saliency_peak is None for c in off.cases)
    assert off.metadata["saliency"] is None and not (tmp_path / "off" / "thumbnails" / "saliency").exists()


@pytest.mark.parametrize("method", ["protonet", "maml", "fomaml", "anil", "matching", "mann"])
def test_every_method_gets_a_map_and_is_left_as_fitted(method):
    """Occlusion needs only the fitted learner's predict_query: every method (fresh weights on a
    toy task) gets a finite map of the images' shape, and predicts exactly as before afterwards."""
    from medmeta.backbones import create_backbone
    from medmeta.methods import create_method, list_methods
    from tests.conftest import toy_episode

    if method not in list_methods():
        pytest.skip(f"{method} is not registered")
    torch.manual_seed(0)
    learner = create_method(method, create_backbone("conv4", in_channels=1, hidden=8)).eval()
    xs, ys, xq, _ = toy_episode(3, shot=2, query=1, size=16)
    learner.fit_support(xs, ys)
    before = learner.predict_query(xq).detach()
    maps, peaks = occlusion_saliency(learner, xq, before.argmax(1).numpy(), temperature=1.0)
    assert maps.shape == (3, 16, 16) and np.isfinite(maps).all() and (maps >= 0).all() and (peaks >= 0).all()
    assert not any(module.training for module in learner.modules())
    torch.testing.assert_close(learner.predict_query(xq).detach(), before, rtol=0, atol=0)


@pytest.mark.parametrize("options", [{"head": "logistic"}, {"head": "finetune"}, {"head": "prototype", "transductive": "soft_kmeans"}])
def test_every_head_gets_maps_and_the_same_predictions(trained_run, options):
    """Through adapt, whatever is fitted on the support: maps for every case, and not one
    probability changed by computing them (they come before the leave-one-out refits)."""
    from medmeta import load_run
    from medmeta.adaptation import adapt
    from tests.conftest import SAMPLE_DATA

    run = load_run(trained_run, "cpu")
    on = adapt(run, SAMPLE_DATA / "cases", workers=0, **options)
    off = adapt(run, SAMPLE_DATA / "cases", workers=0, saliency=False, **options)
    np.testing.assert_array_equal(on.probabilities, off.probabilities)
    assert all(case.saliency.shape == case.image.shape[1:] and case.saliency_peak >= 0 for case in on.cases)
    head = on.metadata["saliency"]["head"]
    assert head == ("inductive (without the transductive refiner)" if "transductive" in options else "as adapted")
