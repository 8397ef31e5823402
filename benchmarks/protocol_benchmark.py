"""Benchmark: train on a protocol's meta-train classes, evaluate on its test classes.

Prints accuracy (95% CI), macro AUC, ECE before/after temperature scaling for every shot in
the protocol, and training throughput; writes ``benchmark.json`` into the run folder.

    python benchmarks/protocol_benchmark.py ../shared/protocols/derm-rare.yaml --out runs/derm-rare

Every training setting left unset is ``medmeta train``'s default (since 2026-12-03; before,
this script had defaults of its own: 20,000 episodes, 100 val episodes every 250, 200
calibration episodes, a learning-rate step every 1,000), so a run without options measures the
recipe that ships; ``--max-minutes`` (30, the budget of issue 11) only guards the time.

Episodes are seeded by the protocol and ``--eval-seed`` only, so every method is measured on
identical test episodes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medmeta.data.protocol import load_protocol
from medmeta.evaluation import EvaluationSettings, evaluate_checkpoint
from medmeta.io import atomic_write_json, json_safe
from medmeta.training import TrainConfig, train
from medmeta.training.config_file import parse_key_values


#: ``(option, TrainConfig field, type, help)``: the training settings this benchmark passes on.
#: Unset, each is ``medmeta train``'s own default, so a run without options is the shipped recipe.
TRAINING_OPTIONS = (
    ("--method", "method", str, None),
    ("--backbone", "backbone", str, None),
    ("--image-size", "image_size", int, None),
    ("--channels", "channels", int, None),
    ("--episodes", "episodes", int, None),
    ("--pretrain-epochs", "pretrain_epochs", int, None),
    ("--label-smoothing", "pretrain_label_smoothing", float, "of the pre-training cross-entropy"),
    ("--contrastive", "pretrain_contrastive", float, "weight of the contrastive pre-training loss"),
    ("--generations", "pretrain_generations", int, "pre-training generations (born-again self-distillation)"),
    ("--tuning-episodes", "tuning_episodes", int, "val episodes choosing the finetune head's steps and rate"),
    ("--shot", "shot", int, "training shot [default: protocol's largest]"),
    ("--val-interval", "val_interval", int, None),
    ("--val-episodes", "val_episodes", int, None),
    ("--calibration-episodes", "calibration_episodes", int, None),
    ("--lr-step", "lr_step", int, None),
    ("--augment", "augment", str, None),
    ("--grayscale", "augment_grayscale", float, "probability of a grayscale training image"),
    ("--meta-batch", "meta_batch", int, None),
    ("--lr", "lr", float, None),
    ("--backbone-lr", "backbone_lr", float, "0 freezes the backbone"),
    ("--grad-clip", "grad_clip", float, None),
    ("--ema-decay", "ema_decay", float, "weight average of episodic training (0 = none)"),
    ("--init-from", "init_from", str, "start the backbone from this checkpoint"),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("protocol")
    parser.add_argument("--out", required=True)
    defaults = TrainConfig()
    for option, field, kind, text in TRAINING_OPTIONS:
        parser.add_argument(option, dest=field, type=kind, default=None,
                            help=f"{text + ' ' if text else ''}[default: medmeta train's, {getattr(defaults, field)!r}]")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="stop episodic training after this many minutes (the issue's budget)")
    parser.add_argument("--train-shot", type=int, action="append", default=None, help="draw each training episode's shot from these (repeatable)")
    parser.add_argument("--method-option", action="append", default=[], help="KEY=VALUE (repeatable)")
    parser.add_argument("--backbone-option", action="append", default=[], help="KEY=VALUE (repeatable)")
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--eval-episodes", type=int, default=None)
    parser.add_argument("--skip-train", action="store_true", help="evaluate an existing run folder")
    parser.add_argument("--head", action="append", default=None, help="adaptation head(s) to evaluate (repeatable) [default: the checkpoint's]")
    parser.add_argument("--calibration-source", default=None, help="support or val [default: the shipped default]")
    parser.add_argument("--test-shot", type=int, action="append", default=None, help="test shots [default: the protocol's]")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--skip-test", action="store_true", help="train (and calibrate) only: choices are made on val")
    return parser.parse_args()


def train_run(args: argparse.Namespace, out: Path) -> dict:
    """Train as the arguments say; the training part of the report."""
    chosen = {field: getattr(args, field) for _, field, _, _ in TRAINING_OPTIONS if getattr(args, field) is not None}
    config = TrainConfig(
        protocol=args.protocol, out=str(out), max_minutes=args.max_minutes, seed=args.seed, train_shots=args.train_shot,
        method_kwargs=parse_key_values(args.method_option, "--method-option"),
        backbone_kwargs=parse_key_values(args.backbone_option, "--backbone-option"), **chosen,
    )
    started = time.perf_counter()
    result = train(config)
    return {
        "config": json_safe(config.to_dict()),
        "wall_seconds": time.perf_counter() - started,
        "episodes_done": result.episodes_done,
        "episodes_per_second": result.episodes_per_second,
        "best_val": result.best_val,
        "calibration": json_safe(result.calibration.to_dict()),
    }


def main() -> None:
    args = parse_args()
    protocol = load_protocol(args.protocol)
    out = Path(args.out)
    report: dict = {"protocol": protocol.name, "args": vars(args)}
    if not args.skip_train:
        report["training"] = train_run(args, out)
    report["test"] = {}
    sources = {"conformal_source": args.calibration_source, "temperature_source": args.calibration_source} if args.calibration_source else {}
    for head in [] if args.skip_test else args.head or [None]:
        for shot in args.test_shot or protocol.episodes.shot:
            settings = EvaluationSettings(protocol=args.protocol, shot=shot, episodes=args.eval_episodes, seed=args.eval_seed, head=head, **sources)
            report["test"][f"{shot}-shot" + (f" {head}" if head else "")] = evaluate_checkpoint(out, settings).to_dict()
    atomic_write_json(out / "benchmark.json", report)

    trained = report.get("training", {}).get("config")
    if trained:  # the size the run used (the protocol's default when the option was not given)
        size = json.loads((out / "best.json").read_text())["preprocessing"]["image_size"]
        side = f"{size}^3 voxels" if protocol.spatial_dims == 3 else f"{size}px"
    print(f"\n{protocol.name}: " + (f"{trained['method']}/{trained['backbone']} at {side}" if trained else str(out)))
    if "training" in report:
        t = report["training"]
        print(f"training: {t['wall_seconds'] / 60:.1f} min wall, {t['episodes_done']} episodes, {t['episodes_per_second']:.2f} episodes/s")
    print(f"{'shot':>16} {'accuracy':>16} {'macro AUC':>10} {'ECE before':>11} {'ECE after':>10} {'T':>7}")
    for name, s in report["test"].items():
        print(
            f"{name:>16} {100 * s['accuracy']:7.1f}% ± {100 * s['accuracy_ci95']:4.1f} {s['macro_auc']:10.3f} "
            f"{s['ece_before']:11.3f} {s['ece_after']:10.3f} {s['temperature']:7.3f}"
        )
    print(json.dumps({k: round(v["accuracy"], 4) for k, v in report["test"].items()}))


if __name__ == "__main__":
    main()
