"""Result integrity: the center signs every result object, the edge verifies before anything.

When the center writes a result object (SR, SEG) it signs, with an Ed25519 key that is not in
its database, a JWS (compact, EdDSA) whose claims bind the object's exact bytes (their sha256)
to what it is and whom it is for: SOP Instance and Class UID, pseudonymous study UID, kind,
version, agreement, and the edges the center's trust file binds to that agreement. The
signature is kept with the object's row and carried in the listing; the edge verifies it with
the center's public keys (a JWKS it was given out of band) before it parses, re-identifies or
sends anything to the PACS, and keeps the verified token as evidence of what it delivered.

Someone who can change the center's files or rows (or re-post a study under a known UID) cannot
make a result the edge accepts: the key is not there. DICOM's own Digital Signatures would not
survive re-identification, and no maintained Python implementation exists.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from radbridge.auth import PublicJWK, generate_edge_key, load_edge_key, public_jwk
from radbridge.db.tables import ResultObjectRow
from radbridge.errors import ConfigError, SignatureError

__all__ = [
    "ISSUER",
    "ResultSigner",
    "ResultVerifier",
    "ensure_local_signing",
    "load_center_keys",
    "load_signer",
    "write_center_keys",
]

ISSUER = "radbridge-center"
_BOUND = ("sha256", "sop_instance_uid", "sop_class_uid", "study_uid", "kind", "version")


@dataclass(frozen=True)
class ResultSigner:
    """Signs result objects with the center's private key."""

    key: Ed25519PrivateKey

    @property
    def jwk(self) -> PublicJWK:
        return public_jwk(self.key.public_key())

    def sign(
        self,
        *,
        agreement_id: str,
        edges: list[str],
        sha256: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        study_uid: str,
        kind: str,
        version: int,
    ) -> str:
        claims = {
            "iss": ISSUER,
            "iat": int(time.time()),
            "agreement": agreement_id,
            "edges": sorted(edges),
            "sha256": sha256.lower(),
            "sop_instance_uid": sop_instance_uid,
            "sop_class_uid": sop_class_uid,
            "study_uid": study_uid,
            "kind": kind,
            "version": version,
        }
        return jwt.encode(claims, self.key, algorithm="EdDSA", headers={"kid": self.jwk.kid})

    def sign_row(self, row: ResultObjectRow, edges_by_agreement: dict[str, list[str]]) -> str:
        """The signature of a result object row, for the edges bound to its agreement."""
        return self.sign(
            agreement_id=row.agreement_id,
            edges=edges_by_agreement.get(row.agreement_id, []),
            sha256=row.sha256,
            sop_instance_uid=row.sop_instance_uid,
            sop_class_uid=row.sop_class_uid,
            study_uid=row.study_uid,
            kind=row.kind,
            version=row.version,
        )


class ResultVerifier:
    """Verifies the center's signatures at the edge (public keys by ``kid``)."""

    def __init__(self, keys: list[PublicJWK]) -> None:
        if not keys:
            raise ConfigError("edge.center_keys_file: no public key of the center")
        self._keys = {k.kid: jwt.PyJWK(k.model_dump(), algorithm="EdDSA") for k in keys}

    def verify(
        self,
        token: str | None,
        *,
        edge_id: str,
        agreement_id: str,
        sha256: str,
        expected: dict[str, Any],
    ) -> dict[str, Any]:
        """The claims, when ``token`` is the center's signature of these exact bytes
        (``sha256`` computed here from what was downloaded) for this agreement and this edge,
        and its UIDs, kind and version are ``expected``; :class:`SignatureError` otherwise."""
        if not token:
            raise SignatureError("unsigned", "the result object carries no signature")
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self._keys.get(str(kid))
            if key is None:
                raise SignatureError("unknown_key", "signed with a key this edge does not trust")
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=["EdDSA"],
                issuer=ISSUER,
                options={
                    "require": ["iss", "iat", *_BOUND, "agreement", "edges"],
                    # A result's signature does not expire and ``iat`` only records when it
                    # was made: an edge whose clock lags the center's (a step back) must not
                    # refuse a result "signed in the future" for ever.
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise SignatureError("invalid", f"signature invalid ({type(exc).__name__})") from None
        if claims["sha256"] != sha256.lower():
            raise SignatureError("altered", "the bytes are not the ones the center signed")
        if claims["agreement"] != agreement_id or edge_id not in claims["edges"]:
            raise SignatureError("not_ours", "signed for another agreement or edge")
        for name, value in expected.items():
            if claims.get(name) != value:
                raise SignatureError("mismatch", f"signed {name} differs from the object's")
        return claims


def write_center_keys(path: Path, keys: list[PublicJWK]) -> None:
    """The center's public keys as a JWKS file (what an edge is given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"keys": [k.model_dump() for k in keys]}, indent=2) + "\n")
    tmp.replace(path)


def load_center_keys(path: Path) -> list[PublicJWK]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return [PublicJWK.model_validate(k) for k in raw["keys"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"edge.center_keys_file {path}: not a JWKS of Ed25519 keys ({type(exc).__name__})"
        ) from None


def load_signer(path: Path) -> ResultSigner:
    return ResultSigner(load_edge_key(path, "center.signing_key_file").private)


def ensure_local_signing(signing_key_file: Path, center_keys_file: Path) -> None:
    """Create, where missing, the center's throwaway signing key and the JWKS the local edge
    trusts; a JWKS without the current key gets it added (the old ones stay: rotation)."""
    if signing_key_file.exists():
        jwk = load_edge_key(signing_key_file, "center.signing_key_file").jwk
    else:
        jwk = generate_edge_key(signing_key_file).jwk
    keys = load_center_keys(center_keys_file) if center_keys_file.exists() else []
    if all(k.kid != jwk.kid for k in keys):
        write_center_keys(center_keys_file, [*keys, jwk])
