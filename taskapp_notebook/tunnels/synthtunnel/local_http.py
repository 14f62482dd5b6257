"""The agent's HTTP/1.1 client to the local app: keep-alive connections, nothing else.

Why not httpx: the agent calls one app on loopback with headers it already prepared, so a
general client's layers are pure cost. Profiled per request (``bench/tunnel.py``
``--profile-ours``), httpcore spent ~0.2 ms in a failing ``import`` probe for the async
library and ~0.3 ms scanning its pool; this client is an ``asyncio.Protocol`` that writes
the request in one ``write`` and parses the response head with ``bytes.split``.

Behaviour: the response body is returned as it comes (chunked transfer decoded, no content
decoding, no redirects). Reading is paused while more than ``READ_BUFFER`` bytes wait for
the agent (bounded memory; back-pressure reaches the app through TCP). A request body is
either bytes (sent with ``Content-Length``) or an async iterator (sent chunked).

Keep-alive race: an idle connection the app closes (uvicorn's ``timeout_keep_alive``, 5 s)
at the moment a request is written on it loses that request. Idle connections are
therefore dropped after ``IDLE_TIMEOUT`` (2 s, below uvicorn's), and a request that fails on
a *reused* connection before any response byte arrived, with a body that is not a stream,
is sent once more on a new connection: it never reached the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .http_connection import READ_BUFFER, Connection, LocalHTTPError

__all__ = ["READ_BUFFER", "LocalHTTP", "LocalHTTPError", "Response"]

#: Idle keep-alive connections older than this are closed instead of reused.
IDLE_TIMEOUT = 2.0
#: Idle connections kept per app.
MAX_IDLE = 32
#: Largest response head (status line + headers).
MAX_HEAD = 64 * 1024
CONNECT_TIMEOUT = 10.0

_NO_BODY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})


class Response:
    """A response head and its body, read with :meth:`body`; :meth:`aclose` always."""

    def __init__(
        self,
        client: LocalHTTP,
        conn: Connection,
        head: _Head,
        *,
        reusable: bool,
    ) -> None:
        self._client = client
        self._conn = conn
        self.status = head.status
        self.headers = head.headers
        self._framing = head.framing  # "length", "chunked", "eof" or "none"
        self._left = head.length
        self._done = head.framing == "none" or (head.framing == "length" and not head.length)
        self._reusable = reusable and head.keep_alive

    def buffered_body(self, limit: int) -> bytes | None:
        """The whole body when it has already arrived and is at most ``limit`` bytes (a
        small response: sent on in one go), else None (read it with :meth:`body`)."""
        if self._done:
            return b""
        if self._framing == "length" and self._left <= min(limit, len(self._conn.buffer)):
            data = self._conn.take(self._left)
            self._left, self._done = 0, True
            return data
        return None

    async def body(self) -> AsyncIterator[bytes]:
        """The body as it arrives (transfer framing removed)."""
        conn = self._conn
        if self._framing == "length":
            while self._left:
                if not conn.buffer:
                    await conn.wait_data()
                    continue
                data = conn.take(self._left)
                self._left -= len(data)
                yield data
        elif self._framing == "eof":
            while True:
                if conn.buffer:
                    yield conn.take()
                elif conn.closed:
                    break
                else:
                    with contextlib.suppress(LocalHTTPError):
                        await conn.wait_data()
        elif self._framing == "chunked":
            async for data in self._chunked():
                yield data
        self._done = True

    async def _line(self) -> bytes:
        conn = self._conn
        while (end := conn.buffer.find(b"\r\n")) < 0:
            if len(conn.buffer) > MAX_HEAD:
                raise LocalHTTPError("malformed chunked body", response_started=True)
            await conn.wait_data()
        line = conn.take(end + 2)
        return line[:-2]

    async def _chunked(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            size_line = (await self._line()).split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise LocalHTTPError("malformed chunk size", response_started=True) from None
            if size == 0:
                while await self._line():  # trailers, up to the empty line
                    pass
                return
            while size:
                if not conn.buffer:
                    await conn.wait_data()
                    continue
                data = conn.take(size)
                size -= len(data)
                yield data
            if await self._line():
                raise LocalHTTPError("malformed chunked body", response_started=True)

    async def aclose(self) -> None:
        """Give the connection back for reuse if the exchange completed, else close it."""
        conn = self._conn
        if self._done and self._reusable and not conn.closed and not conn.buffer:
            self._client.release_connection(conn)
        else:
            self._client.discard_connection(conn)


class LocalHTTP:
    """Keep-alive HTTP/1.1 connections to one app at ``host:port``."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._host_header = (
            f"{host}:{port}".encode("ascii")
            if ":" not in host
            else (f"[{host}]:{port}".encode("ascii"))
        )
        self._idle: list[Connection] = []
        self._open: set[Connection] = set()
        #: Requests sent a second time after a reused connection closed under them.
        self.retries = 0

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, conn = await loop.create_connection(Connection, self.host, self.port)
        except (OSError, TimeoutError) as exc:
            raise LocalHTTPError(f"cannot connect to {self.host}:{self.port}: {exc!r}") from None
        self._open.add(conn)
        return conn

    async def _acquire(self) -> Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_TIMEOUT:
                conn.reused = True
                conn.begin()
                return conn
            self.discard_connection(conn)
        conn = await self._connect()
        conn.reused = False
        return conn

    def release_connection(self, conn: Connection) -> None:
        conn.idle_since = time.monotonic()
        if len(self._idle) >= MAX_IDLE:
            self.discard_connection(self._idle.pop(0))
        self._idle.append(conn)

    def discard_connection(self, conn: Connection) -> None:
        conn.abort()
        self._open.discard(conn)

    def _head(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], framing: bytes
    ) -> bytes:
        lines = [
            method.encode("ascii"),
            b" ",
            target,
            b" HTTP/1.1\r\nhost: ",
            self._host_header,
            b"\r\n",
        ]
        for name, value in headers:
            lines += (name, b": ", value, b"\r\n")
        lines += (framing, b"\r\n")
        return b"".join(lines)

    async def request(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes | memoryview],
    ) -> Response:
        """Send one request; return its response once the head arrived."""
        if not isinstance(body, bytes):
            return await self._streamed(method, target, headers, body)
        if body or method not in _NO_BODY_METHODS:
            framing = b"content-length: %d\r\n" % len(body)
        else:
            framing = b""
        head = self._head(method, target, headers, framing)
        small = len(body) < 65536  # one write; a large body is not copied into the head
        for attempt in (1, 2):
            conn = await self._acquire()
            try:
                await conn.write(head + body if small else head)
                if not small:
                    await conn.write(body)
                return await self._response(conn, method)
            except LocalHTTPError as exc:
                self.discard_connection(conn)
                if attempt == 1 and conn.reused and not exc.response_started:
                    self.retries += 1  # a stale keep-alive connection: it never got there
                    continue
                raise
            except BaseException:
                self.discard_connection(conn)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _streamed(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterator[bytes | memoryview],
    ) -> Response:
        conn = await self._acquire()
        head = self._head(method, target, headers, b"transfer-encoding: chunked\r\n")
        sender: asyncio.Task[None] | None = None
        try:
            await conn.write(head)
            sender = asyncio.ensure_future(self._send_chunked(conn, body))
            sender.add_done_callback(_retrieve)
            return await self._response(conn, method, sender)
        except BaseException:
            if sender is not None:
                sender.cancel()
            self.discard_connection(conn)
            raise

    async def _send_chunked(
        self, conn: Connection, body: AsyncIterator[bytes | memoryview]
    ) -> None:
        async for chunk in body:
            if chunk:
                await conn.write(b"".join((b"%x\r\n" % len(chunk), chunk, b"\r\n")))
        await conn.write(b"0\r\n\r\n")

    async def _response(
        self, conn: Connection, method: str, sender: asyncio.Task[None] | None = None
    ) -> Response:
        while True:
            end = conn.buffer.find(b"\r\n\r\n")
            while end < 0:
                if len(conn.buffer) > MAX_HEAD:
                    raise LocalHTTPError("response head too large", response_started=True)
                if sender is not None and sender.done():
                    sender.result()  # raises if sending failed
                    sender = None
                await conn.wait_data()
                end = conn.buffer.find(b"\r\n\r\n")
            head = _parse_head(conn.take(end + 4), method)
            if 100 <= head.status < 200 and head.status != 101:
                continue  # 100 Continue and other interim responses
            # An app that answers before taking the whole body is fine, but the connection
            # cannot be reused (the rest of the body would be read as the next request).
            complete = sender is None or sender.done()
            if sender is not None and not sender.done():
                sender.cancel()
            return Response(self, conn, head, reusable=complete)

    async def aclose(self) -> None:
        for conn in list(self._open):
            conn.abort()
        self._open.clear()
        self._idle.clear()


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a body sender's failure as seen (the response path reports it, or not at all
    when the app answered without the rest of the body)."""
    if not task.cancelled():
        task.exception()


@dataclass(frozen=True, slots=True)
class _Head:
    status: int
    headers: list[tuple[bytes, bytes]]
    framing: str
    length: int
    keep_alive: bool


def _parse_head(head: bytes, method: str) -> _Head:
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise LocalHTTPError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
    status = int(parts[1])
    keep = parts[0] == b"HTTP/1.1"
    headers: list[tuple[bytes, bytes]] = []
    length, chunked = -1, False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise LocalHTTPError(f"malformed response header {line[:80]!r}", response_started=True)
        value = value.strip()
        headers.append((name, value))
        low = name.lower()
        if low == b"content-length":
            if not value.isdigit() or (length >= 0 and int(value) != length):
                raise LocalHTTPError("bad content-length", response_started=True)
            length = int(value)
        elif low == b"transfer-encoding":
            chunked = value.lower().endswith(b"chunked")
        elif low == b"connection":
            tokens = {token.strip() for token in value.lower().split(b",")}
            keep = b"close" not in tokens and (keep or b"keep-alive" in tokens)
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return _Head(status, headers, "none", 0, keep)
    if chunked:
        return _Head(status, headers, "chunked", 0, keep)
    if length >= 0:
        return _Head(status, headers, "length", length, keep)
    return _Head(status, headers, "eof", 0, False)
