"""Cost of second- vs first-order MAML: time per outer step and peak memory against inner steps.

Conv-4 (3 input channels, GroupNorm, 64 channels) on random 64x64 images, one 3-way 5-shot
15-query episode per outer step (``episode_loss`` + ``backward``, as in the training loop).
For every order and number of inner steps it prints the median time of ``--repeats`` steps
after ``--warmup`` untimed ones, and the peak memory of the step:

- on CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before the step;
- on CPU (process RSS is not a reliable measure of what torch holds), the peak bytes of the
  tensors kept alive by autograd for backward, counted through
  ``torch.autograd.graph.saved_tensors_hooks`` (each storage counted once while any graph node
  holds it). This is the part of memory that grows with the inner steps in second order.

    OMP_NUM_THREADS=1 python benchmarks/maml_cost.py                 # about a minute or two on CPU
    python benchmarks/maml_cost.py --steps 1 --repeats 1 --warmup 0  # quick check
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import medmeta.methods.maml  # noqa: F401  (registration)
from medmeta.backbones import create_backbone
from medmeta.methods import create_method

MIB = 2**20


class SavedTensorMeter:
    """Peak bytes of the storages held by autograd's saved tensors while the context is active."""

    def __init__(self):
        self.live: dict[int, list[int]] = {}  # storage pointer -> [holders, bytes]
        self.current = 0
        self.peak = 0

    def _pack(self, tensor: torch.Tensor):
        return _Held(self, tensor)

    @staticmethod
    def _unpack(held: "_Held") -> torch.Tensor:
        return held.tensor

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class _Held:
    """A saved tensor; counts its storage while some graph node holds it."""

    def __init__(self, meter: SavedTensorMeter, tensor: torch.Tensor):
        # detached: holding a saved *output* with its grad_fn would make a reference cycle
        # (tensor -> node -> this holder -> tensor) that keeps whole graphs alive; autograd
        # re-attaches the grad_fn on unpacking.
        self.meter, self.tensor = meter, tensor.detach()
        storage = tensor.untyped_storage()
        self.key = storage.data_ptr()
        entry = meter.live.setdefault(self.key, [0, storage.nbytes()])
        if entry[0] == 0:
            meter.current += entry[1]
            meter.peak = max(meter.peak, meter.current)
        entry[0] += 1

    def __del__(self):
        entry = self.meter.live.get(self.key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.meter.current -= entry[1]
            del self.meter.live[self.key]


def outer_step(learner, episode) -> None:
    learner.zero_grad(set_to_none=True)
    loss, _ = learner.episode_loss(*episode)
    loss.backward()


def measure(learner, episode, device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """Median seconds per outer step and peak memory (MiB) of one step."""
    for _ in range(warmup):
        outer_step(learner, episode)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        outer_step(learner, episode)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    learner.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        outer_step(learner, episode)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        with SavedTensorMeter() as meter:
            outer_step(learner, episode)
        peak = meter.peak
    return statistics.median(times), peak / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10], help="inner steps to compare [1 5 10]")
    parser.add_argument("--repeats", type=int, default=3, help="timed outer steps per setting [3]")
    parser.add_argument("--warmup", type=int, default=1, help="untimed outer steps first [1]")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--way", type=int, default=3)
    parser.add_argument("--shot", type=int, default=5)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    size = args.image_size
    support = torch.rand(args.way * args.shot, 3, size, size, generator=g).to(device)
    query = torch.rand(args.way * args.query, 3, size, size, generator=g).to(device)
    episode = (
        support,
        torch.arange(args.way).repeat_interleave(args.shot).to(device),
        query,
        torch.arange(args.way).repeat_interleave(args.query).to(device),
    )
    measure_name = (
        "torch.cuda.max_memory_allocated above the step's baseline"
        if device.type == "cuda"
        else "peak bytes of tensors saved for backward (saved_tensors_hooks)"
    )
    print(
        f"MAML cost on {device} ({torch.get_num_threads()} CPU thread(s)): conv4 (3 channels, GroupNorm), "
        f"{size}x{size} images, {args.way}-way {args.shot}-shot {args.query}-query"
    )
    print(f"time: median of {args.repeats} outer step(s) after {args.warmup} warm-up; memory: {measure_name}")
    print(f"{'order':<8} {'inner steps':>11} {'s / step':>10} {'peak MiB':>10}")
    for name, order in (("maml", "second"), ("fomaml", "first")):
        for steps in args.steps:
            torch.manual_seed(0)
            backbone = create_backbone("conv4", in_channels=3, norm_kind="group")
            learner = create_method(name, backbone, inner_steps=steps).to(device).train()
            seconds, peak = measure(learner, episode, device, args.warmup, args.repeats)
            print(f"{order:<8} {steps:>11d} {seconds:>10.3f} {peak:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
