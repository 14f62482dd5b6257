"""Test scaffolding for tests/test_relay.py: THE TESTS' OWN minimal SynthTunnel agent
(written from synthtunnel-protocol.md, not our production agent), raw-agent helpers, and a
small task app served by a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Generator
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from websockets.asyncio.client import ClientConnection, connect

MAX_MSG = 16 * 1024 * 1024


async def attach_raw(lease: dict[str, Any], agent_id: str = "raw-test-agent") -> ClientConnection:
    """Connect to ``agent_connect.url`` as given, ATTACH, and wait for ATTACH_ACK."""
    ws = await connect(
        lease["agent_connect"]["url"],
        additional_headers={"Authorization": f"Bearer {lease['agent_connect']['agent_token']}"},
        max_size=MAX_MSG,
        ping_interval=None,
    )
    await ws.send(
        json.dumps(
            {
                "type": "ATTACH",
                "agent_id": agent_id,
                "leases": [{"lease_id": lease["lease_id"], "local_target": {"host": "127.0.0.1"}}],
                "capabilities": {"max_body_chunk_bytes": 65536, "streaming": True},
            }
        )
    )
    ack = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert ack["type"] == "ATTACH_ACK", ack
    return ws


async def next_frame(ws: ClientConnection, kind: str | None = None) -> dict[str, Any]:
    """The next frame (of type ``kind`` when given, skipping others)."""
    while True:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if kind is None or frame["type"] == kind:
            return frame


class RelayTestAgent:
    """The tests' agent: serves a lease by forwarding each request to ``local_url``.

    Records what the relay sent (``requests`` by rid, decoded REQ_BODY sizes, CANCELs).
    ``chunk_size=None`` sends response chunks as large as they are read.
    """

    def __init__(self, lease: dict[str, Any], local_url: str, chunk_size: int | None = 65536):
        self.lease, self.local_url, self.chunk_size = lease, local_url, chunk_size
        self.requests: dict[str, dict[str, Any]] = {}
        self.req_chunk_sizes: list[int] = []
        self.cancelled: set[str] = set()
        self.got_cancel = asyncio.Event()
        self._bodies: dict[str, asyncio.Queue[bytes | None]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def __aenter__(self) -> RelayTestAgent:
        self.ws = await attach_raw(self.lease, "relay-test-agent")
        self.http = httpx.AsyncClient(base_url=self.local_url, timeout=30)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._reader.cancel()
        for task in [self._reader, *self._tasks.values()]:
            task.cancel()
        await asyncio.gather(self._reader, *self._tasks.values(), return_exceptions=True)
        await self.ws.close()
        await self.http.aclose()

    async def _send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps({"lease_id": self.lease["lease_id"], **frame}))

    async def _read(self) -> None:
        async for message in self.ws:
            frame = json.loads(message)
            rid = frame.get("rid")
            if frame["type"] == "REQ_HEADERS":
                self.requests[rid] = frame
                self._bodies[rid] = asyncio.Queue()
                self._tasks[rid] = asyncio.create_task(self._serve(frame, self._bodies[rid]))
            elif frame["type"] == "REQ_BODY":
                chunk = base64.b64decode(frame["chunk_b64"])
                self.req_chunk_sizes.append(len(chunk))
                self._bodies[rid].put_nowait(chunk)
            elif frame["type"] == "REQ_END":
                self._bodies[rid].put_nowait(None)
            elif frame["type"] == "CANCEL":
                self.cancelled.add(rid)
                self.got_cancel.set()
                if rid in self._tasks:
                    self._tasks[rid].cancel()

    async def _serve(self, frame: dict[str, Any], body: asyncio.Queue[bytes | None]) -> None:
        rid = frame["rid"]

        async def stream() -> AsyncIterator[bytes]:
            while (chunk := await body.get()) is not None:
                yield chunk

        url = frame["path"] + (f"?{frame['query']}" if frame["query"] else "")
        content = None if frame["method"] in ("GET", "HEAD") else stream()
        request = self.http.build_request(
            frame["method"], url, headers=frame["headers"], content=content
        )
        try:
            response = await self.http.send(request, stream=True)
        except httpx.HTTPError as exc:
            await self._send(
                {
                    "type": "RESP_ERROR",
                    "rid": rid,
                    "code": "LOCAL_CONNECT_FAILED",
                    "message": str(exc),
                }
            )
            return
        try:
            await self._send(
                {
                    "type": "RESP_HEADERS",
                    "rid": rid,
                    "status": response.status_code,
                    "headers": [list(p) for p in response.headers.multi_items()],
                }
            )
            async for chunk in response.aiter_raw(self.chunk_size):
                await self._send(
                    {
                        "type": "RESP_BODY",
                        "rid": rid,
                        "eof": False,
                        "chunk_b64": base64.b64encode(chunk).decode(),
                    }
                )
            await self._send({"type": "RESP_END", "rid": rid})
        finally:
            await response.aclose()


# -- the task app behind the agent ------------------------------------------------------


class TaskApp:
    """A small Starlette app: /echo, /stream-echo, /bytes?n=, /hold (until released)."""

    def __init__(self) -> None:
        self.held = 0
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()

    async def echo(self, request: Request) -> Response:
        body = await request.body()
        return JSONResponse(
            {
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query,
                "body_len": len(body),
                "headers": [[k, v] for k, v in request.headers.items()],
            }
        )

    @staticmethod
    async def stream_echo(scope: Any, receive: Any, send: Any) -> None:
        """Raw ASGI: each request chunk goes straight back as a response chunk."""
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")],
            }
        )
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
            await send(
                {"type": "http.response.body", "body": message.get("body", b""), "more_body": more}
            )

    async def nbytes(self, request: Request) -> Response:
        return Response(b"x" * int(request.query_params["n"]))

    async def hold(self, request: Request) -> Response:
        self.held += 1
        self.arrived.set()
        await self.release.wait()
        return JSONResponse({"released": True})

    def asgi(self) -> Any:
        methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
        app = Starlette(
            routes=[
                Route("/echo", self.echo, methods=methods),
                Route("/bytes", self.nbytes),
                Route("/hold", self.hold),
            ]
        )

        async def dispatch(scope: Any, receive: Any, send: Any) -> None:
            target = self.stream_echo if scope.get("path") == "/stream-echo" else app
            await target(scope, receive, send)

        return dispatch


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@contextlib.asynccontextmanager
async def serve_app(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on 127.0.0.1 in this loop; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _Server(uvicorn.Config(app, lifespan="off", log_config=None, access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        assert not task.done(), "task app failed to start"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()
