"""Re-identification round trip: de-identify -> SR built on the pseudonymous images -> back.

Runs on SQLite and PostgreSQL (the identity map lives in the edge database).
"""

from __future__ import annotations

import warnings
from io import BytesIO

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_io.deid import deidentify
from dicom_io.identity_map import record_pseudonyms
from dicom_io.pseudonyms import Pseudonymizer
from dicom_io.reidentify import reidentify
from radbridge.agreements import load_agreements
from radbridge.db import Database
from radbridge.db.agreements import sync_agreements
from radbridge.errors import ReidentificationError
from tests.conftest import REPO, make_instance

AGREEMENT = "demo-hospital-to-center"


def _sr(evidence: list[Dataset], referenced: Dataset) -> Dataset:
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name="radbridge demo")
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="finding 1"),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=hd.sr.CodedConcept("404684003", "SCT", "Clinical finding"),
                value=hd.sr.CodedConcept("373067005", "SCT", "No"),
            )
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(referenced)],
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=hd.sr.CodedConcept("168731009", "SCT", "Chest X-ray"),
        imaging_measurements=[group],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-component pseudonymous PatientName
        return hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=hd.UID(),
            series_number=99,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="radbridge",
            is_complete=True,
            is_final=False,
            is_verified=False,
        )


@pytest.fixture
def edge_db(edge_db: Database) -> Database:
    sync_agreements(edge_db, load_agreements(REPO / "radbridge/defaults/agreements.yaml"))
    return edge_db


def _deid_study(db: Database) -> tuple[list[Dataset], list[Dataset]]:
    first = make_instance()
    originals = [first] + [
        make_instance(first.StudyInstanceUID, first.SeriesInstanceUID, seed=i) for i in (1, 2)
    ]
    p = Pseudonymizer(b"k" * 32)
    deid = [deidentify(ds, p).dataset for ds in originals]
    record_pseudonyms(db, AGREEMENT, p.issued)
    return originals, deid


def _all_uids(ds: Dataset) -> set[str]:
    out: set[str] = set()
    for elem in ds.iterall():
        if elem.VR == "UI" and elem.value:
            out |= {str(v) for v in (elem.value if elem.VM > 1 else [elem.value])}
    return out


def test_round_trip_restores_identity_and_every_reference(edge_db: Database) -> None:
    originals, deid = _deid_study(edge_db)
    sr = _sr(deid, deid[1])
    sr_uid, sr_series = str(sr.SOPInstanceUID), str(sr.SeriesInstanceUID)
    out = reidentify(sr, AGREEMENT, edge_db, originals[0])
    ds = out.dataset
    assert ds.PatientName == originals[0].PatientName
    assert ds.PatientID == originals[0].PatientID
    assert ds.PatientBirthDate == originals[0].PatientBirthDate
    assert ds.AccessionNumber == originals[0].AccessionNumber
    assert ds.StudyDate == originals[0].StudyDate
    assert ds.StudyInstanceUID == originals[0].StudyInstanceUID
    assert "PatientIdentityRemoved" not in ds and "DeidentificationMethod" not in ds
    # The result's own UIDs stay as minted; everything else is a hospital original.
    assert (ds.SOPInstanceUID, ds.SeriesInstanceUID) == (sr_uid, sr_series)
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == originals[0].StudyInstanceUID
    series = evidence.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == originals[0].SeriesInstanceUID
    assert {str(r.ReferencedSOPInstanceUID) for r in series.ReferencedSOPSequence} == {
        str(o.SOPInstanceUID) for o in originals
    }
    image_refs = [str(e.value) for e in ds.iterall() if e.keyword == "ReferencedSOPInstanceUID"]
    assert str(originals[1].SOPInstanceUID) in image_refs
    pseudonyms = {u for d in deid for u in _all_uids(d)} - {
        u for o in originals for u in _all_uids(o)
    }
    leftover = _all_uids(ds) & pseudonyms
    assert leftover == set(), "a pseudonymous UID survived re-identification"
    assert out.restored_uids >= 6
    # Still a valid SR that highdicom reads back.
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    back = hd.sr.srread(BytesIO(buf.getvalue()))
    assert back.PatientID == originals[0].PatientID


def test_result_for_a_study_never_sent_is_refused(edge_db: Database) -> None:
    originals, _ = _deid_study(edge_db)
    stranger = deidentify(make_instance(), Pseudonymizer(b"other-key" * 4)).dataset
    with pytest.raises(ReidentificationError, match="did not send"):
        reidentify(_sr([stranger], stranger), AGREEMENT, edge_db, originals[0])


def test_reference_to_an_unknown_instance_is_refused(edge_db: Database) -> None:
    originals, deid = _deid_study(edge_db)
    stray = pydicom.Dataset()
    stray.update(deid[0])
    stray.SOPInstanceUID = hd.UID()  # same (known) study, an instance the edge never sent
    sr = _sr([*deid, stray], stray)
    with pytest.raises(ReidentificationError, match="did not send"):
        reidentify(sr, AGREEMENT, edge_db, originals[0])
