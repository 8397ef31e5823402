"""Benchmark: where a checkpoint's calibration comes from, compared on identical test episodes.

Runs the protocol's seeded test episodes once (with leave-one-out support refits when the shot
allows) and summarises them with the temperature from the validation conditions and with it
updated by each episode's support (for every ``--sigma``), each with validation- and
support-calibrated prediction sets and probability-mass sets (what support calibration falls back
to at 1-shot). The oracle row is the best single temperature for these
test cases (it looks at their labels, so it is a floor for any one temperature, not a method).

    python benchmarks/calibration_sources.py runs/derm-rare-euc5 --shot 5 --out runs/derm-rare-euc5/sources_5shot.json
    python benchmarks/calibration_sources.py runs/d-derm-s0 --shot 1 --head prototype --out runs/d-derm-s0/sources_1shot.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmeta import load_run  # noqa: E402
from medmeta.calibration import TemperatureScaler  # noqa: E402
from medmeta.evaluation import run_episodes, summarize  # noqa: E402
from medmeta.io import atomic_write_json, json_safe  # noqa: E402
from medmeta.pipeline import PredictionSetStep, TemperatureStep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--shot", type=int, required=True)
    parser.add_argument("--episodes", type=int, default=None, help="[default: the protocol's test_episodes]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sigma", type=float, action="append", default=None, help="prior spread(s) of log T [default: 0.5]")
    parser.add_argument("--head", default=None, help="adaptation head [default: the checkpoint's default head]")
    parser.add_argument("--out", default=None, help="JSON file for every row")
    args = parser.parse_args()
    run = load_run(args.checkpoint, device="cpu")
    ckpt, proto = run.checkpoint, run.protocol
    episodes = args.episodes or proto.episodes.test_episodes
    way, query = proto.episodes.way, proto.episodes.query
    sampler = run.sampler("test", way, args.shot, query, args.seed)
    start = time.perf_counter()
    head = args.head or run.default_head
    learner, calibration = run.head_learner(head, None), run.calibration_for(head, None)
    outputs = run_episodes(learner, run.store(), sampler, range(episodes), run.device, support_loo=args.shot >= 2)
    seconds = time.perf_counter() - start
    method = ckpt.meta["method"]
    print(f"{method['name']} {method.get('hparams', {})}, {head} head, on {proto.name}: {episodes} {way}-way {args.shot}-shot test "
          f"episodes ({seconds:.0f} s with leave-one-out refits)")
    conformal, distance, temperature = calibration.conformal, calibration.distance_threshold, calibration.temperature
    logits, labels = outputs.pooled()
    oracle = TemperatureScaler().fit(logits, labels).temperature_
    rows = [("oracle single T (test labels)", oracle, "val", 0.0, "val")]
    for sets in ("val", "support", "mass"):
        rows.append(("val T", temperature, "val", 0.0, sets))
        for sigma in args.sigma or [0.5]:
            rows.append((f"val T updated by support, sigma {sigma:g}", temperature, "support", sigma, sets))
    print(f"  {'temperature':40s} {'sets':8s} {'ECE':>6s} {'NLL':>6s} {'Brier':>6s} {'coverage':>9s} {'size':>5s} {'referred':>8s} {'acc kept':>8s}")
    results = []
    for name, temperature, source, sigma, sets in rows:
        stats = summarize(
            outputs, TemperatureStep(temperature, source, sigma), PredictionSetStep(conformal, sets), distance
        ).to_dict()
        results.append({"row": name, "sets_requested": sets, **stats})
        cov = "n/a" if stats["coverage"] is None else f"{stats['coverage']:.3f}"
        size = "n/a" if stats["mean_set_size"] is None else f"{stats['mean_set_size']:.2f}"
        ref = "n/a" if stats["referral_rate"] is None else f"{stats['referral_rate']:.3f}"
        kept = "n/a" if stats["accuracy_not_referred"] is None else f"{stats['accuracy_not_referred']:.3f}"
        print(f"  {name:40s} {stats['conformal_source']:8s} {stats['ece_after']:6.3f} {stats['nll_after']:6.3f} "
              f"{stats['brier_after']:6.3f} {cov:>9s} {size:>5s} {ref:>8s} {kept:>8s}")
    print(f"  accuracy {100 * results[0]['accuracy']:.1f}% +- {100 * results[0]['accuracy_ci95']:.1f}, "
          f"macro AUC {results[0]['macro_auc']:.3f}, ECE before any temperature {results[0]['ece_before']:.3f}")
    if args.out:
        atomic_write_json(args.out, json_safe({"checkpoint": str(ckpt.path), "method": method, "head": head, "protocol": proto.name,
                                               "way": way, "shot": args.shot, "episodes": episodes, "seed": args.seed,
                                               "seconds": seconds, "rows": results}))


if __name__ == "__main__":
    main()
