"""Checkpoints: weights in safetensors plus a JSON sidecar. Nothing is ever unpickled.

A checkpoint is a pair ``NAME.safetensors`` / ``NAME.json`` (see ``docs/checkpoint.md``). The
sidecar records everything needed to rebuild and trust the model: method and backbone with
their arguments, preprocessing, the protocol's class splits, calibration parameters, library
versions and the sha256 of the weights file, which is checked on load.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medmeta.errors import CheckpointError, MedmetaError
from medmeta.io import atomic_path, atomic_write_json, sha256_file

FORMAT = "medmeta-checkpoint"
FORMAT_VERSION = 1


def library_versions() -> dict[str, str]:
    import monai

    import medmeta

    return {
        "medmeta": medmeta.__version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
    }


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write tensors atomically as safetensors (with ``metadata``, text in the file's header);
    returns the file's sha256."""
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)
    return sha256_file(path)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None


def tensors_metadata(path: str | Path) -> dict[str, str]:
    """The text metadata in a safetensors file's header (``{}`` when it has none); the tensors
    are not read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """``run/``, ``run/best.json`` or ``run/best.safetensors`` -> the JSON sidecar path."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.json"
    elif path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (give a run folder, NAME.json or NAME.safetensors)")
    return path


@dataclass
class Checkpoint:
    """A loaded, verified checkpoint: its metadata and its tensors."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    path: Path
    _calibration: Any = field(default=None, repr=False, compare=False)

    @property
    def calibration(self):
        """The stored :class:`~medmeta.calibration.CalibrationRecord` (validated; a record that
        is malformed or out of bounds is a :class:`CheckpointError` naming this file)."""
        from medmeta.calibration.record import CalibrationRecord

        if self._calibration is None:
            try:
                self._calibration = CalibrationRecord.from_dict(self.meta.get("calibration"))
            except MedmetaError as exc:
                raise CheckpointError(f"{self.path}: invalid calibration record ({exc})") from None
        return self._calibration

    @property
    def temperature(self) -> float:
        return self.calibration.temperature

    @property
    def conformal(self):
        """The fitted :class:`~medmeta.calibration.ConformalPredictor` stored by ``medmeta train``,
        or None for checkpoints written before conformal calibration existed."""
        return self.calibration.conformal

    @property
    def normaliser(self):
        """The stored :class:`~medmeta.heads.EmbeddingNormaliser`, or None (a checkpoint trained
        before normalisation was learnt: embedding heads then use raw embeddings)."""
        from medmeta.heads import EmbeddingNormaliser

        data = self.meta.get("embedding_normaliser")
        if data is None:
            return None
        try:
            return EmbeddingNormaliser.from_dict(data)
        except MedmetaError as exc:
            raise CheckpointError(f"{self.path}: invalid embedding normalisation ({exc})") from None

    @property
    def heads_record(self) -> dict[str, Any]:
        """The sidecar's ``heads`` entry: ``default``, ``options`` and ``calibration`` per head
        (``{}`` for a checkpoint with the method's own head only)."""
        record = self.meta.get("heads")
        if record is None:
            return {}
        if not isinstance(record, dict) or not isinstance(record.get("calibration", {}), dict):
            raise CheckpointError(f"{self.path}: invalid heads record (expected a mapping)")
        return record

    @property
    def calibrated_heads(self) -> list[str]:
        """The heads this checkpoint holds a calibration for, ``method`` first."""
        return ["method", *sorted(self.heads_record.get("calibration", {}))]

    @property
    def default_head(self) -> str:
        """The head ``adapt`` and ``evaluate`` use without ``--head`` (chosen on val at training)."""
        head = self.heads_record.get("default", "method")
        if head not in self.calibrated_heads:
            raise CheckpointError(f"{self.path}: the default head {head!r} has no calibration record")
        return head

    def head_options(self, head: str) -> dict[str, Any]:
        options = self.heads_record.get("options", {}).get(head, {})
        if not isinstance(options, dict):
            raise CheckpointError(f"{self.path}: invalid options of head {head!r}")
        return options

    def calibration_for(self, head: str):
        """The :class:`~medmeta.calibration.CalibrationRecord` of ``head`` (validated)."""
        from medmeta.calibration.record import CalibrationRecord

        if head == "method":
            return self.calibration
        data = self.heads_record.get("calibration", {}).get(head)
        if data is None:
            raise CheckpointError(
                f"{self.path}: no calibration for head {head!r} (calibrated: {', '.join(self.calibrated_heads)}); "
                f"fit one with `medmeta calibrate --checkpoint {self.path.parent} --head {head}`"
            )
        try:
            return CalibrationRecord.from_dict(data)
        except MedmetaError as exc:
            raise CheckpointError(f"{self.path}: invalid calibration record of head {head!r} ({exc})") from None

    def calibration_notes(self) -> list[str]:
        """What this checkpoint's calibration cannot provide, as sentences for reports."""
        return self.calibration.notes(self.meta["method"]["name"])

    @property
    def distance_threshold(self) -> float | None:
        """The out-of-distribution distance threshold, or None for checkpoints without referral
        calibration (``inf`` when nothing is to be flagged, NaN when the method has no distance)."""
        return self.calibration.distance_threshold

    @property
    def sha256(self) -> str:
        return str(self.meta["weights"]["sha256"])


def save_checkpoint(json_path: str | Path, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model``'s state dict and a sidecar built from ``meta`` (atomic, weights first)."""
    json_path = Path(json_path)
    weights = json_path.with_suffix(".safetensors")
    digest = save_tensors(weights, model.state_dict())
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        **meta,
        "weights": {"file": weights.name, "sha256": digest},
    }
    atomic_write_json(json_path, sidecar)
    return json_path


def update_checkpoint_meta(json_path: str | Path, **fields: Any) -> None:
    """Replace top-level fields of a sidecar (e.g. ``calibration``), keeping the rest."""
    meta = read_meta(Path(json_path))
    meta.update(fields)
    atomic_write_json(json_path, meta)


def read_meta(json_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{json_path}: not a medmeta checkpoint (unreadable JSON: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{json_path}: not a medmeta checkpoint (no '\"format\": \"{FORMAT}\"' field)")
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{json_path}: not a medmeta checkpoint (format_version {version!r} is not an integer)")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{json_path}: checkpoint format {meta['format_version']} is newer than this medmeta reads")
    return meta


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and verify a checkpoint (sidecar format, weights present, sha256 matches)."""
    json_path = resolve_checkpoint(path)
    meta = read_meta(json_path)
    try:
        weights = json_path.parent / meta["weights"]["file"]
        expected = meta["weights"]["sha256"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{json_path}: not a medmeta checkpoint (no 'weights' entry)") from None
    if not weights.is_file():
        raise CheckpointError(f"{json_path}: weights file {weights.name} is missing")
    actual = sha256_file(weights)
    if actual != expected:
        raise CheckpointError(f"{weights}: sha256 {actual[:12]}... does not match the sidecar's {expected[:12]}...; file changed or corrupt")
    return Checkpoint(meta=meta, tensors=load_tensors(weights), path=json_path)


def build_learner(checkpoint: Checkpoint):
    """Rebuild the meta-learner described by a checkpoint and load its weights."""
    from medmeta.backbones import create_backbone
    from medmeta.methods import create_method

    meta = checkpoint.meta
    try:
        backbone = create_backbone(meta["backbone"]["name"], **meta["backbone"].get("kwargs", {}))
        learner = create_method(meta["method"]["name"], backbone, **meta["method"].get("hparams", {}))
        learner.load_state_dict(checkpoint.tensors, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{checkpoint.path}: cannot rebuild the model ({str(exc).splitlines()[0]})") from None
    return learner.eval()


def optimizer_to_tensors(state: dict[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer ``state_dict`` into tensors (for safetensors) and JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], rest: dict[str, Any], prefix: str) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    for index, entries in rest["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": rest["param_groups"]}
