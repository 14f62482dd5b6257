"""RelayServer: the relay's lifecycle on one port, on the caller's loop or in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import threading
from collections.abc import Generator, Iterable
from types import TracebackType
from typing import Self

import uvicorn

from ..errors import mask_secret
from .app import RelayApp
from .config import RelayConfig
from .endpoint import AgentEndpoint
from .limits import ConnectionGuard, uvicorn_options
from .state import RelayState

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the relay's owner decides what signals do
    (a notebook kernel keeps its interrupt handler; the CLI installs its own)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _url_host(host: str) -> str:
    """A host a client can connect to, formatted for a URL."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class RelayServer:
    """A SynthTunnel-compatible relay: lease API, agent WebSocket and public route, all on
    ``host:port``. Run it with ``async with`` / ``start()`` + ``stop()`` on a running loop,
    or with ``with`` / ``start_in_thread()`` + ``stop_in_thread()`` from sync code.

    ``api_keys`` are the keys that may create leases (one is generated when None; read it
    from :attr:`api_key`). ``public_url`` is the base URL advertised in leases (default:
    the local URL). Port 0 picks a free port; read :attr:`port` after starting.
    """

    def __init__(
        self,
        api_keys: Iterable[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        public_url: str | None = None,
        config: RelayConfig | None = None,
    ) -> None:
        if isinstance(api_keys, str):
            api_keys = [api_keys]
        keys = [secrets.token_urlsafe(32)] if api_keys is None else [k for k in api_keys if k]
        if not keys:
            raise ValueError(
                "RelayServer needs at least one non-empty API key (or None to generate one)."
            )
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in 0..65535, got {port!r}.")
        if public_url is not None and not public_url.startswith(("http://", "https://")):
            raise ValueError(f"public_url must start with http:// or https://, got {public_url!r}.")
        self.api_keys: tuple[str, ...] = tuple(keys)
        self.host = host
        self.config = config or RelayConfig()
        self._requested_port = port
        self._public_url = public_url.rstrip("/") if public_url else None
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state: RelayState | None = None
        self._endpoint: AgentEndpoint | None = None
        self._server: _Server | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._thread_stop: asyncio.Event | None = None

    # -- properties ---------------------------------------------------------------------

    @property
    def api_key(self) -> str:
        """The first API key (the generated one when none was given)."""
        return self.api_keys[0]

    @property
    def running(self) -> bool:
        return self._serve_task is not None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("The relay is not running; start it first.")
        return self._port

    @property
    def local_url(self) -> str:
        """``http://host:port`` as a local client reaches it."""
        return f"http://{_url_host(self.host)}:{self.port}"

    @property
    def url(self) -> str:
        """The advertised base URL: point ``SYNTH_BACKEND_URL`` here."""
        return self._public_url or self.local_url

    # -- async lifecycle ----------------------------------------------------------------

    def _bind(self) -> socket.socket:
        infos = socket.getaddrinfo(
            self.host or None,
            self._requested_port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno,
                f"Cannot listen on {self.host}:{self._requested_port}: {exc.strerror}. "
                "Pick another port or stop what holds it.",
            ) from exc
        return sock

    async def start(self) -> None:
        """Bind, start serving, and return once requests are accepted."""
        if self.running or self._thread not in (None, threading.current_thread()):
            raise RuntimeError("This RelayServer is already running.")
        sock = self._bind()
        self._port = sock.getsockname()[1]
        if self._public_url is None and self.host in ("", "0.0.0.0", "::"):
            logger.warning(
                "Relay listens on all interfaces but advertises %s; pass "
                "public_url (--public-url) so remote agents and callers reach it",
                self.local_url,
            )
        try:
            state = RelayState(self.config, self.api_keys, self.url)
        except BaseException:
            sock.close()
            self._port = None
            raise
        endpoint = AgentEndpoint(state)
        # Connection limits (see limits.py): header deadline, connection cap, fd shedding.
        guard = ConnectionGuard.from_config(self.config)
        sock = guard.listener(sock)
        server = _Server(
            uvicorn.Config(
                RelayApp(state),
                **uvicorn_options(guard, endpoint.protocol_class),
                interface="asgi3",
                lifespan="off",
                log_config=None,
                access_log=False,
                proxy_headers=False,
                server_header=False,
                date_header=False,
                timeout_graceful_shutdown=5,
                ws_max_size=self.config.max_message_bytes,
            )
        )
        task = asyncio.create_task(server.serve(sockets=[sock]), name="taskapp-relay")
        try:
            while not server.started:
                if task.done():
                    raise RuntimeError(f"The relay failed to start on {self.local_url}.") from (
                        task.exception()
                    )
                await asyncio.sleep(0.01)
        except BaseException:
            server.should_exit = True
            await asyncio.wait([task], timeout=5)
            sock.close()
            state.close_store()
            self._port = None
            raise
        self._loop = asyncio.get_running_loop()
        self._state, self._endpoint, self._server, self._serve_task = state, endpoint, server, task
        self._sweeper = asyncio.create_task(state.sweep_forever(), name="taskapp-relay-sweeper")
        logger.info(
            "SynthTunnel relay on %s (advertised %s, %d API key(s): %s)",
            self.local_url,
            self.url,
            len(self.api_keys),
            ", ".join(mask_secret(k) for k in self.api_keys),
        )

    async def stop(self) -> None:
        """Close agent sockets (1001), fail what is in flight, stop serving. Idempotent."""
        task, server, state, endpoint = self._serve_task, self._server, self._state, self._endpoint
        if task is None or server is None or state is None or endpoint is None:
            return
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError(
                "stop() must run on the loop the relay started on; "
                "use stop_in_thread() for a relay started with start_in_thread()."
            )
        self._serve_task = None
        endpoint.server.accepting = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.wait([self._sweeper])
        try:
            await state.aclose()
            await endpoint.aclose()
        finally:
            server.should_exit = True
            _, pending = await asyncio.wait([task], timeout=10)
            if pending:
                server.force_exit = True
                await asyncio.wait([task], timeout=5)
            self._port = None
            self._state = self._endpoint = self._server = self._sweeper = None
            logger.info("SynthTunnel relay stopped")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- thread lifecycle ---------------------------------------------------------------

    def start_in_thread(self, timeout: float = 10.0) -> Self:
        """Run the relay on its own loop in a daemon thread; return once it serves."""
        if self.running or self._thread is not None:
            raise RuntimeError("This RelayServer is already running.")
        ready = threading.Event()
        errors: list[BaseException] = []
        thread = threading.Thread(
            target=asyncio.run,
            args=(self._thread_main(ready, errors),),
            name="taskapp-relay",
            daemon=True,
        )
        self._thread = thread
        thread.start()
        if not ready.wait(timeout):
            self.stop_in_thread()
            raise RuntimeError(f"The relay thread did not start within {timeout}s.")
        if errors:
            thread.join(timeout)
            self._thread = None
            raise errors[0]
        return self

    async def _thread_main(self, ready: threading.Event, errors: list[BaseException]) -> None:
        try:
            await self.start()
        except BaseException as exc:
            errors.append(exc)
            ready.set()
            return
        self._thread_stop = asyncio.Event()
        ready.set()
        try:
            await self._thread_stop.wait()
        finally:
            await self.stop()

    def stop_in_thread(self, timeout: float = 15.0) -> None:
        """Stop a relay started with :meth:`start_in_thread` and join its thread."""
        thread, loop, event = self._thread, self._loop, self._thread_stop
        if thread is None:
            return
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(event.set)
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("The relay thread did not stop within %.0fs", timeout)
        self._thread = None
        self._thread_stop = None

    def __enter__(self) -> Self:
        return self.start_in_thread()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_in_thread()
