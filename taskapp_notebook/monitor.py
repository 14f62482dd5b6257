"""Live health of an InProcessTaskApp: event-loop lag, ``GET /health``, tunnel state.

While the app runs, a ``HealthMonitor`` keeps two workers:

* a watchdog **thread** that posts a no-op onto the app's loop every ``ping`` seconds and
  times how long the loop takes to run it. A loop blocked by a synchronous cell cannot
  time itself; the thread can, and reports ``"kernel busy (N s)"`` while it waits
  (docs/kernel-facts.md #1: a server on the kernel loop is stalled, not down);
* a **task on the app's loop** that does a light ``GET /health`` with the app key every
  ``interval`` seconds. A check that fails while the loop was busy is not held against
  the app.

``status`` is, by priority: the app's own state when it is not running (``starting``,
``stopped``, ``failed``), then ``kernel busy``, then ``reconnecting`` / ``unhealthy`` from
the tunnel's status, then ``unhealthy`` after a failed check, else ``running``. The
monitor pauses when the app stops and resumes when it starts again; ``close()`` detaches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import InvalidParameterError
from .health import HealthResult, auth_headers, check_once
from .runner import AppState
from .tunnels.base import TunnelState

if TYPE_CHECKING:
    from .runner import InProcessTaskApp

logger = logging.getLogger(__name__)

#: Every value ``HealthMonitor.status`` takes.
STATUSES: tuple[str, ...] = (
    "starting", "running", "kernel busy", "unhealthy", "reconnecting", "stopped", "failed",
)
#: Loop lag (seconds) from which the loop counts as busy.
BUSY_AFTER = 0.5
_DEFAULT_INTERVAL = 2.0
_BUSY_REPORT_STEP = 0.5

Listener = Callable[["HealthMonitor"], None]

_monitors: weakref.WeakKeyDictionary[InProcessTaskApp, HealthMonitor] = (
    weakref.WeakKeyDictionary()
)
_monitors_lock = threading.Lock()


def monitor_for(app: InProcessTaskApp) -> HealthMonitor | None:
    """The open monitor attached to ``app``, if any."""
    with _monitors_lock:
        monitor = _monitors.get(app)
    return monitor if monitor is not None and not monitor.closed else None


@dataclass
class _Run:
    """The workers of one app run (one loop)."""

    loop: asyncio.AbstractEventLoop
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    future: concurrent.futures.Future[None] | None = None


class HealthMonitor:
    """Watches one app. Create with :meth:`attach`; read ``status``, ``lag_seconds``,
    ``last`` and ``failures`` (``notebook/presenter.py`` turns them into words)."""

    def __init__(self, app: InProcessTaskApp, interval: float = _DEFAULT_INTERVAL) -> None:
        self._app_ref = weakref.ref(app)
        self.interval = _validate_interval(interval)
        #: The last ``GET /health`` that counts (None before the first).
        self.last: HealthResult | None = None
        #: Consecutive failed checks.
        self.failures = 0
        #: Checks that reached the server (they appear in ``app.stats`` too).
        self.checks = 0
        #: The largest loop lag measured, in seconds.
        self.max_lag_seconds = 0.0
        #: Status changes, newest last: ``(time.time(), status, lag_seconds)``.
        self.history: deque[tuple[float, str, float]] = deque(maxlen=200)
        self.closed = False
        self._lock = threading.RLock()
        self._lag = 0.0
        self._ping_sent: float | None = None
        self._busy_epoch = 0
        self._run: _Run | None = None
        self._listeners: list[Listener] = []
        self._last_status: str | None = None
        app.add_listener(self._on_app_change)

    # ------------------------------------------------------------------ public

    @classmethod
    def attach(cls, app: InProcessTaskApp, interval: float | None = None) -> HealthMonitor:
        """The monitor of ``app``, created on first call (``interval`` defaults to 2 s).

        Idempotent: later calls return the same monitor (updating ``interval`` if given).
        """
        with _monitors_lock:
            monitor = _monitors.get(app)
            if monitor is None or monitor.closed:
                monitor = cls(app, _DEFAULT_INTERVAL if interval is None else interval)
                _monitors[app] = monitor
            elif interval is not None:
                monitor.interval = _validate_interval(interval)
        monitor.sync()
        return monitor

    @property
    def app(self) -> InProcessTaskApp | None:
        return self._app_ref()

    @property
    def busy(self) -> bool:
        """True while the app's loop has not run our ping for ``BUSY_AFTER`` seconds."""
        with self._lock:
            sent = self._ping_sent
        return sent is not None and time.monotonic() - sent >= BUSY_AFTER

    @property
    def lag_seconds(self) -> float:
        """Current loop lag: the pending ping's age while busy, else the last measured."""
        with self._lock:
            sent, lag = self._ping_sent, self._lag
        if sent is not None:
            pending = time.monotonic() - sent
            if pending >= BUSY_AFTER:
                return pending
        return lag

    @property
    def status(self) -> str:
        """One of :data:`STATUSES`."""
        app = self._app_ref()
        if app is None:
            return "stopped"
        state = app.state
        if state is AppState.STARTING:
            return "starting"
        if state is AppState.FAILED:
            return "failed"
        if state is not AppState.RUNNING:
            return "stopped"
        if self.busy:
            return "kernel busy"
        tunnel = app.tunnel
        tunnel_state = tunnel.status.state if tunnel is not None else None
        if tunnel_state in (TunnelState.RECONNECTING, TunnelState.CONNECTING):
            return "reconnecting"
        if tunnel_state is TunnelState.DOWN or self.failures:
            return "unhealthy"
        return "running"

    def add_listener(self, callback: Listener) -> None:
        """Call ``callback(self)`` on every tick and status change (from any thread)."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    def close(self) -> None:
        """Stop the workers and detach from the app. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._stop_run()
        app = self._app_ref()
        if app is not None:
            app.remove_listener(self._on_app_change)
            with _monitors_lock:
                if _monitors.get(app) is self:
                    del _monitors[app]
        self._changed()
        self._listeners.clear()

    def __repr__(self) -> str:
        app = self._app_ref()
        name = app.name if app is not None else "?"
        return f"<HealthMonitor app={name!r} status={self.status!r} interval={self.interval:g}>"

    # ------------------------------------------------------------------ workers

    def _on_app_change(self, app: InProcessTaskApp) -> None:
        self.sync()

    def sync(self) -> None:
        """Start or stop the workers to match the app's state, then notify listeners."""
        app = self._app_ref()
        with self._lock:
            if app is None or self.closed:
                self._stop_run()
            elif app.state is AppState.RUNNING:
                loop, current = app.loop, self._run
                if loop is not None and not loop.is_closed() and (
                    current is None or current.loop is not loop
                ):
                    self._stop_run()
                    self._start_run(app, loop)
            elif app.state is not AppState.STARTING:
                self._stop_run()
        self._changed()

    def _start_run(self, app: InProcessTaskApp, loop: asyncio.AbstractEventLoop) -> None:
        run = _Run(loop)
        with self._lock:
            self._run = run
            self.failures = 0
            self._ping_sent = None
            self._lag = 0.0
        run.thread = threading.Thread(
            target=self._watch, args=(run,), name=f"taskapp-monitor-{app.name}", daemon=True
        )
        run.thread.start()
        run.future = asyncio.run_coroutine_threadsafe(self._check_forever(run), loop)

    def _stop_run(self) -> None:
        with self._lock:
            run, self._run = self._run, None
            self._ping_sent = None
        if run is not None:
            run.stop.set()
            if run.future is not None:
                run.future.cancel()

    def _watch(self, run: _Run) -> None:
        """Watchdog thread: time no-op pings through the loop."""
        loop = run.loop
        ping_every = min(self.interval, 0.25)
        while not run.stop.is_set():
            answered = threading.Event()
            sent = time.monotonic()
            try:
                loop.call_soon_threadsafe(answered.set)
            except RuntimeError:  # loop closed
                break
            with self._lock:
                if self._run is run:
                    self._ping_sent = sent
            reported = 0.0
            while not answered.wait(0.1):
                if run.stop.is_set() or loop.is_closed():
                    return
                lag = time.monotonic() - sent
                if lag >= BUSY_AFTER and loop.is_running() and (
                    not reported or lag - reported >= _BUSY_REPORT_STEP
                ):
                    if not reported:
                        with self._lock:
                            self._busy_epoch += 1
                    reported = lag
                    self._changed()
            lag = time.monotonic() - sent
            with self._lock:
                if self._run is run:
                    self._ping_sent = None
                    self._lag = lag
                    self.max_lag_seconds = max(self.max_lag_seconds, lag)
            if reported:
                logger.debug("Loop of %r was busy for %.1f s", self._app_ref(), lag)
                self._changed()
            run.stop.wait(ping_every)

    async def _check_forever(self, run: _Run) -> None:
        """Task on the app's loop: ``GET /health`` every ``interval`` seconds."""
        import httpx

        async with httpx.AsyncClient(trust_env=False) as client:
            while not run.stop.is_set():
                app = self._app_ref()
                if app is None or not app.is_running:
                    return
                url, headers = app.local_url, auth_headers(app.api_key, internal=True)
                timeout = min(max(2.0, 2 * self.interval), 10.0)
                del app
                with self._lock:
                    epoch = self._busy_epoch
                result = await check_once(client, url, headers, timeout=timeout)
                if run.stop.is_set():
                    return
                self._record(result, busy=self.busy or epoch != self._busy_epoch)
                await asyncio.sleep(self.interval)

    def _record(self, result: HealthResult, *, busy: bool) -> None:
        with self._lock:
            if result.status is not None:
                self.checks += 1
            if not result.ok and busy:
                logger.debug("Ignoring a failed health check made while the loop was busy")
            else:
                self.last = result
                self.failures = 0 if result.ok else self.failures + 1
        app = self._app_ref()
        if app is not None and (result.ok or not busy):
            app.health = result
        self._changed()

    def _changed(self) -> None:
        status = self.status
        with self._lock:
            if status != self._last_status:
                self._last_status = status
                self.history.append((time.time(), status, self.lag_seconds))
        for listener in list(self._listeners):
            try:
                listener(self)
            except Exception:  # noqa: BLE001 - observers never break the monitor
                logger.debug("Monitor listener %r failed", listener, exc_info=True)


def _validate_interval(interval: float) -> float:
    if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
        raise InvalidParameterError(
            f"interval must be a positive number of seconds, got {interval!r}."
        )
    return float(interval)
