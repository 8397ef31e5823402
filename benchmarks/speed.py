"""Speed of meta-training and of ``adapt``, each beside a peer or a physical limit, in one run.

    python benchmarks/speed.py                       # training table, 64 and 84 px, every method
    python benchmarks/speed.py --adapt-cases 1000    # and adapt on 1,000 DICOM files
    python benchmarks/speed.py --only-adapt --adapt-cases 1000 --adapt-cases 10000   # adapt alone, memory growth
    python benchmarks/speed.py --only-adapt --adapt-cases 1000 --adapt-option=--no-saliency   # without the saliency maps
    python benchmarks/speed.py --method protonet --size 84 --steps 20 --json runs/speed.json
    python benchmarks/speed.py --device cuda --no-peer   # the training table on a GPU

**Training** (one row per method, size and precision): episodes/s and images/s of meta-training
steps (forward, backward, Adam step) on 5-way 5-shot 15-query episodes of random tensors, as
:mod:`medmeta.training.episodic` runs them: conv4 in the training memory layout, the precision
under its autocast with float32 features (``auto`` is the shipped default). Beside them, on the same
episode shapes and the same conv4, easyfsl's ``PrototypicalNetworks`` trained as easyfsl's own
loop does (``process_support_set``, ``forward``, cross-entropy, Adam; float32, default layout).
Each row also gives the GFLOP/s the step achieves (its FLOPs counted by torch's
``FlopCounterMode``) against the machine's measured matmul peak (a 2048^3 float32 and bfloat16
``torch.mm``), and the peak resident memory of a process that runs only that row. Rows run one
after another in fresh processes, so nothing shares the cores: keep the machine otherwise idle
and read the load average printed at the top.

**Adapt** (``--adapt-cases N``): N synthetic 16-bit DICOM files (256 x 256) as the query of a
cases folder; ``medmeta adapt``'s cases/s (discovery, decoding, adaptation, diagnosis, reports)
against a bare loop that only decodes the same files with pydicom (``dcmread`` + ``pixel_array``),
and adapt's peak resident memory. Given several N, each runs in a fresh process on the first N of
one set of files, and the marginal rate between the smallest and largest N is printed too: it
leaves out the fixed start (Python, torch, the checkpoint, the support), which dominates a small
batch.

``--device cuda`` runs the training table (and the matmul peak, 8192^3) on the GPU, timed to
the end of each row's last kernel, with each row's peak GPU memory; the default layout (not
``channels_last``) and ``auto`` precision as ``medmeta train`` uses them there. Scaling over
several GPUs or processes: ``benchmarks/ddp_scaling.py``.

easyfsl is a benchmark-only extra: ``pip install --no-deps "easyfsl==1.5.0"``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WAY, SHOT, QUERY = 5, 5, 15
SIZES = (64, 84)


def _episode(size: int, device: str = "cpu"):
    """Random images ``(100, 3, size, size)`` of a 5-way 5-shot 15-query episode, and its
    support and query labels, on ``device``."""
    import torch

    torch.manual_seed(0)
    images = torch.randn(WAY * (SHOT + QUERY), 3, size, size)
    labels = torch.arange(WAY).repeat_interleave(SHOT), torch.arange(WAY).repeat_interleave(QUERY)
    return images.to(device), labels[0].to(device), labels[1].to(device)


def _easyfsl_step(size: int, device: str = "cpu"):
    """easyfsl's training step: ``process_support_set``, ``forward``, cross-entropy, Adam."""
    import torch
    from torch.nn import functional as F

    from medmeta.backbones.registry import create_backbone

    sys.path.insert(0, str(Path(__file__).parent))
    from easyfsl_peer import prototypical_networks

    images, support_labels, query_labels = _episode(size, device)
    n_support = len(support_labels)
    model = prototypical_networks()(create_backbone("conv4")).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad()
        model.process_support_set(images[:n_support], support_labels)
        F.cross_entropy(model(images[n_support:]), query_labels).backward()
        optimizer.step()

    return step


def _medmeta_step(method: str, size: int, precision: str, device_name: str = "cpu"):
    """medmeta's training step as the episodic loop runs it: the training memory layout, the
    precision's autocast with float32 features, ``episode_loss``, Adam."""
    import torch

    from medmeta.backbones.registry import create_backbone
    from medmeta.device import training_memory_format
    from medmeta.methods.registry import create_method
    from medmeta.precision import autocast, float32_features

    device = torch.device(device_name)
    images, support_labels, query_labels = _episode(size, device_name)
    n_support = len(support_labels)
    learner = create_method(method, create_backbone("conv4"))
    layout = training_memory_format(device, image_ndim=4)
    learner.to(device, memory_format=layout)
    float32_features(learner.backbone, precision)
    batch = images.contiguous(memory_format=layout)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad()
        with autocast(device, precision):
            loss, _ = learner.episode_loss(batch[:n_support], support_labels, batch[n_support:], query_labels)
        loss.backward()
        optimizer.step()

    return step


def _row(kind: str, method: str, size: int, precision: str, steps: int, warmup: int, device: str = "cpu") -> dict:
    """One training row, in this (fresh) process: FLOPs of a step, then the timed steps (on a
    GPU, timed to the end of the last kernel, with the peak GPU memory allocated)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medmeta.allocator import keep_freed_memory
    from medmeta.precision import resolve_precision

    keep_freed_memory()  # as medmeta train does
    resolved = "fp32" if kind == "easyfsl" else resolve_precision(precision, torch.device(device))
    step = _easyfsl_step(size, device) if kind == "easyfsl" else _medmeta_step(method, size, resolved, device)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(warmup):
        step()
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    n_images = WAY * (SHOT + QUERY)
    row = {
        "kind": kind, "method": method, "size": size, "precision": resolved, "device": device, "episodes_per_s": 1 / seconds,
        "images_per_s": n_images / seconds, "gflop_per_step": flops / 1e9, "gflops": flops / seconds / 1e9,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.startswith("cuda"):
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def _synchronize(device: str) -> None:
    """Wait for the GPU's queued kernels (a CUDA call returns before its work is done)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 10, device: str = "cpu") -> float:
    """GFLOP/s of an ``n``^3 matrix product on this machine's cores (or GPU), in ``dtype_name``."""
    import torch

    dtype = getattr(torch, dtype_name)
    if device.startswith("cuda"):
        n, repeats = 8192, 50  # enough work to fill a GPU
    a, b = torch.randn(n, n).to(device, dtype), torch.randn(n, n).to(device, dtype)
    for _ in range(2):
        torch.mm(a, b)
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    _synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9


def _in_fresh_process(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--_row", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"row {args} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def training_table(
    methods: list[str], sizes: list[int], precisions: list[str], steps: int, warmup: int, peer: bool, device: str = "cpu"
) -> list[dict]:
    rows = []
    for size in sizes:
        if peer:
            rows.append(_in_fresh_process("easyfsl", "protonet", str(size), "fp32", str(steps), str(warmup), device))
            _print_row(rows[-1])
        for method in methods:
            for precision in precisions:
                rows.append(_in_fresh_process("medmeta", method, str(size), precision, str(steps), str(warmup), device))
                _print_row(rows[-1])
    return rows


def _print_row(row: dict) -> None:
    name = "easyfsl PrototypicalNetworks" if row["kind"] == "easyfsl" else f"medmeta {row['method']}"
    print(
        f"{name:>30} {row['size']:>4}px {row['precision']:>5} {row['episodes_per_s']:8.2f} ep/s {row['images_per_s']:8.0f} img/s "
        f"{row['gflop_per_step']:7.2f} GFLOP/step {row['gflops']:7.1f} GFLOP/s {row['peak_rss_mib']:7.0f} MiB"
        + (f" (GPU {row['peak_gpu_mib']:.0f} MiB)" if "peak_gpu_mib" in row else ""),
        flush=True,
    )


def write_dicom_cases(folder: Path, n_cases: int, n_support: int = 5) -> Path:
    """A cases folder of 16-bit monochrome DICOM files: 2 conditions x ``n_support`` support
    scans (a bright disc or a dark square on noise) and ``n_cases`` query scans of either."""
    import numpy as np
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256]

    def pixels(kind: int) -> np.ndarray:
        image = rng.normal(800, 60, (256, 256))
        if kind == 0:
            image[(yy - 128) ** 2 + (xx - 128) ** 2 < 50**2] += 900
        else:
            image[80:176, 80:176] -= 500
        return np.clip(image, 0, 4095).astype(np.uint16)

    def write(path: Path, kind: int) -> None:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = "OT", f"P{rng.integers(1e6)}"
        ds.Rows = ds.Columns = 256
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels(kind).tobytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        pydicom.dcmwrite(path, ds, enforce_file_format=True)

    for kind, name in enumerate(("disc", "square")):
        for i in range(n_support):
            write(folder / "support" / name / f"s{i}.dcm", kind)
    for i in range(n_cases):
        write(folder / "query" / f"case{i:05d}.dcm", i % 2)
    return folder


def bare_decode_rate(files: list[Path]) -> float:
    """Files/s of a loop that only reads each file with pydicom and decodes its pixels."""
    import pydicom

    started = time.perf_counter()
    for path in files:
        pydicom.dcmread(path).pixel_array
    return len(files) / (time.perf_counter() - started)


def adapt_rates(counts: list[int], checkpoint: str | None, options: list[str] | None = None) -> list[dict]:
    """``medmeta adapt`` on ``n`` synthetic DICOM cases for each ``n`` of ``counts`` (hard links
    to one set of files), each in a fresh process: its wall time, cases/s and peak RSS, beside
    the bare pydicom loop's files/s on the same files. With two counts or more, the marginal
    rate between the smallest and the largest leaves out what does not grow with the batch
    (starting Python and torch, loading the checkpoint, reading the support). ``options`` are
    passed to ``medmeta adapt`` (e.g. ``--no-saliency``)."""
    with tempfile.TemporaryDirectory(prefix="medmeta-speed-") as tmp:
        tmp = Path(tmp)
        full = write_dicom_cases(tmp / "all", max(counts))
        files = sorted((full / "query").iterdir())
        bare = bare_decode_rate(files[: min(counts)])
        if checkpoint is None:
            checkpoint = str(tmp / "run")
            subprocess.run(
                [sys.executable, "-m", "medmeta.cli", "-q", "train", "--config", "sample_data/demo-budget.yaml",
                 "--out", checkpoint], check=True,
            )
        rows = []
        for n in counts:
            cases = tmp / f"cases{n}"
            shutil.copytree(full / "support", cases / "support")
            (cases / "query").mkdir()
            for path in files[:n]:
                os.link(path, cases / "query" / path.name)
            command = [sys.executable, "-m", "medmeta.cli", "-q", "adapt", "--checkpoint", checkpoint, "--cases", str(cases),
                       "--out", str(tmp / f"report{n}"), *(options or [])]
            started = time.perf_counter()
            child = subprocess.Popen(command)
            _, status, usage = os.wait4(child.pid, 0)  # this child's own peak memory
            seconds = time.perf_counter() - started
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit("adapt failed (its error is above)")
            rows.append({"cases": n, "bare_decode_per_s": bare, "adapt_seconds": seconds, "adapt_cases_per_s": n / seconds,
                         "adapt_share_of_bare": n / seconds / bare, "adapt_peak_rss_mib": usage.ru_maxrss / 1024})
            shutil.rmtree(cases)
            shutil.rmtree(tmp / f"report{n}")
        if len(rows) > 1:
            first, last = rows[0], rows[-1]
            marginal = (last["cases"] - first["cases"]) / (last["adapt_seconds"] - first["adapt_seconds"])
            for row in rows:
                row["marginal_cases_per_s"] = marginal
                row["marginal_share_of_bare"] = marginal / bare
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", action="append", default=None, help="methods (repeatable) [default: all]")
    parser.add_argument("--size", type=int, action="append", default=None, help="image sides (repeatable) [default: 64 and 84]")
    parser.add_argument("--precision", action="append", default=None, help="precisions (repeatable) [default: fp32 and auto]")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true", help="leave out easyfsl")
    parser.add_argument("--adapt-cases", type=int, action="append", default=None,
                        help="also time adapt on this many DICOM cases (repeatable: e.g. 1000 and 10000 for memory growth)")
    parser.add_argument("--only-adapt", action="store_true", help="leave out the training table")
    parser.add_argument("--adapt-option", action="append", default=None,
                        help="an option for medmeta adapt, e.g. --adapt-option=--no-saliency (repeatable)")
    parser.add_argument("--checkpoint", default=None, help="run folder for adapt [default: train the demo budget on sample_data]")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the training table runs [default: cpu]")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--_row", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._row:
        kind, method, size, precision, steps, warmup, device = args._row
        print(json.dumps(_row(kind, method, int(size), precision, int(steps), int(warmup), device)))
        return

    import torch

    from medmeta.methods import list_methods
    from medmeta.precision import cpu_has_native_bf16

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}, "
          f"native bfloat16: {cpu_has_native_bf16()}")
    report: dict = {"load_average": os.getloadavg()}
    if not args.only_adapt:
        report.update(_training_report(args, list_methods))
    if args.adapt_cases:
        report["adapt"] = adapt_rates(sorted(args.adapt_cases), args.checkpoint, args.adapt_option)
        for a in report["adapt"]:
            print(f"adapt on {a['cases']} DICOM cases: {a['adapt_seconds']:.1f} s, {a['adapt_cases_per_s']:.1f} cases/s "
                  f"({100 * a['adapt_share_of_bare']:.0f}% of bare pydicom's {a['bare_decode_per_s']:.0f} files/s), "
                  f"peak RSS {a['adapt_peak_rss_mib']:.0f} MiB")
        if "marginal_cases_per_s" in report["adapt"][0]:
            a = report["adapt"][0]
            print(f"adapt, marginal rate: {a['marginal_cases_per_s']:.1f} cases/s ({100 * a['marginal_share_of_bare']:.0f}% of bare)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))


def _training_report(args, list_methods) -> dict:
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU here")
        print(f"GPU: {torch.cuda.get_device_name()}", flush=True)
    peaks = {name: matmul_peak(name, device=args.device) for name in ("float32", "bfloat16")}
    print(f"matmul peak ({args.device}): float32 {peaks['float32']:.0f} GFLOP/s, bfloat16 {peaks['bfloat16']:.0f} GFLOP/s", flush=True)
    rows = training_table(args.method or list_methods(), args.size or list(SIZES), args.precision or ["fp32", "auto"],
                          args.steps, args.warmup, peer=not args.no_peer, device=args.device)
    for row in rows:
        row["share_of_matmul_peak"] = row["gflops"] / peaks["bfloat16" if row["precision"] == "bf16" else "float32"]
    for size in sorted({r["size"] for r in rows}):
        peer = [r for r in rows if r["size"] == size and r["kind"] == "easyfsl"]
        ours = [r for r in rows if r["size"] == size and r["method"] == "protonet" and r["kind"] == "medmeta"]
        for row in ours if peer else []:
            print(f"{size}px: medmeta ProtoNet ({row['precision']}) {row['images_per_s'] / peer[0]['images_per_s']:.2f}x easyfsl's images/s")
    return {"matmul_peak_gflops": peaks, "training": rows}


if __name__ == "__main__":
    main()
