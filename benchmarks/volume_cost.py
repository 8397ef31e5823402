"""Cost of 3D training: episodes/s and peak memory of meta-training on volumes at 28^3 and 64^3.

For each method and cube side, a fresh child process builds the learner as ``medmeta train``
builds it for a volume protocol (conv4 with ``spatial_dims=3``, one channel, the method's
backbone defaults, the CPU's ``channels_last_3d`` layout), then runs 3-way 5-shot 15-query
episodes (60 volumes each, augmented with the 3D ``light`` transforms, ``episode_loss`` +
``backward`` + Adam step, as in the training loop). It prints the median seconds per episode
of ``--repeats`` episodes after one untimed one, volumes/s, and the child's **peak resident
memory** (``ru_maxrss``: the whole process, torch and Python included, from a fresh start), so
the numbers at two sizes compare like with like. The same is printed for 2D conv4 on 28 and
64-pixel single-channel images as the physical reference: the same work per pixel in 2D.

    python benchmarks/volume_cost.py                          # a few minutes on 2 CPU cores
    python benchmarks/volume_cost.py --sizes 28 --repeats 2   # quick check
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def measure(method: str, dims: int, size: int, hidden: int, repeats: int) -> dict:
    """One configuration, in this process (called in a child)."""
    import torch

    from medmeta.backbones import create_backbone
    from medmeta.data.augment import Augmenter
    from medmeta.device import training_memory_format
    from medmeta.methods import create_method
    from medmeta.methods.registry import METHODS

    torch.manual_seed(0)
    defaults = dict(getattr(METHODS.get(method), "backbone_defaults", {}))
    backbone = create_backbone("conv4", in_channels=1, spatial_dims=dims, hidden=hidden, **defaults)
    learner = create_method(method, backbone).train()
    layout = training_memory_format(torch.device("cpu"), image_ndim=2 + dims)
    learner.to(memory_format=layout)
    optimiser = torch.optim.Adam(learner.parameters(), lr=1e-3)
    augment = Augmenter("light", seed=0, spatial_dims=dims)
    shape = (1,) + (size,) * dims
    way, shot, query = 3, 5, 15
    support_labels = torch.arange(way).repeat_interleave(shot)
    query_labels = torch.arange(way).repeat_interleave(query)
    times = []
    for step in range(repeats + 1):
        support = torch.rand(way * shot, *shape)
        queries = torch.rand(way * query, *shape)
        started = time.perf_counter()
        xs = augment(support, 2 * step).to(memory_format=layout)
        xq = augment(queries, 2 * step + 1).to(memory_format=layout)
        loss, _ = learner.episode_loss(xs, support_labels, xq, query_labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step:
            times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    return {
        "method": method, "dims": dims, "size": size, "hidden": hidden, "seconds_per_episode": seconds,
        "episodes_per_second": 1 / seconds, "volumes_per_second": way * (shot + query) / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["protonet", "fomaml"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[28, 64])
    parser.add_argument("--hidden", type=int, default=32, help="conv4 width (the 3D benchmark rows use 32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, dims, size, hidden = args.child
        print(json.dumps(measure(method, int(dims), int(size), int(hidden), args.repeats)))
        return
    print(f"{'method':<10}{'input':>12}{'s/episode':>11}{'episodes/s':>12}{'volumes/s':>11}{'peak RSS':>11}")
    for method in args.methods:
        for dims in (3, 2):
            for size in args.sizes:
                command = [sys.executable, __file__, "--repeats", str(args.repeats), "--child", method, str(dims), str(size), str(args.hidden)]
                row = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
                shape = "x".join([str(size)] * dims)
                print(f"{method:<10}{shape:>12}{row['seconds_per_episode']:>11.3f}{row['episodes_per_second']:>12.2f}"
                      f"{row['volumes_per_second']:>11.1f}{row['peak_rss_mib']:>8.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
