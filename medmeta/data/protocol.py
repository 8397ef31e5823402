"""Benchmark protocols: which classes meta-train, meta-validate and meta-test, and the episode shape.

A protocol is a YAML file (see ``docs/data.md``)::

    name: derm-rare
    sources:                       # paths relative to this file
      isic9: ../datasets/isic9     # class folders, a MedMNIST .npz or a CSV manifest
    classes:
      train: ["isic9/nevus", "blood/*"]
      val:   ["isic9/seborrheic keratosis"]
      test:  ["isic9/dermatofibroma"]
    episodes: {way: 3, shot: [1, 5], query: 15, test_episodes: 600}   # spatial_dims: 3 for volumes

Loading refuses a class in two splits, an unknown source or class, a class with fewer images
than ``max(shot) + query``, and a patient whose images fall in two splits.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medmeta.data.records import ImageRecord
from medmeta.data.sources import load_source
from medmeta.errors import ProtocolError
from medmeta.io import load_yaml

SPLITS = ("train", "val", "test")


@dataclass
class EpisodeSettings:
    way: int = 5
    shot: list[int] = field(default_factory=lambda: [1, 5])
    query: int = 15
    test_episodes: int = 600
    #: 2: every scan is an image; 3: every scan is a volume (NIfTI, a DICOM series folder,
    #: MedMNIST 3D), read whole by a 3D backbone
    spatial_dims: int = 2

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "EpisodeSettings":
        unknown = set(data) - {"way", "shot", "query", "test_episodes", "spatial_dims"}
        if unknown:
            raise ProtocolError(f"{where}: unknown episode settings {sorted(unknown)}")
        shot = data.get("shot", [1, 5])
        shots = shot if isinstance(shot, list) and shot else [shot]
        return cls(
            _count(data.get("way", 5), "way", 2, where),
            [_count(s, "shot", 1, where) for s in shots],
            _count(data.get("query", 15), "query", 1, where),
            _count(data.get("test_episodes", 600), "test_episodes", 1, where),
            _spatial_dims(data.get("spatial_dims", 2), where),
        )


def _spatial_dims(value: Any, where: str) -> int:
    if isinstance(value, bool) or value not in (2, 3):
        raise ProtocolError(f"{where}: episodes.spatial_dims must be 2 (images) or 3 (volumes), got {value!r}")
    return int(value)


# Upper bounds of a protocol's counts: far beyond any real use, small enough that a typo cannot
# ask for an endless episode list or a huge episode.
COUNT_LIMITS = {"way": 100, "shot": 1000, "query": 1000, "test_episodes": 100_000}


def _count(value: Any, name: str, low: int, where: str) -> int:
    """A whole number in ``[low, COUNT_LIMITS[name]]``; anything else is a :class:`ProtocolError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{where}: episodes.{name} must be a whole number, got {value!r}")
    if value < low:
        raise ProtocolError(f"{where}: episodes need way >= 2, shot >= 1, query >= 1, test_episodes >= 1")
    if value > COUNT_LIMITS[name]:
        raise ProtocolError(f"{where}: episodes.{name} is at most {COUNT_LIMITS[name]}, got {value}")
    return value


@dataclass
class Protocol:
    """A loaded protocol: the class splits and the records of every class in them."""

    name: str
    classes: dict[str, list[str]]
    records: dict[str, list[ImageRecord]]
    episodes: EpisodeSettings
    path: Path | None = None
    #: the protocol's ``preprocessing`` settings (a subset of
    #: :class:`~medmeta.data.reading.Preprocessing`'s fields, checked at load)
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def split_records(self, split: str) -> dict[str, list[ImageRecord]]:
        """``{qualified class name: records}`` for one of ``train``, ``val``, ``test``."""
        return {name: self.records[name] for name in self.classes[split]}

    def check_counts(self, shot: int, query: int, splits: tuple[str, ...] = SPLITS) -> None:
        """Refuse any class with fewer images than ``shot + query``."""
        short = [
            f"'{name}' ({len(self.records[name])} images)"
            for split in splits
            for name in self.classes[split]
            if len(self.records[name]) < shot + query
        ]
        if short:
            where = f"{self.path}: " if self.path else ""
            raise ProtocolError(
                f"{where}{len(short)} class(es) have fewer images than shot + query = {shot} + {query}: " + ", ".join(short)
            )

    @property
    def spatial_dims(self) -> int:
        return self.episodes.spatial_dims

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint stores about the protocol (no image data)."""
        episodes = asdict(self.episodes)
        if self.episodes.spatial_dims == 2:  # as stored before volumes existed
            del episodes["spatial_dims"]
        return {
            "name": self.name,
            "path": str(self.path) if self.path else None,
            "classes": self.classes,
            "episodes": episodes,
            "class_counts": {name: len(recs) for name, recs in self.records.items()},
        }


def load_protocol(path: str | Path) -> Protocol:
    """Read and validate a protocol YAML; paths inside are relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise ProtocolError(f"{path}: protocol file not found")
    try:
        spec = load_yaml(path)
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"{path}: not valid YAML ({str(exc).splitlines()[0][:300]})") from None
    if not isinstance(spec, dict):
        raise ProtocolError(f"{path}: a protocol is a mapping with 'sources', 'classes' and 'episodes'")
    for key in ("sources", "classes"):
        if not isinstance(spec.get(key), dict) or not spec[key]:
            raise ProtocolError(f"{path}: missing or empty '{key}'")
    not_lists = [s for s in SPLITS if spec["classes"].get(s) is not None and not isinstance(spec["classes"][s], list)]
    if not_lists:
        raise ProtocolError(f"{path}: classes.{not_lists[0]} must be a list such as [\"source/class\", \"source/*\"]")
    missing_splits = [s for s in SPLITS if not spec["classes"].get(s)]
    if missing_splits:
        raise ProtocolError(f"{path}: 'classes' needs non-empty lists for {', '.join(missing_splits)}")
    episodes = EpisodeSettings.from_dict(spec.get("episodes") or {}, str(path))
    preprocessing = _preprocessing(spec.get("preprocessing"), episodes.spatial_dims, path)

    base = path.parent
    available: dict[str, list[ImageRecord]] = {}
    for source_name, source_spec in spec["sources"].items():
        try:
            records = load_source(source_spec, base, spatial_dims=episodes.spatial_dims)
        except ProtocolError as exc:
            raise ProtocolError(f"{path}: source '{source_name}': {exc}") from None
        for record in records:
            available.setdefault(f"{source_name}/{record.label}", []).append(record.relabel(f"{source_name}/{record.label}"))

    classes: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for split in SPLITS:
        selected: list[str] = []
        for selector in spec["classes"][split]:
            matches = _expand(str(selector), available, spec["sources"], path)
            for name in matches:
                if name in owner and owner[name] != split:
                    raise ProtocolError(f"{path}: class '{name}' is in both {owner[name]} and {split}")
                if name not in selected:
                    selected.append(name)
                    owner[name] = split
        classes[split] = selected

    protocol = Protocol(
        name=str(spec.get("name") or path.stem),
        classes=classes,
        records={name: available[name] for split in SPLITS for name in classes[split]},
        episodes=episodes,
        path=path.resolve(),
        preprocessing=preprocessing,
    )
    for split in ("train", "test"):
        if len(classes[split]) < episodes.way:
            raise ProtocolError(f"{path}: {split} has {len(classes[split])} classes, fewer than way = {episodes.way}")
    protocol.check_counts(max(episodes.shot), episodes.query)
    _check_patients_within_one_split(protocol)
    return protocol


#: The keys a protocol's ``preprocessing`` may set.
PREPROCESSING_KEYS = ("image_size", "channels", "spacing", "intensity", "ct_window", "percentiles")


def _preprocessing(spec: Any, spatial_dims: int, path: Path) -> dict[str, Any]:
    """The protocol's ``preprocessing`` mapping, checked by building the
    :class:`~medmeta.data.reading.Preprocessing` it describes."""
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise ProtocolError(f"{path}: 'preprocessing' must be a mapping of {', '.join(PREPROCESSING_KEYS)}")
    unknown = sorted(set(spec) - set(PREPROCESSING_KEYS))
    if unknown:
        raise ProtocolError(f"{path}: unknown preprocessing settings {unknown} (known: {', '.join(PREPROCESSING_KEYS)})")
    from medmeta.data.reading import Preprocessing
    from medmeta.errors import MedmetaError

    try:
        Preprocessing.from_dict({"image_size": 28 if spatial_dims == 3 else 64, "channels": 1, **spec, "spatial_dims": spatial_dims})
    except MedmetaError as exc:
        raise ProtocolError(f"{path}: {exc}") from None
    return dict(spec)


def _expand(selector: str, available: dict[str, list[ImageRecord]], sources: dict, path: Path) -> list[str]:
    if "/" not in selector:
        raise ProtocolError(f"{path}: class '{selector}' must be written 'source/class' or 'source/*'")
    source = selector.split("/", 1)[0]
    if source not in sources:
        raise ProtocolError(f"{path}: class '{selector}' names unknown source '{source}' (sources: {', '.join(sources)})")
    if any(ch in selector for ch in "*?["):
        matches = sorted(name for name in available if fnmatch.fnmatchcase(name, selector))
        if not matches:
            raise ProtocolError(f"{path}: '{selector}' matches no class")
        return matches
    if selector not in available:
        known = sorted(n.split("/", 1)[1] for n in available if n.startswith(source + "/"))
        raise ProtocolError(f"{path}: unknown class '{selector}' (source '{source}' has: {', '.join(known)})")
    return [selector]


def _check_patients_within_one_split(protocol: Protocol) -> None:
    seen: dict[str, tuple[str, str]] = {}
    for split in SPLITS:
        for name in protocol.classes[split]:
            for record in protocol.records[name]:
                if record.patient_id is None:
                    continue
                first = seen.setdefault(record.patient_id, (split, name))
                if first[0] != split:
                    raise ProtocolError(
                        f"{protocol.path}: patient '{record.patient_id}' has images in {first[0]} class "
                        f"'{first[1]}' and {split} class '{name}'; a patient must stay in one split"
                    )


def group_by_patient(records: list[ImageRecord]) -> dict[str, list[ImageRecord]]:
    """Group records by patient; records without an id form their own singleton group."""
    groups: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in records:
        groups[record.patient_id or f"__record__{record.key}"].append(record)
    return dict(groups)
