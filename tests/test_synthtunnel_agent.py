"""SynthTunnel agent against real servers on 127.0.0.1.

``SynthTunnelTestRelay`` is this file's own minimal relay: a real lease API (FastAPI on
uvicorn) and a real agent WebSocket server (websockets). The test plays the relay's caller
side by sending REQ_* frames itself. The local target is a real FastAPI app on uvicorn.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as WSRequest
from websockets.http11 import Response as WSResponse

from taskapp_notebook.errors import TunnelError
from taskapp_notebook.tunnels.base import TunnelContext, TunnelState, create_tunnel
from taskapp_notebook.tunnels.synthtunnel import SynthTunnel
from taskapp_notebook.tunnels.synthtunnel import agent as synthtunnel_agent
from taskapp_notebook.tunnels.synthtunnel.lease_client import client_instance_id

logger = logging.getLogger(__name__)

APP_KEY = "app-key-" + "k" * 24
TERMINAL = ("RESP_END", "RESP_ERROR")


# -- servers ---------------------------------------------------------------------------


async def serve_app(app: Any) -> tuple[uvicorn.Server, asyncio.Task[None], socket.socket]:
    """Run ``app`` with uvicorn on a socket bound to 127.0.0.1:0 on this loop."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, log_config=None, lifespan="off", ws="none", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    return server, task, sock


async def stop_app(server: uvicorn.Server, task: asyncio.Task[None], sock: socket.socket) -> None:
    server.should_exit = True
    await task
    sock.close()


async def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


class AgentConn:
    """One agent WebSocket as the test relay sees it."""

    def __init__(self, ws: ServerConnection, lease_id: str, attach: dict[str, Any]) -> None:
        self.ws = ws
        self.lease_id = lease_id
        self.attach = attach
        self.path = ws.request.path if ws.request else ""
        self.authorization = ws.request.headers.get("Authorization") if ws.request else None
        self.attached_at = time.monotonic()
        self.received: list[dict[str, Any]] = []

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(frame if isinstance(frame, str | bytes) else json.dumps(frame))

    async def request(
        self,
        rid: str,
        method: str,
        path: str,
        *,
        query: str = "",
        headers: list[list[str]] | None = None,
        body: bytes = b"",
        deadline_ms: int | None = None,
        end: bool = True,
    ) -> None:
        frame: dict[str, Any] = {
            "type": "REQ_HEADERS",
            "lease_id": self.lease_id,
            "rid": rid,
            "method": method,
            "path": path,
            "query": query,
            "headers": headers or [],
        }
        if deadline_ms is not None:
            frame["deadline_ms"] = deadline_ms
        await self.send(frame)
        await self.send_body(rid, body)
        if end:
            await self.send({"type": "REQ_END", "rid": rid})

    async def send_body(self, rid: str, body: bytes) -> None:
        for start in range(0, len(body), 65536):
            chunk = base64.b64encode(body[start : start + 65536]).decode()
            await self.send({"type": "REQ_BODY", "rid": rid, "chunk_b64": chunk})

    def frames(self, rid: str) -> list[dict[str, Any]]:
        return [f for f in self.received if f.get("rid") == rid]

    async def response(self, rid: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Frames for ``rid`` up to and including RESP_END or RESP_ERROR."""
        await wait_until(lambda: any(f["type"] in TERMINAL for f in self.frames(rid)), timeout)
        return self.frames(rid)


def decode_agent_message(message: str | bytes) -> dict[str, Any]:
    """An agent message as a JSON frame dict. A binary message is read as the binary body
    frame of docs/synthtunnel-protocol.md (kind 2 = RESP_BODY, rid length, rid, body) and
    marked ``"binary": True``; anything else binary fails the test."""
    if isinstance(message, str):
        frame: dict[str, Any] = json.loads(message)
        return frame
    kind, rid_length = message[0], message[1]
    assert kind == 2, f"binary message of kind {kind}"
    rid = message[2 : 2 + rid_length].decode()
    chunk = base64.b64encode(message[2 + rid_length :]).decode()
    return {"type": "RESP_BODY", "rid": rid, "chunk_b64": chunk, "binary": True}


def body_of(frames: list[dict[str, Any]]) -> bytes:
    return b"".join(base64.b64decode(f["chunk_b64"]) for f in frames if f["type"] == "RESP_BODY")


class SynthTunnelTestRelay:
    """This test file's relay: lease API on uvicorn + agent WebSocket server (websockets)."""

    def __init__(self) -> None:
        self.leases: dict[str, dict[str, Any]] = {}
        self.lease_requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.deletes: list[tuple[str, str | None]] = []
        self.connections: list[AgentConn] = []
        #: TTLs handed out to the next leases (then 3600 s).
        self.ttls: list[float] = []
        #: Status with which WebSocket handshakes are refused, when set.
        self.refuse_status: int | None = None
        #: (status, problem) the lease API answers POSTs with, when set.
        self.lease_problem: tuple[int, dict[str, Any]] | None = None
        self.ack: dict[str, Any] = {"type": "ATTACH_ACK", "agent_id": "relay"}
        #: Honour ``renew_lease_id`` (extend in place), as our relay does.
        self.supports_renew = False
        #: Answer 422 to bodies with fields beyond the protocol's (a strict relay).
        self.strict = False
        self._count = 0
        self._api: tuple[uvicorn.Server, asyncio.Task[None], socket.socket] | None = None
        self._ws_server: Server | None = None
        self.api_url = ""
        self.ws_url = ""

    async def start(self) -> None:
        self._api = await serve_app(self._lease_app())
        self.api_url = f"http://127.0.0.1:{self._api[2].getsockname()[1]}"
        self._ws_server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            process_request=self._check_token,
            max_size=16 * 1024 * 1024,
            ping_interval=None,
        )
        port = next(iter(self._ws_server.sockets)).getsockname()[1]
        self.ws_url = f"ws://127.0.0.1:{port}/agent?relay=test"

    async def stop(self) -> None:
        if self._ws_server is not None:
            self._ws_server.close()
            await self._ws_server.wait_closed()
        if self._api is not None:
            await stop_app(*self._api)

    def _new_lease(self, ttl: float) -> dict[str, Any]:
        self._count += 1
        n = self._count
        expires = datetime.now(UTC) + timedelta(seconds=ttl)
        lease = {
            "lease_id": f"lease_{n}",
            "route_token": f"route{n}",
            "public_base_url": self.api_url,
            "public_url": f"{self.api_url}/s/rt_route{n}",
            "agent_connect": {
                "url": self.ws_url,
                "agent_token": f"agent-token-{n}-{secrets.token_hex(8)}",
            },
            "worker_token": f"worker-token-{n}-{secrets.token_hex(8)}",
            "expires_at": expires.isoformat().replace("+00:00", "Z"),
            "limits": {"max_inflight": 128, "max_response_bytes": 209715200},
            "heartbeat": {},
        }
        self.leases[lease["lease_id"]] = lease
        return lease

    def _lease_app(self) -> FastAPI:
        api = FastAPI()

        @api.post("/api/v1/synthtunnel/leases")
        async def create(request: Request) -> Response:
            body = await request.json()
            self.lease_requests.append((dict(request.headers), body))
            if self.lease_problem is not None:
                status, problem = self.lease_problem
                return JSONResponse(problem, status_code=status)
            extra = set(body) - {
                "client_instance_id",
                "local_target",
                "requested_ttl_seconds",
                "metadata",
                "capabilities",
            }
            if self.strict and extra:
                return JSONResponse({"detail": f"extra fields {sorted(extra)}"}, 422)
            ttl = self.ttls.pop(0) if self.ttls else 3600.0
            renew = body.get("renew_lease_id")
            if self.supports_renew and renew in self.leases:
                lease = self.leases[renew]
                expires = datetime.now(UTC) + timedelta(seconds=ttl)
                lease["expires_at"] = expires.isoformat().replace("+00:00", "Z")
                return JSONResponse(lease, status_code=200)
            return JSONResponse(self._new_lease(ttl), status_code=201)

        @api.delete("/api/v1/synthtunnel/leases/{lease_id}")
        async def delete(lease_id: str, request: Request) -> Response:
            self.deletes.append((lease_id, request.headers.get("authorization")))
            if self.leases.pop(lease_id, None) is None:
                return JSONResponse({"detail": "lease not found", "code": "not_found"}, 404)
            return Response(status_code=204)

        return api

    def _lease_for(self, authorization: str | None) -> dict[str, Any] | None:
        for lease in self.leases.values():
            if authorization == f"Bearer {lease['agent_connect']['agent_token']}":
                return lease
        return None

    def _check_token(self, connection: ServerConnection, request: WSRequest) -> WSResponse | None:
        if self.refuse_status is not None:
            return connection.respond(self.refuse_status, "relay unavailable\n")
        if self._lease_for(request.headers.get("Authorization")) is None:
            body = json.dumps({"detail": "agent_offline: unknown agent token", "code": "auth"})
            return WSResponse(401, "Unauthorized", Headers(), body.encode())
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        lease = self._lease_for(ws.request.headers.get("Authorization"))
        assert lease is not None
        attach = json.loads(await ws.recv())
        conn = AgentConn(ws, lease["lease_id"], attach)
        await ws.send(json.dumps(self.ack))
        self.connections.append(conn)
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                conn.received.append(decode_agent_message(message))

    def conns_for(self, lease_id: str) -> list[AgentConn]:
        return [c for c in self.connections if c.lease_id == lease_id]


# -- the local app ---------------------------------------------------------------------


def make_app(state: dict[str, Any]) -> FastAPI:
    app = FastAPI()

    @app.get("/echo")
    async def echo(request: Request) -> dict[str, Any]:
        return {
            "method": request.method,
            "query": request.url.query,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers.raw],
        }

    @app.post("/upload")
    async def upload(request: Request) -> Response:
        received = bytearray()
        state["upload_bytes"] = 0
        state["upload_headers"] = dict(request.headers)
        async for chunk in request.stream():
            received += chunk
            state["upload_bytes"] = len(received)
        return Response(bytes(received), media_type="application/octet-stream")

    @app.post("/slow-upload")
    async def slow_upload(request: Request) -> Response:
        """Sleeps until the test sets ``state["gate"]``, then reads the body."""
        rid = request.headers.get("x-synthtunnel-request-id", "")
        state.setdefault("slow_started", []).append(rid)
        await state["gate"].wait()
        digest, size = hashlib.sha256(), 0
        try:
            async for chunk in request.stream():
                digest.update(chunk)
                size += len(chunk)
        except ClientDisconnect:
            state.setdefault("slow_disconnected", []).append(rid)
            return Response(status_code=499)
        return JSONResponse({"size": size, "sha256": digest.hexdigest()})

    @app.get("/hold")
    async def hold(request: Request) -> Response:
        rid = request.headers.get("x-synthtunnel-request-id", "")
        state.setdefault("started", []).append(rid)
        for _ in range(600):
            if await request.is_disconnected():
                state.setdefault("disconnected", []).append(rid)
                return Response(status_code=499)
            await asyncio.sleep(0.05)
        return Response(b"held")

    @app.get("/broken")
    async def broken() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"x" * 1000
            raise RuntimeError("app failed mid-body (expected in this test)")

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/redirect")
    async def redirect() -> Response:
        return Response(status_code=307, headers={"location": "/echo"})

    @app.get("/cookie")
    async def cookie() -> Response:
        return Response(b"set", headers={"set-cookie": "session=callers-a; Path=/"})

    return app


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def synth_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SYNTH_API_KEY", "sk-test-" + secrets.token_hex(12))
    monkeypatch.delenv("SYNTH_TUNNEL_TIMEOUT_SEC", raising=False)


@pytest.fixture
async def app_state() -> AsyncIterator[tuple[dict[str, Any], int]]:
    state: dict[str, Any] = {}
    running = await serve_app(make_app(state))
    yield state, running[2].getsockname()[1]
    await stop_app(*running)


@pytest.fixture
async def relay(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SynthTunnelTestRelay]:
    test_relay = SynthTunnelTestRelay()
    await test_relay.start()
    monkeypatch.setenv("SYNTH_BACKEND_URL", test_relay.api_url)
    yield test_relay
    await test_relay.stop()


@pytest.fixture
def events() -> list[str]:
    return []


@pytest.fixture
def ctx(app_state: tuple[dict[str, Any], int], events: list[str]) -> TunnelContext:
    return TunnelContext("127.0.0.1", app_state[1], APP_KEY, on_event=events.append)


@pytest.fixture
async def tunnel(relay: SynthTunnelTestRelay, ctx: TunnelContext) -> AsyncIterator[SynthTunnel]:
    st = SynthTunnel()
    st.preflight(ctx)
    await st.open(ctx)
    yield st
    await st.close()


def only_conn(relay: SynthTunnelTestRelay) -> AgentConn:
    assert len(relay.connections) == 1
    return relay.connections[0]


# -- tests -----------------------------------------------------------------------------


async def test_lease_request_and_attach_frame_follow_the_protocol(
    relay: SynthTunnelTestRelay, ctx: TunnelContext, events: list[str]
) -> None:
    st = create_tunnel("synth-tunnel")
    assert isinstance(st, SynthTunnel)
    st.preflight(ctx)
    url = await st.open(ctx)
    try:
        headers, body = relay.lease_requests[0]
        assert headers["authorization"] == f"Bearer {os.environ['SYNTH_API_KEY']}"
        client_id = body["client_instance_id"]
        assert body == {
            "client_instance_id": client_id,
            "local_target": {"host": "127.0.0.1", "port": ctx.local_port},
            "requested_ttl_seconds": 3600,
            "metadata": {},
            "capabilities": {},
        }
        assert client_id.startswith("client-") and len(client_id) == len("client-") + 16
        stored = Path(os.environ["HOME"], ".synth", "client_instance_id").read_text()
        assert stored == client_id

        lease = relay.leases["lease_1"]
        conn = only_conn(relay)
        assert conn.path == "/agent?relay=test"  # agent_connect.url kept exactly
        assert conn.authorization == f"Bearer {lease['agent_connect']['agent_token']}"
        # permessage-deflate is offered; the relay decides (see LeaseAgent.connect).
        assert conn.ws.request is not None
        assert "permessage-deflate" in conn.ws.request.headers.get("Sec-WebSocket-Extensions", "")
        assert conn.attach == {
            "type": "ATTACH",
            "agent_id": client_id,
            "leases": [
                {
                    "lease_id": "lease_1",
                    "local_target": {"host": "127.0.0.1", "port": ctx.local_port},
                }
            ],
            "capabilities": {
                "max_body_chunk_bytes": 65536,
                "max_inflight": 128,
                "streaming": True,
                "supports_cancel": True,
                "binary_bodies": 1,  # our extension, offered; this relay (like Synth's)
            },  # does not agree, so every frame stays JSON text (checked below)
        }
        assert url == st.url == lease["public_url"]
        assert st.worker_token == lease["worker_token"]
        assert st.verification_headers() == {"Authorization": f"Bearer {lease['worker_token']}"}
        assert st.status.state is TunnelState.CONNECTED
        assert lease["worker_token"][-4:] in repr(st)
        secret_values = (lease["worker_token"], lease["agent_connect"]["agent_token"], APP_KEY)
        shown = repr(st) + repr(st.lease) + repr(st.agent) + repr(st._settings)
        assert not any(value in shown for value in (*secret_values, os.environ["SYNTH_API_KEY"]))
        assert any(lease["public_url"] in line for line in events)
    finally:
        await st.close()


async def test_client_instance_id_survives_an_unwritable_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home_is_a_file = tmp_path / "not-a-dir"
    home_is_a_file.write_text("")
    monkeypatch.setenv("HOME", str(home_is_a_file))
    first = client_instance_id()
    assert first.startswith("client-")
    assert client_instance_id() == first


async def test_forwarded_get_strips_headers_and_injects_the_app_key(
    relay: SynthTunnelTestRelay, tunnel: SynthTunnel, ctx: TunnelContext
) -> None:
    conn = only_conn(relay)
    worker = f"Bearer {tunnel.worker_token}"
    await conn.request(
        "r1",
        "GET",
        "/echo",
        query="x=1&y=%2F",
        headers=[
            ["Authorization", worker],
            ["X-SynthTunnel-Worker-Token", "wt"],
            ["X-API-Key", "callers-key"],
            ["X-API-Keys", "a,b"],
            ["x-synthtunnel-lease-id", "spoofed-lease"],
            ["X-SynthTunnel-Request-Id", "spoofed-rid"],
            ["X-Forwarded-Proto", "http"],
            ["Connection", "keep-alive, X-Hop"],
            ["X-Hop", "1"],
            ["Proxy-Authorization", "Basic cA=="],
            ["Keep-Alive", "timeout=5"],
            ["Host", "evil.example"],
            ["Content-Length", "999"],
            ["X-Custom", "kept"],
            ["X-Custom", "twice"],
        ],
    )
    frames = await conn.response("r1")
    assert [f["type"] for f in frames][0] == "RESP_HEADERS"
    assert frames[-1] == {"type": "RESP_END", "lease_id": "lease_1", "rid": "r1"}
    assert frames[0]["status"] == 200 and frames[0]["lease_id"] == "lease_1"
    seen = json.loads(body_of(frames))
    assert seen["query"] == "x=1&y=%2F"
    pairs = [(k.lower(), v) for k, v in seen["headers"]]
    names = [k for k, _ in pairs]
    assert ("x-api-key", APP_KEY) in pairs and names.count("x-api-key") == 1
    assert ("authorization", f"Bearer {APP_KEY}") in pairs and names.count("authorization") == 1
    assert ("x-synthtunnel-lease-id", "lease_1") in pairs
    assert ("x-synthtunnel-request-id", "r1") in pairs
    assert ("x-forwarded-proto", "https") in pairs
    for name in ("x-synthtunnel-lease-id", "x-synthtunnel-request-id", "x-forwarded-proto"):
        assert names.count(name) == 1
    assert ("host", f"127.0.0.1:{ctx.local_port}") in pairs
    for gone in (
        "x-synthtunnel-worker-token",
        "x-api-keys",
        "x-hop",
        "proxy-authorization",
        "keep-alive",
        "content-length",
        "accept-encoding",
        "user-agent",
    ):
        assert gone not in names, gone
    assert [v for k, v in pairs if k == "x-custom"] == ["kept", "twice"]
    assert worker not in json.dumps(seen)


async def test_response_is_returned_as_is_without_following_redirects(
    relay: SynthTunnelTestRelay, tunnel: SynthTunnel
) -> None:
    conn = only_conn(relay)
    await conn.request("r-redirect", "GET", "/redirect")
    frames = await conn.response("r-redirect")
    assert frames[0]["status"] == 307
    assert ["location", "/echo"] in frames[0]["headers"]
    assert frames[-1]["type"] == "RESP_END"


async def test_app_cookies_are_not_kept_between_callers(
    relay: SynthTunnelTestRelay, tunnel: SynthTunnel
) -> None:
    conn = only_conn(relay)
    await conn.request("r-cookie", "GET", "/cookie")
    frames = await conn.response("r-cookie")
    assert ["set-cookie", "session=callers-a; Path=/"] in frames[0]["headers"]
    await conn.request("r-after", "GET", "/echo")
    seen = json.loads(body_of(await conn.response("r-after")))
    assert "cookie" not in [k.lower() for k, _ in seen["headers"]]


async def test_one_mib_post_streams_both_ways_in_64k_chunks(
    relay: SynthTunnelTestRelay, tunnel: SynthTunnel, app_state: tuple[dict[str, Any], int]
) -> None:
    state, _ = app_state
    conn = only_conn(relay)
    payload = secrets.token_bytes(1024 * 1024)
    half = len(payload) // 2
    await conn.request(
        "big", "POST", "/upload", headers=[["content-type", "x/y"]], body=payload[:half], end=False
    )
    # The app receives the first half before the relay has sent the rest: streamed.
    await wait_until(lambda: state.get("upload_bytes", 0) >= 65536)
    assert state["upload_bytes"] < len(payload)
    await conn.send_body("big", payload[half:])
    await conn.send({"type": "REQ_END", "rid": "big"})
    frames = await conn.response("big")
    assert frames[-1]["type"] == "RESP_END"
    chunks = [base64.b64decode(f["chunk_b64"]) for f in frames if f["type"] == "RESP_BODY"]
    assert max(len(c) for c in chunks) <= 65536
    assert all(f["eof"] is False for f in frames if f["type"] == "RESP_BODY")
    assert hashlib.sha256(b"".join(chunks)).digest() == hashlib.sha256(payload).digest()
    assert state["upload_headers"].get("transfer-encoding") == "chunked"


async def test_small_body_is_sent_with_a_content_length(
    relay: SynthTunnelTestRelay, tunnel: SynthTunnel, app_state: tuple[dict[str, Any], int]
) -> None:
    state, _ = app_state
    conn = only_conn(relay)
    await conn.request("small", "POST", "/upload", body=b'{"a": 1}')
    frames = await conn.response("small")
    assert body_of(frames) == b'{"a": 1}'
    assert state["upload_headers"].get("content-length") == "8"


async def test_cancel_aborts_the_local_request(
    relay: SynthTunnelTestRelay, tunnel: SynthTunnel, app_state: tuple[dict[str, Any], int]
) -> None:
    state, _ = app_state
    conn = only_conn(relay)
    await conn.request("c1", "GET", "/hold")
    await wait_until(lambda: "c1" in state.get("started", []))
    await conn.send({"type": "CANCEL", "rid": "c1"})
    await wait_until(lambda: "c1" in state.get("disconnected", []))
    assert tunnel.agent is not None and "c1" not in tunnel.agent.inflight
    # The connection still works, and nothing was ever sent for the cancelled rid.
    await conn.request("after", "GET", "/echo")
    await conn.response("after")
    assert conn.frames("c1") == []


async def test_deadline_aborts_the_local_request(
    relay: SynthTunnelTestRelay, tunnel: SynthTunnel, app_state: tuple[dict[str, Any], int]
) -> None:
    state, _ = app_state
    conn = only_conn(relay)
    await conn.request("d1", "GET", "/hold", deadline_ms=300)
    frames = await conn.response("d1")
    assert [f["type"] for f in frames] == ["RESP_ERROR"]
    assert frames[0]["code"] == "DEADLINE_EXCEEDED" and frames[0]["lease_id"] == "lease_1"
    await wait_until(lambda: "d1" in state.get("disconnected", []))


async def test_max_inflight_is_enforced(
    relay: SynthTunnelTestRelay, ctx: TunnelContext, app_state: tuple[dict[str, Any], int]
) -> None:
    state, _ = app_state
    st = SynthTunnel(max_inflight=2)
    await st.open(ctx)
    try:
        conn = only_conn(relay)
        assert conn.attach["capabilities"]["max_inflight"] == 2
        for rid in ("h1", "h2", "h3"):
            await conn.request(rid, "GET", "/hold")
        frames = await conn.response("h3")
        assert frames == [
            {
                "type": "RESP_ERROR",
                "lease_id": "lease_1",
                "rid": "h3",
                "code": "AGENT_OVERLOADED",
                "message": frames[0]["message"],
            }
        ]
        await wait_until(lambda: {"h1", "h2"} <= set(state.get("started", [])))
        assert "h3" not in state["started"]
        await conn.send({"type": "CANCEL", "rid": "h1"})
        await wait_until(lambda: st.agent is not None and len(st.agent.inflight) == 1)
        await conn.request("h4", "GET", "/hold")  # room again after a cancel
        await wait_until(lambda: "h4" in state.get("started", []))
    finally:
        await st.close()


async def test_bad_frames_are_skipped_or_answered_with_bad_request_frame(
    relay: SynthTunnelTestRelay, tunnel: SynthTunnel
) -> None:
    conn = only_conn(relay)
    await conn.send("not json")
    await conn.send("[" * 100_000 + "]" * 100_000)  # nested past the recursion limit
    await conn.send(b"\x00binary")
    await conn.send({"type": "SOMETHING_NEW", "rid": "x"})
    await conn.send({"type": "REQ_HEADERS", "rid": "no-lease", "method": "GET", "path": "/"})
    await conn.send({"type": "REQ_BODY", "rid": "unknown", "chunk_b64": "AAAA"})
    await conn.request("b64", "POST", "/upload", end=False)
    await conn.send({"type": "REQ_BODY", "rid": "b64", "chunk_b64": "!!not base64!!"})
    frames = await conn.response("b64")
    assert [f["type"] for f in frames] == ["RESP_ERROR"]
    assert frames[0]["code"] == "BAD_REQUEST_FRAME"
    await conn.send(
        {
            "type": "REQ_HEADERS",
            "lease_id": "lease_1",
            "rid": "obj",
            "method": "GET",
            "path": "/echo",
            "query": "",
            "headers": {"a": "b"},
        }
    )
    frames = await conn.response("obj")
    assert frames[0]["code"] == "BAD_REQUEST_FRAME"
    await conn.request("ok", "GET", "/echo")
    assert (await conn.response("ok"))[-1]["type"] == "RESP_END"
    assert conn.frames("no-lease") == [] and conn.frames("unknown") == []


async def test_binary_bodies_when_the_relay_agrees(
    relay: SynthTunnelTestRelay, ctx: TunnelContext
) -> None:
    """Our extension: the relay agrees in ATTACH_ACK; then bodies travel as binary
    messages both ways (REQ_BODY kind 1, RESP_BODY kind 2), and JSON body frames still work."""
    relay.ack = {"type": "ATTACH_ACK", "agent_id": "relay", "capabilities": {"binary_bodies": 1}}
    st = SynthTunnel()
    await st.open(ctx)
    try:
        assert st.lease is not None
        conn = relay.conns_for(st.lease.lease_id)[0]
        payload = os.urandom(200_000)
        await conn.request("bin", "POST", "/upload", end=False)
        for start in range(0, len(payload), 65536):
            await conn.send(bytes([1, 3]) + b"bin" + payload[start : start + 65536])
        await conn.send({"type": "REQ_END", "rid": "bin"})
        frames = await conn.response("bin")
        bodies = [f for f in frames if f["type"] == "RESP_BODY"]
        assert bodies and all(f.get("binary") for f in bodies)
        assert body_of(frames) == payload and frames[-1]["type"] == "RESP_END"
        await conn.request("json", "POST", "/upload", body=b"abc")
        assert body_of(await conn.response("json")) == b"abc"
    finally:
        await st.close()


async def test_header_rules_and_binary_messages_at_the_agent(
    relay: SynthTunnelTestRelay, tunnel: SynthTunnel
) -> None:
    """The drift once between agent and relay, resolved in the shared rules: an empty
    header name is dropped (not a BAD_REQUEST_FRAME), headers a ``Connection`` header names
    are dropped, and a binary message is not a frame (skipped)."""
    conn = only_conn(relay)
    binary = {"type": "REQ_HEADERS", "lease_id": "lease_1", "rid": "bin", "method": "GET"}
    await conn.send(json.dumps({**binary, "path": "/echo"}).encode())
    headers = [["", "x"], ["Connection", "x-secret"], ["x-secret", "1"], ["x-ok", "1"]]
    await conn.request("h", "GET", "/echo", headers=headers)
    frames = await conn.response("h")
    assert [f["type"] for f in frames][0] == "RESP_HEADERS" and frames[-1]["type"] == "RESP_END"
    seen = [name for name, _ in json.loads(body_of(frames))["headers"]]
    assert "x-ok" in seen and "x-secret" not in seen and "" not in seen
    assert conn.frames("bin") == []


async def test_local_failures_map_to_resp_error_codes(
    relay: SynthTunnelTestRelay, tunnel: SynthTunnel, events: list[str]
) -> None:
    conn = only_conn(relay)
    await conn.request("broken", "GET", "/broken")
    frames = await conn.response("broken")
    assert [f["type"] for f in frames][0] == "RESP_HEADERS"
    assert frames[-1]["type"] == "RESP_ERROR" and frames[-1]["code"] == "LOCAL_BAD_RESPONSE"

    nobody = socket.socket()
    nobody.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    try:
        ctx = TunnelContext("127.0.0.1", nobody.getsockname()[1], APP_KEY)
        st = SynthTunnel()
        await st.open(ctx)
        try:
            conn2 = relay.conns_for(st.lease.lease_id if st.lease else "")[0]
            await conn2.request("refused", "GET", "/echo")
            frames = await conn2.response("refused")
            assert [f["type"] for f in frames] == ["RESP_ERROR"]
            assert frames[0]["code"] == "LOCAL_CONNECT_FAILED"
        finally:
            await st.close()
    finally:
        nobody.close()


async def test_reconnects_after_the_relay_drops_the_socket(
    relay: SynthTunnelTestRelay,
    tunnel: SynthTunnel,
    app_state: tuple[dict[str, Any], int],
    events: list[str],
) -> None:
    state, _ = app_state
    conn = only_conn(relay)
    await conn.request("inflight", "GET", "/hold")
    await wait_until(lambda: "inflight" in state.get("started", []))
    dropped_at = time.monotonic()
    conn.ws.transport.abort()  # TCP connection gone, no close frame
    await wait_until(lambda: len(relay.connections) == 2)
    second = relay.connections[1]
    delay = second.attached_at - dropped_at
    agent_figure = tunnel.agent.reconnect_durations[0] if tunnel.agent else float("nan")
    logger.info(
        "first reconnect: %.3f s drop->re-ATTACH at the relay (agent: %.3f s)", delay, agent_figure
    )
    assert second.attach == conn.attach  # a fresh ATTACH for the same lease
    assert second.authorization == conn.authorization
    await wait_until(lambda: tunnel.status.state is TunnelState.CONNECTED)
    # The in-flight request was aborted locally; nothing is replayed.
    await wait_until(lambda: "inflight" in state.get("disconnected", []))
    assert any("reconnecting" in e for e in events) and any("reconnected" in e for e in events)
    await second.request("again", "GET", "/echo")
    assert (await second.response("again"))[-1]["type"] == "RESP_END"
    assert second.frames("inflight") == []


async def test_a_black_holed_relay_is_detected_by_our_pings(
    relay: SynthTunnelTestRelay, ctx: TunnelContext, events: list[str]
) -> None:
    st = SynthTunnel(ping_interval=0.2, ping_timeout=0.3)
    await st.open(ctx)
    try:
        first = only_conn(relay)
        blackholed_at = time.monotonic()
        first.ws.transport.pause_reading()  # no pongs, no close frame, no FIN: a dead relay
        await wait_until(lambda: len(relay.connections) == 2)
        first.ws.transport.abort()
        logger.info(
            "black-holed relay: re-ATTACH %.3f s after it stopped answering",
            relay.connections[1].attached_at - blackholed_at,
        )
        assert relay.connections[1].lease_id == "lease_1"
        assert any("ping timeout" in e and "reconnecting" in e for e in events)
        await wait_until(lambda: st.status.state is TunnelState.CONNECTED)
    finally:
        await st.close()


async def test_refused_reconnects_report_down_then_recover(
    relay: SynthTunnelTestRelay, tunnel: SynthTunnel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(synthtunnel_agent, "DOWN_AFTER", 0.3)
    relay.refuse_status = 503
    await only_conn(relay).ws.close(1012)
    await wait_until(lambda: tunnel.status.state is TunnelState.DOWN)
    assert "HTTP 503" in (tunnel.status.last_error or "")
    relay.refuse_status = None
    await wait_until(lambda: tunnel.status.state is TunnelState.CONNECTED)
    assert len(relay.connections) == 2 and relay.connections[1].lease_id == "lease_1"


async def test_lease_refused_on_reconnect_is_replaced(
    relay: SynthTunnelTestRelay, tunnel: SynthTunnel, events: list[str]
) -> None:
    old_url = tunnel.url
    relay.leases.clear()  # the relay forgot the lease (restart, expiry)
    await only_conn(relay).ws.close(1012)
    await wait_until(lambda: len(relay.connections) == 2, timeout=15)
    await wait_until(lambda: tunnel.url != old_url)
    assert relay.connections[1].lease_id == "lease_2"
    assert tunnel.status.state is TunnelState.CONNECTED
    assert any("refused its token" in e and "public URL changed" in e for e in events)


async def test_renewal_with_a_short_ttl(
    relay: SynthTunnelTestRelay, ctx: TunnelContext, events: list[str]
) -> None:
    relay.ttls = [2.0]
    st = SynthTunnel(drain_timeout=1.0)
    await st.open(ctx)
    try:
        first_url, first_token = st.url, st.worker_token
        await wait_until(lambda: st.lease is not None and st.lease.lease_id == "lease_2")
        assert len(relay.lease_requests) == 2
        first_body = relay.lease_requests[0][1]
        assert relay.lease_requests[1][1] == {**first_body, "renew_lease_id": "lease_1"}
        assert st.url == relay.leases["lease_2"]["public_url"] != first_url
        assert st.worker_token == relay.leases["lease_2"]["worker_token"] != first_token
        await wait_until(
            lambda: ("lease_1", f"Bearer {os.environ['SYNTH_API_KEY']}") in relay.deletes
        )
        new_conn = relay.conns_for("lease_2")[0]
        assert new_conn.attach["leases"][0]["lease_id"] == "lease_2"
        await new_conn.request("r", "GET", "/echo")
        assert (await new_conn.response("r"))[-1]["type"] == "RESP_END"
        assert any("public URL changed" in e for e in events)
        assert st.status.state is TunnelState.CONNECTED
    finally:
        await st.close()
    assert relay.leases == {}


async def test_renewal_extends_in_place_on_a_relay_that_supports_it(
    relay: SynthTunnelTestRelay, ctx: TunnelContext, events: list[str]
) -> None:
    relay.ttls = [1.5, 3600.0]
    relay.supports_renew = True
    st = SynthTunnel()
    await st.open(ctx)
    try:
        url, first_expiry = st.url, relay.leases["lease_1"]["expires_at"]
        await wait_until(lambda: any("extended" in e for e in events))
        assert relay.lease_requests[1][1]["renew_lease_id"] == "lease_1"
        assert st.url == url and st.lease is not None and st.lease.lease_id == "lease_1"
        assert relay.leases["lease_1"]["expires_at"] != first_expiry
        assert len(relay.connections) == 1 and relay.deletes == []
    finally:
        await st.close()
    assert [lease_id for lease_id, _ in relay.deletes] == ["lease_1"]


async def test_renewal_on_a_strict_relay_drops_the_renew_field(
    relay: SynthTunnelTestRelay, ctx: TunnelContext
) -> None:
    relay.ttls = [1.5]
    relay.strict = True
    st = SynthTunnel(drain_timeout=0.5)
    await st.open(ctx)
    try:
        await wait_until(lambda: st.lease is not None and st.lease.lease_id == "lease_2")
        bodies = [body for _, body in relay.lease_requests]
        assert [b.get("renew_lease_id") for b in bodies] == [None, "lease_1", None]
        assert st.status.state is TunnelState.CONNECTED
    finally:
        await st.close()


async def test_close_deletes_the_lease_and_is_idempotent(
    relay: SynthTunnelTestRelay, ctx: TunnelContext
) -> None:
    st = SynthTunnel()
    await st.open(ctx)
    conn = only_conn(relay)
    await st.close()
    assert relay.deletes == [("lease_1", f"Bearer {os.environ['SYNTH_API_KEY']}")]
    assert relay.leases == {}
    assert st.status.state is TunnelState.CLOSED
    await wait_until(lambda: conn.ws.close_code is not None)
    await st.close()
    assert len(relay.deletes) == 1


async def test_missing_api_key_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, ctx: TunnelContext
) -> None:
    monkeypatch.delenv("SYNTH_API_KEY")
    st = SynthTunnel()
    with pytest.raises(TunnelError, match="SYNTH_API_KEY is not set") as info:
        st.preflight(ctx)
    assert "tunnel_mode='local'" in str(info.value)
    with pytest.raises(TunnelError, match="SYNTH_API_KEY"):
        await st.open(ctx)
    await st.close()


async def test_lease_problem_is_quoted_with_the_key_masked(
    relay: SynthTunnelTestRelay, ctx: TunnelContext
) -> None:
    key = os.environ["SYNTH_API_KEY"]
    relay.lease_problem = (
        401,
        {"detail": f"invalid api key {key}", "code": "unauthorized", "request_id": "req-9"},
    )
    st = SynthTunnel()
    with pytest.raises(TunnelError) as info:
        await st.open(ctx)
    message = str(info.value)
    assert "HTTP 401" in message and "unauthorized" in message and "req-9" in message
    assert key not in message and key[-4:] in message
    assert "SYNTH_API_KEY" in message
    await st.close()


async def test_attach_refused_deletes_the_lease(
    relay: SynthTunnelTestRelay, ctx: TunnelContext
) -> None:
    relay.ack = {"type": "ERROR", "detail": "agent_offline: go away"}
    st = SynthTunnel()
    with pytest.raises(TunnelError, match="instead of ATTACH_ACK.*agent_offline"):
        await st.open(ctx)
    assert [lease_id for lease_id, _ in relay.deletes] == ["lease_1"] and relay.leases == {}
    assert st.url is None
    await st.close()
    assert st.status.state is TunnelState.CLOSED


async def test_unreachable_backend_is_a_tunnel_error(
    monkeypatch: pytest.MonkeyPatch, ctx: TunnelContext
) -> None:
    with socket.socket() as nobody:
        nobody.bind(("127.0.0.1", 0))
        monkeypatch.setenv("SYNTH_BACKEND_URL", f"http://127.0.0.1:{nobody.getsockname()[1]}/api")
        st = SynthTunnel()
        with pytest.raises(TunnelError, match="SynthTunnel lease request .* failed: ConnectError"):
            await st.open(ctx)
    await st.close()


async def test_close_from_another_loop_deletes_the_lease(
    relay: SynthTunnelTestRelay, ctx: TunnelContext
) -> None:
    st = SynthTunnel()
    await st.open(ctx)

    def close_in_thread() -> None:
        asyncio.run(st.close())

    await asyncio.to_thread(close_in_thread)
    assert [lease_id for lease_id, _ in relay.deletes] == ["lease_1"]
    assert st.status.state is TunnelState.CLOSED
    await st.close()  # again, on its own loop: nothing left to do
    assert len(relay.deletes) == 1


# -- end to end: our agent against the real relay (taskapp_notebook.relay) ---------------


@pytest.fixture
async def real_relay(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    from taskapp_notebook.relay import RelayConfig, RelayServer

    # Leases live 2 s, so the agent renews during the test.
    config = RelayConfig(default_ttl=2.0, max_ttl=2.0, ping_interval=0.5, ping_timeout=2.0)
    async with RelayServer(config=config) as server:
        monkeypatch.setenv("SYNTH_BACKEND_URL", server.url)
        monkeypatch.setenv("SYNTH_API_KEY", server.api_key)
        yield server


async def test_end_to_end_through_the_real_relay(
    real_relay: Any,
    ctx: TunnelContext,
    app_state: tuple[dict[str, Any], int],
    events: list[str],
) -> None:
    import httpx

    state, _ = app_state
    st = SynthTunnel()
    st.preflight(ctx)
    url = await st.open(ctx)
    lease_id = st.lease.lease_id if st.lease else ""
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as caller:
            auth = st.verification_headers()
            response = await caller.get(
                f"{url}/echo",
                params={"x": "1"},
                headers={**auth, "X-API-Key": "callers-key", "x-synthtunnel-lease-id": "spoof"},
            )
            assert response.status_code == 200
            pairs = [(k.lower(), v) for k, v in response.json()["headers"]]
            assert ("x-api-key", APP_KEY) in pairs and ("x-synthtunnel-lease-id", lease_id) in pairs
            assert ("authorization", f"Bearer {APP_KEY}") in pairs
            assert response.json()["query"] == "x=1"
            # Our relay declines the agent's permessage-deflate offer (see endpoint.py).
            assert st.agent is not None and st.agent._ws is not None
            assert st.agent._ws.protocol.extensions == []

            payload = secrets.token_bytes(1024 * 1024)
            response = await caller.post(f"{url}/upload", content=payload, headers=auth)
            assert response.status_code == 200 and response.content == payload
            assert state["upload_bytes"] == len(payload)

            unauthenticated = await caller.get(f"{url}/echo")
            assert unauthenticated.status_code in (401, 403)

            # A caller that gives up: the relay sends CANCEL, the app sees the disconnect.
            with pytest.raises(httpx.ReadTimeout):
                await caller.get(f"{url}/hold", headers=auth, timeout=0.5)
            await wait_until(lambda: len(state.get("disconnected", [])) == 1)
            assert state["disconnected"] == state["started"]

            # The 2 s lease is renewed in place (same lease, URL and token) while we call it.
            await wait_until(lambda: any("extended" in e for e in events))
            assert st.url == url and st.lease is not None and st.lease.lease_id == lease_id
            again = await caller.get(f"{url}/echo", headers=st.verification_headers())
            assert again.status_code == 200
            assert st.status.state is TunnelState.CONNECTED
    finally:
        await st.close()
    async with httpx.AsyncClient(trust_env=False) as client:
        gone = await client.get(
            f"{real_relay.url}/api/v1/synthtunnel/leases/{lease_id}",
            headers={"Authorization": f"Bearer {real_relay.api_key}"},
        )
    assert gone.status_code in (404, 410)


# -- request bodies: bounded buffers ---------------------------------------------------

MiB = 1024 * 1024


async def _upload(conn: AgentConn, rid: str, payload: bytes) -> None:
    """Send ``payload`` as REQ_BODY frames then REQ_END (waits when the agent pushes back)."""
    await conn.send_body(rid, payload)
    await conn.send({"type": "REQ_END", "rid": rid})


async def test_a_sleeping_app_fails_only_its_upload_and_the_buffer_stays_bounded(
    relay: SynthTunnelTestRelay, ctx: TunnelContext, app_state: tuple[dict[str, Any], int]
) -> None:
    """A 16 MiB upload to a handler that sleeps before reading: at most 1 MiB of it is ever
    buffered by the agent, the request ends with REQUEST_BODY_OVERFLOW, and requests sent
    behind the upload's frames complete while the handler is still asleep."""
    state, _ = app_state
    gate = state["gate"] = asyncio.Event()
    st = SynthTunnel(request_buffer_bytes=MiB, agent_buffer_bytes=4 * MiB, body_stall_timeout=0.2)
    await st.open(ctx)
    try:
        agent, conn = st.agent, only_conn(relay)
        assert agent is not None
        payload = secrets.token_bytes(16 * MiB)
        await conn.request("up", "POST", "/slow-upload", end=False)
        await wait_until(lambda: "up" in agent.inflight)
        request = agent.inflight["up"]
        uploading = asyncio.create_task(_upload(conn, "up", payload))
        await wait_until(lambda: agent.body_stalls >= 1)
        await wait_until(lambda: "up" in state.get("slow_started", []))
        for rid in ("e1", "e2", "e3"):  # queued behind the upload on the same WebSocket
            await conn.request(rid, "GET", "/echo")
        frames = await conn.response("up")
        assert [f["type"] for f in frames] == ["RESP_ERROR"]
        assert frames[0]["code"] == "REQUEST_BODY_OVERFLOW" and frames[0]["lease_id"] == "lease_1"
        assert "request_buffer_bytes=1048576" in frames[0]["message"]
        for rid in ("e1", "e2", "e3"):
            assert (await conn.response(rid))[-1]["type"] == "RESP_END"
        await uploading  # the agent drops the rest of the body without waiting
        assert not gate.is_set()  # all of that while the handler slept
        assert 0 < request.peak_buffered_bytes <= MiB
        assert agent.body_budget.peak <= MiB
        assert agent.body_overflows == 1 and agent.body_budget.used == 0
        assert request.buffered_bytes == 0 and "up" not in agent.inflight
        gate.set()  # the handler wakes up to a request the agent aborted
        await wait_until(lambda: "up" in state.get("slow_disconnected", []))
        assert conn.frames("up") == frames  # nothing more for the failed rid
    finally:
        gate.set()
        await st.close()


async def test_an_app_that_reads_late_gets_the_upload_intact_through_back_pressure(
    relay: SynthTunnelTestRelay, ctx: TunnelContext, app_state: tuple[dict[str, Any], int]
) -> None:
    """Within ``body_stall_timeout`` the agent stops reading the WebSocket instead of
    buffering: the relay's sends wait, and the whole body reaches the app once it reads."""
    state, _ = app_state
    gate = state["gate"] = asyncio.Event()
    st = SynthTunnel(request_buffer_bytes=256 * 1024, agent_buffer_bytes=MiB, body_stall_timeout=60)
    await st.open(ctx)
    try:
        agent, conn = st.agent, only_conn(relay)
        assert agent is not None
        assert agent.body_stall_timeout == 10.0  # capped at half the ping timeout (20 s)
        payload = secrets.token_bytes(12 * MiB)
        await conn.request("up", "POST", "/slow-upload", end=False)
        await wait_until(lambda: "up" in agent.inflight)
        request = agent.inflight["up"]
        uploading = asyncio.create_task(_upload(conn, "up", payload))
        await wait_until(lambda: agent.body_stalls >= 1)  # full, and the app reads nothing
        assert request.buffered_bytes <= 256 * 1024 and not uploading.done()
        await conn.request("e1", "GET", "/echo")  # waits behind the upload, then completes
        gate.set()
        frames = await conn.response("up", timeout=30)
        assert frames[0]["status"] == 200 and frames[-1]["type"] == "RESP_END"
        seen = json.loads(body_of(frames))
        assert seen == {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        assert (await conn.response("e1"))[-1]["type"] == "RESP_END"
        await uploading
        assert 0 < request.peak_buffered_bytes <= 256 * 1024
        assert agent.body_budget.peak <= 256 * 1024
        assert agent.body_overflows == 0 and agent.body_budget.used == 0
    finally:
        gate.set()
        await st.close()


async def test_past_the_agent_bound_the_biggest_buffer_fails_and_the_rest_go_on(
    relay: SynthTunnelTestRelay, ctx: TunnelContext, app_state: tuple[dict[str, Any], int]
) -> None:
    """Bodies under 64 KiB stay in the agent until REQ_END, so the buffered bytes are
    exact: 60 + 40 KiB buffered, 30 KiB more do not fit the agent's 128 KiB. The largest
    buffer (not the request whose chunk did not fit) fails; the others arrive intact."""
    state, _ = app_state
    kib = 1024
    st = SynthTunnel(
        request_buffer_bytes=128 * kib, agent_buffer_bytes=128 * kib, body_stall_timeout=0.2
    )
    await st.open(ctx)
    try:
        agent, conn = st.agent, only_conn(relay)
        assert agent is not None
        bodies = {rid: secrets.token_bytes(n * kib) for rid, n in (("a", 60), ("b", 40), ("c", 30))}
        for rid in ("a", "b"):
            await conn.request(rid, "POST", "/upload", body=bodies[rid], end=False)
        await wait_until(lambda: agent.body_budget.used == 100 * kib)
        await conn.request("c", "POST", "/upload", body=bodies["c"], end=False)
        frames = await conn.response("a")
        assert [f["type"] for f in frames] == ["RESP_ERROR"]
        assert frames[0]["code"] == "REQUEST_BODY_OVERFLOW"
        assert "agent_buffer_bytes=131072" in frames[0]["message"]
        await wait_until(lambda: agent.body_budget.used == 70 * kib)
        assert agent.body_budget.peak == 100 * kib and agent.body_overflows == 1
        for rid in ("b", "c"):
            await conn.send({"type": "REQ_END", "rid": rid})
            frames = await conn.response(rid)
            assert frames[-1]["type"] == "RESP_END" and body_of(frames) == bodies[rid]
        assert state["upload_headers"].get("content-length") == str(30 * kib)
        assert agent.body_budget.used == 0 and agent.inflight == {}
    finally:
        await st.close()


async def test_cancel_and_deadline_free_a_buffered_body(
    relay: SynthTunnelTestRelay, ctx: TunnelContext, app_state: tuple[dict[str, Any], int]
) -> None:
    state, _ = app_state
    st = SynthTunnel(request_buffer_bytes=128 * 1024, agent_buffer_bytes=128 * 1024)
    await st.open(ctx)
    try:
        agent, conn = st.agent, only_conn(relay)
        assert agent is not None
        await conn.request("c1", "POST", "/upload", body=b"x" * 50_000, end=False)
        await wait_until(lambda: agent.body_budget.used == 50_000)
        await conn.send({"type": "CANCEL", "rid": "c1"})
        await wait_until(lambda: agent.body_budget.used == 0 and "c1" not in agent.inflight)
        await conn.request("d1", "POST", "/upload", body=b"y" * 50_000, end=False, deadline_ms=200)
        frames = await conn.response("d1")
        assert [f["code"] for f in frames] == ["DEADLINE_EXCEEDED"]
        assert agent.body_budget.used == 0 and agent.inflight == {}
        assert conn.frames("c1") == []
        await conn.request("r", "POST", "/upload", body=b"z" * 100_000)
        assert body_of(await conn.response("r")) == b"z" * 100_000
    finally:
        await st.close()


def test_body_bounds_are_validated() -> None:
    with pytest.raises(ValueError, match="request_buffer_bytes must be at least 131072"):
        SynthTunnel(request_buffer_bytes=65536)
    with pytest.raises(ValueError, match="agent_buffer_bytes"):
        SynthTunnel(request_buffer_bytes=8 * MiB, agent_buffer_bytes=4 * MiB)
    with pytest.raises(ValueError, match="body_stall_timeout"):
        SynthTunnel(body_stall_timeout=-1)


def test_reconnect_backoff_starts_under_a_second_and_is_spread() -> None:
    from itertools import islice

    from taskapp_notebook.tunnels.synthtunnel.attach import backoff

    runs = [list(islice(backoff(), 8)) for _ in range(50)]
    assert all(run[0] <= 1.0 for run in runs)  # first retry within a second
    nominal = (0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0)
    for run in runs:
        for delay, base in zip(run, nominal, strict=True):
            assert base * 0.8 <= delay <= base * 1.2
    assert len({run[0] for run in runs}) > 1  # agents do not all come back in step
