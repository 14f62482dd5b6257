"""The agent WebSocket endpoint: websockets' connection, plugged into uvicorn's port.

uvicorn hands every WebSocket upgrade to the protocol class it is configured with
(``uvicorn.Config(ws=...)``). Ours is a websockets :class:`ServerConnection`, so the agent
endpoint runs on the websockets API, which lets the relay decide when pings start: right
after ATTACH_ACK, never before (the SDK's agent fails if anything but ATTACH_ACK comes
first). The HTTP side (lease API, public route) stays a plain ASGI app.
"""

from __future__ import annotations

import asyncio
import http
import logging
import socket
from typing import Any

from websockets.asyncio.server import Server, ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, ConnectionClosedError
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from ..errors import RedactingLogger, mask_secret
from ..tunnels.synthtunnel.batching import write_coalesced
from ..tunnels.synthtunnel.codec import encode, parse_agent_frame
from ..tunnels.synthtunnel.protocol import (
    BINARY_BODIES,
    Attach,
    AttachAck,
    FrameError,
)
from .lease_store import Lease, iso_z
from .problems import bearer, new_request_id, problem_body
from .sessions import WARN_MALFORMED, AgentGoneError, AgentSession
from .state import AGENT_PATH, CLOSE_LEASE_GONE, RelayState

logger = logging.getLogger(__name__)

#: Time allowed for the WebSocket opening handshake.
OPEN_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
#: Linux only: ACK what an agent sends at once instead of delaying the ACK (see below).
TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class AgentConnection(ServerConnection):
    """A websockets server connection that remembers the lease its token opened.

    It ACKs every read at once (``TCP_QUICKACK``, Linux): an agent whose socket keeps
    Nagle's algorithm on (the SDK's compiled 0.9.11 agent does not set ``TCP_NODELAY``)
    holds its second small frame (RESP_BODY after RESP_HEADERS) until the first is
    ACKed, and Linux delays that ACK by ~40 ms on a request/response socket: every
    response through such an agent took 40 ms longer. Costs one setsockopt per read.
    """

    lease: Lease | None = None
    _quickack: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if TCP_QUICKACK is not None:
            self._quickack = transport.get_extra_info("socket")

    def send_data(self) -> None:
        write_coalesced(self)  # REQ_HEADERS + REQ_END in one segment

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._quickack is not None:
            try:
                self._quickack.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
            except OSError:  # not TCP after all, or closed: stop trying
                self._quickack = None


class _AgentServer(Server):
    """A websockets ``Server`` without a listener of its own: uvicorn owns the socket."""

    def __init__(self, endpoint: AgentEndpoint) -> None:
        super().__init__(self._no_listener, endpoint.run_connection)
        self.accepting = True

    @staticmethod
    async def _no_listener() -> asyncio.Server:
        raise RuntimeError("the agent endpoint shares uvicorn's listener")

    def is_serving(self) -> bool:
        return self.accepting


class AgentEndpoint:
    """Authenticates agent sockets, handles ATTACH, and runs each socket's reader."""

    def __init__(self, state: RelayState) -> None:
        self.state = state
        self.server = _AgentServer(self)
        #: Every socket with a live handler, handshake included.
        self._open: set[ServerConnection] = set()
        self.protocol_class = self._protocol_class()

    def _protocol_class(self) -> type[AgentConnection]:
        server, cfg = self.server, self.state.config

        class UvicornAgentConnection(AgentConnection):
            def __init__(self, **_uvicorn_kwargs: Any) -> None:
                super().__init__(
                    # No extensions: permessage-deflate, which agents offer, is declined.
                    # Bodies are base64 (random data deflates only to ~77 % at ~20 MB/s
                    # per core); on loopback or a LAN it would halve throughput for little.
                    ServerProtocol(
                        max_size=cfg.max_message_bytes,
                        # Handshake headers are logged at DEBUG: mask the agent tokens.
                        logger=RedactingLogger(logging.getLogger("websockets.server")),
                    ),
                    server,
                    ping_interval=cfg.ping_interval,
                    ping_timeout=cfg.ping_timeout,
                    close_timeout=CLOSE_TIMEOUT,
                )

        return UvicornAgentConnection

    @staticmethod
    def _reject(status: int, code: str, detail: str) -> Response:
        body = problem_body(code, detail, new_request_id())
        headers = Headers(
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ]
        )
        return Response(status, http.HTTPStatus(status).phrase, headers, body)

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Check path and agent token before the WebSocket opens."""
        if request.path.partition("?")[0] != AGENT_PATH:
            return self._reject(
                404, "not_found", f"no WebSocket endpoint here; agents use {AGENT_PATH}"
            )
        if not self.server.accepting:
            return self._reject(503, "relay_closing", "the relay is shutting down")
        values = request.headers.get_all("Authorization")
        token = bearer(values[0] if values else None)
        if token is None:
            return self._reject(
                401, "agent_token_required", "send Authorization: Bearer <agent_token>"
            )
        lease = self.state.store.by_agent_token(token)
        if lease is None:
            logger.info("Agent connection refused: unknown agent token %s", mask_secret(token))
            ended = self.state.store.tombstone(token)
            if ended:
                return self._reject(410, ended, "this agent token's lease has ended")
            return self._reject(401, "agent_token_invalid", "unknown agent token")
        if lease.expired():
            return self._reject(410, "lease_expired", "this agent token's lease has expired")
        assert isinstance(connection, AgentConnection)
        connection.lease = lease
        return None

    async def run_connection(self, connection: ServerConnection) -> None:
        """Lifecycle of one agent socket (mirrors websockets' own ``serve`` handler)."""
        self._open.add(connection)
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                await connection.handshake(self.process_request)
            if connection.protocol.state is not State.OPEN:
                connection.transport.abort()
                return
            self.server.all_connections.add(connection)
            try:
                async with connection:
                    assert isinstance(connection, AgentConnection)
                    await self._serve(connection)
            except Exception:
                logger.exception("Agent connection handler failed")
            finally:
                self.server.all_connections.discard(connection)
        except asyncio.CancelledError:
            connection.transport.abort()
            raise
        except Exception:  # a failed handshake (timeout, bad request): drop the socket
            connection.transport.abort()
        finally:
            self._open.discard(connection)
            task = asyncio.current_task()
            if task is not None:
                self.server.handler_tasks.discard(task)

    async def _serve(self, connection: AgentConnection) -> None:
        lease = connection.lease
        assert lease is not None
        first = await self._await_attach(connection, lease)
        if first is None:
            return
        if self.state.store.get(lease.lease_id) is not lease:
            await connection.close(CLOSE_LEASE_GONE, "lease_expired")
            return
        session = AgentSession(
            connection,
            first.agent_id,
            first.capabilities,
            max_buffered=self.state.config.max_buffered_bytes,
        )
        try:
            await session.send(self._attach(session, lease, first))
        except AgentGoneError:
            self.state.detach(session, "closed during ATTACH")
            return
        # Pings start only now: nothing may reach the agent before ATTACH_ACK.
        connection.start_keepalive()
        logger.info("%s attached to lease %s", session.label, lease.lease_id)
        reason = "agent closed the connection"
        try:
            async for message in connection:
                attach = session.handle(message)
                if attach is not None and self.state.store.get(lease.lease_id) is lease:
                    await session.send(self._attach(session, lease, attach))
        except ConnectionClosedError as exc:
            reason = f"connection lost ({exc})"
        except AgentGoneError as exc:
            reason = f"connection lost ({exc})"
        finally:
            self.state.detach(session, reason)

    async def _await_attach(self, connection: AgentConnection, lease: Lease) -> Attach | None:
        """The agent's ATTACH. Other frames before it are skipped (malformed frames are never
        fatal); a socket with no ATTACH within ``attach_timeout`` is closed with 1008."""
        timeout = self.state.config.attach_timeout
        skipped = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await connection.recv()
                    try:
                        frame = parse_agent_frame(message)
                    except FrameError as exc:
                        why = exc.reason
                    else:
                        if isinstance(frame, Attach):
                            return frame
                        why = f"a {type(frame).__name__} frame"
                    skipped += 1
                    level = logging.WARNING if skipped <= WARN_MALFORMED else logging.DEBUG
                    logger.log(
                        level,
                        "Agent for lease %s sent %s before ATTACH; skipped",
                        lease.lease_id,
                        why,
                    )
        except TimeoutError:
            logger.warning(
                "Agent for lease %s sent no ATTACH within %gs; closing", lease.lease_id, timeout
            )
            await connection.close(1008, "ATTACH expected")
        except ConnectionClosed:
            pass
        return None

    def _attach(self, session: AgentSession, lease: Lease, frame: Attach) -> str:
        listed = {target.lease_id for target in frame.leases}
        if listed and lease.lease_id not in listed:
            logger.warning(
                "%s: ATTACH does not list lease %s, which its token opened; attaching it anyway",
                session.label,
                lease.lease_id,
            )
        if listed - {lease.lease_id}:
            logger.warning(
                "%s: ignoring %d ATTACH lease(s) its token does not cover",
                session.label,
                len(listed - {lease.lease_id}),
            )
        self.state.attach(session, lease)
        return encode(
            AttachAck(
                frame.agent_id,
                ({"lease_id": lease.lease_id, "expires_at": iso_z(lease.expires_at)},),
                {BINARY_BODIES: 1} if session.binary else {},
            )
        )

    async def aclose(self) -> None:
        """Refuse new sockets, close the open ones (1001), wait for their handlers."""
        self.server.accepting = False
        for connection in list(self.server.all_connections):
            self.state.spawn(connection.close(1001, "relay shutting down"))
        tasks = list(self.server.handler_tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT + 1)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for connection in list(self._open):  # nothing may outlive the relay
            connection.transport.abort()
