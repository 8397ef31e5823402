"""The command line, driven through Typer's CliRunner: train, adapt, evaluate and bad input."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medmeta.cli.main import app
from medmeta.methods import list_methods

runner = CliRunner()
SAMPLE_CASES = Path(__file__).resolve().parents[1] / "sample_data" / "cases"


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.fixture
def cases(tmp_path) -> Path:
    """A private copy of the demo cases folder, safe to damage."""
    target = tmp_path / "cases"
    shutil.copytree(SAMPLE_CASES, target)
    return target


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_train_help_lists_methods_and_options():
    result = invoke("train", "--help")
    assert result.exit_code == 0
    text = plain(result.output)
    for option in ("--protocol", "--method", "--backbone", "--way", "--shot", "--query", "--episodes", "--image-size", "--device", "--seed", "--out", "--resume", "--conformal-score", "--coverage", "--class-conditional", "--refer-share", "--pretrain-lr", "--config"):
        assert option in text
    for name in list_methods():
        assert name in text


def test_adapt_on_sample_data_writes_all_the_reports(trained_run, cases, tmp_path):
    out = tmp_path / "report"
    result = invoke("adapt", "--checkpoint", trained_run, "--cases", cases, "--out", out, "--labels", cases / "labels.csv")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["predictions.csv", "rejected.csv", "report.html", "report.json", "support.csv", "thumbnails"]
    rows = read_csv(out / "predictions.csv")
    assert len(rows) == 30
    conditions = ["concentric_rings", "gradient_halo", "triangle_mass"]
    assert list(rows[0]) == [
        "path", "patient", "predicted", *[f"p_{c}" for c in conditions],
        "prediction_set", "refer", "refer_reason", "stability_max_change", "label",
    ]
    for row in rows:
        probs = [float(row[f"p_{c}"]) for c in conditions]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert row["predicted"] == conditions[probs.index(max(probs))]
        members = row["prediction_set"].split(";") if row["prediction_set"] else []
        assert set(members) <= set(conditions)
        assert row["refer"] in ("true", "false")
        assert (row["refer"] == "true") == bool(row["refer_reason"])
        if len(members) != 1:
            assert row["refer"] == "true" and ("empty prediction set" in row["refer_reason"] or "conditions" in row["refer_reason"])
        assert 0.0 <= float(row["stability_max_change"]) <= 1.0
    assert any(r["path"].startswith("query/patient_") for r in rows)
    report = json.loads((out / "report.json").read_text())
    assert report["metadata"]["checkpoint_sha256"] == json.loads((trained_run / "best.json").read_text())["weights"]["sha256"]
    assert report["metadata"]["temperature"] > 0
    assert all(len(c["sha256"]) == 64 for c in report["cases"])
    assert report["metrics"]["n_labelled"] == 30 and report["metrics"]["accuracy"] > 0.5
    assert report["metadata"]["conformal"]["score"] == "lac" and report["metadata"]["stability"]["computed"]
    for case, row in zip(report["cases"], rows):
        assert case["prediction_set"] == (row["prediction_set"].split(";") if row["prediction_set"] else [])
        assert case["refer"] == (row["refer"] == "true") and case["refer_reason"] == row["refer_reason"]
        assert case["stability_max_change"] == pytest.approx(float(row["stability_max_change"]), abs=1e-6)
    assert 0 <= report["metrics"]["coverage"] <= 1 and 0 <= report["metrics"]["referral_rate"] <= 1
    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html
    assert html.count('class="thumb" src="thumbnails/') == 30 and len(list((out / "thumbnails").glob("*.png"))) == 30
    assert html.count('class="support-thumb" src="thumbnails/support/') == 15 == len(list((out / "thumbnails" / "support").glob("*.png")))
    assert "Prediction set" in html and "stability: up to" in html
    assert html.count('class="refer"') == sum(r["refer"] == "true" for r in rows)
    assert read_csv(out / "rejected.csv") == []
    support = read_csv(out / "support.csv")
    assert [(r["path"], r["condition"], r["sha256"]) for r in support] == [
        (scan["path"], condition, scan["sha256"]) for condition, scans in report["support"].items() for scan in scans
    ]
    assert len(support) == 15 and {r["condition"] for r in support} == set(conditions)


def test_one_bad_scan_is_rejected_and_the_batch_goes_on(trained_run, cases, tmp_path):
    (cases / "query" / "broken.dcm").write_bytes(b"\x00" * 300)
    (cases / "query" / "notes.txt").write_text("not a scan")
    out = tmp_path / "report"
    result = invoke("adapt", "--checkpoint", trained_run, "--cases", cases, "--out", out)
    assert result.exit_code == 0, result.output
    rejected = {r["path"]: r["reason"] for r in read_csv(out / "rejected.csv")}
    assert set(rejected) == {"query/broken.dcm", "query/notes.txt"}
    assert "unsupported file type" in rejected["query/notes.txt"]
    assert len(read_csv(out / "predictions.csv")) == 30
    assert "Traceback" not in result.output


def test_support_condition_without_readable_scan_is_a_one_line_error(trained_run, cases, tmp_path):
    for path in (cases / "support" / "triangle_mass").iterdir():
        path.write_bytes(b"garbage")
    out = tmp_path / "report"
    result = invoke("adapt", "--checkpoint", trained_run, "--cases", cases, "--out", out)
    assert result.exit_code == 2
    assert "no readable scan for condition(s) triangle_mass" in plain(result.output)
    assert "Traceback" not in result.output
    assert len(read_csv(out / "rejected.csv")) == 5


def test_empty_query_folder_is_a_clear_error(trained_run, cases, tmp_path):
    shutil.rmtree(cases / "query")
    (cases / "query").mkdir()
    result = invoke("adapt", "--checkpoint", trained_run, "--cases", cases, "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert "no cases to diagnose" in plain(result.output)


def test_not_a_checkpoint_is_a_clear_error(cases, tmp_path):
    fake = tmp_path / "model.json"
    fake.write_text('{"weights": "x"}')
    result = invoke("adapt", "--checkpoint", fake, "--cases", cases)
    assert result.exit_code == 2
    assert "not a medmeta checkpoint" in plain(result.output)
    assert "Traceback" not in result.output


def test_missing_cases_folder_is_a_clear_error(trained_run, tmp_path):
    result = invoke("adapt", "--checkpoint", trained_run, "--cases", tmp_path / "absent")
    assert result.exit_code == 2 and "cases folder not found" in plain(result.output)


def test_evaluate_writes_json(trained_run, tmp_path):
    # the method's own head, named: the stored default depends on calibration accuracies within noise
    result = invoke(
        "evaluate", "--checkpoint", trained_run, "--episodes", 10, "--shot", 1, "--device", "cpu", "--head", "method", "--out", tmp_path
    )
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "evaluation_3way_1shot_mass.json").read_text())
    assert stats["episodes"] == 10 and stats["shot"] == 1 and 0 <= stats["accuracy"] <= 1
    for key in ("coverage", "mean_set_size", "referral_rate", "accuracy_not_referred", "mce_before", "mce_after", "aurc"):
        assert isinstance(stats[key], float), key
    assert 0 <= stats["coverage"] <= 1 and 0 <= stats["mean_set_size"] <= 3 and 0 <= stats["referral_rate"] <= 1
    assert set(stats["per_class_recall"]) == {"synth/gradient_halo", "synth/triangle_mass", "synth/concentric_rings"}
    assert len(stats["risk_coverage"]["coverage"]) == len(stats["risk_coverage"]["risk"]) == 100
    for name in ("reliability_3way_1shot_mass.png", "risk_coverage_3way_1shot_mass.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    episodes = read_csv(tmp_path / "episodes_3way_1shot_seed0.csv")
    assert len(episodes) == 10 * 3 * (1 + 10)  # episodes x way x (shot + query)
    assert {r["role"] for r in episodes} == {"support", "query"}
    # the default calibration source is the support's; at 1-shot the temperature falls back to
    # val and the sets to the probability mass, and the notes say so
    assert stats["conformal_source"] == "mass" and stats["temperature_source"] == "val"
    assert any("need two support scans per class" in note for note in stats["notes"])


def test_evaluate_calibrates_on_the_support_by_default(trained_run, tmp_path):
    result = invoke("evaluate", "--checkpoint", trained_run, "--episodes", 4, "--shot", 3, "--head", "method", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "evaluation_3way_3shot_tsupport_support.json").read_text())
    assert stats["conformal_source"] == "support" and stats["temperature_source"] == "support"


def test_evaluate_with_support_calibrated_sets(trained_run, tmp_path):
    args = ("evaluate", "--checkpoint", trained_run, "--episodes", 6, "--shot", 3, "--device", "cpu", "--out", tmp_path,
            "--temperature-source", "val", "--head", "method")
    result = invoke(*args, "--conformal-source", "support")
    assert result.exit_code == 0, result.output
    assert "support-calibrated" in plain(result.output)
    support = json.loads((tmp_path / "evaluation_3way_3shot_support.json").read_text())
    assert support["conformal_source"] == "support" and 0 <= support["support_threshold_mean"] <= 1
    assert invoke(*args, "--conformal-source", "val").exit_code == 0
    val = json.loads((tmp_path / "evaluation_3way_3shot.json").read_text())
    assert val["conformal_source"] == "val" and val["accuracy"] == support["accuracy"]
    assert invoke(*args, "--conformal-source", "mass").exit_code == 0
    mass = json.loads((tmp_path / "evaluation_3way_3shot_mass.json").read_text())
    assert mass["conformal_source"] == "mass" and mass["empty_set_rate"] == 0 and mass["accuracy"] == support["accuracy"]
    bad = invoke(*args, "--conformal-source", "test")
    assert bad.exit_code == 2 and "--conformal-source" in plain(bad.output)


def test_train_refuses_a_bad_protocol_without_traceback(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("sources: {a: missing_folder}\nclasses: {train: [a/x], val: [a/y], test: [a/z]}\n")
    result = invoke("train", "--protocol", bad, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "source not found" in plain(result.output) and "Traceback" not in result.output


def test_train_refuses_unknown_method(tmp_path):
    result = invoke("train", "--method", "nope", "--out", tmp_path / "run")
    text = " ".join(plain(result.output).split())
    assert result.exit_code == 2 and "--method: unknown method 'nope'" in text and "protonet" in text


def test_key_value_options_are_parsed_as_yaml_scalars():
    from medmeta.training.config_file import parse_key_values
    from medmeta.errors import MedmetaError

    assert parse_key_values(["inner_steps=5", "first_order=true", "inner_lr=0.01", "norm_kind=group"], "--x") == {
        "inner_steps": 5,
        "first_order": True,
        "inner_lr": 0.01,
        "norm_kind": "group",
    }
    with pytest.raises(MedmetaError, match="KEY=VALUE"):
        parse_key_values(["oops"], "--method-option")


def test_train_refuses_an_option_the_method_does_not_take(tmp_path):
    result = invoke("train", "--method-option", "bogus=1", "--out", tmp_path / "run", "--episodes", 1, "--pretrain-epochs", 0)
    assert result.exit_code == 2
    assert "cannot build protonet" in plain(result.output) and "Traceback" not in result.output


def test_calibrate_refits_on_val_classes_without_touching_the_weights(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = json.loads((run / "best.json").read_text())
    result = invoke("calibrate", "--checkpoint", run, "--coverage", 0.8, "--device", "cpu")
    assert result.exit_code == 0, result.output
    after = json.loads((run / "best.json").read_text())
    assert after["weights"] == before["weights"]
    assert after["calibration"]["conformal"]["coverage"] == 0.8
    # same seeds, same episodes: the temperature is refitted to the same value
    assert after["calibration"]["temperature"] == pytest.approx(before["calibration"]["temperature"], rel=1e-9)
    assert invoke("calibrate", "--checkpoint", run, "--coverage", 1.5).exit_code == 2


def test_calibrate_one_head_adds_a_transductive_variant_and_keeps_the_rest(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = json.loads((run / "best.json").read_text())
    assert "prototype+alpha_tim" not in before["heads"]["calibration"]
    result = invoke("calibrate", "--checkpoint", run, "--head", "prototype+alpha_tim", "--device", "cpu")
    assert result.exit_code == 0, result.output
    after = json.loads((run / "best.json").read_text())
    fitted = after["heads"]["calibration"].pop("prototype+alpha_tim")
    assert fitted["temperature"] > 0 and 0 <= fitted["accuracy_fit_episodes"] <= 1
    # nothing else is refitted: the method's own record, every other head and the default stay
    assert after["calibration"] == before["calibration"] and after["heads"]["calibration"] == before["heads"]["calibration"]
    assert after["heads"]["default"] == before["heads"]["default"] and after["weights"] == before["weights"]
    out = tmp_path / "report"
    adapted = invoke("adapt", "--checkpoint", run, "--cases", SAMPLE_CASES, "--out", out, "--head", "prototype",
                     "--transductive", "alpha_tim", "--no-stability")
    assert adapted.exit_code == 0, adapted.output
    assert json.loads((out / "report.json").read_text())["metadata"]["transductive"] == "alpha_tim"


@pytest.mark.parametrize(
    "args, message",
    [
        (("--head", "knn"), "unknown head 'knn'"),
        (("--head", "prototype+kmeans"), "unknown transductive refiner 'kmeans'"),
        (("--head", "method+soft_kmeans"), "not the method's own"),
        (("--head", "prototype", "--method-option", "distance=euclidean"), "add --head method"),
    ],
)
def test_calibrate_refuses_a_bad_head_and_writes_nothing(trained_run, tmp_path, args, message):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = (run / "best.json").read_text()
    result = invoke("calibrate", "--checkpoint", run, *args, "--device", "cpu")
    assert result.exit_code == 2 and message in plain(result.output) and "Traceback" not in result.output
    assert (run / "best.json").read_text() == before


def test_head_specs_are_parsed_in_order_without_repeats():
    from medmeta.training.calibration import parse_head_specs

    assert parse_head_specs(["prototype+alpha_tim", "method", "logistic", "prototype+alpha_tim"]) == (
        True, (("prototype", "alpha_tim"), ("logistic", None)))
    assert parse_head_specs(["finetune"]) == (False, (("finetune", None),))


def test_evaluate_with_support_updated_temperature(trained_run, tmp_path):
    args = ("evaluate", "--checkpoint", trained_run, "--episodes", 6, "--shot", 3, "--device", "cpu", "--out", tmp_path,
            "--conformal-source", "val", "--head", "method")
    result = invoke(*args, "--temperature-source", "support", "--temperature-sigma", 0.3)
    assert result.exit_code == 0, result.output
    assert "updated by each support" in " ".join(plain(result.output).split())
    support = json.loads((tmp_path / "evaluation_3way_3shot_tsupport.json").read_text())
    assert support["temperature_source"] == "support" and support["temperature_prior_sigma"] == 0.3
    assert support["support_temperature_mean"] > 0 and (tmp_path / "reliability_3way_3shot_tsupport.png").exists()
    # sigma 0 is the checkpoint's temperature: the same figures as without the option
    assert invoke(*args, "--temperature-source", "support", "--temperature-sigma", 0).exit_code == 0
    zero = json.loads((tmp_path / "evaluation_3way_3shot_tsupport.json").read_text())
    assert invoke(*args, "--temperature-source", "val").exit_code == 0
    val = json.loads((tmp_path / "evaluation_3way_3shot.json").read_text())
    assert val["temperature_source"] == "val" and zero["ece_after"] == pytest.approx(val["ece_after"])
    assert zero["accuracy"] == val["accuracy"] == support["accuracy"]
    bad = invoke(*args, "--temperature-source", "test")
    assert bad.exit_code == 2 and "--temperature-source" in plain(bad.output)
    bad = invoke(*args, "--temperature-source", "support", "--temperature-sigma", -1)
    assert bad.exit_code == 2 and "--temperature-sigma" in plain(bad.output) and "Traceback" not in bad.output


def test_adapt_with_support_updated_temperature(trained_run, cases, tmp_path):
    result = invoke("adapt", "--checkpoint", trained_run, "--cases", cases, "--out", tmp_path / "r", "--device", "cpu",
                    "--temperature-source", "support")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    meta = report.get("metadata", report)
    assert meta["temperature_source"] == "support" and meta["support_temperature"] > 0
    assert "updated by this support" in " ".join(plain(result.output).split())
    html = " ".join((tmp_path / "r" / "report.html").read_text().split())
    assert f"temperature {meta['support_temperature']:.3f}: the validation conditions' {meta['temperature']:.3f} updated" in html
    assert "then updated by this support's own leave-one-out predictions" in html
    bad = invoke("adapt", "--checkpoint", trained_run, "--cases", cases, "--temperature-source", "nope")
    assert bad.exit_code == 2 and "--temperature-source" in plain(bad.output)


def test_calibrate_can_switch_protonet_to_euclidean_distances(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = json.loads((run / "best.json").read_text())
    result = invoke("calibrate", "--checkpoint", run, "--method-option", "distance=euclidean", "--device", "cpu")
    assert result.exit_code == 0, result.output
    after = json.loads((run / "best.json").read_text())
    assert after["weights"] == before["weights"]
    assert after["method"]["hparams"]["distance"] == "euclidean"
    assert after["calibration"]["method_options"] == {"distance": "euclidean"}
    # another logit shape, another temperature
    assert after["calibration"]["temperature"] != pytest.approx(before["calibration"]["temperature"], rel=1e-3)
    bad = invoke("calibrate", "--checkpoint", run, "--method-option", "distance=cosine", "--device", "cpu")
    assert bad.exit_code == 2 and "distance" in plain(bad.output) and "Traceback" not in bad.output
    assert json.loads((run / "best.json").read_text()) == after  # a refused option writes nothing
