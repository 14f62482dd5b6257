"""SynthTunnel's agent: one lease's WebSocket to the relay, forwarding requests to the app.

``LeaseAgent.connect()`` opens the WebSocket and ATTACHes; ``start()`` runs the receive loop
as a task that reconnects (0.25, 0.5, 1, 2, 4, then every 5 s) until ``close()``. Each
request is a task (``forward``); ``max_inflight`` and CANCEL are enforced here,
and so are the bounds on buffered request bodies: a REQ_BODY that does not fit makes the
receive loop wait for the app at most ``body_stall_timeout``, then the request with the
most buffered bytes fails with ``REQUEST_BODY_OVERFLOW`` (why: ``forward``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Callable

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from ...errors import TunnelError
from ..base import TunnelState
from .attach import LeaseRejectedError, backoff, open_attached
from .batching import send_frames
from .codec import encode, parse_relay_frame
from .forward import (
    AGENT_BUFFER_BYTES,
    BODY_STALL_TIMEOUT,
    REQUEST_BUFFER_BYTES,
    BodyBudget,
    ForwardedRequest,
    check_body_bounds,
)
from .lease_client import Lease
from .local_http import LocalHTTP
from .protocol import (
    AGENT_OVERLOADED,
    BAD_REQUEST_FRAME,
    REQUEST_BODY_OVERFLOW,
    Cancel,
    FrameError,
    ReqBody,
    ReqEnd,
    ReqHeaders,
    RespError,
)

logger = logging.getLogger(__name__)

#: Report DOWN after this long without a working connection.
DOWN_AFTER = 30.0


class LeaseAgent:
    """Serves one lease over one WebSocket, reconnecting until closed."""

    def __init__(
        self,
        lease: Lease,
        *,
        agent_id: str,
        local_host: str,
        local_port: int,
        api_key: str,
        http: LocalHTTP,
        max_inflight: int,
        ping_interval: float,
        ping_timeout: float,
        open_timeout: float,
        use_proxy: bool,
        on_state: Callable[[LeaseAgent, TunnelState, str | None], None],
        on_event: Callable[[str], None],
        on_lease_gone: Callable[[LeaseAgent], None],
        request_buffer_bytes: int = REQUEST_BUFFER_BYTES,
        agent_buffer_bytes: int = AGENT_BUFFER_BYTES,
        body_stall_timeout: float = BODY_STALL_TIMEOUT,
    ) -> None:
        check_body_bounds(request_buffer_bytes, agent_buffer_bytes, body_stall_timeout)
        self.lease = lease
        self.agent_id = agent_id
        self.local_host = local_host
        self.local_port = local_port
        self.api_key = api_key
        self.http = http
        self.max_inflight = max_inflight
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.open_timeout = open_timeout
        self.use_proxy = use_proxy
        self.on_state = on_state
        self.on_event = on_event
        self.on_lease_gone = on_lease_gone
        self.request_buffer_bytes = request_buffer_bytes
        #: Request-body bytes buffered across this agent's requests (``used``, ``peak``).
        self.body_budget = BodyBudget(agent_buffer_bytes)
        # Waiting longer would let our own pings (and the relay's) time out meanwhile.
        self.body_stall_timeout = (
            min(body_stall_timeout, ping_timeout / 2) if ping_timeout else body_stall_timeout
        )
        #: How often the receive loop waited for an app to take body bytes, and how many
        #: requests it failed with REQUEST_BODY_OVERFLOW.
        self.body_stalls = 0
        self.body_overflows = 0
        #: Seconds each reconnect took, from the drop to the new ATTACH_ACK.
        self.reconnect_durations: list[float] = []
        self.inflight: dict[str, ForwardedRequest] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._ws: ClientConnection | None = None
        #: Binary body frames agreed on the current connection.
        self.binary = False
        self._run_task: asyncio.Task[None] | None = None
        self._closing = False
        self._draining = False

    def __repr__(self) -> str:
        return f"LeaseAgent({self.lease!r}, inflight={len(self.inflight)})"

    def _secrets(self) -> tuple[str | None, ...]:
        return (self.lease.agent_token, self.lease.worker_token, self.api_key)

    # -- connection -------------------------------------------------------------------

    async def connect(self) -> ClientConnection:
        """Open the WebSocket, send ATTACH, wait for ATTACH_ACK. TunnelError on failure."""
        ws, self.binary = await open_attached(
            self.lease,
            agent_id=self.agent_id,
            local_host=self.local_host,
            local_port=self.local_port,
            max_inflight=self.max_inflight,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            open_timeout=self.open_timeout,
            use_proxy=self.use_proxy,
            secrets=self._secrets(),
        )
        logger.info("SynthTunnel agent attached lease %s", self.lease.lease_id)
        return ws

    def start(self, ws: ClientConnection) -> None:
        """Serve ``ws`` (from :meth:`connect`) in a background task on the running loop."""
        self._run_task = asyncio.get_running_loop().create_task(
            self._run(ws), name=f"synthtunnel-agent-{self.lease.lease_id}"
        )

    async def _run(self, ws: ClientConnection | None) -> None:
        while ws is not None:
            self._ws = ws
            try:
                await self._serve(ws)
                reason = f"closed by the relay (code {ws.close_code}, {ws.close_reason!r})"
            except ConnectionClosed as exc:
                reason = f"dropped ({exc})"
            except Exception as exc:  # noqa: BLE001 - keep serving whatever happened
                logger.exception("SynthTunnel receive loop failed")
                reason = f"receive loop error {exc!r}"
                await ws.close()
            finally:
                self._abort_inflight()
            if self._closing or self._draining:
                return
            ws = await self._reconnect(reason)

    async def _reconnect(self, reason: str) -> ClientConnection | None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.on_event(f"SynthTunnel connection {reason}; reconnecting")
        self.on_state(self, TunnelState.RECONNECTING, f"connection {reason}")
        reported_down = False
        for attempt, delay in enumerate(backoff(), start=1):
            await asyncio.sleep(delay)
            if self._closing or self._draining:
                return None
            try:
                ws = await self.connect()
            except TunnelError as exc:
                level = logging.INFO if attempt <= 5 or attempt % 12 == 0 else logging.DEBUG
                logger.log(level, "SynthTunnel reconnect attempt %d failed: %s", attempt, exc)
                down = loop.time() - started >= DOWN_AFTER
                self.on_state(
                    self, TunnelState.DOWN if down else TunnelState.RECONNECTING, str(exc)
                )
                if down and not reported_down:
                    reported_down = True
                    self.on_event(
                        f"SynthTunnel down for {loop.time() - started:.0f}s ({exc}); "
                        "still retrying every 5s"
                    )
                if isinstance(exc, LeaseRejectedError):
                    self.on_lease_gone(self)
                continue
            took = loop.time() - started
            self.reconnect_durations.append(took)
            self.on_event(f"SynthTunnel reconnected after {took:.2f}s (attempt {attempt})")
            self.on_state(self, TunnelState.CONNECTED, None)
            return ws
        return None  # pragma: no cover - backoff() never ends

    async def drain(self, timeout: float) -> None:
        """Stop reconnecting; wait (at most ``timeout``) for in-flight requests to finish."""
        self._draining = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()

    async def close(self) -> None:
        """Abort requests, stop the receive loop, close the WebSocket. Never raises."""
        self._closing = True
        tasks = [req.task for req in self.inflight.values() if req.task is not None]
        self._abort_inflight()
        if self._run_task is not None:
            self._run_task.cancel()
            tasks.append(self._run_task)
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        await asyncio.gather(*tasks, return_exceptions=True)

    def abandon(self) -> None:
        """The loop this agent ran on is closed (``asyncio.run`` returned without a stop):
        release the WebSocket's socket without that loop, which can no longer do it."""
        transport = getattr(self._ws, "transport", None)
        sock = getattr(transport, "_sock", None)  # asyncio's selector transport internals
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.close()
            transport._sock = None  # type: ignore[union-attr]  # no "unclosed" warning later

    # -- frames -----------------------------------------------------------------------

    async def _send(self, ws: ClientConnection, message: str | bytes) -> None:
        await ws.send(message)

    async def _serve(self, ws: ClientConnection) -> None:
        async for message in ws:
            try:
                frame = parse_relay_frame(message, binary=self.binary)
            except FrameError as exc:
                if exc.rid is None:
                    logger.debug("SynthTunnel: skipping message (%s)", exc)
                else:
                    await self._bad_frame(ws, exc)
                continue
            if isinstance(frame, ReqHeaders):
                await self._on_headers(ws, frame)
            elif isinstance(frame, ReqBody | ReqEnd | Cancel):
                await self._on_request_frame(ws, frame)
            else:
                logger.debug("SynthTunnel: skipping %s frame", type(frame).__name__)

    async def _bad_frame(self, ws: ClientConnection, exc: FrameError) -> None:
        """Answer a broken request frame with BAD_REQUEST_FRAME and forget its request."""
        assert exc.rid is not None
        request = self.inflight.get(exc.rid)
        if request is not None:
            self._finish(request)
            lease_id = request.lease_id
        elif exc.lease_id is not None and exc.rid not in self.inflight:
            lease_id = exc.lease_id  # a broken REQ_HEADERS
        else:
            logger.debug("SynthTunnel: dropping bad frame for unknown rid %r", exc.rid)
            return
        await self._send(ws, encode(RespError(lease_id, exc.rid, BAD_REQUEST_FRAME, exc.reason)))

    async def _on_headers(self, ws: ClientConnection, frame: ReqHeaders) -> None:
        lease_id, rid = frame.lease_id, frame.rid
        if rid in self.inflight:
            logger.debug("SynthTunnel: dropping REQ_HEADERS for in-flight rid %r", rid)
            return
        if len(self.inflight) >= self.max_inflight:
            message = f"agent has {len(self.inflight)} requests in flight (max_inflight)"
            await self._send(ws, encode(RespError(lease_id, rid, AGENT_OVERLOADED, message)))
            return
        try:
            request = ForwardedRequest.from_frame(
                frame,
                api_key=self.api_key,
                budget=self.body_budget,
                max_buffered=self.request_buffer_bytes,
            )
        except FrameError as exc:
            await self._send(ws, encode(RespError(lease_id, rid, BAD_REQUEST_FRAME, str(exc))))
            return
        self.inflight[rid] = request
        self._idle.clear()
        request.task = asyncio.get_running_loop().create_task(self._forward(ws, request))

    async def _on_request_frame(
        self, ws: ClientConnection, frame: ReqBody | ReqEnd | Cancel
    ) -> None:
        request = self.inflight.get(frame.rid)
        if request is None:
            logger.debug(
                "SynthTunnel: dropping %s for unknown rid %r", type(frame).__name__, frame.rid
            )
            return
        if isinstance(frame, Cancel):
            self._finish(request)
            logger.debug("SynthTunnel: request %s cancelled by the relay", request.rid)
            return
        try:
            if isinstance(frame, ReqBody):
                request.check_body()
                size = len(frame.data)
                if not self._fits(request, size) and not await self._make_room(ws, request, size):
                    return  # the request ended or was failed meanwhile: drop the chunk
                request.feed(frame.data)
            else:
                request.end()
        except FrameError as exc:
            self._finish(request)
            await self._send(
                ws, encode(RespError(request.lease_id, request.rid, BAD_REQUEST_FRAME, str(exc)))
            )

    def _fits(self, request: ForwardedRequest, size: int) -> bool:
        return request.fits(size) and self.body_budget.fits(size)

    async def _make_room(self, ws: ClientConnection, request: ForwardedRequest, size: int) -> bool:
        """Wait (at most ``body_stall_timeout``) until ``size`` more body bytes of ``request``
        fit; then fail the biggest buffers until they do. True when ``request`` can take
        them, False when it is over (finished, cancelled or failed)."""
        self.body_stalls += 1
        logger.debug("SynthTunnel: request %s waits for the app to take its body", request.rid)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.body_stall_timeout):
                while self._live(request) and not self._fits(request, size):
                    await self.body_budget.released()
        while self._live(request) and not self._fits(request, size):
            if request.fits(size):
                # The agent's bound: the request holding the most goes (ties: this one).
                victim = max(self.inflight.values(), key=lambda r: (r.buffered_bytes, r is request))
                bound = f"agent_buffer_bytes={self.body_budget.limit} across its requests"
            else:
                victim = request
                bound = f"request_buffer_bytes={request.max_buffered}"
            await self._overflow(ws, victim, bound)
        return self._live(request)

    def _live(self, request: ForwardedRequest) -> bool:
        return self.inflight.get(request.rid) is request

    async def _overflow(self, ws: ClientConnection, request: ForwardedRequest, bound: str) -> None:
        """Abort ``request``, whose app is not taking its body, with REQUEST_BODY_OVERFLOW."""
        message = (
            f"the app did not take the request body fast enough: {request.buffered_bytes} "
            f"bytes of it were buffered and the agent's bound ({bound}) stayed full for "
            f"{self.body_stall_timeout:g}s; local request aborted"
        )
        self.body_overflows += 1
        logger.info("SynthTunnel request %s: %s", request.rid, message)
        self._finish(request)
        await self._send(
            ws, encode(RespError(request.lease_id, request.rid, REQUEST_BODY_OVERFLOW, message))
        )

    def _finish(self, request: ForwardedRequest) -> None:
        """Forget ``request``, drop its buffered body and abort its local call; nothing more
        is sent for it."""
        if self.inflight.get(request.rid) is request:
            del self.inflight[request.rid]
        if not self.inflight:
            self._idle.set()
        request.close()
        if request.task is not None and request.task is not asyncio.current_task():
            request.task.cancel()

    def _abort_inflight(self) -> None:
        for request in list(self.inflight.values()):
            self._finish(request)

    async def _forward(self, ws: ClientConnection, request: ForwardedRequest) -> None:
        configured = self.lease.limits.get("max_response_bytes")
        limit = configured if isinstance(configured, int) and configured > 0 else None
        try:
            await request.run(
                self.http, functools.partial(send_frames, ws), limit, binary=self.binary
            )
        finally:
            self._finish(request)
