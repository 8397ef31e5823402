"""Everything a trained run needs to be used again, from one call: :func:`load_run`.

``adapt``, ``evaluate``, ``calibrate`` and the benchmarks all start the same way: load and
verify the checkpoint, rebuild the learner on a device, rebuild the preprocessing the model
was trained with, and (for episodes) load the protocol and draw seeded episodes from one of
its splits. :class:`LoadedRun` holds the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily: loading a run pulls in torch and MONAI
    import torch

    from medmeta.calibration import CalibrationRecord
    from medmeta.checkpoint import Checkpoint
    from medmeta.data import EpisodeSampler, ImageStore, Preprocessing, Protocol, ScanReader
    from medmeta.methods import MetaLearner


@dataclass
class LoadedRun:
    """A verified checkpoint with its learner (on ``device``, in evaluation mode), its
    preprocessing and a scan reader for it. The protocol is loaded on first use (``adapt``
    needs none); ``protocol_path`` overrides the one the checkpoint names."""

    checkpoint: "Checkpoint"
    learner: "MetaLearner"
    preprocessing: "Preprocessing"
    reader: "ScanReader"
    device: "torch.device"
    protocol_path: str | None = None
    _protocol: "Protocol | None" = field(default=None, repr=False)

    @property
    def calibration(self) -> "CalibrationRecord":
        return self.checkpoint.calibration

    @property
    def default_head(self) -> str:
        """The head used when none is asked for (:attr:`Checkpoint.default_head`)."""
        return self.checkpoint.default_head

    def calibration_for(self, head: str | None = None, transductive: str | None = None) -> "CalibrationRecord":
        """The calibration record of ``head`` (None: the default head), with ``transductive``
        refinement when named."""
        from medmeta.heads import head_key

        return self.checkpoint.calibration_for(head_key(head or self.default_head, transductive))

    def head_learner(self, head: str | None = None, transductive: str | None = None):
        """The learner with ``head`` (None: the default head) as its adaptation: the learner
        itself for ``method``, else a :class:`~medmeta.heads.HeadLearner` on its backbone with
        the stored normaliser, the head's stored options and, when named, the ``transductive``
        refiner (:mod:`medmeta.transductive`)."""
        from medmeta.errors import MedmetaError
        from medmeta.heads import METHOD_HEAD, adapting_learner, create_head, list_heads

        head = head or self.default_head
        if head not in list_heads():
            raise MedmetaError(f"unknown head {head!r}; choose from {', '.join(list_heads())}")
        if head == METHOD_HEAD:
            if transductive:
                raise MedmetaError("--transductive refines embedding heads: choose --head prototype or logistic")
            return self.learner
        refiner = None
        if transductive:
            from medmeta.transductive import create_refiner

            try:
                refiner = create_refiner(transductive)
            except ValueError as exc:
                raise MedmetaError(str(exc)) from None
        return adapting_learner(
            self.learner, create_head(head, **self.checkpoint.head_options(head)), self.checkpoint.normaliser, refiner
        )

    @property
    def method(self) -> str:
        return str(self.checkpoint.meta["method"]["name"])

    @property
    def backbone(self) -> str:
        return str(self.checkpoint.meta["backbone"]["name"])

    @property
    def training(self) -> dict[str, Any]:
        """The sidecar's training record (``{}`` when the checkpoint has none)."""
        record = self.checkpoint.meta.get("training")
        return record if isinstance(record, dict) else {}

    @property
    def protocol(self) -> "Protocol":
        """The protocol (loaded once); :class:`ProtocolError` when neither the caller nor the
        checkpoint names one."""
        if self._protocol is None:
            from medmeta.data import load_protocol
            from medmeta.errors import ProtocolError

            path = self.protocol_path or (self.checkpoint.meta.get("protocol") or {}).get("path")
            if not path:
                raise ProtocolError(f"{self.checkpoint.path}: the checkpoint names no protocol; pass --protocol")
            protocol = load_protocol(path)
            if protocol.spatial_dims != self.preprocessing.spatial_dims:
                kind = {2: "2D images", 3: "volumes (3D)"}
                raise ProtocolError(
                    f"{protocol.path}: its scans are {kind[protocol.spatial_dims]}, but the model of {self.checkpoint.path} "
                    f"reads {kind[self.preprocessing.spatial_dims]}; a 2D model cannot be used on volumes, nor a 3D one on images"
                )
            self._protocol = protocol
        return self._protocol

    def store(self) -> "ImageStore":
        """A fresh decode-once image cache with this run's preprocessing."""
        from medmeta.data import ImageStore

        return ImageStore(self.reader)

    def drop_unreadable(self, split: str, store: "ImageStore") -> list[tuple[str, str]]:
        """Decode every scan of the protocol's ``split`` classes into ``store`` and leave the
        unreadable ones out of the protocol (one bad scan never stops an evaluation); returns
        their ``(key, reason)``. Episodes are then drawn from the readable scans."""
        bad: list[tuple[str, str]] = []
        for name in self.protocol.classes[split]:
            good, failed = store.warm(self.protocol.records[name])
            self.protocol.records[name] = good
            bad += [(record.key, reason) for record, reason in failed]
        return bad

    def sampler(self, split: str, way: int, shot: int, query: int, seed: int) -> "EpisodeSampler":
        """Seeded episodes of the protocol's ``split`` classes (counts checked first)."""
        from medmeta.data import EpisodeSampler

        self.protocol.check_counts(shot, query, splits=(split,))
        return EpisodeSampler(self.protocol.split_records(split), way, shot, query, seed)


def load_run(
    checkpoint: str | Path,
    device: str = "auto",
    protocol: str | Path | None = None,
    method_options: dict[str, Any] | None = None,
    max_pixels: int | None = None,
    allow_unfinished: bool = False,
) -> LoadedRun:
    """Load the run at ``checkpoint`` (a run folder, ``NAME.json`` or ``NAME.safetensors``).

    ``device`` is ``"auto"``, ``"cpu"`` or ``"cuda"``; ``protocol`` overrides the protocol the
    checkpoint names; ``method_options`` replaces method hyperparameters that leave the weights
    as they are (e.g. ``{"distance": "euclidean"}`` for ProtoNet) before the learner is built;
    ``max_pixels`` caps the pixels a scan's header may declare (default
    :data:`medmeta.data.reading.MAX_PIXELS`; larger files are refused before decoding).
    A checkpoint whose training run stopped before calibration (its last phase) is refused
    unless ``allow_unfinished``: it would diagnose with uncalibrated probabilities.
    """
    from medmeta.checkpoint import build_learner, load_checkpoint
    from medmeta.data import Preprocessing, ScanReader
    from medmeta.data.reading import MAX_PIXELS
    from medmeta.device import resolve_device
    from medmeta.errors import CheckpointError, MedmetaError

    ckpt = load_checkpoint(checkpoint)
    try:  # the sidecar's values are checked before anything is built from them
        preprocessing = Preprocessing.from_dict(ckpt.meta.get("preprocessing"))
    except MedmetaError as exc:
        raise CheckpointError(f"{ckpt.path}: invalid preprocessing record ({exc})") from None
    if not ckpt.calibration.fitted and "training" in ckpt.meta and not allow_unfinished:
        raise CheckpointError(
            f"{ckpt.path}: the training run that wrote this checkpoint did not finish (it stopped before "
            f"calibration); finish it with `medmeta train --resume --out {ckpt.path.parent}` or `medmeta calibrate "
            f"--checkpoint {ckpt.path}`, or pass --allow-unfinished to use it uncalibrated"
        )
    if method_options:
        method = ckpt.meta["method"]
        ckpt.meta["method"] = {**method, "hparams": {**method.get("hparams", {}), **method_options}}
    torch_device = resolve_device(device)
    learner = build_learner(ckpt).to(torch_device)
    return LoadedRun(
        checkpoint=ckpt,
        learner=learner,
        preprocessing=preprocessing,
        reader=ScanReader(preprocessing, max_pixels or MAX_PIXELS),
        device=torch_device,
        protocol_path=str(protocol) if protocol is not None else None,
    )


def as_run(
    checkpoint, device: str = "auto", protocol: str | Path | None = None, max_pixels: int | None = None,
    allow_unfinished: bool = False,
) -> LoadedRun:
    """``checkpoint`` itself when it is a :class:`LoadedRun` already (with ``protocol``, if
    given, replacing the one it names), else :func:`load_run` of it."""
    if isinstance(checkpoint, LoadedRun):
        if protocol is not None and str(protocol) != checkpoint.protocol_path:
            from dataclasses import replace

            return replace(checkpoint, protocol_path=str(protocol), _protocol=None)
        return checkpoint
    return load_run(checkpoint, device, protocol=protocol, max_pixels=max_pixels, allow_unfinished=allow_unfinished)
