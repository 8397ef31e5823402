"""Scaling of meta-training over processes: DistributedDataParallel on 1..N GPUs (NCCL) or on
groups of CPU cores (gloo), the episodic step exactly as ``medmeta train --nproc N`` runs it.

    python benchmarks/ddp_scaling.py --nproc 1 --nproc 2                   # CPU: gloo, cores shared out
    python benchmarks/ddp_scaling.py --device cuda --nproc 1 --nproc 2 --nproc 4 --nproc 8   # a process per GPU

For each process count N, ``torchrun --standalone --nproc-per-node N`` runs this file's worker.
Every process builds medmeta's conv4 method (``--method``, default ProtoNet) as the episodic loop
trains it (the training memory layout of the device, the ``auto`` precision's autocast with
float32 features, :class:`~medmeta.training.distributed.EpisodeLoss` in DistributedDataParallel)
and times ``--steps`` optimiser steps of a meta-batch of ``--meta-batch`` 5-way 5-shot 15-query
episodes of random images, shared as training shares them: each process backpropagates its
``meta_batch / N`` episodes, the gradients all-reduced once, on the last backward. Printed per
N: episodes/s of the whole job (the slowest process's time), the speed-up over one process and
the parallel efficiency (speed-up / N). On the CPU each process has ``cores // N`` threads, as
``medmeta train --nproc`` gives them, so N processes share one machine's cores: the figure shows
the all-reduce's cost there, not more compute. ``--meta-batch`` must be a multiple of every N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAY, SHOT, QUERY = 5, 5, 15


def worker(method: str, size: int, meta_batch: int, steps: int, warmup: int, device_name: str, precision: str) -> dict | None:
    """This process's part of the timed steps; process 0 returns the row, the others ``None``."""
    import torch

    from medmeta.precision import resolve_precision
    from medmeta.training.distributed import Processes, start, stop

    processes = Processes.from_environment()
    device = processes.device(torch.device(device_name))
    start(processes, device)
    precision = resolve_precision(precision, device)
    step = _training_step(method, size, meta_batch // processes.world_size, device, precision, processes)
    seconds = _timed(step, steps, warmup, device, processes)
    stop(processes)
    if not processes.is_main:
        return None
    return {
        "nproc": processes.world_size, "device": device_name, "method": method, "size": size, "precision": precision,
        "meta_batch": meta_batch, "steps": steps, "seconds": seconds, "episodes_per_s": meta_batch * steps / seconds,
        "threads_per_process": torch.get_num_threads(),
    }


def _training_step(method: str, size: int, share: int, device, precision: str, processes):
    """One optimiser step of this process's ``share`` of the meta-batch, as the episodic loop
    runs it: the device's training layout, the precision's autocast, DDP all-reducing once."""
    import torch

    from medmeta.backbones.registry import create_backbone
    from medmeta.device import training_memory_format
    from medmeta.methods.registry import create_method
    from medmeta.precision import autocast, float32_features
    from medmeta.training.distributed import EpisodeLoss, no_sync, wrap

    torch.manual_seed(0)
    learner = create_method(method, create_backbone("conv4"))
    layout = training_memory_format(device, image_ndim=4)
    learner.to(device, memory_format=layout)
    float32_features(learner.backbone, precision)
    model = wrap(EpisodeLoss(learner), processes, device)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    images = torch.randn(WAY * (SHOT + QUERY), 3, size, size).to(device).contiguous(memory_format=layout)
    support_labels = torch.arange(WAY).repeat_interleave(SHOT).to(device)
    query_labels = torch.arange(WAY).repeat_interleave(QUERY).to(device)
    n_support = len(support_labels)

    def step():
        optimizer.zero_grad(set_to_none=True)
        for position in range(share):
            with no_sync(model, last=position == share - 1):
                with autocast(device, precision):
                    loss, _ = model(images[:n_support], support_labels, images[n_support:], query_labels)
                (loss / share).backward()
        optimizer.step()

    return step


def _timed(step, steps: int, warmup: int, device, processes) -> float:
    """Seconds of ``steps`` calls of ``step`` after ``warmup``: the slowest process's, every GPU
    kernel finished."""
    import torch

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if processes.distributed:
            torch.distributed.barrier()

    for _ in range(warmup):
        step()
    synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
    if processes.distributed:
        elapsed = elapsed.to(device) if device.type == "cuda" else elapsed
        torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
    return float(elapsed.item())


def run_scaling(counts: list[int], args) -> list[dict]:
    """One torchrun per process count, in order; each row with its speed-up and efficiency."""
    from medmeta.training.launch import process_environment

    rows = []
    for n in counts:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", __file__, "--_worker",
            "--method", args.method, "--size", str(args.size), "--meta-batch", str(args.meta_batch), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--device", args.device, "--precision", args.precision,
        ]
        env = process_environment(n)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{n} process(es) failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1]))
        base = rows[0]["episodes_per_s"]
        rows[-1]["speedup"] = rows[-1]["episodes_per_s"] / base
        rows[-1]["efficiency"] = rows[-1]["speedup"] * rows[0]["nproc"] / n
        r = rows[-1]
        print(f"{n} process(es) on {args.device}: {r['episodes_per_s']:.2f} episodes/s, x{r['speedup']:.2f} "
              f"(efficiency {100 * r['efficiency']:.0f}%), {r['threads_per_process']} thread(s) each", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, action="append", default=None, help="process counts (repeatable) [default: 1 and 2]")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, a GPU per process)")
    parser.add_argument("--method", default="protonet")
    parser.add_argument("--size", type=int, default=84, help="image side in pixels")
    parser.add_argument("--meta-batch", type=int, default=8, help="episodes per optimiser step, shared by the processes")
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        row = worker(args.method, args.size, args.meta_batch, args.steps, args.warmup, args.device, args.precision)
        if row is not None:
            print(json.dumps(row), flush=True)
        return
    counts = sorted(set(args.nproc or [1, 2]))
    if any(args.meta_batch % n for n in counts):
        raise SystemExit(f"--meta-batch {args.meta_batch} must be a multiple of every --nproc ({counts})")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < max(counts):
            raise SystemExit(f"--device cuda with {max(counts)} processes needs that many GPUs")
    print(f"load average {os.getloadavg()}", flush=True)
    rows = run_scaling(counts, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"load_average": os.getloadavg(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
