"""Running a learner over seeded episodes and summarising what it got right, and how sure it was."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmeta.calibration import (
    brier_score,
    expected_calibration_error,
    macro_auc,
    mean_confidence_interval,
    negative_log_likelihood,
    softmax,
)
from medmeta.data.episodes import EpisodeSampler
from medmeta.data.store import ImageStore
from medmeta.io import atomic_write_json
from medmeta.methods.base import MetaLearner


@dataclass
class EpisodeOutputs:
    """Per-episode query logits ``(n_query, n_way)``, labels ``(n_query,)`` and support distances."""

    logits: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    distances: list[np.ndarray] = field(default_factory=list)

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.logits), np.concatenate(self.labels)


@torch.no_grad()
def run_episodes(
    learner: MetaLearner,
    store: ImageStore,
    sampler: EpisodeSampler,
    indices: Iterable[int],
    device: torch.device,
    on_episode=None,
) -> EpisodeOutputs:
    """Adapt to and predict every episode in ``indices`` (eval mode: no statistics are updated)."""
    was_training = learner.training
    learner.eval()
    out = EpisodeOutputs()
    try:
        for index in indices:
            ep = sampler.episode(index)
            support = store.stack(ep.support).to(device)
            query = store.stack(ep.query).to(device)
            learner.fit_support(support, ep.support_labels.to(device))
            out.logits.append(learner.predict_query(query).double().cpu().numpy())
            out.labels.append(ep.query_labels.numpy())
            out.distances.append(learner.support_distance(query).double().cpu().numpy())
            if on_episode is not None:
                on_episode(out)
    finally:
        learner.train(was_training)
    return out


def summarize(outputs: EpisodeOutputs, temperature: float = 1.0, n_bins: int = 15) -> dict[str, float]:
    """Accuracy (mean over episodes, 95% CI), macro AUC (mean over episodes), and pooled ECE,
    NLL and Brier before and after dividing logits by ``temperature``."""
    accs = np.array([(lg.argmax(1) == lb).mean() for lg, lb in zip(outputs.logits, outputs.labels)])
    aucs = np.array([macro_auc(softmax(lg), lb) for lg, lb in zip(outputs.logits, outputs.labels)])
    logits, labels = outputs.pooled()
    before, after = softmax(logits), softmax(logits / temperature)
    mean, ci = mean_confidence_interval(accs)
    return {
        "episodes": len(accs),
        "accuracy": mean,
        "accuracy_ci95": ci,
        "macro_auc": float(np.nanmean(aucs)) if len(aucs) else float("nan"),
        "temperature": float(temperature),
        "ece_before": expected_calibration_error(before, labels, n_bins),
        "ece_after": expected_calibration_error(after, labels, n_bins),
        "nll_before": negative_log_likelihood(before, labels),
        "nll_after": negative_log_likelihood(after, labels),
        "brier_before": brier_score(before, labels),
        "brier_after": brier_score(after, labels),
    }


def evaluate_checkpoint(
    checkpoint: str | Path,
    protocol: str | Path | None = None,
    way: int | None = None,
    shot: int | None = None,
    query: int | None = None,
    episodes: int | None = None,
    seed: int = 0,
    device: str = "auto",
    quiet: bool = False,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Measure a checkpoint on seeded episodes of the protocol's test classes.

    The episodes depend only on the protocol, the episode shape and ``seed``, never on the
    model, so methods are compared on identical episodes. With ``out_dir``, the results are
    written there as ``evaluation_<way>way_<shot>shot.json`` and the episodes' file lists as
    ``episodes_<way>way_<shot>shot_seed<seed>.csv``.
    """
    from medmeta.checkpoint import build_learner, load_checkpoint
    from medmeta.data.protocol import load_protocol
    from medmeta.data.reading import Preprocessing, ScanReader
    from medmeta.device import resolve_device
    from medmeta.errors import ProtocolError
    from medmeta.progress import make_progress

    ckpt = load_checkpoint(checkpoint)
    protocol_path = protocol or ckpt.meta.get("protocol", {}).get("path")
    if not protocol_path:
        raise ProtocolError(f"{ckpt.path}: the checkpoint names no protocol; pass --protocol")
    proto = load_protocol(protocol_path)
    way = way or proto.episodes.way
    shot = shot or min(proto.episodes.shot)
    query = query or proto.episodes.query
    episodes = episodes or proto.episodes.test_episodes
    proto.check_counts(shot, query, splits=("test",))
    learner = build_learner(ckpt)
    torch_device = resolve_device(device)
    learner.to(torch_device)
    store = ImageStore(ScanReader(Preprocessing.from_dict(ckpt.meta["preprocessing"])))
    sampler = EpisodeSampler(proto.split_records("test"), way, shot, query, seed)
    tag = f"{way}way_{shot}shot"
    if out_dir is not None:
        sampler.save_manifest(Path(out_dir) / f"episodes_{tag}_seed{seed}.csv", range(episodes))
    with make_progress(disable=quiet) as progress:
        task = progress.add_task("Evaluating", total=episodes, status="")

        def tick(out: EpisodeOutputs) -> None:
            accs = [(lg.argmax(1) == lb).mean() for lg, lb in zip(out.logits, out.labels)]
            progress.update(task, advance=1, status=f"acc {np.mean(accs):.3f}")

        outputs = run_episodes(learner, store, sampler, range(episodes), torch_device, on_episode=tick)
    stats = summarize(outputs, temperature=ckpt.temperature)
    result = {
        "checkpoint": str(ckpt.path),
        "checkpoint_sha256": ckpt.sha256,
        "method": ckpt.meta["method"]["name"],
        "backbone": ckpt.meta["backbone"]["name"],
        "protocol": proto.name,
        "test_classes": proto.classes["test"],
        "way": way,
        "shot": shot,
        "query": query,
        "seed": seed,
        **stats,
    }
    if out_dir is not None:
        atomic_write_json(Path(out_dir) / f"evaluation_{tag}.json", result)
    return result
