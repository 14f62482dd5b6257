"""Attached agents: one :class:`AgentSession` per WebSocket, one :class:`Exchange` per
proxied request.

The session's reader routes each RESP_* frame to the exchange named by its ``rid``; the
HTTP handler that owns the exchange consumes its events. Malformed frames are skipped with
a reason (the first few at WARNING, the rest at DEBUG); a malformed frame that names a live
``rid`` ends that request with 502 instead of corrupting it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from ..tunnels.synthtunnel.batching import send_frames
from ..tunnels.synthtunnel.codec import TextFrame, parse_agent_frame
from ..tunnels.synthtunnel.protocol import (
    Attach,
    FrameError,
    RespBody,
    RespEnd,
    RespError,
    RespHeaders,
    Unknown,
    binary_agreed,
)

logger = logging.getLogger(__name__)

#: Malformed frames per session logged at WARNING before the rest go to DEBUG.
WARN_MALFORMED = 5


@dataclass(frozen=True)
class AgentLost:
    """The agent went away (or was detached) before the response ended."""

    reason: str


@dataclass(frozen=True)
class CallerGone:
    """The caller disconnected."""


@dataclass(frozen=True)
class BadFrame:
    """The agent sent a frame for this request that the relay cannot use."""

    reason: str


@dataclass(frozen=True)
class Overflow:
    """The caller reads slower than the agent sends, past the buffer cap."""


Event = RespHeaders | RespBody | RespEnd | RespError | AgentLost | CallerGone | BadFrame | Overflow


class AgentGoneError(Exception):
    """Sending to an agent failed because its WebSocket is closed."""


class Exchange:
    """The events of one proxied request, in order, with a cap on buffered body bytes."""

    def __init__(self, rid: str, lease_id: str, max_buffered: int) -> None:
        self.rid = rid
        self.lease_id = lease_id
        self._max_buffered = max_buffered
        self._items: deque[Event] = deque()
        self._wake = asyncio.Event()
        self._buffered = 0
        self._terminal = False

    def put(self, event: Event) -> None:
        """Queue ``event``; a body past the buffer cap turns into :class:`Overflow`."""
        if self._terminal:
            return
        if isinstance(event, RespBody):
            size = len(event.data)
            if self._buffered and self._buffered + size > self._max_buffered:
                self.interrupt(Overflow())
                return
            self._buffered += size
        self._items.append(event)
        self._wake.set()

    def interrupt(self, event: Event) -> None:
        """Drop whatever is queued and deliver ``event`` next; ignore later events."""
        self._items.clear()
        self._buffered = 0
        self._items.append(event)
        self._terminal = True
        self._wake.set()

    async def get(self) -> Event:
        while not self._items:
            self._wake.clear()
            await self._wake.wait()
        event = self._items.popleft()
        if isinstance(event, RespBody):
            self._buffered -= len(event.data)
        return event


class AgentSession:
    """One attached agent WebSocket and the requests in flight on it."""

    def __init__(
        self,
        conn: ServerConnection,
        agent_id: str,
        capabilities: Mapping[str, Any],
        *,
        max_buffered: int,
    ) -> None:
        self.conn = conn
        self.agent_id = agent_id
        self.lease_ids: set[str] = set()
        self.exchanges: dict[str, Exchange] = {}
        self.max_buffered = max_buffered
        cap = capabilities.get("max_inflight")
        self.max_inflight: int | None = (
            cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else None
        )
        self.malformed = 0
        #: Binary body frames agreed at ATTACH (``protocol``: our agents offer them).
        self.binary = binary_agreed(capabilities)
        self.closing = False
        self.detached = False
        addr = conn.remote_address
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else "?"
        self.label = f"agent {agent_id or '<no id>'!r} from {peer}"

    @property
    def usable(self) -> bool:
        return not self.closing and self.conn.state is State.OPEN

    async def send(self, text: str | bytes | TextFrame) -> None:
        """Send one frame; raises AgentGoneError when the socket is closed."""
        await self.send_many([text])

    async def send_many(self, messages: list[str | bytes | TextFrame]) -> None:
        """Send frames back to back (one write when small); AgentGoneError when closed."""
        try:
            await send_frames(self.conn, messages)
        except ConnectionClosed as exc:
            raise AgentGoneError(str(exc)) from None

    def open_exchange(self, lease_id: str) -> Exchange:
        rid = "rid_" + secrets.token_hex(8)
        exchange = Exchange(rid, lease_id, self.max_buffered)
        self.exchanges[rid] = exchange
        return exchange

    def forget(self, rid: str) -> None:
        self.exchanges.pop(rid, None)

    def fail_exchanges(self, reason: str, lease_id: str | None = None) -> int:
        """End the requests in flight (of ``lease_id``, or all) with :class:`AgentLost`."""
        doomed = [
            rid for rid, ex in self.exchanges.items() if lease_id is None or ex.lease_id == lease_id
        ]
        for rid in doomed:
            self.exchanges.pop(rid).put(AgentLost(reason))
        return len(doomed)

    def handle(self, message: str | bytes) -> Attach | None:
        """Route one message from the agent. Returns an ATTACH for the caller to process;
        never raises."""
        try:
            frame = parse_agent_frame(message, binary=self.binary)
        except FrameError as exc:
            self._malformed(exc.reason, exc.rid)
            return None
        if isinstance(frame, Attach):
            return frame
        if isinstance(frame, Unknown):
            logger.debug("%s: skipping frame of unknown type %r", self.label, frame.type[:40])
            return None
        exchange = self.exchanges.get(frame.rid)
        if exchange is None:
            logger.debug("%s: %s for a finished or unknown rid", self.label, type(frame).__name__)
            return None
        if isinstance(frame, RespEnd | RespError):
            self.exchanges.pop(frame.rid, None)
        exchange.put(frame)
        return None

    def _malformed(self, reason: str, rid: str | None) -> None:
        self.malformed += 1
        level = logging.WARNING if self.malformed <= WARN_MALFORMED else logging.DEBUG
        exchange = self.exchanges.pop(rid, None) if rid else None
        if exchange is not None:
            logger.log(
                level, "%s: bad frame (%s); failing its request with 502", self.label, reason
            )
            exchange.interrupt(BadFrame(reason))
        else:
            logger.log(level, "%s: skipping malformed frame: %s", self.label, reason)
        if self.malformed == WARN_MALFORMED:
            logger.warning("%s: further malformed frames are logged at DEBUG", self.label)
