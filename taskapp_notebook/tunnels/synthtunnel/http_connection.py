"""One keep-alive HTTP/1.1 connection of the agent's client to the app
(:mod:`.local_http`): an ``asyncio.Protocol`` that buffers what the app sends, pauses reading
past :data:`READ_BUFFER` (bounded memory: back-pressure reaches the app through TCP), and
honours the transport's write flow control.
"""

from __future__ import annotations

import asyncio

#: Response bytes read ahead of the agent before reading pauses.
READ_BUFFER = 1024 * 1024


class LocalHTTPError(OSError):
    """The app could not be reached or broke the exchange; ``response_started`` is True
    once any byte of the response had arrived."""

    def __init__(self, message: str, *, response_started: bool = False) -> None:
        super().__init__(message)
        self.response_started = response_started


class Connection(asyncio.Protocol):
    """One TCP connection to the app, parsing one response at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.buffered = 0
        self.received = 0  # response bytes seen for the current request
        self.closed = False
        self.error: str | None = None
        self.paused = False
        self.idle_since = 0.0
        self.reused = False
        self._wake: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._write_paused = False

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.buffer += data
        self.buffered += len(data)
        if self.buffered > READ_BUFFER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._notify()

    def eof_received(self) -> bool | None:
        self.closed = True
        self._notify()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is not None:
            self.error = f"{type(exc).__name__}: {exc}"
        self._notify()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- used by the client --------------------------------------------------------------

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def wait_data(self) -> None:
        """Wait until more bytes (or EOF) arrive."""
        if self.closed:
            raise LocalHTTPError(
                f"the app closed the connection ({self.error or 'EOF'})",
                response_started=self.received > 0,
            )
        self._wake = asyncio.get_running_loop().create_future()
        try:
            await self._wake
        finally:
            self._wake = None

    def take(self, size: int | None = None) -> bytes:
        """Up to ``size`` buffered bytes (all when None); resumes reading when drained."""
        if size is None or size >= len(self.buffer):
            data = bytes(self.buffer)
            self.buffer.clear()
        else:
            data = bytes(memoryview(self.buffer)[:size])  # one copy, not two
            del self.buffer[:size]
        self.buffered = len(self.buffer)
        if self.paused and self.buffered <= READ_BUFFER // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def begin(self) -> None:
        """A new request on this connection: count its response bytes from zero."""
        self.received = 0

    async def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise LocalHTTPError("the app closed the connection while the request was sent")
        self.transport.write(data)
        if self._write_paused:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await self._drained
            finally:
                self._drained = None

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
