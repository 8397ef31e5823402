"""Benchmark: train on a protocol's meta-train classes, evaluate on its test classes.

Prints accuracy (95% CI), macro AUC, ECE before/after temperature scaling for every shot in
the protocol, and training throughput; writes ``benchmark.json`` into the run folder.

    python benchmarks/protocol_benchmark.py ../shared/protocols/derm-rare.yaml \
        --out runs/derm-rare --max-minutes 28 --episodes 20000

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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("protocol")
    parser.add_argument("--out", required=True)
    parser.add_argument("--method", default="protonet")
    parser.add_argument("--backbone", default="conv4")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=20000)
    parser.add_argument("--max-minutes", type=float, default=28.0)
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="of the pre-training cross-entropy")
    parser.add_argument("--contrastive", type=float, default=0.0, help="weight of the contrastive pre-training loss")
    parser.add_argument("--generations", type=int, default=1, help="pre-training generations (born-again self-distillation)")
    parser.add_argument("--tuning-episodes", type=int, default=None, help="val episodes choosing the finetune head's steps and rate")
    parser.add_argument("--shot", type=int, default=None, help="training shot [default: protocol's largest]")
    parser.add_argument("--train-shot", type=int, action="append", default=None, help="draw each training episode's shot from these (repeatable)")
    parser.add_argument("--val-interval", type=int, default=250)
    parser.add_argument("--val-episodes", type=int, default=100)
    parser.add_argument("--calibration-episodes", type=int, default=200)
    parser.add_argument("--lr-step", type=int, default=1000)
    parser.add_argument("--augment", default="light")
    parser.add_argument("--grayscale", type=float, default=0.0, help="probability of a grayscale training image")
    parser.add_argument("--meta-batch", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--backbone-lr", type=float, default=None, help="0 freezes the backbone")
    parser.add_argument("--grad-clip", type=float, default=None)
    parser.add_argument("--init-from", default=None, help="start the backbone from this checkpoint")
    parser.add_argument("--method-option", action="append", default=[], help="KEY=VALUE (repeatable)")
    parser.add_argument("--backbone-option", action="append", default=[], help="KEY=VALUE (repeatable)")
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--eval-episodes", type=int, default=None)
    parser.add_argument("--skip-train", action="store_true", help="evaluate the checkpoint already in --out")
    parser.add_argument("--head", action="append", default=None, help="adaptation head(s) to evaluate (repeatable) [default: the checkpoint's]")
    parser.add_argument("--calibration-source", default=None, help="support or val [default: the shipped default]")
    parser.add_argument("--test-shot", type=int, action="append", default=None, help="test shots [default: the protocol's]")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--skip-test", action="store_true", help="train (and calibrate) only: choices are made on val")
    return parser.parse_args()


def train_run(args: argparse.Namespace, out: Path) -> dict:
    """Train as the arguments say; the training part of the report."""
    config = TrainConfig(
        protocol=args.protocol, out=str(out), method=args.method, backbone=args.backbone,
        image_size=args.image_size, channels=args.channels, episodes=args.episodes, max_minutes=args.max_minutes,
        pretrain_epochs=args.pretrain_epochs, pretrain_label_smoothing=args.label_smoothing, pretrain_contrastive=args.contrastive,
        pretrain_generations=args.generations,
        tuning_episodes=args.tuning_episodes, seed=args.seed, shot=args.shot, train_shots=args.train_shot, val_interval=args.val_interval,
        lr_step=args.lr_step, augment=args.augment, augment_grayscale=args.grayscale, meta_batch=args.meta_batch, lr=args.lr,
        backbone_lr=args.backbone_lr, grad_clip=args.grad_clip,
        val_episodes=args.val_episodes, calibration_episodes=args.calibration_episodes,
        init_from=args.init_from,
        method_kwargs=parse_key_values(args.method_option, "--method-option"),
        backbone_kwargs=parse_key_values(args.backbone_option, "--backbone-option"),
    )
    started = time.perf_counter()
    result = train(config)
    return {
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

    print(f"\n{protocol.name}: {args.method}/{args.backbone} at {args.image_size}px")
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
