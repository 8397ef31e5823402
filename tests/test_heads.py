"""Adaptation heads (``--head``) and the embedding normaliser learnt at training (issue 11, items 1-2)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medmeta.errors import MedmetaError
from medmeta.heads import EmbeddingNormaliser, HeadLearner, create_head, embedding_heads, list_heads
from medmeta.methods.protonet import held_out_correction

SAMPLE_CASES = Path(__file__).resolve().parents[1] / "sample_data" / "cases"
runner = CliRunner()


def invoke(*args):
    from medmeta.cli.main import app

    return runner.invoke(app, [str(a) for a in args])


# -- heads on embeddings -------------------------------------------------------------------------
SUPPORT = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 6.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 0, 1, 1])
QUERY = torch.tensor([[1.0, 0.0], [0.0, 5.0], [3.0, 4.0]], dtype=torch.float64)


def test_prototype_head_exact_values():
    head = create_head("prototype", distance="euclidean").fit(SUPPORT, LABELS)  # means (1, 0) and (0, 5)
    expected = -torch.tensor([[0.0, math.sqrt(26)], [math.sqrt(26), 0.0], [math.sqrt(20), math.sqrt(10)]], dtype=torch.float64)
    torch.testing.assert_close(head.logits(QUERY), expected, atol=1e-5, rtol=0)  # the clamp adds 1e-6 at 0
    torch.testing.assert_close(head.distance(QUERY), torch.tensor([0.0, 0.0, math.sqrt(10)], dtype=torch.float64))
    squared = create_head("prototype", distance="squared", scale=2.0).fit(SUPPORT, LABELS)
    torch.testing.assert_close(squared.logits(QUERY), -torch.tensor([[0.0, 26.0], [26.0, 0.0], [20.0, 10.0]], dtype=torch.float64) / 2)


def test_logistic_head_is_deterministic_and_separates_the_classes():
    first = create_head("logistic").fit(SUPPORT, LABELS).logits(QUERY)
    second = create_head("logistic").fit(SUPPORT, LABELS).logits(QUERY)
    assert first.shape == (3, 2) and torch.equal(first, second)
    assert first.argmax(1).tolist() == [0, 1, 1]


@pytest.mark.parametrize("name", embedding_heads())
@pytest.mark.parametrize("n_way, shot, n_query, dim", [(2, 1, 1, 3), (3, 2, 7, 16), (5, 5, 20, 64)])
def test_every_head_contract(name, n_way, shot, n_query, dim):
    generator = torch.Generator().manual_seed(n_way * 100 + shot)
    support = torch.randn(n_way * shot, dim, generator=generator)
    labels = torch.arange(n_way).repeat_interleave(shot)
    query = torch.randn(n_query, dim, generator=generator)
    before = support.clone()
    head = create_head(name).fit(support, labels)
    logits, distance = head.logits(query), head.distance(query)
    assert logits.shape == (n_query, n_way) and distance.shape == (n_query,)
    assert torch.isfinite(logits).all() and (distance >= 0).all()
    assert torch.equal(support, before)
    assert json.loads(json.dumps(head.hparams())) == head.hparams()
    assert create_head(name, **head.hparams()).hparams() == head.hparams()


def test_prototype_head_corrects_held_out_logits_as_protonet_does():
    logits = np.array([[-1.0, -4.0], [-2.0, -3.0], [-5.0, -1.0]])
    labels = np.array([0, 0, 1])
    head = create_head("prototype", distance="euclidean")
    np.testing.assert_allclose(head.correct_held_out_logits(logits, labels), held_out_correction(logits, labels, "euclidean"))
    assert held_out_correction(logits, labels, "squared")[0, 0] == pytest.approx(-1.0 * 3 / 4)


def test_bad_head_options_are_refused():
    with pytest.raises(ValueError, match="distance"):
        create_head("prototype", distance="cosine")
    with pytest.raises(ValueError, match="C must be > 0"):
        create_head("logistic", C=0)
    with pytest.raises(ValueError, match="unknown head"):
        create_head("nearest")


# -- normaliser ----------------------------------------------------------------------------------
def test_normaliser_centres_then_scales_to_unit_norm():
    train = torch.tensor([[1.0, 1.0], [3.0, 1.0]], dtype=torch.float64)  # mean (2, 1)
    normaliser = EmbeddingNormaliser().fit(train)
    out = normaliser(torch.tensor([[2.0, 4.0], [5.0, 5.0]], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0], [0.6, 0.8]], dtype=torch.float64))
    again = EmbeddingNormaliser.from_dict(json.loads(json.dumps(normaliser.to_dict())), num_features=2)
    torch.testing.assert_close(again(torch.tensor([[5.0, 5.0]], dtype=torch.float64)), out[1:])
    assert torch.equal(EmbeddingNormaliser("none")(train), train)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"kind": "power"}, "must name one of"),
        ({"kind": "center_l2", "mean": [1.0, float("nan")]}, "finite numbers"),
        ({"kind": "center_l2", "mean": ["1"]}, "finite numbers"),
        ({"kind": "center_l2", "mean": [1.0, 2.0, 3.0]}, "3 values for 2 features"),
        ("center_l2", "must name one of"),
    ],
)
def test_a_forged_normaliser_is_refused(data, message):
    with pytest.raises(MedmetaError, match=message):
        EmbeddingNormaliser.from_dict(data, num_features=2)


def test_head_learner_never_changes_the_learner_and_matches_the_head_on_embeddings():
    from conftest import toy_episode

    from medmeta.backbones import create_backbone
    from medmeta.methods import create_method

    torch.manual_seed(0)
    learner = create_method("protonet", create_backbone("conv4", in_channels=1, hidden=8)).eval()
    support, labels, query, _ = toy_episode(3, shot=2, query=2)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    normaliser = EmbeddingNormaliser().fit(torch.randn(10, learner.backbone.num_features, dtype=torch.float64))
    wrapped = HeadLearner(learner, create_head("prototype"), normaliser).eval()
    with torch.no_grad():
        logits, distance = wrapped.fit_support(support, labels).predict_with_distance(query)
        direct = create_head("prototype").fit(normaliser(learner.backbone(support)), labels)
        expected = direct.logits(normaliser(learner.backbone(query)))
    torch.testing.assert_close(logits, expected)
    assert distance.shape == (len(query),)
    assert all(torch.equal(before[k], v) for k, v in learner.state_dict().items())


def test_choose_head_takes_the_most_accurate_and_ties_go_to_the_method():
    from medmeta.training.calibration import choose_head

    assert choose_head({"method": 0.80, "prototype": 0.85, "logistic": 0.84}) == "prototype"
    assert choose_head({"method": 0.85, "prototype": 0.85}) == "method"
    assert choose_head({"method": None, "logistic": 0.5}) == "logistic"
    assert choose_head({"method": float("nan")}) == "method"
    assert choose_head({"finetune": 0.86, "method": 0.85}) == "finetune"  # order of cost, not of the dict


def test_choose_head_takes_the_cheapest_within_one_standard_error():
    from medmeta.training.calibration import choose_head

    # 1,000 cases at p = 0.9: standard error 0.0095
    accuracy = {"method": 0.885, "prototype": 0.895, "logistic": 0.896, "finetune": 0.90}
    assert choose_head(accuracy, n_cases=1000) == "prototype"  # 0.885 is below 0.9 - 0.0095
    assert choose_head(accuracy, n_cases=100_000) == "finetune"  # with that many cases 0.004 is beyond the noise
    assert choose_head({"finetune": 0.95, "logistic": 0.90}, n_cases=1000) == "finetune"


def test_choose_head_prefers_the_best_calibrated_among_the_equally_accurate():
    from medmeta.training.calibration import choose_head

    # 1,000 cases at p = 0.9: standard error 0.0095; logistic (0.885) is not equally accurate
    accuracy = {"method": 0.898, "prototype": 0.893, "logistic": 0.885, "finetune": 0.90}
    ece = {"method": 0.024, "prototype": 0.007, "logistic": 0.001, "finetune": 0.010}
    assert choose_head(accuracy, n_cases=1000, ece=ece) == "prototype"
    # ECEs within 0.005 of the lowest are equal: then the cheapest of them
    assert choose_head(accuracy, n_cases=1000, ece={**ece, "method": 0.011}) == "method"
    # unknown ECEs count as the worst; none known at all: the cheapest, as without ECEs
    assert choose_head(accuracy, n_cases=1000, ece={"method": None, "prototype": float("nan"), "finetune": 0.03}) == "finetune"
    assert choose_head(accuracy, n_cases=1000, ece={}) == "method"
    # calibration never buys a less accurate head
    assert choose_head(accuracy, n_cases=100_000, ece=ece) == "finetune"


def test_cli_head_choices_are_in_step_with_the_registry():
    from medmeta.cli.adapt import HEAD_NAMES

    assert sorted(HEAD_NAMES) == sorted(list_heads())


# -- end to end ----------------------------------------------------------------------------------
def test_training_stores_a_normaliser_and_calibrated_heads_with_a_default(trained_run):
    from medmeta.calibration.record import CalibrationRecord

    meta = json.loads((trained_run / "best.json").read_text())
    normaliser = EmbeddingNormaliser.from_dict(meta["embedding_normaliser"])
    assert normaliser.kind == "center_l2" and normaliser.mean_.shape[0] > 0
    heads = meta["heads"]
    assert set(heads["calibration"]) == {"prototype", "logistic", "finetune", "prototype+soft_kmeans"}
    accuracy = {"method": meta["calibration"]["accuracy_fit_episodes"]}
    for name, data in heads["calibration"].items():
        record = CalibrationRecord.from_dict(data)
        assert record.fitted and record.conformal is not None and record.referral is not None
        assert 0 <= record.accuracy_fit_episodes <= 1
        if "+" not in name:  # transductive variants are never the default
            accuracy[name] = record.accuracy_fit_episodes
    from medmeta.training.calibration import choose_head

    shape, config = meta["training"]["episode_shape"], meta["training"]["config"]
    n_cases = config["calibration_episodes"] * min(shape["way"], len(meta["protocol"]["classes"]["val"])) * shape["query"]
    ece = {"method": meta["calibration"]["ece_after_val"]}
    ece.update({name: data["ece_after_val"] for name, data in heads["calibration"].items() if "+" not in name})
    assert heads["default"] == choose_head(accuracy, n_cases, ece)
    best = max(accuracy.values())
    assert accuracy[heads["default"]] >= best - math.sqrt(best * (1 - best) / n_cases) - 1e-9
    assert f"{n_cases} cases" in heads["chosen_by"]


@pytest.mark.parametrize("head", ["prototype", "logistic", "method"])
def test_adapt_with_each_head_reports_it(trained_run, tmp_path, head):
    out = tmp_path / "report"
    result = invoke("adapt", "--checkpoint", trained_run, "--cases", SAMPLE_CASES, "--out", out, "--head", head,
                    "--labels", SAMPLE_CASES / "labels.csv", "--no-stability")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["metadata"]["head"] == head
    assert report["metadata"]["embedding_normalisation"] == ("method" if head == "method" else "center_l2")
    assert report["metrics"]["accuracy"] > 0.5  # 3 conditions: chance is 1/3
    meta = json.loads((trained_run / "best.json").read_text())
    expected_t = meta["calibration"]["temperature"] if head == "method" else meta["heads"]["calibration"][head]["temperature"]
    assert report["metadata"]["temperature"] == pytest.approx(expected_t)


def test_evaluate_with_a_head_tags_its_results(trained_run, tmp_path):
    out = tmp_path / "eval"
    result = invoke("evaluate", "--checkpoint", trained_run, "--episodes", "4", "--head", "logistic", "--out", out)
    assert result.exit_code == 0, result.output
    assert "(logistic head)" in result.output
    # at the protocol's first shot (1): the sets are probability-mass sets, tagged so
    data = json.loads((out / "evaluation_3way_1shot_logistic_mass.json").read_text())
    assert data["head"] == "logistic"


def test_unknown_head_and_uncalibrated_head_are_one_line_errors(trained_run, tmp_path):
    result = invoke("adapt", "--checkpoint", trained_run, "--cases", SAMPLE_CASES, "--out", tmp_path / "r", "--head", "knn")
    assert result.exit_code == 2 and "unknown --head 'knn'" in result.output
    old = tmp_path / "old"
    shutil.copytree(trained_run, old)
    meta = json.loads((old / "best.json").read_text())
    del meta["heads"], meta["embedding_normaliser"]  # as a checkpoint trained before heads existed
    (old / "best.json").write_text(json.dumps(meta))
    result = invoke("adapt", "--checkpoint", old, "--cases", SAMPLE_CASES, "--out", tmp_path / "r2", "--head", "logistic")
    assert result.exit_code == 2 and "no calibration for head 'logistic'" in result.output
    assert "medmeta calibrate" in result.output and "Traceback" not in result.output
    result = invoke("adapt", "--checkpoint", old, "--cases", SAMPLE_CASES, "--out", tmp_path / "r3", "--no-stability")
    assert result.exit_code == 0, result.output  # its default is the method's own head
    assert json.loads((tmp_path / "r3" / "report.json").read_text())["metadata"]["head"] == "method"


# -- transductive refinement through the pipeline ------------------------------------------------
def test_cli_transductive_choices_are_in_step_with_the_refiners():
    from medmeta.cli.adapt import TRANSDUCTIVE_NAMES
    from medmeta.transductive import REFINERS

    assert sorted(TRANSDUCTIVE_NAMES) == sorted(name for name in REFINERS if name != "inductive")


def test_a_refiner_sees_the_whole_batch_and_distances_stay_the_heads():
    from conftest import toy_episode

    from medmeta.backbones import create_backbone
    from medmeta.methods import create_method
    from medmeta.transductive import create_refiner

    torch.manual_seed(0)
    learner = create_method("protonet", create_backbone("conv4", in_channels=1, hidden=8)).eval()
    support, labels, query, _ = toy_episode(3, shot=2, query=3)
    normaliser = EmbeddingNormaliser().fit(torch.randn(10, learner.backbone.num_features, dtype=torch.float64))
    plain = HeadLearner(learner, create_head("prototype"), normaliser)
    refined = HeadLearner(learner, create_head("prototype"), normaliser, create_refiner("soft_kmeans"))
    with torch.no_grad():
        logits, distance = refined.fit_support(support, labels).predict_with_distance(query)
        _, plain_distance = plain.fit_support(support, labels).predict_with_distance(query)
        embedded = normaliser(learner.backbone(support)), normaliser(learner.backbone(query))
        expected = create_refiner("soft_kmeans").refine(embedded[0], labels, embedded[1], 3)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(distance, plain_distance)


def test_training_calibrates_a_transductive_variant_never_chosen_as_default(trained_run):
    meta = json.loads((trained_run / "best.json").read_text())
    assert "prototype+soft_kmeans" in meta["heads"]["calibration"]
    assert "+" not in meta["heads"]["default"]


def test_adapt_transductive_states_it_and_needs_an_embedding_head(trained_run, tmp_path):
    out = tmp_path / "report"
    result = invoke("adapt", "--checkpoint", trained_run, "--cases", SAMPLE_CASES, "--out", out, "--head", "prototype",
                    "--transductive", "soft_kmeans", "--labels", SAMPLE_CASES / "labels.csv", "--no-stability")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["metadata"]["transductive"] == "soft_kmeans" and report["metrics"]["accuracy"] > 0.5
    assert "refined transductively over this batch (soft_kmeans)" in (out / "report.html").read_text()
    plain_out = tmp_path / "plain"
    assert invoke("adapt", "--checkpoint", trained_run, "--cases", SAMPLE_CASES, "--out", plain_out, "--head", "prototype",
                  "--no-stability").exit_code == 0
    assert "each case on its own (not transductive)" in (plain_out / "report.html").read_text()
    bad = invoke("adapt", "--checkpoint", trained_run, "--cases", SAMPLE_CASES, "--out", tmp_path / "r", "--head", "method",
                 "--transductive", "soft_kmeans")
    assert bad.exit_code == 2 and "--transductive refines embedding heads" in bad.output
    uncalibrated = invoke("adapt", "--checkpoint", trained_run, "--cases", SAMPLE_CASES, "--out", tmp_path / "r2",
                          "--head", "logistic", "--transductive", "alpha_tim")
    assert uncalibrated.exit_code == 2 and "no calibration for head 'logistic+alpha_tim'" in uncalibrated.output
