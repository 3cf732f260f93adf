import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.tag import Tag

from dicom_io.deid.profile import ACTIONS, EDITION, action_for, resolve_code, rule_for, rules
from radbridge.agreements import DeidOption
from radbridge.errors import DeidentificationError


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    return tag


def test_table_loads_all_rows_of_the_edition() -> None:
    assert EDITION == "2024b"
    assert len(rules()) == 621
    assert {r.tag for r in rules()} >= {"(0010,0010)", "(50XX,XXXX)", "(60XX,3000)"}


@pytest.mark.parametrize(
    ("code", "action"),
    [
        ("D", "D"),
        ("Z", "Z"),
        ("X", "X"),
        ("K", "K"),
        ("C", "C"),
        ("U", "U"),
        ("X/Z", "Z"),
        ("X/D", "D"),
        ("X/Z/D", "D"),
        ("Z/D", "D"),
        ("X/Z/U*", "U"),
    ],
)
def test_combined_codes_resolve_conservatively(code: str, action: str) -> None:
    assert resolve_code(code) == action


def test_every_basic_code_in_the_table_resolves() -> None:
    assert {resolve_code(r.basic) for r in rules()} <= ACTIONS
    with pytest.raises(DeidentificationError):
        resolve_code("Q")


def test_known_rows() -> None:
    assert action_for(_tag("PatientName")) in ("Z", "D")
    assert action_for(_tag("PatientID")) == "D"  # Z/D
    assert action_for(_tag("StudyInstanceUID")) == "U"
    assert action_for(_tag("SourceImageSequence")) == "U"  # X/Z/U*
    assert action_for(_tag("InstitutionName")) == "D"  # X/Z/D
    assert action_for(_tag("StudyDescription")) == "X"
    assert action_for(_tag("Modality")) is None  # not in the table: judged by VR


def test_repeating_groups_match_even_groups_only() -> None:
    assert action_for(Tag(0x6000, 0x3000)) == "X"
    assert action_for(Tag(0x601E, 0x4000)) == "X"
    assert action_for(Tag(0x6002, 0x0010)) is None  # not listed; the walk removes 60xx anyway
    assert action_for(Tag(0x5000, 0x0005)) == "X"
    assert action_for(Tag(0x50FE, 0x3000)) == "X"
    assert action_for(Tag(0x5100, 0x0005)) is None
    assert rule_for(Tag(0x0009, 0x1001)) is not None  # the private-attributes row
    assert action_for(Tag(0x0009, 0x1001)) == "X"


def test_options_override_the_basic_profile() -> None:
    sex = _tag("PatientSex")
    assert action_for(sex) == "Z"
    assert action_for(sex, [DeidOption.RETAIN_PATIENT_CHARACTERISTICS]) == "K"
    assert action_for(sex, [DeidOption.RETAIN_DEVICE_IDENTITY]) == "Z"
    station = _tag("DeviceSerialNumber")
    assert action_for(station, [DeidOption.RETAIN_DEVICE_IDENTITY]) == "K"
    inst = _tag("InstitutionName")
    assert action_for(inst, [DeidOption.RETAIN_INSTITUTION_IDENTITY]) == "K"
    assert action_for(_tag("StudyDate")) == "Z"
    assert action_for(_tag("StudyDate"), [DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES]) == "C"
    assert action_for(_tag("StudyDescription"), [DeidOption.CLEAN_DESCRIPTORS]) == "C"
    both = [DeidOption.RETAIN_PATIENT_CHARACTERISTICS, DeidOption.CLEAN_DESCRIPTORS]
    assert action_for(_tag("Allergies"), both) == "C"
