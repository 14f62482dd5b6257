"""RelayServer: the relay's lifecycle on one port, on the caller's loop or in a thread.

It runs on the same lifecycle as the task app: ``server.ServerHandle`` (uvicorn on a socket
we bound, event-driven start and stop, no signal capture) and, from sync code,
``loops.LoopThread``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections.abc import Iterable
from types import TracebackType
from typing import Self

from ..errors import mask_secret
from ..loops import LoopThread
from ..server import ServerHandle
from .app import RelayApp
from .config import RelayConfig
from .endpoint import AgentEndpoint
from .limits import ConnectionGuard, uvicorn_options
from .state import RelayState

logger = logging.getLogger(__name__)


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
        self._server: ServerHandle | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._thread: LoopThread | None = None

    # -- properties ---------------------------------------------------------------------

    @property
    def api_key(self) -> str:
        """The first API key (the generated one when none was given)."""
        return self.api_keys[0]

    @property
    def running(self) -> bool:
        return self._server is not None

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
        if self.running:
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
        server = ServerHandle(
            RelayApp(state),
            sock,
            stop_grace=self.config.stop_grace,
            timeout_keep_alive=self.config.keep_alive_timeout,
            **uvicorn_options(guard, endpoint.protocol_class),
            interface="asgi3",
            lifespan="off",
            proxy_headers=False,
            server_header=False,
            date_header=False,
            ws_max_size=self.config.max_message_bytes,
        )
        try:
            await server.start()
        except BaseException:
            await server.stop()
            state.close_store()
            self._port = None
            raise
        self._loop = asyncio.get_running_loop()
        self._state, self._endpoint, self._server = state, endpoint, server
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
        server, state, endpoint = self._server, self._state, self._endpoint
        if server is None or state is None or endpoint is None:
            return
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError(
                "stop() must run on the loop the relay started on; "
                "use stop_in_thread() for a relay started with start_in_thread()."
            )
        self._server = None
        endpoint.server.accepting = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.wait([self._sweeper])
        try:
            await state.aclose()
            await endpoint.aclose()
        finally:
            await server.stop()
            self._port = None
            self._state = self._endpoint = self._sweeper = None
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
        thread = self._thread = LoopThread("taskapp-relay")
        try:
            thread.submit(self.start()).result(timeout)
        except BaseException:
            self.stop_in_thread()
            raise
        return self

    def stop_in_thread(self, timeout: float = 15.0) -> None:
        """Stop a relay started with :meth:`start_in_thread` and join its thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            if not thread.loop.is_closed():
                thread.submit(self.stop()).result(timeout)
        finally:
            thread.close(timeout)

    def __enter__(self) -> Self:
        return self.start_in_thread()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_in_thread()
