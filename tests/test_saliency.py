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

from medmeta.pipeline.saliency import hide, log_odds, occlusion_logits, occlusion_windows, saliency_maps, window_size
from medmeta.reports.thumbnails import saliency_png, thumbnail_png


class RegionLearner(nn.Module):
    """Two conditions; condition 0's logit is ``10 x`` the spread (standard deviation) of the
    pixels in the top-left ``region`` x ``region`` block, condition 1's is 0: only the structure
    of that block can weaken a prediction of condition 0. It records every batch it scores, and
    a transductive ``refiner``, when set, replaces its logits (as an embedding head's does)."""

    def __init__(self, region: int = 8):
        super().__init__()
        self.region = region
        self.refiner = None
        self.seen: list[torch.Tensor] = []
        self.eval()

    def fit_support(self, images, labels):
        return self

    def predict_query(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.clone())
        if self.refiner is not None:
            return self.refiner.refine(images)
        block = images[:, :, : self.region, : self.region].flatten(1)
        spread = block.std(dim=1, keepdim=True)
        return torch.cat([10 * spread, torch.zeros_like(spread)], dim=1)


def _noise(n: int = 2, size: int = 32, seed: int = 0, channels: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g)


def _maps(learner, images, temperature=1.0):
    scores = occlusion_logits(learner, images)
    return saliency_maps(scores, np.zeros(len(images), dtype=int), temperature)


def test_a_hidden_window_holds_its_own_mean_channel_by_channel():
    image = _noise(1, 8, channels=3)[0]
    window = (slice(2, 6), slice(0, 4))
    hidden = hide(image, window)
    for c in range(3):
        region = image[c, 2:6, 0:4]
        assert torch.allclose(hidden[c, 2:6, 0:4], region.mean().expand(4, 4))
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[2:6, 0:4] = False
    assert torch.equal(hidden[:, outside], image[:, outside])


def test_the_learner_sees_the_scan_then_each_window_hidden():
    learner = RegionLearner(8)
    image = _noise(1, 16)
    occlusion_logits(learner, image, batch_size=5)
    windows = occlusion_windows((16, 16))
    assert [len(batch) for batch in learner.seen] == [1] + [5] * 9 + [4]  # the scan, then 49 windows in batches of 5
    copies = torch.cat(learner.seen[1:])
    assert torch.equal(learner.seen[0][0], image[0])
    for copy, window in zip(copies, windows):
        torch.testing.assert_close(copy, hide(image[0], window), rtol=0, atol=0)


def test_the_map_lies_where_the_prediction_rests_and_nowhere_else():
    images = _noise()
    maps, peaks = _maps(RegionLearner(8), images)
    assert maps.shape == (2, 32, 32) and maps.dtype == np.float32
    # 8 x 8 windows in steps of 4: a pixel at row or column >= 12 is covered by no window touching the block
    assert (maps[:, 12:, :] == 0).all() and (maps[:, :, 12:] == 0).all()
    assert (maps[:, :8, :8] > 0.01).all()
    # the peak is the fall of hiding the whole block (window 0): 10 x the block's spread
    spread = images[:, 0, :8, :8].flatten(1).std(dim=1).double().numpy()
    assert peaks == pytest.approx(10 * spread, rel=1e-5)


def test_a_region_that_does_not_count_gives_an_empty_map():
    images = _noise()
    images[:, :, :8, :8] = 0.5  # the block is flat: hiding any part of it changes nothing
    maps, peaks = _maps(RegionLearner(8), images)
    assert (maps == 0).all() and (peaks == 0).all()


def test_log_odds_match_their_definition():
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    p = np.exp(logits / 0.7) / np.exp(logits / 0.7).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(log_odds(logits, 0.7), np.log(p) - np.log1p(-p), rtol=1e-12)
    assert np.isfinite(log_odds(np.array([[800.0, -800.0]]), 1.0)).all()  # no overflow


def test_the_log_odds_do_not_saturate():
    """A very confident prediction (p > 1 - 1e-9) still shows its region: with two conditions
    its log-odds fall by the logit's fall over the temperature, where its probability would
    hardly move."""
    images = _noise(1)
    scores = occlusion_logits(RegionLearner(8), images)
    strong, peak_strong = saliency_maps(scores, np.zeros(1, dtype=int), 0.1)
    weak, peak_weak = saliency_maps(scores, np.zeros(1, dtype=int), 1.0)
    assert torch.softmax(torch.from_numpy(scores.base) / 0.1, 1)[0, 0].item() > 1 - 1e-9
    np.testing.assert_allclose(strong, 10 * weak, rtol=1e-5, atol=1e-6)
    assert peak_strong == pytest.approx(10 * peak_weak)


def test_a_transductive_refiner_is_set_aside_and_put_back():
    learner = RegionLearner(8)

    class Refiner:
        def refine(self, *args):
            raise AssertionError("the refiner must not see occluded copies")

    refiner = learner.refiner = Refiner()
    occlusion_logits(learner, _noise(1))
    assert learner.refiner is refiner


@pytest.mark.parametrize(
    "spatial, window, count",
    [((64, 64), (16, 16), 49), ((48, 48), (12, 12), 49), ((84, 84), (21, 21), 64), ((30, 17), (8, 5), 49),
     ((16, 16, 16), (4, 4, 4), 343), ((3, 3), (1, 1), 9)],
)
def test_windows(spatial, window, count):
    assert window_size(spatial) == window
    windows = occlusion_windows(spatial)
    assert len(windows) == count
    covered = np.zeros(spatial, dtype=int)
    for w in windows:
        covered[w] += 1
        assert tuple(s.stop - s.start for s in w) == window
    assert covered.min() >= 1  # every pixel is hidden by some window


def test_volumes_get_a_map_of_their_own_shape():
    learner = RegionLearner(4)
    volume = torch.rand(1, 1, 8, 12, 16, generator=torch.Generator().manual_seed(1))
    learner.predict_query = lambda x: torch.cat(
        [10 * x[:, :, :4, :4, :4].flatten(1).std(1, keepdim=True), torch.zeros(len(x), 1)], 1
    )
    maps, _ = _maps(learner, volume)
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
    toy task) gets a finite map of the images' shape, and predicts exactly as before afterwards
    (still in evaluation mode)."""
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
    maps, peaks = saliency_maps(occlusion_logits(learner, xq), before.argmax(1).numpy(), 1.0)
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


def test_a_volume_overlay_is_scaled_to_the_whole_map():
    """A peak off the displayed mid-planes still sets the scale: the planes' weaker values are
    drawn fainter than they would be alone."""
    volume = torch.zeros(1, 9, 9, 9)
    heat = np.zeros((9, 9, 9), np.float32)
    heat[4, 4, 4] = 2.0  # on all three mid-planes
    alone = _pixels(saliency_png(volume, heat))
    heat[0, 0, 0] = 20.0  # on none of them
    scaled = _pixels(saliency_png(volume, heat))
    assert scaled.sum() < alone.sum() / 4


def test_the_windows_are_scored_by_the_head_fitted_on_the_whole_support(trained_run):
    """Occlusion runs before the leave-one-out refits: the scan's own logits among the occlusion
    scores are the head's logits on the full support (after the refits they would not be)."""
    from medmeta import load_run
    from medmeta.pipeline import AdaptationPipeline, Task
    from medmeta.pipeline.cases import open_cases
    from tests.conftest import SAMPLE_DATA

    run = load_run(trained_run, "cpu")
    source = open_cases(SAMPLE_DATA / "cases", run.reader)
    pipeline = AdaptationPipeline.from_run(run, stability=True, head="prototype")
    query = source.support_images[::4]  # any scans will do as cases
    logits = pipeline.head(Task(source.support_images, source.support_labels, query, source.conditions),
                           stability=True, saliency=True)
    assert logits.max_change is not None
    np.testing.assert_allclose(logits.occlusion.base, logits.query, rtol=1e-6, atol=1e-6)
