"""One request forwarded by the SynthTunnel agent to the local app.

The body is streamed to the app as REQ_BODY frames arrive; a body that ends (REQ_END)
before 64 KiB has arrived is sent with a Content-Length instead of chunked. The app's
response goes back as it is (no redirects followed, no decompression) in ≤ 64 KiB
RESP_BODY chunks. ``deadline_ms`` bounds the whole exchange.

Request-body memory. The protocol has no flow control of its own: the relay sends REQ_BODY
frames as fast as the caller uploads, and one WebSocket carries every request. Bytes that
arrived but that the app has not taken yet are *buffered*; they are bounded twice:

- per request, ``request_buffer_bytes`` (8 MiB by default; :attr:`ForwardedRequest.buffered_bytes`),
- per agent (one WebSocket), ``agent_buffer_bytes`` (64 MiB; :class:`BodyBudget`).

When a REQ_BODY would go past either bound, the agent's receive loop (``agent``)
waits for room, for at most ``body_stall_timeout`` (2 s; never more than half the ping
timeout). While it waits it reads nothing, so back-pressure reaches the relay through the
WebSocket and TCP (our relay awaits each send and uvicorn in turn stops reading the
caller), and an app that reads slower than the network still gets its whole upload,
intact, at its own pace. If no room comes within the stall timeout, the app is not reading
at all: the request holding the most buffered bytes (the one that overflowed its own
bound, or the largest when the agent's bound is hit) is aborted with ``RESP_ERROR``
``REQUEST_BODY_OVERFLOW``, its buffer is freed, its later frames are dropped, and the loop
goes on with every other request.

Why not the alternatives. Waiting without a limit (pure back-pressure) lets one stalled
handler freeze every request on the WebSocket and, once websockets stops reading, the
pings too: after the ping timeout (20 s) the connection drops and *all* requests in flight
are lost. Failing as soon as a bound is reached (never waiting) would fail any large upload
to an app that is merely slower than loopback. The bounded wait costs the other requests
at most ``body_stall_timeout`` of head-of-line delay per stalled request, and keeps pings
alive. Besides these buffers, websockets queues a few frames (``max_queue``) before it stops
reading the socket.
"""

from __future__ import annotations

import asyncio
import logging
import re
import string
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from urllib.parse import quote

from websockets.exceptions import ConnectionClosed

from .codec import TextFrame, chunks, encode, encode_body
from .headers import agent_request_headers, header_bytes
from .local_http import LocalHTTP, LocalHTTPError
from .protocol import (
    DEADLINE_EXCEEDED,
    LOCAL_BAD_RESPONSE,
    LOCAL_CONNECT_FAILED,
    MAX_BODY_CHUNK,
    FrameError,
    ReqHeaders,
    RespBody,
    RespEnd,
    RespError,
    RespHeaders,
)

logger = logging.getLogger(__name__)

#: Sends encoded frames (JSON text, or binary body frames) back to back.
Send = Callable[[Sequence[str | bytes | TextFrame]], Awaitable[None]]

#: Characters kept as they are when re-quoting a request target with unsafe characters.
_TARGET_SAFE = "".join(sorted(set(string.printable) - set(string.whitespace) - {"#"}))
#: A target that is not printable ASCII without whitespace and ``#`` gets re-quoted.
_NEEDS_QUOTING = re.compile(r"[^!-~]|#")


#: A response whose body is already read when its head is, up to this size, goes out as
#: RESP_HEADERS + RESP_BODY + RESP_END in one write (``batching``).
SMALL_RESPONSE = 32 * 1024
#: Default bounds on buffered request-body bytes (see the module docstring).
REQUEST_BUFFER_BYTES = 8 * 1024 * 1024
AGENT_BUFFER_BYTES = 64 * 1024 * 1024
#: Longest the receive loop waits for an app to take body bytes before failing a request.
BODY_STALL_TIMEOUT = 2.0
#: The smallest per-request bound that lets streaming start (it starts at 64 KiB).
MIN_REQUEST_BUFFER_BYTES = 2 * MAX_BODY_CHUNK


def check_body_bounds(
    request_buffer_bytes: int, agent_buffer_bytes: int, body_stall_timeout: float
) -> None:
    """ValueError unless the bounds on buffered request bodies are usable."""
    if request_buffer_bytes < MIN_REQUEST_BUFFER_BYTES:
        raise ValueError(f"request_buffer_bytes must be at least {MIN_REQUEST_BUFFER_BYTES}")
    if agent_buffer_bytes < request_buffer_bytes:
        raise ValueError("agent_buffer_bytes must be at least request_buffer_bytes")
    if body_stall_timeout < 0:
        raise ValueError("body_stall_timeout must not be negative")


class BodyBudget:
    """Request-body bytes buffered by one agent: received from the relay, not yet taken by
    the app. ``peak`` is the most ever buffered at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._released = asyncio.Event()

    def fits(self, size: int) -> bool:
        """True when ``size`` more bytes stay within the limit (always, when nothing is
        buffered)."""
        return self.used == 0 or self.used + size <= self.limit

    def take(self, size: int) -> None:
        self.used += size
        self.peak = max(self.peak, self.used)

    def give_back(self, size: int) -> None:
        """``size`` bytes left the buffer (to the app, or dropped); wakes :meth:`released`."""
        self.used -= size
        self._released.set()

    async def released(self) -> None:
        """Wait until bytes are given back (or a request ends)."""
        self._released.clear()
        await self._released.wait()


class ForwardedRequest:
    """A request from REQ_HEADERS on: its body as it arrives, and its forwarding task."""

    def __init__(
        self,
        lease_id: str,
        rid: str,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        deadline: float,
        *,
        budget: BodyBudget | None = None,
        max_buffered: int = REQUEST_BUFFER_BYTES,
    ) -> None:
        self.lease_id = lease_id
        self.rid = rid
        self.method = method
        self.target = target
        self.headers = headers
        self.deadline = deadline
        self.budget = budget if budget is not None else BodyBudget(max_buffered)
        self.max_buffered = max_buffered
        #: Body bytes received and not yet taken by the app, and the most at any time.
        self.buffered_bytes = 0
        self.peak_buffered_bytes = 0
        self.streaming = False
        self.ended = False
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._chunks: deque[bytes | memoryview] = deque()
        self._arrived = asyncio.Event()

    @classmethod
    def from_frame(
        cls,
        frame: ReqHeaders,
        *,
        api_key: str,
        budget: BodyBudget | None = None,
        max_buffered: int = REQUEST_BUFFER_BYTES,
    ) -> ForwardedRequest:
        """The request of a parsed REQ_HEADERS, the header rules applied; FrameError when
        its target cannot be sent."""
        lease_id, rid, path, query = frame.lease_id, frame.rid, frame.path, frame.query
        target = path + (f"?{query}" if query else "")
        if _NEEDS_QUOTING.search(target):
            target = quote(target, safe=_TARGET_SAFE)
        pairs = agent_request_headers(frame.headers, api_keys=[api_key], lease_id=lease_id, rid=rid)
        headers = [(header_bytes(k), header_bytes(v)) for k, v in pairs]
        return cls(
            lease_id,
            rid,
            frame.method,
            target.encode("ascii"),
            headers,
            frame.deadline_ms / 1000,
            budget=budget,
            max_buffered=max_buffered,
        )

    def fits(self, size: int) -> bool:
        """True when ``size`` more bytes stay within this request's bound (always, when
        nothing is buffered)."""
        return self.buffered_bytes == 0 or self.buffered_bytes + size <= self.max_buffered

    def check_body(self) -> None:
        """FrameError when no more body may come (REQ_END was received)."""
        if self.ended:
            raise FrameError("REQ_BODY after REQ_END")

    def feed(self, data: bytes | memoryview) -> None:
        """Add a body chunk; start streaming once a full chunk has arrived.

        Does not check the bounds: the agent makes room first (:meth:`fits`).
        """
        self.check_body()
        if self.closed or not data:
            return
        self._chunks.append(data)
        self.buffered_bytes += len(data)
        self.peak_buffered_bytes = max(self.peak_buffered_bytes, self.buffered_bytes)
        self.budget.take(len(data))
        if not self.streaming and self.buffered_bytes >= MAX_BODY_CHUNK:
            self.streaming = True
            self._ready.set()
        self._arrived.set()

    def end(self) -> None:
        self.ended = True
        self._ready.set()
        self._arrived.set()

    def close(self) -> None:
        """Drop whatever is still buffered: the request is over. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._chunks.clear()
        size, self.buffered_bytes = self.buffered_bytes, 0
        self.budget.give_back(size)

    def _take_all(self) -> bytes:
        body = b"".join(self._chunks)
        self._chunks.clear()
        size, self.buffered_bytes = self.buffered_bytes, 0
        self.budget.give_back(size)
        return body

    async def _stream(self) -> AsyncIterator[bytes | memoryview]:
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self.buffered_bytes -= len(chunk)
                self.budget.give_back(len(chunk))
                yield chunk
            elif self.ended:
                return
            else:
                self._arrived.clear()
                await self._arrived.wait()

    async def run(
        self,
        http: LocalHTTP,
        send: Send,
        max_response_bytes: int | None,
        *,
        binary: bool = False,
    ) -> None:
        """Forward to the app and send the response frames, ending in RESP_END/RESP_ERROR.

        Returns quietly when the WebSocket closes; cancellation (CANCEL) sends nothing.
        """
        headers_sent = False
        error: tuple[str, str] | None = None
        try:
            async with asyncio.timeout(self.deadline):
                await self._ready.wait()
                content = self._stream() if self.streaming else self._take_all()
                try:
                    response = await http.request(self.method, self.target, self.headers, content)
                    try:
                        raw = tuple(
                            (k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers
                        )
                        status = response.status
                        head = encode(RespHeaders(self.lease_id, self.rid, status, raw))
                        small = response.buffered_body(SMALL_RESPONSE)
                        if small is not None and (
                            max_response_bytes is None or len(small) <= max_response_bytes
                        ):
                            # Already here: headers, body and end in one write.
                            frames: list[str | bytes | TextFrame] = [head]
                            for piece in chunks(small):
                                frame = RespBody(self.lease_id, self.rid, piece)
                                frames.append(encode_body(frame, binary=binary))
                            frames.append(encode(RespEnd(self.lease_id, self.rid)))
                            await send(frames)
                            return
                        await send([head])
                        headers_sent = True
                        total = 0
                        async for data in response.body():
                            total += len(data)
                            if max_response_bytes is not None and total > max_response_bytes:
                                error = (
                                    LOCAL_BAD_RESPONSE,
                                    f"response exceeds max_response_bytes={max_response_bytes}",
                                )
                                break
                            for piece in chunks(data):
                                frame = RespBody(self.lease_id, self.rid, piece)
                                await send([encode_body(frame, binary=binary)])
                    finally:
                        await response.aclose()
                except LocalHTTPError as exc:
                    code = LOCAL_BAD_RESPONSE if headers_sent else LOCAL_CONNECT_FAILED
                    error = (code, str(exc))
        except TimeoutError:
            ms = self.deadline * 1000
            error = (DEADLINE_EXCEEDED, f"deadline of {ms:.0f} ms passed; local request aborted")
        except ConnectionClosed:
            return
        except Exception as exc:  # noqa: BLE001 - a bug here must still end the request
            logger.warning("SynthTunnel request %s failed unexpectedly", self.rid, exc_info=True)
            code = LOCAL_BAD_RESPONSE if headers_sent else LOCAL_CONNECT_FAILED
            error = (code, f"agent error {type(exc).__name__}")
        try:
            if error is not None:
                logger.debug("SynthTunnel request %s failed: %s", self.rid, error)
                await send([encode(RespError(self.lease_id, self.rid, *error))])
            else:
                await send([encode(RespEnd(self.lease_id, self.rid))])
        except ConnectionClosed:
            return
