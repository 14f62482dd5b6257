"""uvicorn on a socket we bound, with fast start/stop and no signal capture.

``ServerHandle`` runs ``uvicorn.Server.serve`` as a task on the *current* event loop (the
kernel's loop, or the loop of a :class:`~taskapp_notebook.loops.LoopThread`). Every server
of the package runs on it — the task app and the SynthTunnel relay — and this module is the
only one that overrides uvicorn internals. Facts this relies on
(docs/kernel-facts.md): uvicorn must not capture signals inside a kernel, a failed lifespan calls
``sys.exit`` inside uvicorn, and uvicorn's own main loop and shutdown poll every 100 ms —
we replace both with event-driven versions so start and stop take milliseconds. Stop is
bounded by ``stop_grace``; requests that outlive it are cancelled quietly (a 503 to the
caller, a DEBUG line) instead of uvicorn's ERROR traceback per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Generator
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import ServerStartError
from .params import DEFAULT_STOP_GRACE

logger = logging.getLogger(__name__)


#: After the stop grace, how long cancelled handlers get to unwind and send their 503.
UNWIND_TIMEOUT = 0.5

_STOPPED_BODY = b"The server stopped before this request finished.\n"


class _Server(uvicorn.Server):
    """uvicorn.Server without signal capture, without 100 ms polling, and with a bounded,
    quiet shutdown: requests still running when ``stop_grace`` ends are cancelled and their
    callers answered ``503`` (see :class:`_QuietCancel`)."""

    def __init__(self, config: uvicorn.Config, quiet: _QuietCancel, stop_grace: float) -> None:
        super().__init__(config)
        self.exit_event = asyncio.Event()
        self.quiet = quiet
        self.stop_grace = stop_grace
        #: Requests cancelled because they were still running when the grace ended.
        self.cancelled_requests = 0

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The kernel (or the user's script) owns signals; we are stopped explicitly.
        yield

    async def main_loop(self) -> None:
        # on_tick(0) refreshes the Date header; wake on exit or once a second.
        while not await self.on_tick(0):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.exit_event.wait(), timeout=1.0)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Close the listener first (the port is free now), end idle keep-alive connections,
        # and let requests under way finish within the grace.
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        await self._drain(self.stop_grace)
        running = [task for task in self.server_state.tasks if not task.done()]
        if running and not self.force_exit:
            self.cancelled_requests += len(running)
            logger.debug("Stop grace of %g s over: cancelling %d request(s) still running",
                         self.stop_grace, len(running))
            self.quiet.cancelling = True
            for task in running:
                task.cancel()
            await asyncio.wait(running, timeout=UNWIND_TIMEOUT)
        for connection in list(self.server_state.connections):
            connection.transport.close()
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def _drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for every connection and request to end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.0005
        while (self.server_state.connections or self.server_state.tasks) and not self.force_exit:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)


class _QuietCancel:
    """ASGI wrapper: an HTTP request that the stop cancels on purpose ends cleanly.

    Without it uvicorn logs the ``CancelledError`` at ERROR with a traceback. Here the
    request is logged at DEBUG and its caller gets ``503`` with ``Connection: close``; when
    the response had already started it cannot be completed, so the connection is dropped
    (the cycle marked disconnected, so uvicorn does not report an unfinished response).
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        #: Set by the server once the grace is over: a cancellation from then on is ours.
        self.cancelling = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if not self.cancelling:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            logger.debug("Request %s %s cancelled: still running when the stop grace ended",
                         scope.get("method"), scope.get("path"))
            await _answer_stopped(send)


async def _answer_stopped(send: Any) -> None:
    cycle = getattr(send, "__self__", None)  # uvicorn's RequestResponseCycle
    if getattr(cycle, "response_started", False):
        cycle.disconnected = True  # type: ignore[union-attr]
        cycle.transport.close()  # type: ignore[union-attr]
        return
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(_STOPPED_BODY)).encode()),
        (b"connection", b"close"),
    ]
    with contextlib.suppress(Exception):  # the caller may be gone; nothing to tell then
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": _STOPPED_BODY})


class _CoalescedWrites:
    """A transport whose small writes within one loop iteration go out as one ``send``.

    uvicorn's h11 protocol writes a response in two to four pieces (head, body, chunk end);
    each is a syscall and, on loopback, a wake-up of the reader. Writes are held until the
    end of the current loop iteration (``call_soon``) and joined; a large write (a body
    chunk) flushes what is held and goes out as it is, so bodies are not copied. Everything
    else is the real transport's.
    """

    LIMIT = 64 * 1024

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: list[bytes] = []
        self._size = 0
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._size + len(data) > self.LIMIT:
            self.flush()
            self._transport.write(data)
            return
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)
        self._size += len(data)

    def flush(self) -> None:
        if self._held:
            data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
            self._held.clear()
            self._size = 0
            if not self._transport.is_closing():
                self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._size + self._transport.get_write_buffer_size()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def unwrap(self) -> asyncio.Transport:
        """Send what is held and give back the real transport (for a WebSocket upgrade)."""
        self.flush()
        return self._transport

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingH11Protocol(H11Protocol):
    """uvicorn's h11 protocol writing each response in as few ``send`` calls as it can. A
    WebSocket upgrade gets the real transport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _CoalescedWrites(transport)  # type: ignore[assignment]

    def handle_websocket_upgrade(self, event: Any) -> None:
        _unwrap(self)
        super().handle_websocket_upgrade(event)


def _unwrap(protocol: Any) -> None:
    held = protocol.transport
    if isinstance(held, _CoalescedWrites):
        protocol.transport = held.unwrap()


@functools.cache
def http_protocol() -> type[asyncio.Protocol]:
    """The HTTP protocol every server of ours runs: uvicorn's httptools one (a C parser,
    when ``httptools`` is installed, as with ``uvicorn[standard]``) or its h11 one, each
    writing a response in one ``send``."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return CoalescingH11Protocol

    class CoalescingHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.transport = _CoalescedWrites(transport)  # type: ignore[assignment]

        def handle_websocket_upgrade(self) -> None:
            _unwrap(self)
            super().handle_websocket_upgrade()

    return CoalescingHttpToolsProtocol


class ServerHandle:
    """One uvicorn server on a pre-bound socket, as a task on the running loop.

    ``options`` go to ``uvicorn.Config`` (the relay sets ``http``, ``ws``, ``lifespan``...).
    An ``app`` with a ``lifespan_error`` attribute (``stats.InstrumentedApp``) has it quoted
    when its lifespan startup fails. ``stop_grace``: seconds :meth:`stop` lets requests
    under way finish (after the listener is closed) before cancelling them quietly.
    """

    def __init__(
        self,
        app: Any,
        sock: socket.socket,
        *,
        stop_grace: float = DEFAULT_STOP_GRACE,
        **options: Any,
    ) -> None:
        self.app = app
        self.sock = sock
        host, port = sock.getsockname()[:2]
        settings: dict[str, Any] = {
            "log_config": None,
            "access_log": False,
            "lifespan": "auto",
            "http": http_protocol(),
            **options,
        }
        quiet = _QuietCancel(app)
        config = uvicorn.Config(quiet, host=host, port=port, **settings)
        self.server = _Server(config, quiet, stop_grace)
        self.task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Start serving; return once the socket accepts requests. Raise ServerStartError."""
        self.loop = asyncio.get_running_loop()
        self.task = self.loop.create_task(self._serve(), name=f"taskapp-server:{self.port}")
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises the ServerStartError
                raise ServerStartError("uvicorn exited during startup without an error.")
            await asyncio.sleep(0.0005)

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    async def _serve(self) -> None:
        try:
            await self.server.serve(sockets=[self.sock])
        except SystemExit as exc:
            # uvicorn calls sys.exit() when lifespan startup fails; never let it reach
            # the kernel (docs/kernel-facts.md #3).
            error = getattr(self.app, "lifespan_error", None)
            reason = error or f"uvicorn exited with code {exc.code}"
            raise ServerStartError(
                f"The task app failed to start: its lifespan startup raised ({reason}). "
                "Fix the app's startup hooks and start again."
            ) from None
        finally:
            self.sock.close()

    def close_listener(self) -> None:
        """Stop accepting connections now (frees the port). Safe from any thread of the loop."""
        for server in getattr(self.server, "servers", []):
            server.close()
        self.sock.close()

    def _stop_accepting(self) -> None:
        if self.loop is None:
            return
        for server in getattr(self.server, "servers", []):
            for sock in server.sockets:
                self.loop.remove_reader(sock.fileno())

    def request_exit(self) -> None:
        """Ask the server to exit; callable from any thread and from signal handlers."""
        self.server.should_exit = True
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_loop_exit)

    def _on_loop_exit(self) -> None:
        self.close_listener()
        self.server.exit_event.set()

    @property
    def cancelled_requests(self) -> int:
        """Requests cancelled because they outlived the stop grace."""
        return self.server.cancelled_requests

    @property
    def stop_grace(self) -> float:
        return self.server.stop_grace

    async def stop(self, grace: float | None = None) -> None:
        """Close the listener first, then shut the server down: requests under way get
        ``grace`` seconds (default: ``stop_grace``), then are cancelled. Idempotent."""
        if grace is not None:
            self.server.stop_grace = grace
        task = self.task
        if task is None:
            self.sock.close()
            return
        self.server.should_exit = True
        # Stop accepting, then let connections accepted in this loop tick get their
        # transports: asyncio drops (leaks) a socket it accepted when the server is closed
        # before its transport exists (Server._attach asserts the server is open).
        self._stop_accepting()
        await asyncio.sleep(0)
        self.close_listener()
        self.server.exit_event.set()
        if not task.done() and not self.server.started:
            # Still in startup (e.g. a slow lifespan): nothing to drain, so do not wait for
            # it. Cancel, and queue the lifespan's shutdown so its task ends too.
            task.cancel()
            queue = getattr(getattr(self.server, "lifespan", None), "receive_queue", None)
            if queue is not None:
                queue.put_nowait({"type": "lifespan.shutdown"})
        if not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.done():
                    self.server.force_exit = True
                    raise
        with contextlib.suppress(BaseException):
            task.result()

    def describe(self) -> dict[str, Any]:
        return {"port": self.port, "started": self.server.started}
