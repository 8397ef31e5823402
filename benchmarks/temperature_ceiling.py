"""How far temperature scaling can go: the ECE with the checkpoint's temperature (fitted on val
conditions) against the ECE with the best single temperature for the *test* cases themselves.

The second is an oracle (it looks at the test labels), so it is not a calibration method: it is
the floor that any one temperature, however it is learned, cannot go below for this model and
protocol. When that floor is above a target ECE, the target needs a richer calibration map or a
better-calibrated model, not a better-chosen temperature.

    python benchmarks/temperature_ceiling.py runs/derm-rare-cal5 --shot 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmeta import load_run  # noqa: E402
from medmeta.calibration import TemperatureScaler, expected_calibration_error, softmax  # noqa: E402
from medmeta.evaluation import run_episodes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--shot", type=int, required=True)
    parser.add_argument("--episodes", type=int, default=None, help="[default: the protocol's test_episodes]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run = load_run(args.checkpoint, device="cpu")
    ckpt, proto = run.checkpoint, run.protocol
    episodes = args.episodes or proto.episodes.test_episodes
    sampler = run.sampler("test", proto.episodes.way, args.shot, proto.episodes.query, args.seed)
    outputs = run_episodes(run.learner, run.store(), sampler, range(episodes), run.device)
    logits, labels = outputs.pooled()
    oracle = TemperatureScaler().fit(logits, labels).temperature_
    rows = [("none (T = 1)", 1.0), ("checkpoint's, fitted on val", ckpt.temperature), ("oracle, fitted on these test cases", oracle)]
    print(f"{ckpt.meta['method']['name']} on {proto.name}: {episodes} {proto.episodes.way}-way {args.shot}-shot test episodes")
    for name, t in rows:
        probs = softmax(logits / t)
        nll = -np.log(probs[np.arange(len(labels)), labels] + 1e-12).mean()
        print(f"  temperature {name:36s} T = {t:7.3f}  ECE {expected_calibration_error(probs, labels):.3f}  NLL {nll:.3f}")


if __name__ == "__main__":
    main()
