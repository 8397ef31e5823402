"""``--config run.yaml``: a YAML mapping of :class:`TrainConfig` fields, and the ``config.yaml``
every run writes into its folder (given back to ``--config``, it reproduces the run's config).

Paths in the file (``protocol``, ``out``, ``init_from``) are taken as written, relative to the
working directory, as on the command line.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from medmeta.training.checks import PATH_FIELDS, describe_type, field_types, matches_type
from medmeta.training.config import ConfigError, TrainConfig

CONFIG_FILE = "config.yaml"
# YAML 1.1 (PyYAML) reads "1e-3" as text; a number field takes it as the number it spells
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The fields set by the YAML file ``path``; unknown keys, wrong types and unreadable files
    are refused with a :class:`ConfigError` naming the file (and the key)."""
    import yaml

    from medmeta.io import load_yaml

    try:
        data = load_yaml(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the training config ({exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())[:300]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a training config is a mapping of setting names to values, got {type(data).__name__}")
    hints = field_types()
    for key in data:
        if key not in hints:
            close = difflib.get_close_matches(str(key), hints, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(hints)}"
            raise ConfigError(f"{path}: unknown key {key!r}{hint}", str(key))
    return {key: _typed(path, key, value, hints[key]) for key, value in data.items()}


def _typed(path: str | Path, key: str, value: Any, hint: Any) -> Any:
    if isinstance(value, str) and _FLOAT.match(value.strip()) and matches_type(1.5, hint) and not matches_type(value, hint):
        value = float(value)
    if not matches_type(value, hint, path=key in PATH_FIELDS):
        raise ConfigError(f"{path}: {key} must be {describe_type(hint)}, got {value!r}", key)
    return value


def config_yaml(config: TrainConfig) -> str:
    """``config`` as the YAML text of a ``--config`` file (every field, in declaration order)."""
    import yaml

    data = {spec.name: _plain(getattr(config, spec.name)) for spec in fields(config)}
    header = "# medmeta train --config: the settings of this run (paths relative to the working directory)\n"
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _plain(value: Any) -> Any:
    """Plain YAML-safe values: paths as text, tuples as lists, numpy scalars as Python ones."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "__fspath__"):
        return str(value)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def write_config_file(config: TrainConfig, folder: str | Path) -> Path:
    """Write ``folder/config.yaml`` atomically; returns its path."""
    from medmeta.io import atomic_write_text

    path = Path(folder) / CONFIG_FILE
    atomic_write_text(path, config_yaml(config))
    return path


def parse_key_values(items: list[str], option: str) -> dict:
    """``["inner_steps=5", "first_order=true"]`` -> ``{"inner_steps": 5, "first_order": True}`` (YAML scalars)."""
    import yaml

    from medmeta.errors import MedmetaError

    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MedmetaError(f"{option} expects KEY=VALUE, got {item!r}")
        try:
            parsed[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise MedmetaError(f"{option} {item!r}: cannot parse the value") from None
    return parsed
