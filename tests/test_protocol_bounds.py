"""Hostile protocol and config files: alias bombs, endless counts and wrong types are one clear
error, in well under a second, never a traceback or a runaway allocation."""

from __future__ import annotations

import re
import time

import pytest

from medmeta.data.protocol import COUNT_LIMITS, load_protocol
from medmeta.errors import MedmetaError, ProtocolError
from medmeta.io import MAX_YAML_ALIASES

# each level refers to the one before nine times: 9**12 references once expanded
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(12)
)


def _protocol(tmp_path, episodes: str):
    (tmp_path / "data" / "x" / "a").mkdir(parents=True)
    path = tmp_path / "p.yaml"
    path.write_text(
        "name: t\nsources: {x: data/x}\nclasses: {train: [x/a], val: [x/a], test: [x/a]}\n" f"episodes: {episodes}\n"
    )
    return path


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 1200
    started = time.perf_counter()
    with pytest.raises(ProtocolError, match=f"more than {MAX_YAML_ALIASES} YAML aliases") as excinfo:
        load_protocol(path)
    assert time.perf_counter() - started < 5 and len(str(excinfo.value)) < 500


@pytest.mark.parametrize(
    "episodes, message",
    [
        ("{way: abc}", "episodes.way must be a whole number, got 'abc'"),
        ("{way: 1000000000}", "episodes.way is at most 100, got 1000000000"),
        ("{test_episodes: 1e12}", "episodes.test_episodes must be a whole number, got '1e12'"),
        ("{test_episodes: 1000000000000}", "episodes.test_episodes is at most 100000, got 1000000000000"),
        ("{shot: [1, 0]}", "episodes need way >= 2, shot >= 1"),
        ("{query: true}", "episodes.query must be a whole number, got True"),
        ("{shot: []}", "episodes.shot must be a whole number, got []"),
    ],
)
def test_protocol_counts_are_typed_and_bounded(tmp_path, episodes, message):
    with pytest.raises(ProtocolError, match=re.escape(message)):
        load_protocol(_protocol(tmp_path, episodes))
    assert COUNT_LIMITS["test_episodes"] == 100_000


def test_a_training_config_file_gets_the_same_bounds(tmp_path):
    from medmeta.training.config_file import read_config_file

    path = tmp_path / "run.yaml"
    path.write_text(ALIAS_BOMB)
    with pytest.raises(MedmetaError, match="YAML aliases"):
        read_config_file(path)
