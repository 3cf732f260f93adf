"""PS3.15 E.1 actions on sequences: X removes, Z empties, D keeps the items with dummy values."""

from __future__ import annotations

from io import BytesIO

from pydicom.dataset import Dataset

from dicom_io.deid import deidentify
from dicom_io.deid.profile import action_for
from dicom_io.pseudonyms import Pseudonymizer
from radbridge.agreements import DeidOption
from tests.conftest import make_instance

KEY = b"k" * 32


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _raw(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _sample() -> Dataset:
    ds = make_instance()
    observer = Dataset()
    observer.VerifyingObserverName = "Petrova^Anna"
    observer.VerifyingOrganization = "First People's Hospital"
    observer.VerificationDateTime = "20261120101010"
    observer.VerifyingObserverIdentificationCodeSequence = [_code("D-17", "L", "Petrova")]
    ds.VerifyingObserverSequence = [observer, observer]  # D
    ds.InstitutionCodeSequence = [_code("FPH-BJ-01", "99HOSP", "First People's Hospital")]  # D
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.9911"
    ds.ReferencedStudySequence = [study]  # X/Z -> Z
    other = Dataset()
    other.PatientID = "OTHER-5544332"
    ds.OtherPatientIDsSequence = [other]  # X
    return ds


def test_the_table_gives_these_sequences_d_z_and_x() -> None:
    ds = _sample()
    assert action_for(ds["VerifyingObserverSequence"].tag) == "D"
    assert action_for(ds["InstitutionCodeSequence"].tag) == "D"
    assert action_for(ds["ReferencedStudySequence"].tag) == "Z"
    assert action_for(ds["OtherPatientIDsSequence"].tag) == "X"


def test_d_keeps_every_item_with_dummy_values() -> None:
    out = deidentify(_sample(), Pseudonymizer(KEY)).dataset
    assert len(out.VerifyingObserverSequence) == 2  # not emptied: Type 1 in SR documents
    for item in out.VerifyingObserverSequence:
        assert str(item.VerifyingObserverName) == "REMOVED"  # D
        assert item.VerifyingOrganization == "REMOVED"  # D
        assert item.VerificationDateTime == "19000101000000"  # D
        assert len(item.VerifyingObserverIdentificationCodeSequence) == 0  # Z inside
    (inst,) = out.InstitutionCodeSequence  # coded identity: every code value is a dummy
    assert (inst.CodeValue, inst.CodingSchemeDesignator, inst.CodeMeaning) == ("REMOVED",) * 3


def test_z_empties_and_x_removes() -> None:
    out = deidentify(_sample(), Pseudonymizer(KEY)).dataset
    assert "ReferencedStudySequence" in out and len(out.ReferencedStudySequence) == 0
    assert "OtherPatientIDsSequence" not in out


def test_nothing_of_a_dummied_sequence_survives_in_the_bytes() -> None:
    out = deidentify(_sample(), Pseudonymizer(KEY)).dataset
    raw = _raw(out)
    for needle in (b"Petrova", b"First People", b"FPH-BJ-01", b"99HOSP", b"OTHER-5544332"):
        assert needle not in raw, needle
    assert b"1.2.826.0.1.3680043.8.498.9911" not in raw


def test_an_option_that_retains_a_d_sequence_walks_it_as_usual() -> None:
    opts = [DeidOption.RETAIN_INSTITUTION_IDENTITY]  # Institution Code Sequence: K
    out = deidentify(_sample(), Pseudonymizer(KEY), opts).dataset
    assert out.InstitutionCodeSequence[0].CodeValue == "FPH-BJ-01"
