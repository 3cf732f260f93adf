"""The trust boundary tried as an intruder would, against a running `radbridge up` over TLS.

One stack, two agreements: A (the demo hospital, whose PACS is a real Orthanc) and B (another
hospital). The center speaks HTTPS with the local CA's certificate; the edge's STOW-RS speaks
HTTPS with a hospital CA and wants client certificates. A study of A goes in over STOW-RS,
through the center, and its SR comes back to Orthanc. Then:

* every route of the center's live OpenAPI document is called with no credential, a token
  signed by a key the center does not know, a random bearer secret, a token minted for another
  request, the edge of agreement B (which the center knows) and a known caller in the wrong
  role: 401, 401, 401, 401, 404 (B must not learn A's objects exist) or 403, 403;
* TLS: a client trusting another CA, and plain HTTP on the HTTPS port, get nothing;
* the edge's STOW-RS: no credential, a wrong password, B's credentials from an address B does
  not allow, no client certificate: all refused;
* a forged result never reaches Orthanc: different bytes re-posted under a known SOP Instance
  UID are refused (0x0111) and start no new result; a result object altered at the center
  (file and listed sha256 both, as someone holding the center's disk and database could) and
  sent again fails the edge's signature check: dead with the reason, Orthanc unchanged.

The table of routes and probes is printed and written to ``intruder-table.md`` in the test's
folder (the trust-boundary note quotes it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import sqlite3
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import yaml
from sqlalchemy import select

from dicom_io.delivery import resend_delivery
from dicom_io.stow import encode_multipart
from models.cxr_dicom import write_cxr_study
from radbridge.auth import (
    EdgeAuth,
    EdgeEntry,
    edge_token,
    generate_edge_key,
    load_trust,
)
from radbridge.contract import tls_verify
from radbridge.db import Database
from radbridge.db.tables import DeliveryRow
from radbridge.identity import prepare_local_identity
from radbridge.settings import load_settings
from serving.boundary import ROLES_BY_PREFIX
from tests.certs import TestCA
from tests.conftest import REPO, free_port
from tests.e2e.stack import AGREEMENT, running_stack, stack_report, wait_for_results
from tests.peers import OrthancPeer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

AGREEMENT_B = "other-hospital-to-center"
PASSWORDS = {"RB_TEST_STOW_A": "stow-password-of-hospital-a", "RB_TEST_STOW_B": "stow-pw-b"}
MODEL = "chest-xray-demo"
PATIENT = {"name": "Zhao^Lei=赵^磊", "id": "PACS-INTR-0042", "birth": "19810203"}


def _agreements(path: Path, pacs: OrthancPeer) -> None:
    raw = yaml.safe_load((REPO / "radbridge/defaults/agreements.yaml").read_text())
    a = raw["agreements"][0]
    a["hospital"]["return_destination"] = {
        "ae_title": pacs.aet,
        "host": "127.0.0.1",
        "port": pacs.dicom_port,
    }
    a["hospital"]["stow"] = {"username": "hospital-a", "password_env": "RB_TEST_STOW_A"}
    b = copy.deepcopy(a)
    b["id"] = AGREEMENT_B
    b["hospital"]["name"] = "Other Hospital"
    b["hospital"]["calling_ae_titles"] = ["OTHER_PACS"]
    b["hospital"]["allowed_source_ips"] = ["10.9.9.0/24"]  # not loopback
    b["hospital"]["stow"] = {"username": "hospital-b", "password_env": "RB_TEST_STOW_B"}
    b["transfer_basis"]["reference"] = "DEMO-LOCAL-0001"
    raw["agreements"] = [a, b]
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))


def test_intruder_suite_over_tls(tmp_path: Path) -> None:
    ports = {"edge": free_port(), "metrics": free_port(), "center": free_port()}
    stow_port, dicom_tls_port = free_port(), free_port()
    hospital_ca = TestCA(tmp_path / "hospital-ca", name="hospital CA")
    edge_cert = hospital_ca.issue("radbridge-edge", server=True)
    pacs_client = hospital_ca.issue("hospital-a-pacs")
    data = tmp_path / "stack"
    data.mkdir()
    with OrthancPeer(
        workdir=tmp_path / "orthanc", extra_config={"OverwriteInstances": True}
    ) as pacs:
        agreements = tmp_path / "agreements.yaml"
        _agreements(agreements, pacs)
        env = {
            "RADBRIDGE_AGREEMENTS_FILE": str(agreements),
            "RADBRIDGE_EDGE__DELIVERY_POLL_S": "1",
            # The table makes ~50 failed calls from 127.0.0.1 on purpose; the lockout after
            # center.auth_max_failures (tests/test_auth.py) would answer the rest 401 for all.
            "RADBRIDGE_CENTER__AUTH_MAX_FAILURES": "1000",
            "RADBRIDGE_EDGE__STOW_PORT": str(stow_port),
            "RADBRIDGE_EDGE__STOW_TLS": "true",
            "RADBRIDGE_EDGE__TLS__PORT": str(dicom_tls_port),
            "RADBRIDGE_EDGE__TLS__CERT_FILE": str(edge_cert.cert),
            "RADBRIDGE_EDGE__TLS__KEY_FILE": str(edge_cert.key),
            "RADBRIDGE_EDGE__TLS__CA_FILE": str(hospital_ca.cert),
            **PASSWORDS,
        }
        # The identity `radbridge up` would make, made first, plus an edge the center knows
        # that acts for agreement B only: the other tenant.
        settings = load_settings(data_dir=data, agreements_file=agreements)
        prepare_local_identity(settings)
        intruder_key = generate_edge_key(tmp_path / "intruder-edge.pem")
        trust = load_trust(settings.center_trust_file)
        other = EdgeEntry(id="intruder-edge", agreements=[AGREEMENT_B], keys=[intruder_key.jwk])
        trust = trust.model_copy(update={"edges": [*trust.edges, other]})
        settings.center_trust_file.write_text(yaml.safe_dump(trust.model_dump(mode="json")))

        with running_stack(data, ports, **env) as stack:
            stow = f"https://127.0.0.1:{stow_port}/dicomweb/studies"
            stow_tls = {
                "verify": tls_verify(hospital_ca.cert),
                "cert": (str(pacs_client.cert), str(pacs_client.key)),
            }
            files = write_cxr_study(
                tmp_path / "study",
                seed=4242,
                findings={"pleural_effusion"},
                patient_name=PATIENT["name"],
                patient_id=PATIENT["id"],
                birth_date=PATIENT["birth"],
                n_images=2,
                accession="ACC-INTR-1",
            )
            study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            body, ctype = encode_multipart([f.read_bytes() for f in files])
            stow_rows = _stow_probes(stow, body, ctype, stow_tls, hospital_ca, tmp_path)
            with httpx.Client(timeout=60, **stow_tls) as c:  # type: ignore[arg-type]
                r = c.post(
                    stow,
                    content=body,
                    headers={"content-type": ctype},
                    auth=("hospital-a", PASSWORDS["RB_TEST_STOW_A"]),
                )
            assert r.status_code == 200, r.text
            stow_rows.append(("hospital A, its credentials and certificate", r.status_code))
            results: Any = wait_for_results(stack, study_uid, timeout_s=400)
            assert results["job"]["state"] == "done", results["job"]
            sr_id = _wait_for_pacs_sr(pacs, stack)
            delivered_sr = hashlib.sha256(pacs.instance_file(sr_id)).hexdigest()
            pseudo_study = results["study_uid"]

            rows = _center_probes(stack, pseudo_study, intruder_key, tmp_path)
            _tls_probes(stack, tmp_path)
            _forgeries(stack, pacs, pseudo_study, sr_id, delivered_sr)
            _write_table(tmp_path / "intruder-table.md", rows, stow_rows)
            _audit_trails_tell_the_story(data, pseudo_study)


# -- the center ---------------------------------------------------------------------------

PROBES = ("none", "unknown key", "random bearer", "token of another request", "tenant B")


def _center_probes(
    stack: dict[str, Any], pseudo_study: str, intruder_key: Any, tmp: Path
) -> list[tuple[str, str, str, dict[str, int]]]:
    http: httpx.Client = stack["http"]
    base: str = stack["base"]
    data = Path(stack["data"])
    keys = data / "keys"
    operator = {"authorization": f"Bearer {(keys / 'operator.token').read_text()}"}
    integration = {"authorization": f"Bearer {(keys / 'integration.token').read_text()}"}
    edge_auth: EdgeAuth = stack["edge_auth"]
    local_key = edge_auth.key  # the real edge's key: to mint a token for another request
    stranger = EdgeAuth(generate_edge_key(tmp / "stranger.pem"), "local-edge")
    intruder = EdgeAuth(intruder_key, "intruder-edge")
    listed = http.get(f"{base}/v1/agreements/{AGREEMENT}/result-objects", auth=edge_auth)
    assert listed.status_code == 200, listed.text
    object_id = str(listed.json()["objects"][0]["id"])
    values = {
        "study_uid": pseudo_study,
        "agreement_id": AGREEMENT,
        "object_id": object_id,
        "name": MODEL,
    }
    spec = http.get(f"{base}/openapi.json").json()
    routes = [
        (method.upper(), path)
        for path, ops in spec["paths"].items()
        for method in ops
        if path != "/healthz"
    ]
    assert len(routes) >= 8, routes  # every route of the center, as it documents itself
    rows = []
    for method, template in sorted(routes):
        # The purge route is probed on a study the center does not hold: its owner's call
        # (idempotent, "nothing to purge") must not delete the study the rest of the test reads.
        purge = template.endswith("/purge")
        path = template.format(**(values | ({"study_uid": "2.25.1"} if purge else {})))
        role = next((r.value for p, r in ROLES_BY_PREFIX if path.startswith(p)), "any")
        headers = {"x-radbridge-agreement": AGREEMENT, "content-type": "application/json"}
        # A well-formed body where the route takes JSON, so a refusal is the boundary's.
        bodies = {
            "/complete": {"agreement_id": AGREEMENT, "priority": "routine", "instance_count": 2},
            "/prepare": {"agreement_id": AGREEMENT, "priority": "routine", "instance_count": 2},
            "/purge": {"agreement_id": AGREEMENT, "reason": "consent-withdrawn"},
        }
        well_formed = next((b for end, b in bodies.items() if path.endswith(end)), None)
        body = json.dumps(well_formed).encode() if well_formed else b"{}"

        def call(
            extra: dict[str, str] | None = None,
            auth: Any = None,
            method: str = method,
            url: str = f"{base}{path}",
            body: bytes = body,
            headers: dict[str, str] = headers,
        ) -> int:
            h = {**headers, **(extra or {})}
            return http.request(method, url, content=body, headers=h, auth=auth).status_code

        other_request = edge_token(local_key, "local-edge", "GET", "/healthz")
        got = {
            "none": call(),
            "unknown key": call(auth=stranger),
            "random bearer": call({"authorization": "Bearer " + "A" * 43}),
            "token of another request": call({"authorization": f"Bearer {other_request}"}),
            "tenant B": call(auth=intruder),
        }
        wrong = operator if role != "operator" else integration
        got["wrong role"] = call(wrong)
        own = {"edge": None, "operator": operator, "integration": integration}.get(role)
        got["owner"] = call(own, auth=edge_auth if role == "edge" else None)
        for probe in PROBES[:4]:
            assert got[probe] == 401, (method, path, probe, got)
        assert got["tenant B"] == (404 if role == "edge" else 403), (method, path, got)
        assert got["wrong role"] == 403, (method, path, got)
        assert got["owner"] not in (401, 403, 404), (method, path, got)  # the route is real
        rows.append((method, template, role, got))
    # A token is good for one request only: the same one again is refused.
    path = f"/v1/studies/{pseudo_study}/results"
    once = {"authorization": f"Bearer {edge_token(local_key, 'local-edge', 'GET', path)}"}
    assert http.get(f"{base}{path}", headers=once).status_code == 200
    assert http.get(f"{base}{path}", headers=once).status_code == 401
    return rows


def _tls_probes(stack: dict[str, Any], tmp: Path) -> None:
    base: str = stack["base"]
    foreign = TestCA(tmp / "foreign-ca", name="foreign CA")
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{base}/healthz", verify=tls_verify(foreign.cert), timeout=10)
    with pytest.raises(httpx.HTTPError):
        plain = httpx.get(base.replace("https://", "http://") + "/healthz", timeout=10)
        raise AssertionError(f"plain HTTP answered {plain.status_code}")


# -- the edge's STOW-RS ---------------------------------------------------------------------


def _stow_probes(
    url: str, body: bytes, ctype: str, tls: dict[str, Any], ca: TestCA, tmp: Path
) -> list[tuple[str, int | str]]:
    rows: list[tuple[str, int | str]] = []
    h = {"content-type": ctype}
    with httpx.Client(timeout=30, **tls) as c:
        for label, auth in (
            ("no credential", None),
            ("hospital A, wrong password", ("hospital-a", "guess")),
            ("hospital B, wrong password", ("hospital-b", "x")),
            (
                "hospital B's password, from an address B does not allow",
                ("hospital-b", PASSWORDS["RB_TEST_STOW_B"]),
            ),
        ):
            r = c.post(url, content=body, headers=h, auth=auth)
            assert r.status_code == 401, (label, r.status_code, r.text)
            rows.append((label, r.status_code))
    with pytest.raises(httpx.HTTPError):
        httpx.post(
            url,
            content=body,
            headers=h,
            auth=("hospital-a", PASSWORDS["RB_TEST_STOW_A"]),
            verify=tls_verify(ca.cert),  # a fresh context: httpx loads `cert` into the one given
            timeout=30,
        ).raise_for_status()
    rows.append(("hospital A's password, no client certificate", "TLS handshake refused"))
    return rows


# -- forged results ---------------------------------------------------------------------------


def _wait_for_pacs_sr(pacs: OrthancPeer, stack: dict[str, Any]) -> str:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for inst in pacs.client.get("/instances").json():
            if pacs.instance_tags(inst).get("Modality") == "SR":
                return str(inst)
        time.sleep(2)
    pytest.fail(f"no SR reached the PACS in time:\n{stack_report(Path(stack['data']))}")
    raise AssertionError


def _forgeries(
    stack: dict[str, Any], pacs: OrthancPeer, pseudo_study: str, sr_id: str, sr_sha: str
) -> None:
    http: httpx.Client = stack["http"]
    base: str = stack["base"]
    data = Path(stack["data"])
    edge_auth = stack["edge_auth"]
    count = pacs.statistics()["CountInstances"]
    listing = f"{base}/v1/agreements/{AGREEMENT}/result-objects"
    before = http.get(listing, auth=edge_auth).json()["objects"]

    # 1. Other bytes under a SOP Instance UID the center holds, with the edge's own key.
    held = sorted((data / "center" / "store").rglob("*.dcm"))
    ds = next(
        d for d in (pydicom.dcmread(p) for p in held) if d.Modality != "SR" and "PixelData" in d
    )
    original_bytes = next(p for p in held if p.name == f"{ds.SOPInstanceUID}.dcm").read_bytes()
    ds.SeriesDescription = "FORGED"
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    body, ctype = encode_multipart([buf.getvalue()])
    r = http.post(
        f"{base}/v1/studies",
        content=body,
        headers={"content-type": ctype, "x-radbridge-agreement": AGREEMENT},
        auth=edge_auth,
    )
    assert r.status_code == 409, r.text
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0x0111]
    again = next(p for p in held if p.name == f"{ds.SOPInstanceUID}.dcm").read_bytes()
    assert again == original_bytes
    done = {"agreement_id": AGREEMENT, "priority": "stat", "instance_count": 2}
    r = http.post(f"{base}/v1/studies/{pseudo_study}/complete", json=done, auth=edge_auth)
    assert r.status_code in (200, 202), r.text
    time.sleep(6)  # several delivery polls
    assert http.get(listing, auth=edge_auth).json()["objects"] == before

    # 2. The SR altered at the center after it was signed: file and listed sha256 both.
    sr = next(o for o in before if o["kind"] == "sr" and o["study_uid"] == pseudo_study)
    center_db = sqlite3.connect(data / "center" / "center.db")
    (rel,) = center_db.execute(
        "select path from result_objects where id = ?", (sr["id"],)
    ).fetchone()
    path = data / "center" / "store" / rel
    forged = pydicom.dcmread(path)
    forged.ContentDate = "19990101"
    buf = BytesIO()
    forged.save_as(buf, enforce_file_format=True)
    path.write_bytes(buf.getvalue())
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    with center_db:
        center_db.execute(
            "update result_objects set sha256 = ?, size = ? where id = ?",
            (digest, len(buf.getvalue()), sr["id"]),
        )
    center_db.close()
    edge_db = Database(f"sqlite:///{data / 'edge' / 'edge.db'}")
    try:
        with edge_db.session() as s:
            delivery = s.scalars(
                select(DeliveryRow).where(DeliveryRow.center_object_id == sr["id"])
            ).one()
        assert delivery.state == "delivered"
        resend_delivery(edge_db, delivery.id)  # as `radbridge gateway resend` does
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with edge_db.session() as s:
                row = s.get(DeliveryRow, delivery.id)
                assert row is not None
                if row.state == "dead":
                    break
            time.sleep(1)
        assert row.state == "dead", (row.state, row.last_error)
        assert "(altered)" in (row.last_error or ""), row.last_error
    finally:
        edge_db.dispose()
    assert pacs.statistics()["CountInstances"] == count
    assert hashlib.sha256(pacs.instance_file(sr_id)).hexdigest() == sr_sha


def _write_table(
    path: Path,
    rows: list[tuple[str, str, str, dict[str, int]]],
    stow_rows: list[tuple[str, int | str]],
) -> None:
    probes = [*PROBES, "wrong role", "owner"]
    lines = [
        "| route | role | " + " | ".join(probes) + " |",
        "|---|---|" + "---|" * len(probes),
    ]
    denied = total = 0
    for method, template, role, got in rows:
        lines.append(
            f"| `{method} {template}` | {role} | " + " | ".join(str(got[p]) for p in probes) + " |"
        )
        hostile = [got[p] for p in probes if p != "owner"]
        total += len(hostile)
        denied += sum(code in (401, 403, 404) for code in hostile)
    lines += [
        "",
        f"center: {denied}/{total} hostile calls denied",
        "",
        "| STOW-RS probe | answer |",
    ]
    lines += ["|---|---|", *[f"| {label} | {code} |" for label, code in stow_rows]]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    print("\n" + text)
    assert denied == total


def _audit_trails_tell_the_story(data: Path, pseudo_study: str) -> None:
    """Both nodes' trails verify, and together they tell the study's story in order: exported
    under the agreement's legal basis, imported, results delivered to the PACS, the forged
    result refused. Nothing in them is the patient's (pseudonymous UIDs only)."""
    from radbridge.audit import records, verify

    events: dict[str, list[tuple[str, str | None]]] = {}
    for node in ("edge", "center"):
        db = Database(f"sqlite:///{data / node / f'{node}.db'}")
        try:
            count, broken = verify(db)
            assert broken is None and count >= 2, (node, broken)
            events[node] = [(json.loads(r.details)["event"], r.study_uid) for r in records(db)]
            blob = " ".join(r.details + (r.study_uid or "") for r in records(db))
        finally:
            db.dispose()
        for needle in (PATIENT["id"], "Zhao", "赵", "ACC-INTR-1"):
            assert needle not in blob, (node, needle)
    edge = [e for e, uid in events["edge"] if uid in (pseudo_study, None)]
    assert edge[0] == "agreements-changed" and "export" in edge, edge
    assert (
        edge.index("export") < edge.index("instances-transferred") < edge.index("result-refused")
    ), edge
    assert ("import", pseudo_study) in events["center"], events["center"]
