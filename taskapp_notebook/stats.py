"""Per-instance request statistics, collected by a thin ASGI wrapper around the app."""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Our own health checks carry this header with this process's random value, and are not
#: counted in the stats (a caller cannot hide requests without knowing the value).
INTERNAL_HEADER = "x-taskapp-internal"
INTERNAL_VALUE = secrets.token_hex(16)
_INTERNAL = (INTERNAL_HEADER.encode(), INTERNAL_VALUE.encode())


@dataclass(frozen=True)
class RequestRecord:
    """One finished HTTP request."""

    at: float
    method: str
    path: str
    status: int
    seconds: float

    def line(self) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.at))
        return f"{stamp} {self.method} {self.path} {self.status} {self.seconds * 1000:.1f} ms"


class RequestStats:
    """Counts, errors and latency of the requests an app served. Thread-safe."""

    def __init__(self, recent: int = 200) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.errors = 0
        self.total_seconds = 0.0
        self.last_seconds: float | None = None
        self.recent: deque[RequestRecord] = deque(maxlen=recent)
        self._in_flight: dict[str, int] = {}

    def started(self, path: str) -> None:
        """A request to ``path`` is being served (until :meth:`record`)."""
        with self._lock:
            self._in_flight[path] = self._in_flight.get(path, 0) + 1

    def in_flight(self, path: str | None = None) -> int:
        """Requests being served now (to ``path``, or all)."""
        with self._lock:
            if path is None:
                return sum(self._in_flight.values())
            return self._in_flight.get(path, 0)

    def record(self, method: str, path: str, status: int, seconds: float) -> None:
        with self._lock:
            if self._in_flight.get(path, 0) > 0:
                self._in_flight[path] -= 1
            self.count += 1
            if status >= 500:
                self.errors += 1
            self.total_seconds += seconds
            self.last_seconds = seconds
            self.recent.append(RequestRecord(time.time(), method, path, status, seconds))

    @property
    def mean_seconds(self) -> float | None:
        with self._lock:
            return self.total_seconds / self.count if self.count else None

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able summary."""
        mean = self.mean_seconds
        return {
            "requests": self.count,
            "errors": self.errors,
            "mean_ms": None if mean is None else round(mean * 1000, 2),
            "last_ms": None if self.last_seconds is None else round(self.last_seconds * 1000, 2),
        }


class InstrumentedApp:
    """ASGI wrapper: records HTTP request stats and lifespan startup failures."""

    def __init__(self, app: ASGIApp, stats: RequestStats) -> None:
        self.app = app
        self.stats = stats
        #: The message of a failed lifespan startup, for a clear start error.
        self.lifespan_error: str | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] != "http" or _is_internal(scope):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.stats.started(scope.get("path", "?"))
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.stats.record(
                scope.get("method", "?"),
                scope.get("path", "?"),
                status,
                time.perf_counter() - started,
            )

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_wrapper(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                self.lifespan_error = _last_line(str(message.get("message", "")))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException as exc:
            if self.lifespan_error is None:
                self.lifespan_error = f"{type(exc).__name__}: {exc}"
            raise


def _is_internal(scope: Scope) -> bool:
    return any(
        name == _INTERNAL[0] and hmac.compare_digest(value, _INTERNAL[1])
        for name, value in scope.get("headers", ())
    )


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else text
