"""radbridge.auth: edge tokens, secrets, the trust file and the local identity."""

from __future__ import annotations

import email.utils
import stat
import time
from pathlib import Path

import httpx
import jwt
import pytest
import yaml

from radbridge.agreements import Priority
from radbridge.auth import (
    AUDIENCE,
    Caller,
    EdgeAuth,
    EdgeEntry,
    EdgeKey,
    Role,
    SecretEntry,
    TrustFile,
    Verifier,
    edge_token,
    ensure_local_identity,
    generate_edge_key,
    load_edge_key,
    load_trust,
    secret_hash,
)
from radbridge.errors import AuthError, ConfigError
from radbridge.settings import load_settings

OPERATOR_SECRET = "o" * 40
INTEGRATION_SECRET = "i" * 40


@pytest.fixture
def keys(tmp_path: Path):  # type: ignore[no-untyped-def]
    return generate_edge_key(tmp_path / "edge.pem"), generate_edge_key(tmp_path / "other.pem")


@pytest.fixture
def verifier(keys) -> Verifier:  # type: ignore[no-untyped-def]
    key, other = keys
    trust = TrustFile(
        edges=[
            EdgeEntry(id="edge-a", agreements=["agr-a"], keys=[key.jwk]),
            EdgeEntry(id="edge-b", agreements=["agr-b"], keys=[other.jwk]),
        ],
        operators=[SecretEntry(id="ops", token_sha256=secret_hash(OPERATOR_SECRET))],
        integrations=[
            SecretEntry(
                id="ris",
                token_sha256=secret_hash(INTEGRATION_SECRET),
                agreements=["agr-a"],
                max_priority=Priority.URGENT,
            )
        ],
    )
    return Verifier(trust, max_failures=5, window_s=60, lockout_s=60)


def _bearer(token: str) -> str:
    return f"Bearer {token}"


def test_edge_token_authenticates_the_edge_for_its_agreements(keys, verifier) -> None:  # type: ignore[no-untyped-def]
    key, _ = keys
    token = edge_token(key, "edge-a", "post", "/v1/studies")
    caller = verifier.authenticate(_bearer(token), "POST", "/v1/studies")
    assert caller == Caller(Role.EDGE, "edge-a", frozenset({"agr-a"}), Priority.STAT)
    assert caller.may_act_for("agr-a") and not caller.may_act_for("agr-b")


@pytest.mark.parametrize(
    "case",
    [
        "no header",
        "basic scheme",
        "other path",
        "other method",
        "expired",
        "from the future",
        "too long lived",
        "other audience",
        "claims another edge",
        "signed by another edge's key",
        "unknown key id",
        "tampered payload",
        "alg none",
        "HS256 with the public key",
        "replayed",
        "garbage",
    ],
)
def test_every_bad_edge_token_is_one_401(keys, verifier, case: str) -> None:  # type: ignore[no-untyped-def]
    key, other = keys
    now = time.time()
    good = edge_token(key, "edge-a", "GET", "/v1/x", now=now)

    def signed(claims: dict, signer=key, kid: str | None = None, alg: str = "EdDSA") -> str:  # type: ignore[no-untyped-def,type-arg]
        base = {
            "iss": "edge-a",
            "sub": "edge-a",
            "aud": AUDIENCE,
            "iat": int(now),
            "exp": int(now) + 60,
            "jti": f"j-{case}",
            "htm": "GET",
            "htu": "/v1/x",
        }
        return jwt.encode(
            {**base, **claims},
            signer.private,
            algorithm=alg,
            headers={"kid": kid or signer.jwk.kid},
        )

    header: str | None
    if case == "no header":
        header = None
    elif case == "basic scheme":
        header = f"Basic {good}"
    elif case == "other path":
        header = _bearer(edge_token(key, "edge-a", "GET", "/v1/y"))
    elif case == "other method":
        header = _bearer(edge_token(key, "edge-a", "POST", "/v1/x"))
    elif case == "expired":
        header = _bearer(signed({"iat": int(now) - 600, "exp": int(now) - 480}))
    elif case == "from the future":
        header = _bearer(signed({"iat": int(now) + 600, "exp": int(now) + 700}))
    elif case == "too long lived":
        header = _bearer(signed({"exp": int(now) + 86_400}))
    elif case == "other audience":
        header = _bearer(signed({"aud": "someone-else"}))
    elif case == "claims another edge":
        header = _bearer(signed({"iss": "edge-b", "sub": "edge-b"}))
    elif case == "signed by another edge's key":
        header = _bearer(signed({}, signer=other, kid=key.jwk.kid))
    elif case == "unknown key id":
        header = _bearer(signed({}, kid="not-a-known-kid"))
    elif case == "tampered payload":
        h, p, sig = good.split(".")
        import base64
        import json

        claims = json.loads(base64.urlsafe_b64decode(p + "=="))
        claims["htu"] = "/v1/y"
        p2 = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        header = _bearer(f"{h}.{p2}.{sig}")
    elif case == "alg none":
        import base64
        import json

        h = base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": key.jwk.kid}).encode())
        p = good.split(".")[1]
        header = _bearer(f"{h.rstrip(b'=').decode()}.{p}.")
    elif case == "HS256 with the public key":
        header = _bearer(
            jwt.encode(
                jwt.decode(good, options={"verify_signature": False}),
                key.jwk.x.encode() * 2,
                algorithm="HS256",
                headers={"kid": key.jwk.kid},
            )
        )
    elif case == "replayed":
        verifier.authenticate(_bearer(good), "GET", "/v1/x")
        header = _bearer(good)
    else:
        header = "Bearer not.a.token"
    with pytest.raises(AuthError) as err:
        verifier.authenticate(header, "GET", "/v1/x")
    assert str(err.value) == "not authenticated"  # one answer whatever the reason
    assert verifier.last_failure  # the reason is kept for the log


def test_secrets_give_operator_and_capped_integration_callers(verifier) -> None:  # type: ignore[no-untyped-def]
    ops = verifier.authenticate(_bearer(OPERATOR_SECRET), "GET", "/metrics")
    assert ops.role == Role.OPERATOR and ops.agreements == frozenset()
    ris = verifier.authenticate(_bearer(INTEGRATION_SECRET), "POST", "/v1/models/m/infer")
    assert ris.role == Role.INTEGRATION and ris.agreements == {"agr-a"}
    assert ris.capped(Priority.STAT) == Priority.URGENT
    assert ris.capped(Priority.ROUTINE) == Priority.ROUTINE
    with pytest.raises(AuthError):
        verifier.authenticate(_bearer(OPERATOR_SECRET[:-1]), "GET", "/metrics")


def test_repeated_failures_lock_the_address_out_even_with_a_good_credential(verifier) -> None:  # type: ignore[no-untyped-def]
    for _ in range(6):
        with pytest.raises(AuthError):
            verifier.authenticate("Bearer wrong", "GET", "/metrics", "10.0.0.9")
    with pytest.raises(AuthError):
        verifier.authenticate(_bearer(OPERATOR_SECRET), "GET", "/metrics", "10.0.0.9")
    assert "locked out" in verifier.last_failure
    # Another address is not affected.
    assert verifier.authenticate(_bearer(OPERATOR_SECRET), "GET", "/metrics", "10.0.0.8")


def test_trust_file_errors_name_the_field(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    key, _ = keys
    path = tmp_path / "trust.yaml"
    path.write_text(yaml.safe_dump({"edges": [{"id": "Bad Id", "agreements": ["a"], "keys": []}]}))
    with pytest.raises(ConfigError, match=r"edges\.0\.id"):
        load_trust(path)
    path.write_text(yaml.safe_dump({"operators": [{"id": "ops", "token_sha256": "short"}]}))
    with pytest.raises(ConfigError, match=r"operators\.0\.token_sha256"):
        load_trust(path)
    twice = {"id": "e", "agreements": ["a"], "keys": [key.jwk.model_dump()]}
    path.write_text(yaml.safe_dump({"edges": [twice, {**twice, "id": "f"}]}))
    with pytest.raises(ConfigError, match="listed twice"):
        load_trust(path)


def test_local_identity_is_created_private_and_kept(tmp_path: Path) -> None:
    key_file, trust_file = tmp_path / "keys" / "edge.pem", tmp_path / "keys" / "trust.yaml"
    ensure_local_identity(key_file, trust_file, "local-edge", ["agr-a", "agr-b"])
    for f in (key_file, trust_file, tmp_path / "keys" / "operator.token"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    trust = load_trust(trust_file)
    key = load_edge_key(key_file)
    assert trust.edges[0].keys == [key.jwk] and trust.edges[0].agreements == ["agr-a", "agr-b"]
    before = trust_file.read_bytes()
    ensure_local_identity(key_file, trust_file, "local-edge", ["agr-a", "agr-b"])
    assert trust_file.read_bytes() == before and load_edge_key(key_file).jwk == key.jwk
    # A new edge key (rotated by hand) is added to the trust file, replacing the old entry.
    key_file.unlink()
    ensure_local_identity(key_file, trust_file, "local-edge", ["agr-a"])
    rotated = load_trust(trust_file)
    assert rotated.edges[0].keys == [load_edge_key(key_file).jwk]
    assert rotated.operators == trust.operators
    v = Verifier(rotated)
    token = (tmp_path / "keys" / "operator.token").read_text()
    assert v.authenticate(_bearer(token), "GET", "/metrics").role == Role.OPERATOR


def test_production_settings_refuse_unsafe_values() -> None:
    good = {"master_secret": "s" * 32, "center_url": "https://center.example:8443"}
    assert load_settings(mode="production", edge=good).mode == "production"
    in_cluster = {**good, "center_url": "http://radbridge-center-serve-svc:8000"}
    assert load_settings(mode="production", edge=in_cluster).mode == "production"
    for change, named in (
        ({"master_secret": "short-secret"}, "at least 32 bytes"),
        ({"master_secret": "example-dev-only-edge-master-secret-not-for-real-data"}, "example"),
        ({"center_url": "http://center.example:8000"}, "https://"),
        ({"center_url": "http://10.0.0.5:8000"}, "https://"),
    ):
        with pytest.raises(ConfigError, match=named):
            load_settings(mode="production", edge={**good, **change})


def _center_with_clock(
    verifier: Verifier, offset_s: float, date: bool = True
) -> tuple[httpx.MockTransport, list[int]]:
    """An httpx transport answering as a center whose clock is ``offset_s`` from this one:
    200 to a token its Verifier accepts at that time, 401 otherwise; a Date header."""
    calls: list[int] = []

    def handle(request: httpx.Request) -> httpx.Response:
        now = time.time() + offset_s
        try:
            verifier.authenticate(
                request.headers.get("authorization"), request.method, request.url.path, now=now
            )
            status = 200
        except AuthError:
            status = 401
        calls.append(status)
        headers = {"Date": email.utils.formatdate(now, usegmt=True)} if date else {}
        return httpx.Response(status, headers=headers)

    return httpx.MockTransport(handle), calls


@pytest.mark.parametrize("offset_s", [-3600, 3600, -200])
def test_edge_tokens_follow_the_centers_clock_when_the_edges_steps(
    keys, verifier, offset_s
) -> None:  # type: ignore[no-untyped-def]
    """An edge clock an hour (or minutes) off the center's: the first refusal teaches the
    offset from the answer's Date and the request goes again at once; the next ones pass."""
    key, _ = keys
    auth = EdgeAuth(key, "edge-a")
    transport, calls = _center_with_clock(verifier, offset_s)
    with httpx.Client(transport=transport, auth=auth, base_url="https://center") as client:
        assert client.post("/v1/studies").status_code == 200
        assert calls == [401, 200]
        assert abs(auth.offset_s - offset_s) <= 1
        assert client.get("/v1/result-objects").status_code == 200
        assert calls == [401, 200, 200]


def test_edge_tokens_keep_the_edges_clock_within_the_tolerance_and_return_to_it(
    keys, verifier
) -> None:  # type: ignore[no-untyped-def]
    key, _ = keys
    auth = EdgeAuth(key, "edge-a")
    transport, calls = _center_with_clock(verifier, 2)
    with httpx.Client(transport=transport, auth=auth, base_url="https://center") as client:
        assert client.get("/v1/result-objects").status_code == 200
    assert auth.offset_s == 0.0 and calls == [200]
    auth.offset_s = 3600.0  # learnt before the edge's clock was set right
    transport, calls = _center_with_clock(verifier, 0)
    with httpx.Client(transport=transport, auth=auth, base_url="https://center") as client:
        assert client.get("/v1/result-objects").status_code == 200
    assert auth.offset_s == 0.0 and calls == [401, 200]


def test_a_refusal_without_a_date_is_not_sent_again(
    keys: tuple[EdgeKey, EdgeKey], verifier: Verifier
) -> None:
    key, _ = keys
    auth = EdgeAuth(key, "edge-a")
    transport, calls = _center_with_clock(verifier, 3600, date=False)
    with httpx.Client(transport=transport, auth=auth, base_url="https://center") as client:
        assert client.post("/v1/studies").status_code == 401
    assert calls == [401] and auth.offset_s == 0.0


def test_a_long_polls_date_moves_the_offset_only_to_the_range_it_proves(
    keys: tuple[EdgeKey, EdgeKey],
) -> None:
    """A Date written anywhere in a 20 s long poll proves the offset lies in a 21 s range:
    an offset already in it stays; one outside moves to the range's middle."""
    auth = EdgeAuth(keys[0], "edge-a")

    def answer(center_s: float) -> httpx.Response:
        return httpx.Response(200, headers={"Date": email.utils.formatdate(center_s, usegmt=True)})

    now, started = time.time(), time.monotonic() - 20
    auth.offset_s = 7199.0
    auth._learn(answer(now + 7184), sent=started)  # Date written 5 s into the poll
    assert auth.offset_s == 7199.0
    auth.offset_s = 0.0
    auth._learn(answer(now + 3600), sent=started)
    assert 3609 <= auth.offset_s <= 3611  # 0 lies below the range [3600, 3621]: its middle
    auth._learn(answer(time.time() - 7200), sent=time.monotonic())  # a short request: exact
    assert -7201 <= auth.offset_s <= -7199
