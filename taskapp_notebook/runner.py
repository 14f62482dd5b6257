"""InProcessTaskApp: run a task app in this process and expose it through a tunnel.

Lifecycle (every step undone in reverse if a later one fails)::

    validate (constructor) → tunnel preflight → build the ASGI app → bind our socket
    → uvicorn task on the instance loop → GET /health → open tunnel → [verify] → running

The *instance loop* is the caller's running loop (``serve_on="loop"``) or a dedicated
daemon thread's loop (``serve_on="thread"``); all of an instance's async work runs there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from . import params, registry
from .errors import (
    InvalidParameterError,
    ModeNotAvailableError,
    ServerStartError,
    StartError,
    TunnelVerificationError,
    describe_error,
    mask_secret,
)
from .health import HealthResult, auth_headers, wait_healthy
from .loops import LoopThread, in_ipython_kernel, run_sync, running_loop
from .ports import DEFAULT_PORT, acquire_port, validate_host, validate_port
from .stats import ASGIApp, RequestStats
from .tunnels.base import Tunnel, TunnelContext, create_tunnel

if TYPE_CHECKING:

    from .contract import TaskAppConfig
    from .server import ServerHandle

logger = logging.getLogger(__name__)

ServeOn = Literal["auto", "loop", "thread"]
Callback = Callable[["InProcessTaskApp"], None]
_STOP_TIMEOUT = 30.0


class AppState(enum.StrEnum):
    """Where an InProcessTaskApp is in its lifecycle."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class InProcessTaskApp:
    """Run a task app in this process with automatic tunnelling.

    Use as ``async with InProcessTaskApp(...) as task_app:``, ``with ...:``, or
    ``start()`` / ``stop()``. Exactly one of ``app``, ``config``, ``config_factory`` or
    ``task_app_path`` must be given. See the README for every parameter.
    """

    def __init__(
        self,
        *,
        app: Any | None = None,
        config: TaskAppConfig | None = None,
        config_factory: Callable[[], TaskAppConfig] | None = None,
        task_app_path: Path | str | None = None,
        container_path: Path | str | None = None,
        port: int = DEFAULT_PORT,
        host: str = "127.0.0.1",
        tunnel_mode: str = "synthtunnel",
        tunnel_backend: Any | None = None,
        preconfigured_url: str | None = None,
        preconfigured_auth_header: str | None = None,
        preconfigured_auth_token: str | None = None,
        api_key: str | None = None,
        health_check_timeout: float = 30.0,
        stop_grace: float = params.DEFAULT_STOP_GRACE,
        auto_find_port: bool = True,
        skip_tunnel_verification: bool = True,
        force_new_tunnel: bool = False,
        on_start: Callback | None = None,
        on_stop: Callback | None = None,
        serve_on: ServeOn = "auto",
        name: str | None = None,
    ) -> None:
        task_app_path = params.path_alias(task_app_path, container_path)
        kind = params.check_one_input({
            "app": app, "config": config, "config_factory": config_factory,
            "task_app_path": task_app_path,
        })
        self.port: int = validate_port(port)
        self.host: str = validate_host(host)
        self.tunnel_mode: str = params.check_tunnel(tunnel_mode, tunnel_backend)
        params.check_preconfigured(self.tunnel_mode, preconfigured_url,
                                   preconfigured_auth_header, preconfigured_auth_token)
        timeout = params.check_timeout(health_check_timeout)
        grace = params.check_stop_grace(stop_grace)
        params.check_serve_on(serve_on)
        params.check_callbacks(on_start=on_start, on_stop=on_stop)
        task_path: Path | None = None
        if task_app_path is not None:
            from .loading import validate_task_app_path

            task_path = validate_task_app_path(task_app_path)

        self._app = app
        self._config = config
        self._config_factory = config_factory
        self.task_app_path = task_path
        self.requested_port = self.port
        #: True when the caller chose the port (anything but the default 8114): moving off a
        #: busy port is then a WARNING (the URL is not the one asked for), else only INFO.
        self.port_pinned = self.port != DEFAULT_PORT
        self.tunnel_backend = tunnel_backend
        self.preconfigured_url = preconfigured_url
        self.preconfigured_auth_header = preconfigured_auth_header
        self._preconfigured_auth_token = preconfigured_auth_token
        self.api_key, self.api_key_source = params.resolve_api_key(api_key)
        self.health_check_timeout = timeout
        #: Seconds a stop lets requests under way finish (the port is already free) before
        #: it cancels them; their callers get 503. A failed start cancels at once.
        self.stop_grace = grace
        self.auto_find_port = auto_find_port
        self.skip_tunnel_verification = skip_tunnel_verification
        self.force_new_tunnel = force_new_tunnel
        self.on_start = on_start
        self.on_stop = on_stop
        self.serve_on_requested: ServeOn = serve_on
        self.name = name or _default_name(kind, task_path)

        self.url: str | None = None
        self.task_app_worker_token: str | None = None
        self.serve_on: Literal["loop", "thread"] | None = None
        self.state = AppState.STOPPED
        self.error: str | None = None
        self.started_at: float | None = None
        self.health: HealthResult | None = None
        self.stats = RequestStats()
        #: Recent human-readable events (lifecycle, tunnel), newest last.
        self.events: deque[str] = deque(maxlen=200)
        #: The same events with their ``time.time()``, for merging with request records.
        self.timed_events: deque[tuple[float, str]] = deque(maxlen=200)
        self.tunnel: Tunnel | None = None
        #: Every worker token this instance has been given (masked in views and logs even
        #: after the lease that carried it is gone).
        self._worker_tokens: set[str] = set()
        self._server: ServerHandle | None = None
        self._asgi_app: ASGIApp | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: LoopThread | None = None
        self._listeners: list[Callable[[InProcessTaskApp], None]] = []
        self._stopped = threading.Event()
        self._stopped.set()
        self._stopping_thread: int | None = None
        self._stop_requested = False
        self._start_task: asyncio.Task[Any] | None = None

    # ------------------------------------------------------------------ public faces

    async def __aenter__(self) -> InProcessTaskApp:
        await self.astart()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    def __enter__(self) -> InProcessTaskApp:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def astart(self) -> InProcessTaskApp:
        """Start (from async code). Returns once healthy and the URL is known."""
        if self._begin_start():
            try:
                other = self._instance_on_our_port()
                if other is not None:
                    await other.astop()
                if self.serve_on == "thread":
                    thread = self._thread = LoopThread(f"taskapp-{self.name}")
                    try:
                        await asyncio.wrap_future(thread.submit(self._start_here()))
                    except BaseException:
                        await asyncio.to_thread(self._close_thread)
                        raise
                else:
                    await self._start_here()
            except BaseException:
                self._start_aborted()
                raise
            self._after_start()
        return self

    def start(self) -> InProcessTaskApp:
        """Start (from sync code, including a notebook cell). Returns once healthy."""
        if self._begin_start():
            try:
                other = self._instance_on_our_port()
                if other is not None:
                    other.stop()
                if self.serve_on == "thread":
                    thread = self._thread = LoopThread(f"taskapp-{self.name}")
                    future = thread.submit(self._start_here())
                    try:
                        future.result()
                    except BaseException:
                        future.cancel()
                        self._close_thread()
                        raise
                else:
                    loop = running_loop()
                    assert loop is not None  # _begin_start checked
                    run_sync(loop, self._start_here())
            except BaseException:
                self._start_aborted()
                raise
            self._after_start()
        return self

    async def astop(self) -> None:
        """Stop everything this instance started. Idempotent; a stop already in progress
        elsewhere is waited for. Cancelling the caller does not cut the stop short."""
        if not self._begin_stop():
            if self.state in (AppState.STOPPING, AppState.STARTING):
                # waiting in a worker thread blocks nothing
                await asyncio.to_thread(self._stopped.wait, _STOP_TIMEOUT)
            return
        loop = self._loop
        if self._thread is not None:
            await asyncio.shield(asyncio.ensure_future(asyncio.to_thread(self._stop_thread)))
        elif loop is None or loop is running_loop():
            await asyncio.shield(asyncio.ensure_future(self._stop_here()))
        elif loop.is_closed():
            await asyncio.to_thread(self._stop_hard)
        elif not loop.is_running():
            await asyncio.to_thread(run_sync, loop, self._stop_here())
        else:
            future = asyncio.run_coroutine_threadsafe(self._stop_here(), loop)
            await asyncio.shield(asyncio.wrap_future(future))

    def stop(self) -> None:
        """Stop everything this instance started (from sync code). Idempotent; a stop in
        progress on another thread is waited for. An interrupt while stopping lets the
        stop finish first."""
        if not self._begin_stop():
            if self.state in (AppState.STOPPING, AppState.STARTING) and not self._stopping_here():
                loop = self._loop
                if loop is None or loop is not running_loop():
                    self._stopped.wait(_STOP_TIMEOUT)
            return
        loop = self._loop
        if self._thread is not None:
            self._stop_thread()
        elif loop is None:
            self._after_stop()
        elif loop.is_closed():
            self._stop_hard()
        else:
            run_sync(loop, self._stop_here(), timeout=_STOP_TIMEOUT, finish_on_interrupt=True)

    def restart(self) -> InProcessTaskApp:
        """Stop (if running) and start again on the port it last had, with the same key."""
        self.stop()
        self._keep_port()
        return self.start()

    async def arestart(self) -> InProcessTaskApp:
        """:meth:`restart` from async code."""
        await self.astop()
        self._keep_port()
        return await self.astart()

    def _keep_port(self) -> None:
        if self.state in (AppState.STOPPED, AppState.FAILED):
            self.requested_port = self.port
            self.port_pinned = True  # the URL it had: moving off it is worth a warning
        #: True when the caller chose the port (anything but the default 8114): moving off a
        #: busy port is then a WARNING (the URL is not the one asked for), else only INFO.
        self.port_pinned = self.port != DEFAULT_PORT

    # ------------------------------------------------------------------ observation

    @property
    def is_running(self) -> bool:
        return self.state is AppState.RUNNING

    @property
    def local_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "localhost") else self.host
        return f"http://{host}:{self.port}"

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the server runs on (None before start)."""
        return self._loop

    @property
    def uptime(self) -> float | None:
        if self.started_at is None or not self.is_running:
            return None
        return time.time() - self.started_at

    def add_listener(self, callback: Callable[[InProcessTaskApp], None]) -> None:
        """Call ``callback(self)`` after every state change (from any thread)."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[InProcessTaskApp], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    @property
    def container_worker_token(self) -> str | None:
        """synth-ai 0.9's name for :attr:`task_app_worker_token`."""
        return self.task_app_worker_token

    def secrets(self) -> tuple[str, ...]:
        """Every secret this app holds or held (API key, preconfigured auth token, worker
        tokens), for :func:`~taskapp_notebook.errors.scrub_secrets`."""
        held = (self.api_key, self._preconfigured_auth_token, *sorted(self._worker_tokens))
        return tuple(secret for secret in held if secret)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able summary with secrets masked."""
        status = self.tunnel.status if self.tunnel is not None else None
        return {
            "name": self.name,
            "state": str(self.state),
            "url": self.url,
            "local_url": self.local_url,
            "port": self.port,
            "host": self.host,
            "tunnel_mode": self.tunnel_mode,
            "tunnel_state": str(status.state) if status else None,
            "tunnel_error": status.last_error if status else None,
            "serve_on": self.serve_on or self.serve_on_requested,
            "uptime": self.uptime,
            "health": self.health.describe() if self.health else None,
            "error": self.error,
            "api_key": mask_secret(self.api_key),
            "task_app_worker_token": mask_secret(self.task_app_worker_token)
            if self.task_app_worker_token
            else None,
            **self.stats.snapshot(),
        }

    def __repr__(self) -> str:
        return (
            f"InProcessTaskApp(name={self.name!r}, state={str(self.state)!r}, url={self.url!r}, "
            f"port={self.port}, tunnel_mode={self.tunnel_mode!r}, "
            f"api_key={mask_secret(self.api_key)!r})"
        )

    # ------------------------------------------------------------------ internals

    def _set_state(self, state: AppState, error: str | None = None) -> None:
        self.state = state
        if error is not None or state is AppState.STARTING:
            self.error = error
        self.record_event(f"state: {state}" + (f" ({error})" if error else ""))
        for listener in list(self._listeners):
            try:
                listener(self)
            except Exception:  # noqa: BLE001 - observers never break the app
                logger.debug("State listener %r failed", listener, exc_info=True)

    def record_event(self, line: str) -> None:
        """Add ``line``, time-stamped, to :attr:`events` (the widget's log, ``%taskapp logs``)."""
        now = time.time()
        text = time.strftime("%H:%M:%S ", time.localtime(now)) + line
        self.events.append(text)
        self.timed_events.append((now, text))

    def _begin_start(self) -> bool:
        if self.state in (AppState.RUNNING, AppState.STARTING):
            return False
        if self.state is AppState.STOPPING:
            raise StartError(f"{self!r} is still stopping; wait for stop() to return.")
        loop = running_loop()
        if self.serve_on_requested == "thread":
            self.serve_on = "thread"
        elif self.serve_on_requested == "loop":
            if loop is None:
                raise InvalidParameterError(
                    "serve_on='loop' needs a running event loop (a notebook cell or async "
                    "code). Use serve_on='thread', or start it with 'async with'."
                )
            self.serve_on = "loop"
        else:
            self.serve_on = "loop" if loop is not None and in_ipython_kernel() else "thread"
        self.port = self.requested_port
        # Registered from the start, so stop_all / kernel shutdown / signals see an app even
        # while it is starting (or if an interrupt leaves its start running).
        self._stop_requested = False
        self._stopped.clear()
        registry.register(self)
        return True

    def _instance_on_our_port(self) -> InProcessTaskApp | None:
        """With auto_find_port=False, another running app of this process on our port is
        stopped (here, in the caller's context, where both loops can make progress)."""
        if self.auto_find_port:
            return None
        other: InProcessTaskApp | None = registry.find_by_port(self.requested_port)
        if other is None or other is self:
            return None
        logger.warning("Port %d is held by %r in this process; stopping it (auto_find_port="
                       "False)", self.requested_port, other)
        return other

    async def _start_here(self) -> None:
        """Start on the instance loop; undo everything on any failure."""
        self._loop = asyncio.get_running_loop()
        self._start_task = asyncio.current_task()
        self._set_state(AppState.STARTING)
        logger.info("Starting task app %r (tunnel_mode=%s, serve_on=%s)", self.name,
                    self.tunnel_mode, self.serve_on)
        try:
            tunnel = self.tunnel = self._make_tunnel()
            tunnel.preflight(self._tunnel_context())
            from .loading import build_asgi_app

            built = build_asgi_app(
                app=self._app, config=self._config, config_factory=self._config_factory,
                task_app_path=self.task_app_path, api_key=self.api_key,
                api_key_source=self.api_key_source, name=self.name,
            )
            asgi_app: ASGIApp = built.app
            self.api_key, self.api_key_source = built.api_key, built.api_key_source
            self._asgi_app = asgi_app
            sock = await acquire_port(self.host, self.requested_port,
                                      auto_find_port=self.auto_find_port,
                                      pinned=self.port_pinned)
            self.port = sock.getsockname()[1]
            from .server import ServerHandle
            from .stats import InstrumentedApp

            self._server = ServerHandle(InstrumentedApp(asgi_app, self.stats), sock,
                                        stop_grace=self.stop_grace)
            try:
                await asyncio.wait_for(self._server.start(), self.health_check_timeout)
            except TimeoutError:
                raise ServerStartError(
                    f"The task app's lifespan startup did not finish within "
                    f"{self.health_check_timeout:g} s. Check its startup hooks, or raise "
                    "health_check_timeout."
                ) from None
            logger.debug("Server listening on %s", self.local_url)
            self.health = await wait_healthy(
                self.local_url,
                auth_headers(self.api_key, internal=True),
                timeout=self.health_check_timeout,
            )
            logger.debug("Health check passed in %.1f ms", self.health.seconds * 1000)
            self.url = await tunnel.open(self._tunnel_context())
            self._set_worker_token(tunnel.worker_token)
            if not self.skip_tunnel_verification and tunnel.mode != "local":
                await self._verify_tunnel(tunnel)
            if self._stop_requested:  # a stop arrived as the start finished
                raise asyncio.CancelledError
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                # Never in service: requests under way (our hung health check) end at once.
                await asyncio.shield(self._teardown(grace=0.0))
            self.url = self.task_app_worker_token = None
            registry.unregister(self)
            self._start_task = None
            stopped = self._stop_requested and isinstance(exc, asyncio.CancelledError)
            why = "stopped while starting" if stopped else describe_error(exc)
            for detail in [] if stopped else str(exc).strip().splitlines()[1:]:
                self.record_event(detail)  # e.g. a tunnel's last log lines
            self._set_state(AppState.FAILED, error=why)
            self._stopped.set()
            logger.info("Task app %r failed to start: %s", self.name, why)
            if stopped:
                raise StartError(f"Task app {self.name!r} was stopped while starting.") from None
            raise
        self._start_task = None
        self.started_at = time.time()
        self._set_state(AppState.RUNNING)
        logger.info("Task app %r running at %s (local %s)", self.name, self.url, self.local_url)

    def _after_start(self) -> None:
        if self.on_start is not None:
            _call_back(self.on_start, self, "on_start")

    def _begin_stop(self) -> bool:
        if self.state is AppState.STARTING:
            self._cancel_start()
            return False
        if self.state in (AppState.STOPPED, AppState.STOPPING):
            return False
        if self.state is AppState.FAILED and self._server is None and self._thread is None:
            return False
        if self.on_stop is not None and self.state is AppState.RUNNING:
            _call_back(self.on_stop, self, "on_stop")
        self._stopped.clear()
        self._stopping_thread = threading.get_ident()
        self._set_state(AppState.STOPPING)
        logger.info("Stopping task app %r", self.name)
        return True

    def _cancel_start(self) -> None:
        """A stop while starting: cancel the start; its own rollback undoes everything."""
        self._stop_requested = True
        task, loop = self._start_task, self._loop
        if task is not None and loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)

    def _start_aborted(self) -> None:
        """The start ended early (failed, cancelled, interrupted): no registry entry left."""
        if self.state not in (AppState.STARTING, AppState.RUNNING):
            registry.unregister(self)
            self._stopped.set()

    def _stopping_here(self) -> bool:
        """True when this very thread is the one stopping (a signal handler nested in it)."""
        return self._stopping_thread == threading.get_ident()

    async def _stop_here(self) -> None:
        """Teardown on the instance loop, then mark stopped (even if cut short)."""
        try:
            await self._teardown()
        finally:
            self._after_stop()

    def _stop_thread(self) -> None:
        """Thread mode: teardown on the server thread, then close it. Blocking; an interrupt
        while waiting lets the teardown finish first, then propagates."""
        thread, server = self._thread, self._server
        assert thread is not None
        future = thread.submit(self._teardown())
        try:
            future.result(_STOP_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - includes the timeout
            logger.warning("Error while stopping %r: %s", self, describe_error(exc))
            if server is not None:
                server.request_exit()  # at least free the port before the thread closes
        except BaseException:
            with contextlib.suppress(BaseException):
                future.result(_STOP_TIMEOUT)
            raise
        finally:
            self._close_thread()
            self._after_stop()

    def _after_stop(self) -> None:
        registry.unregister(self)
        self.url = None
        self.task_app_worker_token = None
        self.started_at = None
        self._stopping_thread = None
        self._set_state(AppState.STOPPED)
        self._stopped.set()
        logger.info("Task app %r stopped", self.name)

    async def _teardown(self, grace: float | None = None) -> None:
        """Close tunnel, then server (listener first; requests under way get ``grace``, by
        default :attr:`stop_grace`). Every step runs even if an interrupt or cancellation
        lands in one; that is re-raised at the end. Idempotent."""
        tunnel, server = self.tunnel, self._server
        self._server = None
        interrupted: BaseException | None = None
        if tunnel is not None:
            try:
                await tunnel.close()
            except Exception:  # noqa: BLE001
                logger.warning("Error while closing the %s tunnel", tunnel.mode, exc_info=True)
            except BaseException as exc:  # noqa: BLE001 - finish the teardown first
                interrupted = exc
        stopped = server is None
        if server is not None:
            for _ in range(2):  # once more if an interrupt cut the first attempt short
                try:
                    await server.stop(grace)
                    stopped = True
                    break
                except Exception:  # noqa: BLE001
                    logger.warning("Error while stopping the server", exc_info=True)
                    break
                except BaseException as exc:  # noqa: BLE001
                    interrupted = interrupted or exc
        if server is not None and server.cancelled_requests:
            self.record_event(f"stop: cancelled {server.cancelled_requests} request(s) still "
                              f"running after the {server.stop_grace:g} s grace (answered 503)")
        app, self._asgi_app = self._asgi_app, None
        if app is not None and stopped:
            from .loading import release_asgi_app

            release_asgi_app(app)  # the next start with the same config may reuse it
        if interrupted is not None:
            raise interrupted

    def _stop_hard(self) -> None:
        """The loop is gone (e.g. at exit after asyncio.run): free the port, and close the
        tunnel on a fresh loop so a lease is deleted and a subprocess reaped."""
        server, self._server = self._server, None
        if server is not None:
            server.close_listener()
        tunnel = self.tunnel
        if tunnel is not None:

            def close_tunnel() -> None:
                try:
                    asyncio.run(tunnel.close())
                except Exception:  # noqa: BLE001
                    logger.warning("Error while closing the %s tunnel", tunnel.mode,
                                   exc_info=True)

            if running_loop() is None:
                close_tunnel()
            else:
                helper = threading.Thread(target=close_tunnel, name="taskapp-close-tunnel")
                helper.start()
                helper.join(_STOP_TIMEOUT)
        self._after_stop()

    def stop_from_signal(self) -> concurrent.futures.Future[None] | None:
        """Stop from a signal handler on the main thread (the registry's SIGTERM / SIGINT).

        Returns the rest of the stop when it was scheduled on the running loop (loop mode),
        None when the app is already stopped or stopping.
        """
        if self.state is AppState.STOPPING:
            return None  # a second Ctrl-C / SIGTERM while stopping: let that stop finish
        if self._thread is not None or self._loop is None or not self._loop.is_running():
            self.stop()
            return None
        # Loop mode, and the signal interrupted that very loop: free the port now and let
        # the loop finish the rest (``async with`` / asyncio.run's cleanup await it too).
        server = self._server
        if server is not None:
            server.close_listener()
            server.request_exit()
        return asyncio.run_coroutine_threadsafe(self.astop(), self._loop)

    def _close_thread(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.close()

    def _make_tunnel(self) -> Tunnel:
        try:
            return create_tunnel(self.tunnel_mode)
        except ImportError as exc:
            raise ModeNotAvailableError(
                f"tunnel_mode={self.tunnel_mode!r} is not available in this build ({exc}). "
                "Use tunnel_mode='local' or 'preconfigured'."
            ) from exc

    def _tunnel_context(self) -> TunnelContext:
        return TunnelContext(
            local_host=self.host,
            local_port=self.port,
            api_key=self.api_key,
            force_new_tunnel=self.force_new_tunnel,
            preconfigured_url=self.preconfigured_url,
            preconfigured_auth_header=self.preconfigured_auth_header,
            preconfigured_auth_token=self._preconfigured_auth_token,
            on_event=self._on_tunnel_event,
        )

    def _on_tunnel_event(self, line: str) -> None:
        self.record_event(f"tunnel: {line}")
        tunnel = self.tunnel
        if tunnel is not None and self.is_running:
            if tunnel.url and tunnel.url != self.url:
                logger.info("Tunnel URL of %r changed to %s", self.name, tunnel.url)
                self.url = tunnel.url
            self._set_worker_token(tunnel.worker_token)
        for listener in list(self._listeners):
            with contextlib.suppress(Exception):
                listener(self)


    def _set_worker_token(self, token: str | None) -> None:
        self.task_app_worker_token = token
        if token:
            self._worker_tokens.add(token)

    async def _verify_tunnel(self, tunnel: Tunnel) -> None:
        assert self.url is not None
        try:
            await wait_healthy(
                self.url,
                tunnel.verification_headers(),
                timeout=min(self.health_check_timeout, 60.0),
                what=f"{tunnel.mode} tunnel",
                local=False,
            )
        except StartError as exc:
            raise TunnelVerificationError(
                f"The tunnel opened but does not reach the app: {exc} "
                "Pass skip_tunnel_verification=True to start without this check."
            ) from exc


#: synth-ai 0.9's name: ``from taskapp_notebook import InProcessContainer`` runs 0.9 code.
InProcessContainer = InProcessTaskApp


def _default_name(kind: str, path: Path | None) -> str:
    return path.stem if path is not None else f"{kind}-{secrets.token_hex(2)}"


def _call_back(callback: Callback, app: InProcessTaskApp, label: str) -> None:
    try:
        callback(app)
    except Exception:  # noqa: BLE001 - callbacks never break the lifecycle
        logger.warning("%s callback %r raised; ignoring", label, callback, exc_info=True)
