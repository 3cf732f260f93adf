"""Who may call the center, and how each caller proves it (the trust boundary).

Callers and their credentials:

- an **edge** (one per hospital site) signs a short-lived JWT with its own Ed25519 private key
  for every request (a private-key JWT assertion, RFC 7523 style): ``iss``/``sub`` its id,
  ``aud`` the center, ``iat``/``exp`` at most :data:`TOKEN_TTL_S` apart, a random ``jti`` and
  the request it is for (``htm`` method, ``htu`` path, as DPoP binds a proof to one request).
  The center knows each edge's public keys by ``kid`` (RFC 7638 thumbprints; a JWKS of several
  keys rotates them) and the agreements the edge may act for. The private key never leaves the
  edge; the center's database never holds a secret;
- an **operator** (metrics) and an **integration** (sync inference, priority capped) present
  a bearer secret of at least 32 bytes; the center keeps only its sha256.

The center's trust file (:class:`TrustFile`, YAML) lists them. Every failure answers the same
401 (the reason is logged, never the token); an address with repeated failures is locked out
for a while, even with a good credential.

``radbridge up`` (local mode) creates a throwaway identity under the data directory
(:func:`ensure_local_identity`): the edge's key, a trust file binding it to every agreement,
operator and integration secrets; every test goes through the real signatures.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx
import jwt
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from radbridge.agreements import Priority
from radbridge.errors import AuthError, ConfigError, validation_problems
from radbridge.files import write_atomic

log = logging.getLogger("radbridge.edge.auth")

__all__ = [
    "AUDIENCE",
    "TOKEN_TTL_S",
    "Caller",
    "EdgeAuth",
    "EdgeKey",
    "Role",
    "TrustFile",
    "Verifier",
    "edge_token",
    "edges_by_agreement",
    "ensure_local_identity",
    "load_edge_key",
    "load_trust",
]

AUDIENCE = "radbridge-center"
TOKEN_TTL_S = 120
LEEWAY_S = 30
SKEW_TOLERANCE_S = 5  # an edge clock this close to the center's needs no correction
MIN_SECRET_BYTES = 32
_ID = r"^[a-z0-9][a-z0-9-]{0,62}$"
_PRIORITY_RANK = {Priority.ROUTINE: 0, Priority.URGENT: 1, Priority.STAT: 2}


class Role(StrEnum):
    EDGE = "edge"
    OPERATOR = "operator"
    INTEGRATION = "integration"


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: what it is and which agreements it may touch."""

    role: Role
    id: str
    agreements: frozenset[str]
    max_priority: Priority = Priority.ROUTINE

    def may_act_for(self, agreement_id: str) -> bool:
        return agreement_id in self.agreements

    def capped(self, priority: Priority) -> Priority:
        """``priority``, lowered to the most this caller may ask for."""
        if _PRIORITY_RANK[priority] > _PRIORITY_RANK[self.max_priority]:
            return self.max_priority
        return priority


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PublicJWK(_Strict):
    kty: str = Field(pattern="^OKP$")
    crv: str = Field(pattern="^Ed25519$")
    x: str = Field(min_length=43, max_length=43, description="base64url, 32 bytes")
    kid: str = Field(min_length=8, max_length=128)


class EdgeEntry(_Strict):
    id: str = Field(pattern=_ID)
    agreements: list[str] = Field(min_length=1)
    keys: list[PublicJWK] = Field(min_length=1, description="Its public keys (a JWKS).")


class SecretEntry(_Strict):
    id: str = Field(pattern=_ID)
    token_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    agreements: list[str] = Field(default_factory=list)
    max_priority: Priority = Priority.ROUTINE


class TrustFile(_Strict):
    """The center's list of who may call it (edges by public key, others by secret hash)."""

    edges: list[EdgeEntry] = Field(default_factory=list)
    operators: list[SecretEntry] = Field(default_factory=list)
    integrations: list[SecretEntry] = Field(default_factory=list)


def edges_by_agreement(trust: TrustFile) -> dict[str, list[str]]:
    """Agreement id -> the ids of the edges the trust file binds to it (sorted)."""
    out: dict[str, list[str]] = {}
    for edge in trust.edges:
        for agreement_id in edge.agreements:
            out.setdefault(agreement_id, []).append(edge.id)
    return {a: sorted(ids) for a, ids in out.items()}


def load_trust(path: Path) -> TrustFile:
    """Read and validate a trust file; ``ConfigError`` names the bad field."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"trust file {path}: cannot be read ({type(exc).__name__})") from None
    try:
        trust = TrustFile.model_validate(raw or {})
    except ValidationError as exc:
        raise ConfigError(f"trust file {path}: {validation_problems(exc, 1)}") from None
    kids = [k.kid for e in trust.edges for k in e.keys]
    if len(kids) != len(set(kids)):
        raise ConfigError(f"trust file {path}: edges.keys.kid: a key id is listed twice")
    return trust


# -- edge keys ------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def public_jwk(public: Ed25519PublicKey) -> PublicJWK:
    """The key as a JWK with its RFC 7638 thumbprint as ``kid``."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    x = _b64url(raw)
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"))
    kid = _b64url(hashlib.sha256(canonical.encode()).digest())
    return PublicJWK(kty="OKP", crv="Ed25519", x=x, kid=kid)


@dataclass(frozen=True)
class EdgeKey:
    private: Ed25519PrivateKey
    jwk: PublicJWK


def load_edge_key(path: Path, field: str = "edge.key_file") -> EdgeKey:
    """An Ed25519 private key (PEM); ``field`` names the setting in errors."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{field} {path}: cannot be read ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{field} {path}: not an Ed25519 private key")
    return EdgeKey(key, public_jwk(key.public_key()))


def generate_edge_key(path: Path) -> EdgeKey:
    """A new Ed25519 key written (mode 0600, atomically) to ``path``."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(path, pem)
    return EdgeKey(key, public_jwk(key.public_key()))


def edge_token(key: EdgeKey, edge_id: str, method: str, path: str, now: float | None = None) -> str:
    """A JWT for one request (``method`` and ``path`` without the query) by this edge."""
    iat = int(now if now is not None else time.time())
    claims = {
        "iss": edge_id,
        "sub": edge_id,
        "aud": AUDIENCE,
        "iat": iat,
        "exp": iat + TOKEN_TTL_S,
        "jti": secrets.token_urlsafe(16),
        "htm": method.upper(),
        "htu": path,
    }
    return jwt.encode(claims, key.private, algorithm="EdDSA", headers={"kid": key.jwk.kid})


class EdgeAuth(httpx.Auth):
    """httpx authentication of an edge: a fresh token for each request it sends (also for
    each retry), bound to that request's method and path.

    Its times are the center's: the center checks ``iat``/``exp`` against its own clock, so an
    edge whose wall clock stepped (an NTP step, a virtual machine restored from a snapshot)
    would otherwise be refused until it is set right. Each answer's ``Date`` header gives the
    center's time; an offset of more than :data:`SKEW_TOLERANCE_S` from the edge's clock is
    added to the tokens' times from then on, and a request the center refused with 401 while
    the offset was unknown goes once more with it. Only a center that passed the TLS check
    can set the offset, and it can only make tokens fresh by its own clock, which it checks
    anyway.
    """

    def __init__(self, key: EdgeKey, edge_id: str) -> None:
        self.key, self.edge_id = key, edge_id
        self.offset_s = 0.0  # the center's clock minus the edge's, as last seen (whole seconds)

    def auth_flow(self, request: httpx.Request) -> Any:
        offset = self.offset_s
        sent = self._sign(request, offset)
        response = yield request
        self._learn(response, sent)
        if response.status_code == 401 and self.offset_s != offset:
            sent = self._sign(request, self.offset_s)
            response = yield request
            self._learn(response, sent)

    def _sign(self, request: httpx.Request, offset_s: float) -> float:
        """Sign ``request`` with the center's time; when (``time.monotonic``) it was signed."""
        now = time.time() + offset_s
        token = edge_token(self.key, self.edge_id, request.method, request.url.path, now)
        request.headers["Authorization"] = f"Bearer {token}"
        return time.monotonic()

    def _learn(self, response: httpx.Response, sent: float) -> None:
        """The center wrote ``Date`` (whole seconds) in the ``elapsed`` seconds since ``sent``
        (a long poll: anywhere in them), so the offset lies in [Date - now, Date + 1 - now +
        elapsed] (the monotonic clock: the wall clock may step mid-request). Zero when that
        range allows it (within the tolerance), the current offset when it does, else the
        middle of the range (a long poll's is wide: a later short request narrows it)."""
        center = _http_date(response.headers.get("date"))
        if center is None:
            return
        low = center - time.time()
        high = low + 1 + (time.monotonic() - sent)
        tolerance = SKEW_TOLERANCE_S
        if low - tolerance <= 0 <= high + tolerance:
            offset = 0.0
        elif low - tolerance <= self.offset_s <= high + tolerance:
            return
        else:
            offset = float(round((low + high) / 2))
        if offset != self.offset_s:
            log.warning(
                "the center's clock is %+.0f s from this edge's: request tokens use the "
                "center's time",
                offset,
            )
            self.offset_s = offset


def _http_date(value: str | None) -> float | None:
    """An HTTP ``Date`` header as a POSIX time; None when absent or not a date."""
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def secret_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# -- the center's check ---------------------------------------------------------------------


class Verifier:
    """Authenticates requests against a trust file; one per center replica.

    ``authenticate`` returns the :class:`Caller` or raises :class:`AuthError` (401) with one
    message whatever the reason. A ``jti`` is accepted once per replica (a replay to another
    replica can only repeat the same method and path within the token's two minutes, which the
    center's routes answer idempotently). More than ``max_failures`` failures from one address
    within ``window_s`` lock it out for ``lockout_s``.
    """

    def __init__(
        self,
        trust: TrustFile,
        *,
        max_failures: int = 20,
        window_s: float = 60.0,
        lockout_s: float = 60.0,
    ) -> None:
        self._keys: dict[str, tuple[EdgeEntry, jwt.PyJWK]] = {}
        for edge in trust.edges:
            for k in edge.keys:
                self._keys[k.kid] = (edge, jwt.PyJWK(k.model_dump(), algorithm="EdDSA"))
        self._secrets = [(e, Role.OPERATOR) for e in trust.operators]
        self._secrets += [(e, Role.INTEGRATION) for e in trust.integrations]
        self._seen: dict[str, float] = {}  # jti -> exp of the tokens accepted
        self._pruned = 0.0
        self._failures: dict[str, deque[float]] = {}
        self._locked: dict[str, float] = {}
        self._lock = threading.Lock()
        self.max_failures, self.window_s, self.lockout_s = max_failures, window_s, lockout_s
        self.last_failure = ""  # why the last request was refused, for the log (no token)

    def authenticate(
        self,
        authorization: str | None,
        method: str,
        path: str,
        address: str = "?",
        now: float | None = None,
    ) -> Caller:
        """``now``: the center's clock (POSIX seconds; the wall clock when None)."""
        now = time.time() if now is None else now
        with self._lock:
            until = self._locked.get(address, 0.0)
        if until > now:
            self.last_failure = "address locked out after repeated failures"
            raise AuthError("not authenticated")
        try:
            return self._check(authorization, method, path, now)
        except AuthError as exc:
            self.last_failure = str(exc)
            self._failed(address, now)
            raise AuthError("not authenticated") from None

    def _failed(self, address: str, now: float) -> None:
        with self._lock:
            times = self._failures.setdefault(address, deque())
            times.append(now)
            while times and times[0] < now - self.window_s:
                times.popleft()
            if len(times) > self.max_failures:
                self._locked[address] = now + self.lockout_s
                times.clear()

    def _check(self, authorization: str | None, method: str, path: str, now: float) -> Caller:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token or len(token) > 4096:
            raise AuthError("no bearer credential")
        if token.count(".") == 2:
            return self._edge(token.strip(), method, path, now)
        digest = secret_hash(token.strip())
        for entry, role in self._secrets:
            if hmac.compare_digest(entry.token_sha256, digest):
                return Caller(role, entry.id, frozenset(entry.agreements), entry.max_priority)
        raise AuthError("unknown secret")

    def _edge(self, token: str, method: str, path: str, now: float) -> Caller:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        found = self._keys.get(str(kid))
        if found is None:
            raise AuthError("unknown key id")
        edge, key = found
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=["EdDSA"],
                audience=AUDIENCE,
                issuer=edge.id,
                options={
                    "require": ["iss", "sub", "aud", "iat", "exp", "jti", "htm", "htu"],
                    # checked below against ``now``, the one clock of this check
                    "verify_exp": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token ({type(exc).__name__})") from None
        if claims["sub"] != edge.id:
            raise AuthError("subject is not the issuer")
        iat, exp = claims["iat"], claims["exp"]
        if not all(type(t) is int for t in (iat, exp)):
            raise AuthError("token times are not whole seconds")
        if exp < now - LEEWAY_S:
            raise AuthError("token expired")
        if exp - iat > TOKEN_TTL_S or iat > now + LEEWAY_S:
            raise AuthError("token lifetime out of bounds")
        if claims["htm"] != method.upper() or claims["htu"] != path:
            raise AuthError("token is for another request")
        jti = str(claims["jti"])
        with self._lock:
            if now - self._pruned > 1.0:  # at most once a second, not per request
                for old in [j for j, exp in self._seen.items() if exp < now - LEEWAY_S]:
                    del self._seen[old]
                self._pruned = now
            if jti in self._seen:
                raise AuthError("token replayed")
            self._seen[jti] = float(claims["exp"])
        return Caller(Role.EDGE, edge.id, frozenset(edge.agreements), Priority.STAT)


# -- the embedded default -------------------------------------------------------------------


def ensure_local_identity(
    key_file: Path, trust_file: Path, edge_id: str, agreement_ids: list[str]
) -> None:
    """Create, where missing, a throwaway local identity: the edge's key, the center's trust
    file binding it to ``agreement_ids``, and operator / integration secrets (their plain
    values beside the trust file, mode 0600, for local tools: ``operator.token``,
    ``integration.token``). Existing files are kept (a restart keeps its identity); a trust
    file that lacks this edge's current key gets it added."""
    key = load_edge_key(key_file) if key_file.exists() else generate_edge_key(key_file)
    if trust_file.exists():
        trust = load_trust(trust_file)
        if any(k.kid == key.jwk.kid for e in trust.edges for k in e.keys):
            return
        edges = [e for e in trust.edges if e.id != edge_id]
        trust = trust.model_copy(
            update={
                "edges": [*edges, EdgeEntry(id=edge_id, agreements=agreement_ids, keys=[key.jwk])]
            }
        )
    else:
        secrets_dir = trust_file.parent
        tokens = {}
        for name in ("operator", "integration"):
            tokens[name] = secrets.token_urlsafe(32)
            write_atomic(secrets_dir / f"{name}.token", tokens[name].encode())
        trust = TrustFile(
            edges=[EdgeEntry(id=edge_id, agreements=agreement_ids, keys=[key.jwk])],
            operators=[
                SecretEntry(id="local-operator", token_sha256=secret_hash(tokens["operator"]))
            ],
            integrations=[
                SecretEntry(
                    id="local-integration",
                    token_sha256=secret_hash(tokens["integration"]),
                    agreements=agreement_ids,
                    max_priority=Priority.STAT,
                )
            ],
        )
    text = yaml.safe_dump(trust.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    write_atomic(trust_file, text.encode("utf-8"))
