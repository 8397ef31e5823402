"""The order a clinician reviews a batch in, and the report page's script that re-sorts and
filters it in the browser.

Worklist order: the cases flagged for review (REFER) first, then every case by its calibrated
confidence (the probability of its predicted condition), lowest first, so the least certain
diagnoses come before the clear ones; ties keep the cases folder's order. ``predictions.csv``
keeps that folder order (a row per case, for machines); ``report.json`` gives each case its
``worklist_rank``; ``report.html`` lists the cases in worklist order.

The page's script (``templates/worklist.js``) only re-orders and hides rows of the table that is
already there: the page reads the same without it. The page's Content-Security-Policy allows
that one script by its sha256 (:func:`script_source`), no other script, no request to another
address.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medmeta.adaptation import CaseResult


def worklist_order(cases: "Sequence[CaseResult]") -> list[int]:
    """Indices of ``cases`` in worklist order (see the module)."""
    return sorted(range(len(cases)), key=lambda i: (not cases[i].refer, max(cases[i].probabilities), i))


def worklist_ranks(cases: "Sequence[CaseResult]") -> list[int]:
    """``ranks[i]``: the place of ``cases[i]`` in the worklist (0 first)."""
    ranks = [0] * len(cases)
    for rank, index in enumerate(worklist_order(cases)):
        ranks[index] = rank
    return ranks


def script() -> str:
    """The report page's sorting and filtering script."""
    return resources.files("medmeta.reports").joinpath("templates", "worklist.js").read_text(encoding="utf-8")


def script_source(text: str) -> str:
    """``'sha256-...'``: the Content-Security-Policy source that allows exactly ``text`` as an
    inline script."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"
