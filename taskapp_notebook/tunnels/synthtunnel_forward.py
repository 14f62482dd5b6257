"""One request forwarded by the SynthTunnel agent to the local app.

The body is streamed to the app as REQ_BODY frames arrive; a body that ends (REQ_END)
before 64 KiB has arrived is sent with a Content-Length instead of chunked. The app's
response goes back as it is (no redirects followed, no decompression) in ≤ 64 KiB
RESP_BODY chunks. ``deadline_ms`` bounds the whole exchange.
"""

from __future__ import annotations

import asyncio
import logging
import string
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

import httpx
from websockets.exceptions import ConnectionClosed

from .synthtunnel_frames import (
    BAD_REQUEST_FRAME,
    DEADLINE_EXCEEDED,
    DEFAULT_DEADLINE_MS,
    LOCAL_BAD_RESPONSE,
    LOCAL_CONNECT_FAILED,
    MAX_BODY_CHUNK,
    FrameError,
    RespBodyEncoder,
    forward_headers,
    header_pairs,
    resp_end,
    resp_error,
    resp_headers,
    split_chunks,
)

logger = logging.getLogger(__name__)

#: Sends one frame: a frame object, or frame JSON text that is already encoded.
Send = Callable[[dict[str, Any] | str], Awaitable[None]]

#: Local request timeouts: 10 s to connect; the rest is bounded by ``deadline_ms``.
_TIMEOUTS = httpx.Timeout(None, connect=10.0).as_dict()

#: Characters kept as they are when re-quoting a request target with unsafe characters.
_TARGET_SAFE = "".join(sorted(set(string.printable) - set(string.whitespace) - {"#"}))


def _encode_header(value: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def _deadline_seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        value = DEFAULT_DEADLINE_MS
    return float(value) / 1000


class ForwardedRequest:
    """A request from REQ_HEADERS on: its body as it arrives, and its forwarding task."""

    def __init__(
        self,
        lease_id: str,
        rid: str,
        method: str,
        url: httpx.URL,
        headers: list[tuple[bytes, bytes]],
        deadline: float,
    ) -> None:
        self.lease_id = lease_id
        self.rid = rid
        self.method = method
        self.url = url
        self.headers = headers
        self.deadline = deadline
        self.streaming = False
        self.ended = False
        self.task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    @classmethod
    def from_frame(
        cls, frame: dict[str, Any], *, lease_id: str, rid: str, local: httpx.URL, api_key: str
    ) -> ForwardedRequest:
        """Validate REQ_HEADERS and apply the header rules; FrameError when unusable."""
        method, path = frame.get("method"), frame.get("path")
        query = frame.get("query") or ""
        if not isinstance(method, str) or not method or not method.isascii():
            raise FrameError("REQ_HEADERS method is missing or invalid")
        if not isinstance(path, str) or not path.startswith("/") or not isinstance(query, str):
            raise FrameError("REQ_HEADERS path must be a string starting with '/'")
        target = path + (f"?{query}" if query else "")
        if not target.isascii() or "#" in target or any(c in string.whitespace for c in target):
            target = quote(target, safe=_TARGET_SAFE)
        try:
            url = local.copy_with(raw_path=target.encode("ascii"))
        except (httpx.InvalidURL, ValueError):
            raise FrameError(f"REQ_HEADERS path {path!r:.200} is not a valid target") from None
        pairs = forward_headers(
            header_pairs(frame.get("headers")), api_keys=[api_key], lease_id=lease_id, rid=rid
        )
        headers = [(_encode_header(k), _encode_header(v)) for k, v in pairs]
        return cls(lease_id, rid, method, url, headers, _deadline_seconds(frame.get("deadline_ms")))

    def feed(self, data: bytes) -> None:
        """Add a body chunk; start streaming once a full chunk has arrived."""
        if self.ended:
            raise FrameError("REQ_BODY after REQ_END")
        if self.streaming:
            self._queue.put_nowait(data)
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= MAX_BODY_CHUNK:
            self.streaming = True
            for piece in self._buffer:
                self._queue.put_nowait(piece)
            self._buffer.clear()
            self._ready.set()

    def end(self) -> None:
        self.ended = True
        if self.streaming:
            self._queue.put_nowait(None)
        self._ready.set()

    async def _stream(self) -> AsyncIterator[bytes]:
        while (chunk := await self._queue.get()) is not None:
            yield chunk

    async def run(
        self, http: httpx.AsyncBaseTransport, send: Send, max_response_bytes: int | None
    ) -> None:
        """Forward to the app and send the response frames, ending in RESP_END/RESP_ERROR.

        Returns quietly when the WebSocket closes; cancellation (CANCEL) sends nothing.
        """
        headers_sent = False
        error: tuple[str, str] | None = None
        try:
            async with asyncio.timeout(self.deadline):
                await self._ready.wait()
                content = self._stream() if self.streaming else b"".join(self._buffer)
                try:
                    request = httpx.Request(
                        self.method,
                        self.url,
                        headers=self.headers,
                        content=content,
                        extensions={"timeout": _TIMEOUTS},
                    )
                    response = await http.handle_async_request(request)
                    try:
                        raw = [
                            [k.decode("latin-1"), v.decode("latin-1")]
                            for k, v in response.headers.raw
                        ]
                        await send(resp_headers(self.lease_id, self.rid, response.status_code, raw))
                        headers_sent = True
                        body_frame = RespBodyEncoder(self.lease_id, self.rid)
                        total = 0
                        async for data in response.aiter_raw():
                            total += len(data)
                            if max_response_bytes is not None and total > max_response_bytes:
                                error = (
                                    LOCAL_BAD_RESPONSE,
                                    f"response exceeds max_response_bytes={max_response_bytes}",
                                )
                                break
                            for piece in split_chunks(data):
                                await send(body_frame(piece))
                    finally:
                        await response.aclose()
                except httpx.LocalProtocolError as exc:
                    code = LOCAL_BAD_RESPONSE if headers_sent else BAD_REQUEST_FRAME
                    error = (code, f"{type(exc).__name__}: {exc}")
                except httpx.HTTPError as exc:
                    code = LOCAL_BAD_RESPONSE if headers_sent else LOCAL_CONNECT_FAILED
                    error = (code, f"{type(exc).__name__}: {exc}")
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
                await send(resp_error(self.lease_id, self.rid, *error))
            else:
                await send(resp_end(self.lease_id, self.rid))
        except ConnectionClosed:
            return
