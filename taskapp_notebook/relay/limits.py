"""Connection limits: the relay stays reachable under slowloris and fd exhaustion.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but never a connection
that sends nothing, or its headers a byte at a time (each byte cancels the keep-alive
timer), and ``limit_concurrency`` answers 503 only once headers are complete. So a few
hundred half-open connections used to exhaust the relay's file descriptors, and asyncio then
logged "socket.accept() out of system resource" tens of thousands of times a second. Here:

* **Header deadline** (``header_timeout``): from a connection's opening, or from the first
  byte of its next request, it has this long to complete the request headers (or to finish
  sending a body nobody reads); then it is closed. Requests being served, agent WebSockets
  and keep-alive waits (uvicorn's own timer) are not affected.
* **Connection cap** (``max_connections``; by default derived from ``RLIMIT_NOFILE``): at the
  cap, a new connection closes the *oldest* connection that is not being served (an idle
  keep-alive or one still sending headers). An attacker's half-open connections are then
  always older than a real caller's, who sends its request at once; when nothing can be
  closed, the new connection is refused.
* **Out of descriptors anyway** (other code in the process holds them): the listener keeps one
  spare descriptor, frees it to accept and close the waiting connections, and logs one
  WARNING per 10 s with counts, instead of asyncio's traceback per failed ``accept()``.
* Responses the relay aborts on purpose (a started response the agent abandoned) are no
  longer logged by uvicorn at ERROR ("ASGI callable returned without completing response"),
  and library lines any peer can trigger without credentials (invalid requests, refused
  agent handshakes) are logged once per 10 s, the rest at DEBUG.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, MutableMapping
from typing import Any

from .config import RelayConfig

logger = logging.getLogger(__name__)

#: Descriptors left for everything but connections (listener, state file, logs, imports).
RESERVED_FDS = 64
#: Cap when the fd limit is unknown or huge.
DEFAULT_MAX_CONNECTIONS = 4096
#: Seconds between two warnings about refused or evicted connections.
WARN_EVERY = 10.0
ABORTED_RESPONSE = "ASGI callable returned without completing response."


def default_max_connections() -> int:
    """The fd limit minus descriptors already open and a reserve (16 .. 4096)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return DEFAULT_MAX_CONNECTIONS
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return DEFAULT_MAX_CONNECTIONS
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        used = 0
    return max(16, min(DEFAULT_MAX_CONNECTIONS, soft - used - RESERVED_FDS))


#: Library log lines any peer can trigger at will, without credentials (a log flood):
#: each is logged at its level at most once per ``WARN_EVERY``, the rest at DEBUG.
RATE_LIMITED = frozenset(
    {
        "Invalid HTTP request received.",  # uvicorn
        "Unsupported upgrade request.",  # uvicorn
        "connection open",  # websockets: the relay logs its own attach/detach lines
        "connection closed",
        "HTTP response sent (%d %s)",  # websockets: a refused agent handshake
        "connection rejected (%d %s)",
    }
)


class QuietLibraryLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A library's logger as the relay wants it: a response aborted on purpose at DEBUG, and
    lines an unauthenticated peer can trigger (:data:`RATE_LIMITED`) rate-limited."""

    _last: dict[tuple[str, str], float] = {}
    _muted: dict[tuple[str, str], int] = {}

    @property
    def level(self) -> int:
        return int(self.logger.level)

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if msg == ABORTED_RESPONSE:
            level = logging.DEBUG
        elif level > logging.DEBUG and isinstance(msg, str) and msg in RATE_LIMITED:
            key, now = (self.logger.name, msg), time.monotonic()
            if now - self._last.get(key, -WARN_EVERY) < WARN_EVERY:
                self._muted[key] = self._muted.get(key, 0) + 1
                level = logging.DEBUG
            else:
                self._last[key] = now
                muted = self._muted.pop(key, 0)
                if muted:
                    msg = msg.replace("%", "%%") if not args else msg
                    msg += " (and %d more like it at DEBUG)"
                    args = (*args, muted)
        super().log(level, msg, *args, **kwargs)


class ConnectionGuard:
    """Counts the relay's connections, enforces the cap and the header deadline."""

    def __init__(self, max_connections: int, header_timeout: float) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self._open: set[asyncio.BaseTransport] = set()
        #: Connections not being served, oldest first, with how to close each.
        self._idle: OrderedDict[asyncio.BaseTransport, Callable[[], None]] = OrderedDict()
        self.evicted = self.refused = self.timed_out = self.shed = 0
        self._reported = (0, 0, 0)
        self._last_warning = 0.0

    @classmethod
    def from_config(cls, config: RelayConfig) -> ConnectionGuard:
        cap = config.max_connections or default_max_connections()
        return cls(cap, config.header_timeout)

    @property
    def open(self) -> int:
        return len(self._open)

    # -- bookkeeping ----------------------------------------------------------------------

    def admit(self, transport: asyncio.Transport) -> bool:
        """Count a new connection; at the cap close the oldest idle one, or refuse."""
        if len(self._open) >= self.max_connections:
            if self._idle:
                victim, close = self._idle.popitem(last=False)
                self._open.discard(victim)
                close()
                self.evicted += 1
            else:
                self.refused += 1
                self.report_limits()
                transport.abort()
                return False
            self.report_limits()
        self._open.add(transport)
        return True

    def adopt(self, transport: asyncio.BaseTransport) -> None:
        """A connection handed to another protocol (WebSocket): counted, never evicted."""
        self._idle.pop(transport, None)
        self._open.add(transport)

    def idle(self, transport: asyncio.BaseTransport, close: Callable[[], None]) -> None:
        if transport in self._open and transport not in self._idle:
            self._idle[transport] = close

    def busy(self, transport: asyncio.BaseTransport) -> None:
        self._idle.pop(transport, None)

    def release(self, transport: asyncio.BaseTransport) -> None:
        self._open.discard(transport)
        self._idle.pop(transport, None)

    def report_limits(self) -> None:
        now = time.monotonic()
        counts = (self.evicted, self.refused, self.shed)
        if now - self._last_warning < WARN_EVERY or counts == self._reported:
            return
        evicted, refused, shed = (a - b for a, b in zip(counts, self._reported, strict=True))
        self._last_warning, self._reported = now, counts
        logger.warning(
            "Relay under connection pressure (%d open, max_connections=%d): closed %d idle or "
            "half-open connection(s), refused %d, shed %d for lack of file descriptors "
            "since the last report",
            len(self._open),
            self.max_connections,
            evicted,
            refused,
            shed,
        )

    def summary(self) -> None:
        """Log what the limits did since the start, if anything."""
        if self.timed_out or self.evicted or self.refused or self.shed:
            logger.info(
                "Connection limits since the start: %d connection(s) closed by header_timeout, "
                "%d evicted at max_connections=%d, %d refused, %d shed for lack of fds",
                self.timed_out,
                self.evicted,
                self.max_connections,
                self.refused,
                self.shed,
            )

    # -- the pieces uvicorn is configured with --------------------------------------------

    def http_protocol(self, base: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
        """``base`` (uvicorn's h11 or httptools protocol, see ``server.http_protocol``) with
        this guard's cap and header deadline. The guard keeps the transport asyncio gave,
        whatever ``base`` wraps it in."""
        guard = self

        class GuardedHTTPProtocol(base):  # type: ignore[valid-type, misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.logger: Any = QuietLibraryLog(self.logger, {})
                self._deadline: asyncio.TimerHandle | None = None
                self._upgraded = False

            def connection_made(self, transport: asyncio.Transport) -> None:
                self._guarded_transport = transport
                super().connection_made(transport)
                if guard.admit(transport):
                    self._update()

            def connection_lost(self, exc: Exception | None) -> None:
                self._disarm()
                guard.release(self._guarded_transport)
                super().connection_lost(exc)

            def data_received(self, data: bytes) -> None:
                super().data_received(data)
                self._update()

            def on_response_complete(self) -> None:
                super().on_response_complete()
                self._update()

            def handle_websocket_upgrade(self, *event: Any) -> None:  # h11 passes the event
                self._disarm()
                self._upgraded = True  # the transport is the WebSocket protocol's now
                guard.adopt(self._guarded_transport)
                super().handle_websocket_upgrade(*event)

            def _update(self) -> None:
                if self._upgraded or self._guarded_transport.is_closing():
                    return
                if self.cycle is not None and not self.cycle.response_complete:
                    guard.busy(self._guarded_transport)  # being served
                    self._disarm()
                    return
                guard.idle(self._guarded_transport, self._evict)
                if self.timeout_keep_alive_task is not None:
                    self._disarm()  # a clean keep-alive wait: uvicorn's timer closes it
                elif self._deadline is None:
                    self._deadline = self.loop.call_later(guard.header_timeout, self._expire)

            def _disarm(self) -> None:
                if self._deadline is not None:
                    self._deadline.cancel()
                    self._deadline = None

            def _expire(self) -> None:
                self._deadline = None
                guard.timed_out += 1
                logger.debug(
                    "Closing a connection from %s: no complete request within %gs",
                    self.client,
                    guard.header_timeout,
                )
                self._evict()

            def _evict(self) -> None:
                self._disarm()
                self._guarded_transport.abort()

        return GuardedHTTPProtocol

    def websocket_protocol(self, base: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
        """``base`` (the agent endpoint's protocol) with its connections counted."""
        guard = self

        class GuardedWebSocketProtocol(base):  # type: ignore[valid-type, misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                quiet = QuietLibraryLog(self.protocol.logger, {})
                self.protocol.logger = self.logger = quiet

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                guard.adopt(transport)
                self._guarded_transport = transport
                super().connection_made(transport)

            def connection_lost(self, exc: Exception | None) -> None:
                guard.release(self._guarded_transport)
                super().connection_lost(exc)

        return GuardedWebSocketProtocol

    def listener(self, sock: socket.socket) -> socket.socket:
        """``sock`` as a listener that sheds connections when descriptors run out."""
        return SheddingListener(sock, self)


class SheddingListener(socket.socket):
    """A listening socket whose ``accept()`` never fails with EMFILE/ENFILE.

    asyncio (3.11) logs a traceback for every failed accept and, looping over its backlog,
    schedules a retry per failure: thousands of lines a second. Here the listener holds one
    spare descriptor; out of descriptors, it frees the spare, accepts and closes what waits,
    takes the spare back, and reports "nothing to accept" (BlockingIOError) to asyncio.
    """

    def __init__(self, sock: socket.socket, guard: ConnectionGuard) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self._guard = guard
        self._spare: int | None = self._take_spare()
        self._cooldown_until = 0.0

    @staticmethod
    def _take_spare() -> int | None:
        try:
            return os.open(os.devnull, os.O_RDONLY)
        except OSError:
            return None

    def accept(self) -> tuple[socket.socket, Any]:
        if time.monotonic() < self._cooldown_until:
            raise BlockingIOError(errno.EAGAIN, "pausing accept: out of file descriptors")
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            if not self._shed():
                # No spare either: let asyncio pause accepting (once, not once per backlog).
                self._cooldown_until = time.monotonic() + 1.0
                raise
            raise BlockingIOError(errno.EAGAIN, "connections shed") from None

    def _shed(self) -> bool:
        """Accept and close what waits, using the spare fd; False when there is no spare."""
        if self._spare is None:
            self._spare = self._take_spare()
            if self._spare is None:
                return False
        os.close(self._spare)
        self._spare = None
        shed = 0
        try:
            for _ in range(128):
                fd, _addr = self._accept()  # type: ignore[attr-defined]
                os.close(fd)
                shed += 1
        except OSError:
            pass  # nothing more waiting (or out of descriptors again)
        finally:
            self._spare = self._take_spare()
        # Linux reports EMFILE before looking at the queue, so shed may be 0: nothing waited.
        if shed:
            self._guard.shed += shed
            self._guard.report_limits()
        return True

    def close(self) -> None:
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
            self._guard.summary()  # once: the listener closes when the relay stops
        super().close()


def uvicorn_options(
    guard: ConnectionGuard, ws_protocol: type[asyncio.Protocol]
) -> MutableMapping[str, Any]:
    """The ``uvicorn.Config`` arguments that install ``guard`` (on the HTTP protocol every
    server of ours runs)."""
    from ..server import http_protocol

    return {"http": guard.http_protocol(http_protocol()),
            "ws": guard.websocket_protocol(ws_protocol)}
