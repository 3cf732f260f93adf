"""radbridge.signing: the center's result signatures and the edge's check of them."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from radbridge.errors import ConfigError, SignatureError
from radbridge.signing import (
    ResultSigner,
    ResultVerifier,
    ensure_local_signing,
    load_center_keys,
    load_signer,
)

DATA = b"the exact bytes of an SR"
FIELDS: dict[str, Any] = {
    "sop_instance_uid": "2.25.11",
    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.22",
    "study_uid": "2.25.10",
    "kind": "sr",
    "version": 2,
}


def _sign(signer: ResultSigner, **over: Any) -> str:
    args: dict[str, Any] = {
        "agreement_id": "agr-a",
        "edges": ["edge-a"],
        "sha256": hashlib.sha256(DATA).hexdigest(),
        **FIELDS,
        **over,
    }
    return signer.sign(**args)


def _verify(verifier: ResultVerifier, token: str | None, **over: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "edge_id": "edge-a",
        "agreement_id": "agr-a",
        "sha256": hashlib.sha256(DATA).hexdigest(),
        "expected": dict(FIELDS),
        **over,
    }
    return verifier.verify(token, **args)


@pytest.fixture
def signer() -> ResultSigner:
    return ResultSigner(Ed25519PrivateKey.generate())


def test_a_signature_binds_bytes_uids_agreement_and_edge(signer: ResultSigner) -> None:
    verifier = ResultVerifier([signer.jwk])
    claims = _verify(verifier, _sign(signer))
    assert claims["sha256"] == hashlib.sha256(DATA).hexdigest()
    assert claims["agreement"] == "agr-a" and claims["edges"] == ["edge-a"]


@pytest.mark.parametrize(
    ("token_over", "verify_over", "reason"),
    [
        ({}, {"sha256": hashlib.sha256(DATA + b"!").hexdigest()}, "altered"),
        ({}, {"agreement_id": "agr-b"}, "not_ours"),
        ({}, {"edge_id": "edge-b"}, "not_ours"),
        ({}, {"expected": {**FIELDS, "sop_instance_uid": "2.25.12"}}, "mismatch"),
        ({}, {"expected": {**FIELDS, "version": 3}}, "mismatch"),
        ({"kind": "seg"}, {}, "mismatch"),
    ],
)
def test_anything_else_is_refused_with_its_reason(
    signer: ResultSigner, token_over: dict[str, Any], verify_over: dict[str, Any], reason: str
) -> None:
    verifier = ResultVerifier([signer.jwk])
    with pytest.raises(SignatureError) as err:
        _verify(verifier, _sign(signer, **token_over), **verify_over)
    assert err.value.reason == reason


def test_a_result_signed_by_a_clock_ahead_of_the_edges_is_accepted(
    signer: ResultSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edge's clock stepped back two hours: the center's signature is "from the future"
    to it, and still binds the same bytes (a result's signature does not expire)."""
    real = time.time
    monkeypatch.setattr("radbridge.signing.time.time", lambda: real() + 7200)
    token = _sign(signer)
    monkeypatch.setattr("radbridge.signing.time.time", real)
    claims = _verify(ResultVerifier([signer.jwk]), token)
    assert claims["iat"] > real() + 7000


def test_unsigned_foreign_key_and_tampered_tokens_are_refused(signer: ResultSigner) -> None:
    verifier = ResultVerifier([signer.jwk])
    with pytest.raises(SignatureError) as err:
        _verify(verifier, None)
    assert err.value.reason == "unsigned"
    stranger = ResultSigner(Ed25519PrivateKey.generate())
    with pytest.raises(SignatureError) as err:
        _verify(verifier, _sign(stranger))
    assert err.value.reason == "unknown_key"
    h, _, sig = _sign(signer).split(".")
    other_p = _sign(signer, version=3).split(".")[1]  # a validly encoded, other payload
    with pytest.raises(SignatureError) as err:
        _verify(verifier, f"{h}.{other_p}.{sig}")
    assert err.value.reason == "invalid"


def test_local_signing_key_and_the_edges_jwks_rotate(tmp_path: Path) -> None:
    key, jwks = tmp_path / "keys" / "center-signing.pem", tmp_path / "keys" / "center.jwks.json"
    ensure_local_signing(key, jwks)
    first = load_signer(key)
    assert load_center_keys(jwks) == [first.jwk]
    ensure_local_signing(key, jwks)  # idempotent
    assert load_center_keys(jwks) == [first.jwk]
    key.unlink()  # a new key: the old one stays trusted for objects already signed
    ensure_local_signing(key, jwks)
    second = load_signer(key)
    assert load_center_keys(jwks) == [first.jwk, second.jwk]
    verifier = ResultVerifier(load_center_keys(jwks))
    _verify(verifier, _sign(first))
    _verify(verifier, _sign(second))


def test_bad_key_files_name_the_setting(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match=r"edge\.center_keys_file"):
        load_center_keys(bad)
    with pytest.raises(ConfigError, match=r"center\.signing_key_file"):
        load_signer(bad)
    with pytest.raises(ConfigError, match="no public key"):
        ResultVerifier([])
