"""Retain Safe Private Option (PS3.15 E.3.10): the private attributes known to carry no identity.

The safe-list below is data: (private creator, group, element offset within the block, VR,
meaning). Every entry is an acquisition parameter that reading software needs and that vendors
document (diffusion b-values and directions, CT table feed and rotation time), modelled on the
exemplary safe private attributes of PS3.15 Table E.3.10-1; every entry is numeric or a coded
string, never free text. A private element is retained only when all of these hold:

- its block's private creator, its group and its offset match an entry;
- its VR is the entry's VR (an element read without its VR, i.e. UN, is not retained: its
  content cannot be checked), and a CS value is a plain code (``[A-Z0-9_ ]``);
- it is not a sequence.

A private creator element is retained when its block retains something. Everything else
private is removed. The leak guard still checks what is retained.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

__all__ = ["SAFE_PRIVATE", "SAFE_VRS", "SafePrivate", "retained_private"]


class SafePrivate(NamedTuple):
    creator: str
    group: int
    offset: int  # the low byte of the element: (gggg,xxOO)
    vr: str
    meaning: str


SAFE_PRIVATE: tuple[SafePrivate, ...] = (
    SafePrivate("SIEMENS MR HEADER", 0x0019, 0x0C, "IS", "B_value"),
    SafePrivate("SIEMENS MR HEADER", 0x0019, 0x0D, "CS", "DiffusionDirectionality"),
    SafePrivate("SIEMENS MR HEADER", 0x0019, 0x0E, "FD", "DiffusionGradientDirection"),
    SafePrivate("SIEMENS MR HEADER", 0x0019, 0x27, "FD", "B_matrix"),
    SafePrivate("SIEMENS CT VA0  COAD", 0x0019, 0x54, "DS", "Rotation Time"),
    SafePrivate("SIEMENS CT VA0  COAD", 0x0019, 0xB0, "DS", "Feed per Rotation"),
    SafePrivate("GEMS_PARM_01", 0x0043, 0x39, "IS", "Slop_int_6..9 (b-value, scale)"),
    SafePrivate("GEMS_ACQU_01", 0x0019, 0x23, "DS", "Table Speed [mm/rotation]"),
    SafePrivate("GEMS_ACQU_01", 0x0019, 0x27, "DS", "Rotation Speed [msec]"),
    SafePrivate("GEMS_ACQU_01", 0x0019, 0xE0, "DS", "User data 24 (DTI diffusion directions)"),
    SafePrivate("Philips Imaging DD 001", 0x2001, 0x03, "FL", "Diffusion B-Factor"),
    SafePrivate("Philips Imaging DD 001", 0x2001, 0x04, "CS", "Diffusion Direction"),
    SafePrivate("Philips MR Imaging DD 001", 0x2005, 0xB0, "FL", "Diffusion Direction RL"),
    SafePrivate("Philips MR Imaging DD 001", 0x2005, 0xB1, "FL", "Diffusion Direction AP"),
    SafePrivate("Philips MR Imaging DD 001", 0x2005, 0xB2, "FL", "Diffusion Direction FH"),
)
SAFE_VRS = frozenset({"IS", "DS", "FD", "FL", "SS", "US", "SL", "UL", "CS"})  # never text
_INDEX = {(e.creator, e.group, e.offset): e for e in SAFE_PRIVATE}
_CODE = re.compile(r"[A-Z0-9_ ]{0,16}")


def retained_private(ds: Dataset) -> frozenset[int]:
    """Tags of the private elements (and their creators) of ``ds`` to keep, this level only."""
    # ds.keys(), not ds: iterating a Dataset converts every element; only private ones are here
    private = [BaseTag(t) for t in ds.keys() if (t >> 16) & 1]  # noqa: SIM118
    creators: dict[tuple[int, int], str] = {}
    for tag in private:
        if 0x10 <= tag.element <= 0xFF:
            value = ds[tag].value
            if isinstance(value, str):
                creators[(tag.group, tag.element)] = value.strip()
    kept: set[int] = set()
    for tag in private:
        if tag.element < 0x1000:
            continue
        block = (tag.group, tag.element >> 8)
        entry = _INDEX.get((creators.get(block, ""), tag.group, tag.element & 0xFF))
        if entry is None:
            continue
        elem = ds[tag]
        if entry.vr != elem.VR or not _plain(elem.VR, elem.value):
            continue
        kept.add(int(tag))
        kept.add((tag.group << 16) | block[1])
    return frozenset(kept)


def _plain(vr: str, value: object) -> bool:
    if vr != "CS":
        return True
    values = list(value) if isinstance(value, list | MultiValue) else [value]
    return all(_CODE.fullmatch(str(v or "")) for v in values)
