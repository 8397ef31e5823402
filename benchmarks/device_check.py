"""GPU check: every method trains, adapts and evaluates on CUDA, and agrees with the CPU.

Run on a machine with a CUDA GPU (not a test: CI has none)::

    python benchmarks/device_check.py --out /tmp/device-check

For each registered method: a short run of ``medmeta train`` on ``sample_data/`` with
``device="cuda"`` (1 pre-training epoch, a few episodes, 32 px), then ``medmeta adapt`` on
``sample_data/cases`` with the checkpoint on CUDA and on the CPU, and a short ``evaluate`` on
CUDA. Prints, per method, the training time, where the weights ended up, the largest difference
between the CUDA and CPU probabilities of the same cases, and the accuracies; exits 1 when
CUDA is missing or any method fails or disagrees with the CPU by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medmeta.adaptation import adapt  # noqa: E402
from medmeta.evaluation import EvaluationSettings, evaluate_checkpoint  # noqa: E402
from medmeta.methods import list_methods  # noqa: E402
from medmeta.training import TrainConfig, train  # noqa: E402


def check_method(method: str, out: Path, episodes: int, device: str = "cuda") -> dict:
    config = TrainConfig(
        protocol=str(ROOT / "sample_data" / "protocol.yaml"), out=str(out / method), method=method,
        episodes=episodes, pretrain_epochs=1, image_size=32, val_interval=episodes, val_episodes=10,
        calibration_episodes=20, device=device, seed=0,
    )
    started = time.perf_counter()
    result = train(config, quiet=True)
    seconds = time.perf_counter() - started
    cases, labels = ROOT / "sample_data" / "cases", ROOT / "sample_data" / "cases" / "labels.csv"
    on_gpu = adapt(out / method, cases, labels=labels, device=device, stability=False)
    on_cpu = adapt(out / method, cases, labels=labels, device="cpu", stability=False)
    gpu_probs = np.array([c.probabilities for c in on_gpu.cases])
    cpu_probs = np.array([c.probabilities for c in on_cpu.cases])
    evaluation = evaluate_checkpoint(out / method, EvaluationSettings(episodes=20, shot=5), device=device, quiet=True)
    return {
        "method": method,
        "train_seconds": round(seconds, 1),
        "episodes": result.episodes_done,
        "adapt_device": on_gpu.metadata["device"],
        "max_prob_diff_cuda_vs_cpu": float(np.abs(gpu_probs - cpu_probs).max()),
        "adapt_accuracy_cuda": on_gpu.metrics.get("accuracy"),
        "adapt_accuracy_cpu": on_cpu.metrics.get("accuracy"),
        "evaluate_accuracy_cuda": evaluation.summary.accuracy,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--episodes", type=int, default=30)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--device", default="cuda", help="cpu only to dry-run this script")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: nothing to check")
        return 1
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (dry run)"
    print(f"torch {torch.__version__}, {name}")
    rows, failed = [], []
    for method in args.methods or list_methods():
        try:
            row = check_method(method, args.out, args.episodes, args.device)
        except Exception:  # report every method, then fail
            traceback.print_exc()
            failed.append(method)
            continue
        rows.append(row)
        if not row["max_prob_diff_cuda_vs_cpu"] <= args.tolerance or row["adapt_device"] != args.device:
            failed.append(method)
        print(json.dumps(row), flush=True)
    (args.out / "device_check.json").write_text(json.dumps({"rows": rows, "failed": failed}, indent=2))
    print("FAILED: " + ", ".join(failed) if failed else f"all {len(rows)} methods OK on CUDA")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
