"""The peer row: easyfsl's PrototypicalNetworks, trained and tested on medmeta's own episodes.

easyfsl (Bennequin, github.com/sicara/easyfsl) is a benchmark-only extra. Its
``easyfsl.methods`` package imports torchvision (for FEAT's backbone), which does not import
beside a CPU build of torch from PyPI; this script loads only the two modules
PrototypicalNetworks needs, so install it without its dependencies:

    pip install --no-deps "easyfsl==1.5.0"
    python benchmarks/easyfsl_peer.py ../shared/protocols/derm-rare.yaml --episodes 3000 --out runs/easyfsl-derm

For a 3D protocol (``episodes.spatial_dims: 3``, e.g. ct-fracture-3d) the backbone is
medmeta's conv4 built with ``spatial_dims=3`` (a 3D Conv-4: 3x3x3 convolutions, 2x2x2 pooling)
on single-channel volumes, with the 3D ``light`` augmentation:

    python benchmarks/easyfsl_peer.py ../shared/protocols/ct-fracture-3d.yaml --image-size 28 --hidden 32 \
        --episodes 600 --out runs/easyfsl-ct3d

The backbone is medmeta's conv4 (the same architecture as medmeta's rows), trained from scratch
by episodic training only (Adam 1e-3, the training shot, 15 queries per class), as in easyfsl's
tutorial, with medmeta's ``light`` augmentation; a fixed number of episodes (or
``--max-minutes``), so a loaded machine changes the time, not the work. Test: the protocol's
test classes, the same seeded episodes ``medmeta evaluate --seed`` draws (every shot of the
protocol), with accuracy (95% CI), macro AUC and ECE of the softmax over easyfsl's logits.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from medmeta.backbones import create_backbone
from medmeta.calibration import expected_calibration_error, softmax
from medmeta.data.augment import Augmenter
from medmeta.data.episodes import EpisodeSampler
from medmeta.data.protocol import load_protocol
from medmeta.data.reading import Preprocessing, ScanReader
from medmeta.data.store import ImageStore
from medmeta.evaluation import EpisodeOutputs, episode_task, summarize
from medmeta.io import atomic_write_json
from medmeta.pipeline import Logits


def prototypical_networks():
    """easyfsl's ``PrototypicalNetworks`` class, without running ``easyfsl.methods/__init__``."""
    spec = importlib.util.find_spec("easyfsl")
    if spec is None or spec.origin is None:
        raise SystemExit('easyfsl is not installed: pip install --no-deps "easyfsl==1.5.0"')
    if "easyfsl.methods" not in sys.modules:
        package = types.ModuleType("easyfsl.methods")
        package.__path__ = [str(Path(spec.origin).parent / "methods")]
        sys.modules["easyfsl.methods"] = package
    from easyfsl.methods.prototypical_networks import PrototypicalNetworks

    return PrototypicalNetworks


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("protocol")
    parser.add_argument("--out", required=True, help="folder for peer.json")
    parser.add_argument("--episodes", type=int, default=3000)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop training earlier at this much training time")
    parser.add_argument("--shot", type=int, default=None, help="training shot [default: the protocol's largest]")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64, help="conv4 width (medmeta's 3D rows use 32)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--eval-episodes", type=int, default=None)
    return parser.parse_args()


def train(model, store, sampler, augment, args) -> dict:
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.train()
    started, done = time.perf_counter(), 0
    for index in range(args.episodes):
        if args.max_minutes is not None and time.perf_counter() - started > args.max_minutes * 60:
            break
        ep = sampler.episode(index)
        support = augment(store.stack(ep.support), step=2 * index)
        query = augment(store.stack(ep.query), step=2 * index + 1)
        model.process_support_set(support, ep.support_labels)
        loss = F.cross_entropy(model(query), ep.query_labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        done += 1
        if done % 250 == 0:
            print(f"episode {done}: loss {loss.item():.3f}, {done / (time.perf_counter() - started):.2f} episodes/s", flush=True)
    seconds = time.perf_counter() - started
    return {"episodes": done, "seconds": seconds, "episodes_per_second": done / max(seconds, 1e-9)}


@torch.no_grad()
def test(model, store, sampler, n_episodes: int) -> dict:
    model.eval()
    outputs = EpisodeOutputs()
    for index in range(n_episodes):
        task = episode_task(store, sampler, index)
        model.process_support_set(task.support_images, task.support_labels)
        logits = model(task.query_images).double()
        outputs.append(Logits(logits.numpy(), np.full(len(logits), np.nan)), task)
    summary = summarize(outputs)
    pooled_logits, labels = outputs.pooled()
    return {"accuracy": summary.accuracy, "accuracy_ci95": summary.accuracy_ci95, "macro_auc": summary.macro_auc,
            "ece": expected_calibration_error(softmax(pooled_logits), labels), "episodes": n_episodes}


def main() -> None:
    args = parse_args()
    PrototypicalNetworks = prototypical_networks()
    protocol = load_protocol(args.protocol)
    ep = protocol.episodes
    shot = args.shot or max(ep.shot)
    dims = protocol.spatial_dims
    channels = 1 if dims == 3 else 3
    store = ImageStore(ScanReader(Preprocessing(image_size=args.image_size, channels=channels, spatial_dims=dims)))
    torch.manual_seed(args.seed)
    model = PrototypicalNetworks(create_backbone("conv4", in_channels=channels, spatial_dims=dims, hidden=args.hidden))
    train_sampler = EpisodeSampler(protocol.split_records("train"), ep.way, shot, ep.query, args.seed)
    report = {"protocol": protocol.name, "args": vars(args), "training": train(model, store, train_sampler, Augmenter("light", args.seed, spatial_dims=dims), args)}
    report["test"] = {}
    for test_shot in ep.shot:
        sampler = EpisodeSampler(protocol.split_records("test"), ep.way, test_shot, ep.query, args.eval_seed)
        report["test"][f"{test_shot}-shot"] = test(model, store, sampler, args.eval_episodes or ep.test_episodes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "peer.json", report)
    t = report["training"]
    print(f"\n{protocol.name}: easyfsl PrototypicalNetworks, {dims}D conv4-{args.hidden} at {args.image_size}px, "
          f"{t['episodes']} episodes in {t['seconds'] / 60:.1f} min ({t['episodes_per_second']:.2f}/s)")
    for name, s in report["test"].items():
        print(f"{name:>7} {100 * s['accuracy']:5.1f}% ± {100 * s['accuracy_ci95']:.1f}  AUC {s['macro_auc']:.3f}  ECE {s['ece']:.3f}")
    print(json.dumps({k: round(v["accuracy"], 4) for k, v in report["test"].items()}))


if __name__ == "__main__":
    main()
