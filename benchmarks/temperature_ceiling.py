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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmeta.calibration import TemperatureScaler, expected_calibration_error, softmax  # noqa: E402
from medmeta.checkpoint import build_learner, load_checkpoint  # noqa: E402
from medmeta.data.episodes import EpisodeSampler  # noqa: E402
from medmeta.data.protocol import load_protocol  # noqa: E402
from medmeta.data.reading import Preprocessing, ScanReader  # noqa: E402
from medmeta.data.store import ImageStore  # noqa: E402
from medmeta.evaluation import run_episodes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--shot", type=int, required=True)
    parser.add_argument("--episodes", type=int, default=None, help="[default: the protocol's test_episodes]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    proto = load_protocol(ckpt.meta["protocol"]["path"])
    episodes = args.episodes or proto.episodes.test_episodes
    learner = build_learner(ckpt)
    store = ImageStore(ScanReader(Preprocessing.from_dict(ckpt.meta["preprocessing"])))
    sampler = EpisodeSampler(proto.split_records("test"), proto.episodes.way, args.shot, proto.episodes.query, args.seed)
    outputs = run_episodes(learner, store, sampler, range(episodes), torch.device("cpu"))
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
