"""Transductive refiners against the inductive baseline, by batch composition and shot.

For every refiner (``medmeta.transductive``), batch composition and shot, the script samples the
same seeded episodes, refines, and prints the mean query accuracy +- 95% CI (1.96 standard errors
over episodes), the mean recall of the worst-recognised class present in the batch, and the time
per episode. Default: synthetic Gaussian embeddings (a fresh set of class means per episode,
isotropic noise, then L2-normalised), 3-way, 30 query cases, 300 episodes per cell (about
1.5 CPU-minutes on one core; `--episodes 500` for the table in docs/transductive.md):

    python benchmarks/transductive_imbalance.py
    python benchmarks/transductive_imbalance.py --embeddings feats.npz --episodes 1000

``--embeddings FILE.npz`` samples episodes from real embeddings instead: arrays ``features (n, d)``
and ``labels (n,)``, optionally ``base_mean (d,)`` (the mean embedding of the meta-train classes,
subtracted before L2-normalising, as SimpleShot does; without it the mean of ``features`` is used).
Support and query cases are disjoint within an episode; the file carries no patient ids, so cases of
one patient may fall on both sides.

Compositions (query proportions per class; with ``--way 3`` the default list):
``balanced``, ``80/10/10``, ``60/30/10``, ``absent`` (one class has no query case, the rest equal),
``shifted`` (balanced, and every query embedding is offset by one common random vector before
normalising, as with another scanner; synthetic only), ``tiny`` (3 query cases with classes drawn
uniformly at random).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmeta.transductive import create_refiner  # noqa: E402

DEFAULT_REFINERS = ["inductive", "soft_kmeans", "bd_cspn", "bd_cspn:shift=False", "tim_gd", "alpha_tim"]
DEFAULT_COMPOSITIONS = ["balanced", "80/10/10", "60/30/10", "absent", "shifted", "tiny"]


@dataclass
class Episode:
    support: torch.Tensor  # (n_support, d), normalised
    support_labels: torch.Tensor  # (n_support,)
    query: torch.Tensor  # (n_query, d), normalised
    query_labels: torch.Tensor  # (n_query,)


def query_counts(composition: str, way: int, n_query: int, rng: np.random.Generator) -> np.ndarray:
    """``(way,)`` number of query cases per class for a composition name."""
    if composition in ("balanced", "shifted"):
        props = np.full(way, 1.0 / way)
    elif composition == "absent":
        props = np.r_[np.full(way - 1, 1.0 / (way - 1)), 0.0]
    elif composition == "tiny":
        return np.bincount(rng.integers(0, way, size=3), minlength=way)
    else:
        props = np.array([float(p) for p in composition.split("/")])
        if len(props) != way:
            raise SystemExit(f"composition {composition!r} has {len(props)} classes, --way is {way}")
        props = props / props.sum()
    exact = props * n_query
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n_query - counts.sum()]:  # largest remainder
        counts[i] += 1
    return counts


def normalise(x: np.ndarray, mean: np.ndarray | None = None) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x, dtype=np.float32))
    if mean is not None:
        t = t - torch.from_numpy(np.asarray(mean, dtype=np.float32))
    return F.normalize(t, dim=1)


def synthetic_episode(args, composition: str, shot: int, seed: int) -> Episode:
    rng = np.random.default_rng(seed)
    counts = query_counts(composition, args.way, args.query, rng)
    means = rng.standard_normal((args.way, args.dim))  # a new set of conditions per episode
    s_lab = np.repeat(np.arange(args.way), shot)
    q_lab = np.repeat(np.arange(args.way), counts)
    support = means[s_lab] + args.noise * rng.standard_normal((len(s_lab), args.dim))
    query = means[q_lab] + args.noise * rng.standard_normal((len(q_lab), args.dim))
    if composition == "shifted":
        offset = rng.standard_normal(args.dim)
        query = query + args.shift * offset / np.linalg.norm(offset) * np.sqrt(args.dim)
    return Episode(normalise(support), torch.from_numpy(s_lab), normalise(query), torch.from_numpy(q_lab))


class RealEpisodes:
    def __init__(self, path: str):
        data = np.load(path)
        self.features = np.asarray(data["features"], dtype=np.float64)
        self.labels = np.asarray(data["labels"])
        if self.features.ndim != 2 or self.labels.shape != (len(self.features),):
            raise SystemExit(f"{path}: need features (n, d) and labels (n,)")
        self.mean = np.asarray(data["base_mean"]) if "base_mean" in data.files else self.features.mean(0)
        self.by_class = {c: np.flatnonzero(self.labels == c) for c in np.unique(self.labels)}

    def episode(self, args, composition: str, shot: int, seed: int) -> Episode:
        rng = np.random.default_rng(seed)
        counts = query_counts(composition, args.way, args.query, rng)
        # classes sorted by need: the class with the most query cases needs the most examples
        need = np.sort(counts)[::-1] + shot
        chosen: list = []
        for n in need:
            pool = [c for c, idx in self.by_class.items() if len(idx) >= n and c not in chosen]
            if not pool:
                raise SystemExit(f"no class left with {n} embeddings for {composition!r}, {shot}-shot")
            chosen.append(pool[rng.integers(len(pool))])
        order = np.argsort(counts)[::-1]  # class position i gets chosen[rank of i]
        s_idx, s_lab, q_idx, q_lab = [], [], [], []
        for rank, pos in enumerate(order):
            idx = rng.permutation(self.by_class[chosen[rank]])
            s_idx += list(idx[:shot])
            s_lab += [pos] * shot
            q_idx += list(idx[shot : shot + counts[pos]])
            q_lab += [pos] * counts[pos]
        return Episode(
            normalise(self.features[s_idx], self.mean),
            torch.tensor(s_lab, dtype=torch.int64),
            normalise(self.features[q_idx], self.mean),
            torch.tensor(q_lab, dtype=torch.int64),
        )


def parse_value(text: str):
    """``True``/``False``/``None``, an int or a float."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_refiner(spec: str):
    """``name`` or ``name:key=value,key=value`` -> a refiner."""
    name, _, rest = spec.partition(":")
    kwargs = {key: parse_value(value) for key, _, value in (item.partition("=") for item in rest.split(",") if item)}
    return create_refiner(name, **kwargs)


def worst_recall(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return min(float((pred[labels == c] == c).float().mean()) for c in labels.unique())


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=300, help="episodes per cell [300]")
    parser.add_argument("--way", type=int, default=3)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--query", type=int, default=30, help="query cases per episode [30]")
    parser.add_argument("--refiners", nargs="+", default=DEFAULT_REFINERS, help="name or name:key=value,...")
    parser.add_argument("--compositions", nargs="+", default=None)
    parser.add_argument("--embeddings", default=None, help="FILE.npz with features (n, d), labels (n,)")
    parser.add_argument("--dim", type=int, default=64, help="synthetic embedding dimension [64]")
    parser.add_argument(
        "--noise", type=float, default=2.5, help="synthetic noise std per coordinate; class means ~ N(0, 1) [2.5]"
    )
    parser.add_argument(
        "--shift", type=float, default=2.0, help="norm of the 'shifted' offset, in units of sqrt(dim) [2.0]"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    return parser.parse_args(argv)


def measure(args, refiners, compositions, real) -> tuple[dict, dict]:
    """``{(refiner, composition, shot): (accuracy %, 95% CI, worst-class recall %)}`` and the
    time spent per refiner ``{spec: [seconds, episodes]}``, on the same episodes for every refiner."""
    rows = {}
    timing = {spec: [0.0, 0] for spec, _ in refiners}
    for shot in args.shots:
        for ci, composition in enumerate(compositions):
            accs = {spec: [] for spec, _ in refiners}
            worst = {spec: [] for spec, _ in refiners}
            for e in range(args.episodes):
                seed = args.seed * 1_000_003 + shot * 10_007 + ci * 100_003 + e
                ep = (real.episode(args, composition, shot, seed) if real
                      else synthetic_episode(args, composition, shot, seed))
                for spec, refiner in refiners:
                    t0 = time.perf_counter()
                    logits = refiner.refine(ep.support, ep.support_labels, ep.query, args.way)
                    timing[spec][0] += time.perf_counter() - t0
                    timing[spec][1] += 1
                    pred = logits.argmax(1)
                    accs[spec].append(float((pred == ep.query_labels).float().mean()))
                    worst[spec].append(worst_recall(pred, ep.query_labels))
            for spec, _ in refiners:
                a = np.array(accs[spec]) * 100
                w = np.array(worst[spec]) * 100
                rows[(spec, composition, shot)] = (a.mean(), 1.96 * a.std(ddof=1) / np.sqrt(len(a)), w.mean())
    return rows, timing


def print_table(rows: dict, timing: dict, shots, refiners, compositions) -> None:
    width = max(len(s) for s, _ in refiners)
    for shot in shots:
        print(f"{shot}-shot".ljust(width) + " | " + " | ".join(c.center(21) for c in compositions))
        print("-" * width + "-|-" + "-|-".join("-" * 21 for _ in compositions))
        for spec, _ in refiners:
            cells = []
            for c in compositions:
                m, h, w = rows[(spec, c, shot)]
                cells.append(f"{m:5.1f} +-{h:4.1f} | {w:5.1f}".rjust(21))
            print(spec.ljust(width) + " | " + " | ".join(cells))
        print()
    print("time per episode (ms): " + ", ".join(f"{s} {1000 * t / max(n, 1):.2f}" for s, (t, n) in timing.items()))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    compositions = args.compositions or (
        DEFAULT_COMPOSITIONS if args.way == 3 else ["balanced", "absent", "shifted", "tiny"]
    )
    real = RealEpisodes(args.embeddings) if args.embeddings else None
    if real is not None and "shifted" in compositions:
        compositions = [c for c in compositions if c != "shifted"]
    refiners = [(spec, parse_refiner(spec)) for spec in args.refiners]
    source = f"embeddings {args.embeddings}" if real else (
        f"SYNTHETIC Gaussian embeddings (d={args.dim}, class means ~ N(0, I), noise std {args.noise})"
    )
    print(f"{source}; {args.way}-way, {args.query} query cases, {args.episodes} episodes per cell, seed {args.seed}")
    print("cells: accuracy % +- 95% CI | mean recall of the worst class present %\n")
    rows, timing = measure(args, refiners, compositions, real)
    print_table(rows, timing, args.shots, refiners, compositions)


if __name__ == "__main__":
    main()
