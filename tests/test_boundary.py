"""The center's trust boundary (serving.boundary.Boundary) in front of a small FastAPI app, as
the Api installs it: nothing passes without a credential, a role reaches only its routes, the
handler sees the caller, the API explorer is closed outside local mode, and a WebSocket is
closed before the app. (Every real route against a running center:
tests/integration/test_serving.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from radbridge.auth import Role, SecretEntry, TrustFile, Verifier, secret_hash
from radbridge.metrics import CenterMetrics
from serving import boundary

OPERATOR = "o" * 40
INTEGRATION = "i" * 40


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request) -> dict[str, str]:
        return {"caller": request.state.caller.id}

    @app.post("/v1/models/{name}/infer")
    async def infer(name: str, request: Request) -> dict[str, str]:
        body = await request.body()
        return {
            "caller": request.state.caller.id,
            "role": request.state.caller.role.value,
            "bytes": str(len(body)),
        }

    app.add_middleware(boundary.Boundary)
    return app


class _Client:
    """httpx over ASGI, one request at a time (the boundary keeps no per-request state)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://center") as c:
                return await c.request(method, path, **kwargs)

        return asyncio.run(go())

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Client]:
    monkeypatch.setattr(boundary, "_state", {})
    yield _Client(_app())


def _install(open_docs: bool = False) -> CenterMetrics:
    trust = TrustFile(
        operators=[SecretEntry(id="ops", token_sha256=secret_hash(OPERATOR))],
        integrations=[
            SecretEntry(id="ris", token_sha256=secret_hash(INTEGRATION), agreements=["agr-a"])
        ],
    )
    metrics = CenterMetrics()
    boundary.install(Verifier(trust), metrics, open_docs=open_docs)
    return metrics


def _refused(metrics: CenterMetrics, why: str) -> float:
    return metrics.refused.labels(why)._value.get()  # type: ignore[no-any-return]


def test_before_the_api_installs_its_verifier_only_health_is_served(client: _Client) -> None:
    assert client.get("/healthz").status_code == 200
    r = client.get("/metrics", headers={"authorization": f"Bearer {OPERATOR}"})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"


def test_without_a_credential_every_path_is_the_same_401(client: _Client) -> None:
    metrics = _install()
    answers = [
        client.get("/metrics"),
        client.post("/v1/models/demo/infer", content=b"x" * 1000),
        client.get("/no/such/path"),
        client.get("/metrics", headers={"authorization": "Bearer not-a-known-secret-at-all!!"}),
    ]
    assert {r.status_code for r in answers} == {401}
    assert len({r.text for r in answers}) == 1  # nothing tells a known path from an unknown
    assert all(r.headers["www-authenticate"].startswith("Bearer") for r in answers)
    assert _refused(metrics, "unauthenticated") == 4
    assert client.get("/healthz").status_code == 200  # the one open path


def test_a_role_reaches_only_its_routes_and_the_handler_sees_the_caller(
    client: _Client,
) -> None:
    metrics = _install()
    ops = {"authorization": f"Bearer {OPERATOR}"}
    ris = {"authorization": f"Bearer {INTEGRATION}"}
    assert client.get("/metrics", headers=ops).json() == {"caller": "ops"}
    r = client.post("/v1/models/demo/infer", headers=ris, content=b"x" * 200_000)
    assert r.json() == {"caller": "ris", "role": Role.INTEGRATION.value, "bytes": "200000"}
    assert client.get("/metrics", headers=ris).status_code == 403
    assert client.post("/v1/models/demo/infer", headers=ops, content=b"x").status_code == 403
    assert _refused(metrics, "forbidden") == 2
    assert client.get("/no/such/path", headers=ops).status_code == 404  # routing, once known


@pytest.mark.parametrize("open_docs", [False, True])
def test_the_api_explorer_is_open_only_in_local_mode(client: _Client, open_docs: bool) -> None:
    _install(open_docs=open_docs)
    assert client.get("/openapi.json").status_code == (200 if open_docs else 404)


def test_a_websocket_is_closed_before_the_app(client: _Client) -> None:
    _install()
    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["type"])

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"authorization", f"Bearer {OPERATOR}".encode())]
    scope = {"type": "websocket", "path": "/ws", "headers": headers}
    asyncio.run(boundary.Boundary(app)(scope, receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008}] and reached == []
    asyncio.run(boundary.Boundary(app)({"type": "lifespan"}, receive, send))
    assert reached == ["lifespan"]  # start-up and shutdown go through
