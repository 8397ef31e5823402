"""Embedding normalisations judged on modalities that no protocol uses (issue 11): evidence for a
normaliser that a domain shift could favour, without looking at any protocol's test classes.

Two public sets from ``../shared/datasets`` become class folders of PNG under ``--work``
(outside the project): CT, the axial mid-slice of every OrganMNIST3D volume (11 organs), and
breast ultrasound (BreastMNIST, 2 classes). A protocol there makes the ultrasound classes its
val split and the CT organs its test split. For each trained run, nearest class mean (Euclidean)
on the backbone's embeddings, one column per normalisation, on seeded episodes:

    python benchmarks/normaliser_shift.py runs/e-mri-s2 runs/e-derm-s2 --out runs/normaliser_shift.json

``train``: centring on the checkpoint's meta-train mean, then L2 (the shipped normaliser);
``train+task``: the same, then centring on the episode's support mean and L2 again; ``task``:
centring on the support mean, then L2; ``raw``: the embeddings as they are.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

ORGANS = ["liver", "kidney-right", "kidney-left", "femur-right", "femur-left", "bladder", "heart", "lung-right", "lung-left",
          "spleen", "pancreas"]
BREAST = ["malignant", "benign-normal"]  # BreastMNIST labels 0 and 1
#: ``(split, modality, way)`` of the episodes measured: ultrasound (val, 2 classes) and CT (test).
TASKS = (("val", "ultrasound", 2), ("test", "CT", 4), ("test", "CT", 3))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="trained run folders")
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    parser.add_argument("--work", default="/tmp/medmeta-shift", help="where the PNG class folders and the protocol are written")
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--out", default=None, help="JSON file of the results")
    return parser.parse_args()


def write_shift_protocol(shared: Path, work: Path) -> Path:
    """The PNG class folders and ``shift.yaml`` under ``work`` (made once)."""
    from PIL import Image

    protocol = work / "shift.yaml"
    if protocol.is_file():
        return protocol
    organ = np.load(shared / "organmnist3d" / "organmnist3d.npz")
    breast = np.load(shared / "breastmnist" / "breastmnist.npz")
    for split in ("train", "val", "test"):
        for i, (volume, label) in enumerate(zip(organ[f"{split}_images"], organ[f"{split}_labels"].ravel())):
            folder = work / "organ" / ORGANS[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(volume[volume.shape[0] // 2]).save(folder / f"{split}_{i}.png")
        for i, (image, label) in enumerate(zip(breast[f"{split}_images"], breast[f"{split}_labels"].ravel())):
            folder = work / "breast" / BREAST[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{split}_{i}.png")
    protocol.write_text(
        "name: shift-val\n"
        f"sources:\n  organ: organ\n  breast: breast\n  blood: {shared / 'blood-pbc'}\n"
        'classes:\n  train: ["blood/*"]\n  val: ["breast/*"]\n  test: ["organ/*"]\n'
        "episodes:\n  way: 4\n  shot: [1, 5]\n  query: 15\n"
    )
    return protocol


def _recentre(support: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred on the support mean, then L2-normalised."""
    centre = support.mean(0)
    return F.normalize(support - centre, dim=-1), F.normalize(query - centre, dim=-1)


def normalisations(normaliser) -> dict:
    """``{name: (support, query) -> (support, query)}``; ``normaliser`` is the checkpoint's
    :class:`~medmeta.heads.EmbeddingNormaliser` (meta-train centring + L2)."""
    return {
        "raw": lambda s, q: (s, q),
        "train": lambda s, q: (normaliser(s), normaliser(q)),
        "train+task": lambda s, q: _recentre(normaliser(s), normaliser(q)),
        "task": _recentre,
    }


def measure(run_folder: str, protocol: Path, episodes: int) -> dict[str, dict[str, float]]:
    """``{"<modality> <way>-way <shot>-shot": {normalisation: accuracy}}`` for one run."""
    from medmeta.embedded import EmbeddingCache
    from medmeta.run import load_run

    run = load_run(run_folder, "cpu", protocol=protocol)
    cache = EmbeddingCache(SimpleNamespace(embed=run.learner.backbone), run.store(), "cpu")  # the backbone's raw embeddings
    variants = normalisations(run.checkpoint.normaliser)
    results = {}
    for split, modality, way in TASKS:
        for shot in (5, 1):
            sampler = run.sampler(split, way, shot, 15, 0)
            correct = {name: [] for name in variants}
            for i in range(episodes):
                episode = sampler.episode(i)
                support, query = cache.stack(episode.support).float(), cache.stack(episode.query).float()
                for name, normalise in variants.items():
                    s, q = normalise(support, query)
                    means = torch.stack([s[episode.support_labels == c].mean(0) for c in range(way)])
                    correct[name].append(float((torch.cdist(q, means).argmin(1) == episode.query_labels).float().mean()))
            results[f"{modality} {way}-way {shot}-shot"] = {name: float(np.mean(v)) for name, v in correct.items()}
    return results


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    protocol = write_shift_protocol(Path(args.shared), Path(args.work))
    everything = {}
    for run in args.runs:
        everything[run] = measure(run, protocol, args.episodes)
        for task, row in everything[run].items():
            print(f"{run} {task}: " + "  ".join(f"{name} {100 * acc:.1f}" for name, acc in row.items()), flush=True)
    if args.out:
        from medmeta.io import atomic_write_json

        atomic_write_json(Path(args.out), everything)


if __name__ == "__main__":
    main()
