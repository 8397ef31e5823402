"""How long the command line takes to answer before any real work: ``medmeta --help``,
``medmeta train --help``, ``medmeta --version`` and an argument error (median of 5 runs each, in
fresh processes), and whether importing the command line loads torch or MONAI.

    python benchmarks/cli_startup.py [--runs 5] [--limit 2.0]

The target (issue 9) is under 2 s each; the script exits 1 when a median is over ``--limit``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "medmeta --help": (["--help"], 0),
    "medmeta train --help": (["train", "--help"], 0),
    "medmeta --version": (["--version"], 0),
    "medmeta train --no-such-option (argument error)": (["train", "--no-such-option"], 2),
}

_HEAVY_PROBE = (
    "import sys, medmeta.cli.main; "
    "print(' '.join(m for m in ('torch', 'monai') if m in sys.modules) or 'none')"
)


def medmeta_command() -> list[str]:
    """The installed ``medmeta`` script beside this Python, else ``python -m medmeta.cli.main``."""
    script = Path(sys.executable).with_name("medmeta")
    if script.is_file():
        return [str(script)]
    found = shutil.which("medmeta")
    return [found] if found else [sys.executable, "-m", "medmeta.cli.main"]


def time_run(command: list[str], expected_code: int) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=None)
    elapsed = time.perf_counter() - start
    if done.returncode != expected_code:
        raise SystemExit(
            f"{' '.join(command)} exited {done.returncode}, expected {expected_code}:\n{done.stdout}{done.stderr}"
        )
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per case (the median is reported)")
    parser.add_argument("--limit", type=float, default=2.0, help="seconds a median may take")
    args = parser.parse_args()

    base = medmeta_command()
    print(f"command: {' '.join(base)}  ({args.runs} runs each, median; Python {sys.version.split()[0]})")
    over = []
    for label, (arguments, code) in CASES.items():
        times = [time_run(base + arguments, code) for _ in range(args.runs)]
        median = statistics.median(times)
        flag = "" if median < args.limit else f"  OVER {args.limit:.1f} s"
        print(f"  {label:<50} median {median:6.2f} s  (min {min(times):.2f}, max {max(times):.2f}){flag}")
        if median >= args.limit:
            over.append(label)
    heavy = subprocess.run([sys.executable, "-c", _HEAVY_PROBE], capture_output=True, text=True)
    print(f"  heavy modules loaded by `import medmeta.cli.main`: {heavy.stdout.strip() or heavy.stderr.strip()}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
