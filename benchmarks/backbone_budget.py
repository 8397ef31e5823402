"""What a training budget buys per backbone and image size: pre-training images/s on this machine.

Times full pre-training steps (forward, cross-entropy, backward, SGD step) of each backbone at
each image size on random batches, and prints images/s, the epochs of a meta-train set of
``--train-images`` that ``--budget-minutes`` allow, and the parameter count:

    python benchmarks/backbone_budget.py --backbone conv4 --backbone resnet12 --size 64 --size 84

Fixed step counts (``--steps``, after ``--warmup`` untimed ones), so a loaded machine gives
lower rates but the same work; the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn
from torch.nn import functional as F

from medmeta.backbones import create_backbone


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", action="append", default=None)
    parser.add_argument("--size", type=int, action="append", default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--train-images", type=int, default=4606, help="meta-train images (derm-rare: 4,606)")
    parser.add_argument("--budget-minutes", type=float, default=30.0)
    return parser.parse_args()


def images_per_second(name: str, size: int, args: argparse.Namespace) -> tuple[float, int]:
    torch.manual_seed(0)
    backbone = create_backbone(name)
    head = nn.Linear(backbone.num_features, args.classes)
    params = list(backbone.parameters()) + list(head.parameters())
    optimiser = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    images = torch.rand(args.batch_size, 3, size, size)
    labels = torch.randint(0, args.classes, (args.batch_size,))

    def step() -> None:
        loss = F.cross_entropy(head(backbone(images)), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    for _ in range(args.warmup):
        step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = time.perf_counter() - started
    return args.steps * args.batch_size / elapsed, sum(p.numel() for p in backbone.parameters())


def main() -> None:
    args = parse_args()
    print(f"threads {torch.get_num_threads()}, load average before {os.getloadavg()[0]:.2f}")
    print(f"{'backbone':>10} {'size':>5} {'params':>10} {'images/s':>9} {'epochs in budget':>17}")
    for name in args.backbone or ["conv4", "resnet12"]:
        for size in args.size or [64, 84]:
            rate, n_params = images_per_second(name, size, args)
            epochs = rate * args.budget_minutes * 60 / args.train_images
            print(f"{name:>10} {size:>5} {n_params:>10,} {rate:9.1f} {epochs:17.1f}")
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
