"""PS3.15 Table E.1-1 as data: the de-identification rule of every listed attribute.

Source: DICOM PS3.15 2024b, Annex E, Table E.1-1 "Application Level Confidentiality Profile
Attributes" (621 rows), machine-readable form from innolitics/dicom-standard, shipped as
``dicom_io/data/ps3.15-2024b-table-e1-1.json``.

Combined codes are resolved conservatively, to the action that keeps the dataset valid while
removing the content: ``X/Z`` → ``Z``, ``X/D``, ``X/Z/D`` and ``Z/D`` → ``D``, ``X/Z/U*`` → ``U``
(the listed sequences are kept and every UID in them is remapped). A selected option overrides
the basic action where its column has an entry; when two selected options disagree, ``K`` wins
over ``C`` (the agreement asked to retain that attribute). Every option column of the table is
supported except Retain Longitudinal Temporal Information with Full Dates (``rtnLongFullDatesOpt``),
which no agreement may select: dates cross the border only shifted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from pydicom.tag import BaseTag

from radbridge.agreements import DeidOption
from radbridge.errors import DeidentificationError

__all__ = [
    "ACTIONS",
    "EDITION",
    "OPTION_COLUMNS",
    "Rule",
    "action_for",
    "resolve_code",
    "rule_for",
    "rules",
]

EDITION = "2024b"
ACTIONS = frozenset({"D", "Z", "X", "K", "C", "U"})
_TABLE = "ps3.15-2024b-table-e1-1.json"
_COMBINED = {"X/Z": "Z", "X/D": "D", "X/Z/D": "D", "Z/D": "D", "X/Z/U*": "U", "X/Z/U": "U"}
# The agreement options we support, mapped to their Table E.1-1 column.
OPTION_COLUMNS: dict[DeidOption, str] = {
    DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES: "rtnLongModifDatesOpt",
    DeidOption.RETAIN_PATIENT_CHARACTERISTICS: "rtnPatCharsOpt",
    DeidOption.RETAIN_DEVICE_IDENTITY: "rtnDevIdOpt",
    DeidOption.RETAIN_INSTITUTION_IDENTITY: "rtnInstIdOpt",
    DeidOption.CLEAN_DESCRIPTORS: "cleanDescOpt",
    DeidOption.RETAIN_UIDS: "rtnUIDsOpt",
    DeidOption.RETAIN_SAFE_PRIVATE: "rtnSafePrivOpt",
    DeidOption.CLEAN_STRUCTURED_CONTENT: "cleanStructContOpt",
    DeidOption.CLEAN_GRAPHICS: "cleanGraphOpt",
}
_COLUMNS = (
    "rtnSafePrivOpt",
    "rtnUIDsOpt",
    "rtnDevIdOpt",
    "rtnInstIdOpt",
    "rtnPatCharsOpt",
    "rtnLongFullDatesOpt",
    "rtnLongModifDatesOpt",
    "cleanDescOpt",
    "cleanStructContOpt",
    "cleanGraphOpt",
)


@dataclass(frozen=True)
class Rule:
    """One row of Table E.1-1: the basic action and each option column's action."""

    name: str
    tag: str
    basic: str
    options: dict[str, str] = field(default_factory=dict)


def resolve_code(code: str) -> str:
    """Resolve a table code (possibly combined, e.g. ``X/Z/D``) to one action letter."""
    code = code.strip().upper()
    if code in ACTIONS:
        return code
    if code in _COMBINED:
        return _COMBINED[code]
    raise DeidentificationError(f"unknown Table E.1-1 action code {code!r}")


@dataclass(frozen=True)
class _Index:
    rows: tuple[Rule, ...]
    exact: dict[int, Rule]
    masked: tuple[tuple[int, int, Rule], ...]  # (mask, value, rule) for 50xx/60xx rows
    private: Rule | None


def _parse_tag(text: str) -> tuple[int, int] | None:
    """``(gggg,eeee)`` with x wildcards → (mask, value); ``None`` for the private-tags row."""
    body = text.strip().upper()
    if not (body.startswith("(") and body[1:10].count(",") == 1 and len(body) == 11):
        return None
    hexits = body[1:5] + body[6:10]
    mask = int("".join("0" if c == "X" else "F" for c in hexits), 16)
    value = int("".join("0" if c == "X" else c for c in hexits), 16)
    return mask, value


@cache
def _index() -> _Index:
    raw = resources.files("dicom_io").joinpath("data", _TABLE).read_text(encoding="utf-8")
    rows: list[Rule] = []
    exact: dict[int, Rule] = {}
    masked: list[tuple[int, int, Rule]] = []
    private: Rule | None = None
    for row in json.loads(raw):
        opts = {col: str(row[col]) for col in _COLUMNS if row.get(col)}
        rule = Rule(str(row["name"]), str(row["tag"]), str(row["basicProfile"]), opts)
        resolve_code(rule.basic)  # fail at load on a code we do not understand
        rows.append(rule)
        parsed = _parse_tag(rule.tag)
        if parsed is None:
            if "ODD" not in rule.tag.upper():
                raise DeidentificationError(f"Table E.1-1: unparseable tag {rule.tag!r}")
            private = rule
        elif parsed[0] == 0xFFFFFFFF:
            exact[parsed[1]] = rule
        else:
            masked.append((parsed[0], parsed[1], rule))
    return _Index(tuple(rows), exact, tuple(masked), private)


def rules() -> tuple[Rule, ...]:
    """All rows of the table, in file order."""
    return _index().rows


def rule_for(tag: BaseTag | int) -> Rule | None:
    """The table row that governs ``tag``, or ``None`` when the table does not list it."""
    idx = _index()
    t = int(tag)
    group = t >> 16
    if group % 2 == 1:
        return idx.private
    hit = idx.exact.get(t)
    if hit is not None:
        return hit
    for mask, value, rule in idx.masked:  # repeating groups: even groups 0x5000-0x50FF etc.
        if t & mask == value:
            return rule
    return None


def action_for(tag: BaseTag | int, options: Iterable[DeidOption] = ()) -> str | None:
    """The effective single-letter action for ``tag`` under ``options``; ``None`` if unlisted."""
    rule = rule_for(tag)
    if rule is None:
        return None
    chosen: list[str] = []
    for opt in options:
        col = OPTION_COLUMNS.get(DeidOption(opt))
        if col and col in rule.options:
            chosen.append(resolve_code(rule.options[col]))
    if chosen:
        return "K" if "K" in chosen else chosen[0]
    return resolve_code(rule.basic)
