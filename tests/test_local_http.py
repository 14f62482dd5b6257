"""The agent's HTTP/1.1 client to the local app (``tunnels/synthtunnel/local_http.py``),
against a real uvicorn app and, for the misbehaviours, raw asyncio servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from relay_agent import serve_app

from taskapp_notebook.tunnels.synthtunnel import local_http
from taskapp_notebook.tunnels.synthtunnel.local_http import LocalHTTP, LocalHTTPError

MiB = 1024 * 1024


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"healthy": True}

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        body = await request.body()
        return Response(body, headers={"x-got": request.headers.get("x-test", "")})

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def parts() -> AsyncIterator[bytes]:
            for i in range(5):
                yield f"part{i};".encode()

        return StreamingResponse(parts())

    @app.get("/empty", status_code=204)
    async def empty() -> Response:
        return Response(status_code=204)

    return app


async def read_all(
    client: LocalHTTP, method: str, target: bytes, body: object = b""
) -> tuple[int, dict[bytes, bytes], bytes]:
    response = await client.request(method, target, [(b"x-test", b"yes")], body)  # type: ignore[arg-type]
    try:
        data = b"".join([chunk async for chunk in response.body()])
    finally:
        await response.aclose()
    return response.status, {k.lower(): v for k, v in response.headers}, data


async def test_requests_bodies_and_keep_alive_against_uvicorn() -> None:
    async with serve_app(make_app()) as url:
        port = int(url.rsplit(":", 1)[1])
        client = LocalHTTP("127.0.0.1", port)
        try:
            assert (await read_all(client, "GET", b"/health"))[2] == b'{"healthy":true}'
            big = os.urandom(3 * MiB)
            status, headers, data = await read_all(client, "POST", b"/echo", big)
            assert (status, headers[b"x-got"], data) == (200, b"yes", big)

            async def streamed() -> AsyncIterator[bytes]:
                for _ in range(4):
                    yield b"y" * 70_000
                    await asyncio.sleep(0)

            assert (await read_all(client, "POST", b"/echo", streamed()))[2] == b"y" * 280_000
            status, headers, data = await read_all(client, "GET", b"/stream")
            assert headers[b"transfer-encoding"] == b"chunked"
            assert data == b"part0;part1;part2;part3;part4;"
            assert (await read_all(client, "GET", b"/empty"))[:1] == (204,)
            assert (await read_all(client, "HEAD", b"/health"))[2] == b""
            assert len(client._open) == 1  # every request on one keep-alive connection
            assert client.retries == 0
            # A response not read to its end cannot leave its connection reusable: closed,
            # and forgotten (no connection object kept per abandoned response).
            for _ in range(3):
                response = await client.request("POST", b"/echo", [], big)
                await response.aclose()
            assert len(client._open) <= 1
        finally:
            await client.aclose()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[int]:
    """A raw asyncio server running ``handler`` per connection; yields its port and closes
    every connection it accepted on exit."""
    writers: list[asyncio.StreamWriter] = []
    tasks: list[asyncio.Task[None]] = []

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        with contextlib.suppress(Exception):
            await handler(reader, writer)

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in writers:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        await server.wait_closed()


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


async def test_a_request_lost_on_a_stale_keep_alive_connection_is_sent_again() -> None:
    """The race behind "requests lost under load": the app closes an idle keep-alive
    connection just as a request is written on it. That request never reached the app,
    so it is sent once more on a new connection; on a NEW connection it is not."""
    served: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = len(served)
        served.append(0)
        while await reader.readuntil(b"\r\n\r\n"):
            if connection == 0 and served[0] == 1:
                writer.close()  # closes instead of answering its second request
                return
            served[connection] += 1
            writer.write(OK)

    async with raw_server(handler) as port:
        client = LocalHTTP("127.0.0.1", port)
        try:
            assert (await read_all(client, "GET", b"/a"))[2] == b"ok"
            assert (await read_all(client, "GET", b"/b"))[2] == b"ok"  # retried transparently
            assert client.retries == 1 and served == [1, 1]
        finally:
            await client.aclose()

    async def closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    # The agent's former client (an httpx transport, as in issue "requests lost under load")
    # loses the request on the stale connection: the server closed it without an answer.
    served.clear()
    async with raw_server(handler) as port:
        transport = httpx.AsyncHTTPTransport()
        try:
            url = f"http://127.0.0.1:{port}"
            first = await transport.handle_async_request(httpx.Request("GET", url + "/a"))
            await first.aread()
            with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
                await transport.handle_async_request(httpx.Request("GET", url + "/b"))
        finally:
            await transport.aclose()

    async with raw_server(closes) as port:
        client = LocalHTTP("127.0.0.1", port)
        try:
            with pytest.raises(LocalHTTPError, match="closed the connection"):
                await read_all(client, "POST", b"/x", b"body")
            assert client.retries == 0
        finally:
            await client.aclose()


async def test_idle_connections_past_the_idle_timeout_are_not_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(local_http, "IDLE_TIMEOUT", 0.05)
    async with serve_app(make_app()) as url:
        client = LocalHTTP("127.0.0.1", int(url.rsplit(":", 1)[1]))
        try:
            await read_all(client, "GET", b"/health")
            first = next(iter(client._open))
            await asyncio.sleep(0.1)
            await read_all(client, "GET", b"/health")
            assert first not in client._open and first.closed and len(client._open) == 1
        finally:
            await client.aclose()


async def test_reading_pauses_while_the_agent_does_not_take_the_body() -> None:
    size = 40 * MiB

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        for _ in range(size // MiB):
            writer.write(b"z" * MiB)
            await writer.drain()

    async with raw_server(flood) as port:
        client = LocalHTTP("127.0.0.1", port)
        try:
            response = await client.request("GET", b"/", [], b"")
            conn = response._conn
            await asyncio.sleep(0.3)  # the app keeps writing; nobody reads the body
            assert conn.paused and conn.buffered <= local_http.READ_BUFFER + 256 * 1024
            total = 0
            async for chunk in response.body():
                total += len(chunk)
                assert conn.buffered <= local_http.READ_BUFFER + 256 * 1024
            assert total == size
            await response.aclose()
        finally:
            await client.aclose()


@pytest.mark.parametrize(
    "answer",
    [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n"],
    ids=["not-http", "bad-header"],
)
async def test_a_response_that_is_not_http_is_an_error(answer: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()

    async with raw_server(handler) as port:
        client = LocalHTTP("127.0.0.1", port)
        try:
            with pytest.raises(LocalHTTPError):
                await read_all(client, "GET", b"/")
        finally:
            await client.aclose()


async def test_refused_connection_is_an_error() -> None:
    async with raw_server(lambda r, w: asyncio.sleep(0)) as port:
        pass
    client = LocalHTTP("127.0.0.1", port)
    with pytest.raises(LocalHTTPError, match="cannot connect"):
        await read_all(client, "GET", b"/")
