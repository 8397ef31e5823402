"""The per-protocol table of issue 11: head x transductive refinement x normalisation, with the
shipped calibration defaults, over one or more trained runs (seeds), beside the easyfsl peer.

    python benchmarks/heads_table.py runs/derm-s0 runs/derm-s1 runs/derm-s2 \\
        --config default --config method --config prototype --config logistic --config finetune \\
        --config prototype+soft_kmeans --config prototype+alpha_tim --shot 5 --shot 1 \\
        --peer runs/peer-derm --out runs/derm-table.json

A config is ``HEAD`` or ``HEAD+REFINER``; ``default`` is each checkpoint's stored default head.
Normalisation follows from the head: ``method`` is the trained method's own adaptation on raw
embeddings (ProtoNet: nearest class mean, squared Euclidean), every other head works on the
checkpoint's stored normalisation (centring on the meta-train mean, then L2). The test episodes
are the protocol's, seeded by ``--eval-seed`` alone, so every row and every seed sees the same
episodes. Results are kept in ``--out`` as they come, and a rerun skips what is there, so an
interrupted table resumes. With several runs, each figure is the mean over runs with the
standard deviation over runs (``±``); with one, accuracy carries its 95% CI over episodes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from medmeta.evaluation import EvaluationSettings, evaluate_checkpoint
from medmeta.io import atomic_write_json

#: What the table shows of each evaluation (the evaluation JSON's keys).
FIELDS = ("accuracy", "accuracy_ci95", "macro_auc", "ece_after", "coverage", "mean_set_size", "singleton_rate", "referral_rate")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="trained run folders (one per seed)")
    parser.add_argument("--config", action="append", default=None, help="HEAD or HEAD+REFINER, or default (repeatable)")
    parser.add_argument("--shot", type=int, action="append", default=None, help="test shots [default: 5]")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--peer", action="append", default=[], help="easyfsl_peer.py output folder(s) (peer.json)")
    parser.add_argument("--out", required=True, help="JSON file of the results (resumed when it exists)")
    return parser.parse_args()


def split_config(config: str) -> tuple[str | None, str | None]:
    head, _, refiner = config.partition("+")
    return (None if head == "default" else head), (refiner or None)


def measure(runs: list[str], configs: list[str], shots: list[int], episodes: int, eval_seed: int, out: Path) -> dict:
    results = json.loads(out.read_text()) if out.is_file() else {}
    for config in configs:
        head, refiner = split_config(config)
        for shot in shots:
            for run in runs:
                key = f"{config}|{shot}|{run}"
                if key in results:
                    continue
                started = time.perf_counter()
                settings = EvaluationSettings(shot=shot, episodes=episodes, seed=eval_seed, head=head, transductive=refiner)
                record = evaluate_checkpoint(run, settings, quiet=True).to_dict()
                results[key] = {**{f: record.get(f) for f in FIELDS}, "head": record["head"], "seconds": time.perf_counter() - started}
                atomic_write_json(out, results)
                print(f"{config:>24} {shot}-shot {run}: {100 * record['accuracy']:.1f}% "
                      f"({results[key]['seconds']:.0f} s)", flush=True)
    return results


def _cell(values: list[float | None], scale: float = 1.0, digits: int = 3, ci: float | None = None) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = scale * statistics.fmean(values)
    if len(values) > 1:
        return f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"
    return f"{mean:.{digits}f}" + (f" ± {scale * ci:.{digits}f}" if ci is not None else "")


def table(results: dict, runs: list[str], configs: list[str], shots: list[int], peers: list[str]) -> str:
    spread = "sd over runs" if len(runs) > 1 else "95% CI over episodes"
    lines = [
        f"| head | transductive | normalisation | shot | accuracy % ({spread}) | macro AUC | ECE | coverage | set size | single-condition sets | referred |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config in configs:
        _, refiner = split_config(config)
        for shot in shots:
            rows = [results[k] for k in (f"{config}|{shot}|{run}" for run in runs) if k in results]
            if not rows:
                continue
            heads = sorted({r["head"] for r in rows})
            name = "/".join(heads) if config != "default" else f"default ({'/'.join(heads)})"
            norm = "none (raw)" if heads == ["method"] else "centre + L2" if "method" not in heads else "per run (method: none)"
            col = {f: [r[f] for r in rows] for f in FIELDS}
            ci = rows[0]["accuracy_ci95"] if len(rows) == 1 else None
            lines.append(
                f"| {name} | {refiner or '-'} | {norm} | {shot} | {_cell(col['accuracy'], 100, 1, ci)} | {_cell(col['macro_auc'])} | "
                f"{_cell(col['ece_after'])} | {_cell(col['coverage'])} | {_cell(col['mean_set_size'], digits=2)} | "
                f"{_cell(col['singleton_rate'], 100, 1)}% | {_cell(col['referral_rate'], 100, 1)}% |"
            )
    for shot in shots:
        tests = [json.loads((Path(p) / "peer.json").read_text())["test"].get(f"{shot}-shot") for p in peers]
        tests = [t for t in tests if t]
        if tests:
            ci = tests[0]["accuracy_ci95"] if len(tests) == 1 else None
            lines.append(
                f"| easyfsl PrototypicalNetworks{' (one run, ± 95% CI)' if len(tests) == 1 else ''} | - | none (raw) | {shot} | {_cell([t['accuracy'] for t in tests], 100, 1, ci)} | "
                f"{_cell([t['macro_auc'] for t in tests])} | {_cell([t['ece'] for t in tests])} (no temperature) | - | - | - | - |"
            )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    configs = args.config or ["default"]
    shots = args.shot or [5]
    out = Path(args.out)
    results = measure(args.runs, configs, shots, args.episodes, args.eval_seed, out)
    print()
    print(table(results, args.runs, configs, shots, args.peer))


if __name__ == "__main__":
    main()
