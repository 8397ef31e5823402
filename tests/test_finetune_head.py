"""The ``finetune`` head (P>M>F's "F", issue 11 item 1) and its tuning on val episodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F
from typer.testing import CliRunner

from medmeta.backbones import create_backbone
from medmeta.errors import MedmetaError
from medmeta.heads import EmbeddingNormaliser, HeadLearner, adapting_learner, create_head
from medmeta.heads.finetune import LR_GRID, STEPS_GRID, FinetuneLearner, split_backbone
from medmeta.leave_one_out import leave_one_out
from medmeta.methods import create_method

SAMPLE_CASES = Path(__file__).resolve().parents[1] / "sample_data" / "cases"


def small_learner(backbone: str = "conv4", **kwargs):
    torch.manual_seed(0)
    defaults = {"conv4": {"hidden": 8}, "resnet12": {"channels": (4, 6, 8, 10)}}[backbone]
    return create_method("protonet", create_backbone(backbone, **{**defaults, **kwargs})).eval()


def normaliser_for(learner) -> EmbeddingNormaliser:
    return EmbeddingNormaliser().fit(torch.randn(20, learner.backbone.num_features, generator=torch.Generator().manual_seed(1)))


def episode(n_way: int = 3, shot: int = 2, n_query: int = 6, size: int = 32, channels: int = 3):
    generator = torch.Generator().manual_seed(n_way * 10 + shot)
    support = torch.rand(n_way * shot, channels, size, size, generator=generator)
    labels = torch.arange(n_way).repeat_interleave(shot)
    query = torch.rand(n_query, channels, size, size, generator=generator)
    return support, labels, query


# -- splitting the backbone: [kwargs, input shape, blocks] ----------------------------------------
SPLITS = [
    ["conv4", {"hidden": 8}, (2, 3, 32, 32), 1],
    ["conv4", {"hidden": 8}, (2, 3, 32, 32), 2],
    ["conv4", {"hidden": 8, "in_channels": 1}, (3, 1, 48, 48), 4],
    ["conv4", {"hidden": 8, "spatial_dims": 3, "in_channels": 1}, (2, 1, 16, 16, 16), 1],
    ["resnet12", {"channels": (4, 6, 8, 10)}, (2, 3, 32, 32), 1],
    ["resnet12", {"channels": (4, 6, 8, 10)}, (2, 3, 32, 32), 9],  # capped at the 4 stages
]


@pytest.mark.parametrize("name, kwargs, shape, blocks", SPLITS)
def test_trunk_then_tail_is_the_backbone(name, kwargs, shape, blocks):
    torch.manual_seed(0)
    backbone = create_backbone(name, **kwargs).eval()
    trunk, tail = split_backbone(backbone, blocks)
    x = torch.rand(*shape)
    with torch.no_grad():
        torch.testing.assert_close(tail(trunk(x)), backbone(x))
    n_stages = len(backbone.stages())
    tuned = {id(p) for p in tail.parameters()}
    expected = {id(p) for stage in backbone.stages()[n_stages - min(blocks, n_stages):] for p in stage.parameters()}
    assert tuned == expected


def test_a_backbone_without_stages_is_tuned_whole():
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    trunk, tail = split_backbone(backbone, 1)
    x = torch.rand(2, 3, 2, 2)
    assert torch.equal(trunk(x), x) and tail is backbone


# -- fitting ---------------------------------------------------------------------------------------
def test_zero_steps_is_a_cosine_classifier_on_the_normalised_prototypes():
    learner = small_learner()
    normaliser = normaliser_for(learner)
    support, labels, query = episode()
    adapted = create_head("finetune", steps=0, views=1, scale=7.0).learner(learner, normaliser)
    logits, distance = adapted.fit_support(support, labels).predict_with_distance(query)
    with torch.no_grad():
        s, q = normaliser(learner.backbone(support)), normaliser(learner.backbone(query))
    prototypes = torch.stack([s[labels == c].mean(0) for c in range(3)])
    expected = 7.0 * F.normalize(q, dim=1) @ F.normalize(prototypes, dim=1).T
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(distance, torch.cdist(q, prototypes).min(1).values, rtol=1e-4, atol=1e-4)


def test_fine_tuning_fits_the_support_and_never_changes_the_learner():
    learner = small_learner()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    support, labels, _ = episode(shot=3)
    normaliser = normaliser_for(learner)

    def support_loss(adapted: FinetuneLearner) -> float:
        return float(F.cross_entropy(adapted.predict_query(support), labels))

    untuned = create_head("finetune", steps=0, views=2).learner(learner, normaliser).fit_support(support, labels)
    tuned = create_head("finetune", steps=100, lr=1e-2, views=2).learner(learner, normaliser).fit_support(support, labels)
    assert support_loss(tuned) < support_loss(untuned) - 0.05
    assert (tuned.predict_query(support).argmax(1) == labels).all()  # the support is learnt
    for key, value in learner.state_dict().items():
        assert torch.equal(value, before[key]), key
    # the tail's copy and the classifier moved; every tuned weight got a gradient
    trunk, tail = split_backbone(learner.backbone, 1)
    moved = [not torch.equal(a, b) for a, b in zip(tuned.tail_.parameters(), tail.parameters())]
    assert moved and all(moved)


def test_fits_are_deterministic_and_seeded():
    learner = small_learner()
    support, labels, query = episode()
    normaliser = normaliser_for(learner)
    first = create_head("finetune", steps=5, views=3).learner(learner, normaliser).fit_support(support, labels).predict_query(query)
    again = create_head("finetune", steps=5, views=3).learner(learner, normaliser).fit_support(support, labels).predict_query(query)
    other_seed = create_head("finetune", steps=5, views=3, seed=1).learner(learner, normaliser).fit_support(support, labels)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed.predict_query(query))


def test_a_trajectory_gives_the_logits_of_every_step_count():
    learner = small_learner()
    support, labels, query = episode()
    normaliser = normaliser_for(learner)
    adapted = create_head("finetune", views=2).learner(learner, normaliser)
    path = adapted.trajectory(support, labels, query, checkpoints=(0, 3, 6), lr=1e-3)
    assert sorted(path) == [0, 3, 6] and all(v.shape == (6, 3) for v in path.values())
    for steps in (0, 3, 6):
        single = create_head("finetune", steps=steps, lr=1e-3, views=2).learner(learner, normaliser).fit_support(support, labels)
        torch.testing.assert_close(path[steps], single.predict_query(query), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"steps": -1}, "steps"), ({"steps": 2.5}, "steps"), ({"lr": 0}, "lr"), ({"views": 0}, "views"),
     ({"blocks": 0}, "blocks"), ({"scale": -1}, "scale")],
)
def test_bad_finetune_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_head("finetune", **kwargs)


def test_finetune_takes_no_transductive_refiner():
    from medmeta.transductive import create_refiner

    learner = small_learner()
    with pytest.raises(MedmetaError, match="adapts the backbone"):
        adapting_learner(learner, create_head("finetune"), normaliser_for(learner), create_refiner("soft_kmeans"))
    assert isinstance(adapting_learner(learner, create_head("finetune"), normaliser_for(learner)), FinetuneLearner)
    assert isinstance(adapting_learner(learner, create_head("prototype"), normaliser_for(learner)), HeadLearner)


def test_leave_one_out_refits_the_finetune_head_on_the_images():
    learner = small_learner()
    support, labels, query = episode(shot=2)
    adapted = create_head("finetune", steps=3, views=1).learner(learner, normaliser_for(learner))
    loo = leave_one_out(adapted, support, labels, query)
    assert loo.support_logits.shape == (6, 3) and loo.max_change.shape == (6,)
    keep = torch.arange(6) != 0
    alone = create_head("finetune", steps=3, views=1).learner(learner, normaliser_for(learner)).fit_support(support[keep], labels[keep])
    torch.testing.assert_close(torch.as_tensor(loo.support_logits[0]), alone.predict_query(support[:1])[0].double(), rtol=1e-5, atol=1e-5)


# -- leave-one-out on cached embeddings (embedding heads) ---------------------------------------
class _ImagesOnly:
    """An embedding head's learner without its embedding shortcut: refitted on images."""

    def __init__(self, learner):
        self.inner = learner

    def fit_support(self, images, labels):
        return self.inner.fit_support(images, labels)

    def predict_query(self, images):
        return self.inner.predict_query(images)

    def correct_held_out_logits(self, logits, labels):
        return self.inner.correct_held_out_logits(logits, labels)


@pytest.mark.parametrize("head, refiner", [("prototype", None), ("logistic", None), ("prototype", "soft_kmeans")])
def test_leave_one_out_on_embeddings_equals_refits_on_images(head, refiner):
    from medmeta.transductive import create_refiner

    learner = small_learner()
    support, labels, query = episode(shot=3)
    wrapped = HeadLearner(learner, create_head(head), normaliser_for(learner), create_refiner(refiner) if refiner else None)
    with torch.no_grad():
        fast = leave_one_out(wrapped, support, labels, query, temperature=0.5)
        slow = leave_one_out(_ImagesOnly(wrapped), support, labels, query, temperature=0.5)
    assert fast.support_logits.shape == slow.support_logits.shape == (9, 3)
    torch.testing.assert_close(torch.as_tensor(fast.support_logits), torch.as_tensor(slow.support_logits), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.as_tensor(fast.max_change), torch.as_tensor(slow.max_change), rtol=1e-5, atol=1e-5)


# -- tuning on val episodes ----------------------------------------------------------------------
def test_tuning_scores_the_whole_grid_and_keeps_the_best(trained_run):
    from medmeta.run import load_run
    from medmeta.training.head_tuning import grid_accuracy, tune_finetune

    run = load_run(trained_run, "cpu")
    val = run.protocol.classes["val"]
    sampler = run.sampler("val", min(2, len(val)), 2, 3, seed=5)
    store, normaliser = run.store(), run.checkpoint.normaliser
    head, evidence = tune_finetune(run.learner, normaliser, store, sampler, 3, "cpu", quiet=True,
                                   steps_grid=(0, 2, 4), lr_grid=(1e-4, 1e-2))
    grid = grid_accuracy(evidence)
    assert grid.shape == (3, 2) and ((grid >= 0) & (grid <= 1)).all()
    assert evidence["chosen"]["accuracy"] == pytest.approx(grid.max())
    assert (head.steps, head.lr) == (evidence["chosen"]["steps"], evidence["chosen"]["lr"])
    # 0 steps is the same classifier whatever the rate: the grid's row is flat
    assert grid[0, 0] == grid[0, 1]
    head0, _ = tune_finetune(run.learner, normaliser, store, sampler, 3, "cpu", quiet=True, steps_grid=(0,), lr_grid=(1e-2, 1e-4))
    assert (head0.steps, head0.lr) == (0, 1e-4)  # ties go to the smaller rate


def test_training_tunes_and_calibrates_the_finetune_head(trained_run):
    from medmeta.calibration.record import CalibrationRecord
    from medmeta.run import load_run

    meta = json.loads((trained_run / "best.json").read_text())
    options = meta["heads"]["options"]["finetune"]
    assert options["steps"] in STEPS_GRID and options["lr"] in LR_GRID
    tuning = meta["heads"]["tuning"]["finetune"]
    assert len(tuning["grid"]) == len(STEPS_GRID) * len(LR_GRID)
    assert (tuning["chosen"]["steps"], tuning["chosen"]["lr"]) == (options["steps"], options["lr"])
    assert CalibrationRecord.from_dict(meta["heads"]["calibration"]["finetune"]).fitted
    adapted = load_run(trained_run, "cpu").head_learner("finetune")
    assert isinstance(adapted, FinetuneLearner) and adapted.head.hparams() == options


def test_adapt_with_the_finetune_head(trained_run, tmp_path):
    from medmeta.cli.main import app

    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["adapt", "--checkpoint", str(trained_run), "--cases", str(SAMPLE_CASES), "--out", str(out),
                                      "--head", "finetune", "--labels", str(SAMPLE_CASES / "labels.csv")])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["metadata"]["head"] == "finetune"
    assert report["metrics"]["accuracy"] > 0.5  # 3 conditions: chance is 1/3


@pytest.mark.parametrize("kwargs, expected", [({}, 50), ({"val_episodes": 4}, 4), ({"tuning_episodes": 0}, 0),
                                              ({"tuning_episodes": 80, "val_episodes": 4}, 80)])
def test_tuning_episodes_default_to_fifty_at_most_the_validation_episodes(kwargs, expected):
    from medmeta.training import TrainConfig
    from medmeta.training.calibration import tuning_episodes

    assert tuning_episodes(TrainConfig(**kwargs)) == expected
