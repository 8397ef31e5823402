"""Print a Markdown table of the benchmark.json files of several runs (accuracy, AUC, ECE).

    python benchmarks/summarize.py runs/derm-rare runs/fomaml runs/anil runs/maml runs/matching runs/mann
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(runs: list[str]) -> None:
    print("| method | shot | episodes | accuracy (95% CI) | macro AUC | ECE before | ECE after | training |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        path = Path(run) / "benchmark.json"
        if not path.is_file():
            print(f"| {run} | | | (no benchmark.json) | | | | |")
            continue
        report = json.loads(path.read_text())
        method = report["args"]["method"]
        training = report.get("training", {})
        trained = f"{training.get('episodes_done', '?')} episodes, {training.get('episodes_per_second', 0):.2f}/s"
        for shot, s in report["test"].items():
            print(
                f"| {method} | {shot} | {s['episodes']} | {100 * s['accuracy']:.1f}% ± {100 * s['accuracy_ci95']:.1f} | "
                f"{s['macro_auc']:.3f} | {s['ece_before']:.3f} | {s['ece_after']:.3f} | {trained} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
