"""Several SynthTunnel frames in one TCP write, on websockets' asyncio connections.

A small response is three frames (RESP_HEADERS, RESP_BODY, RESP_END) and a request without a
body two (REQ_HEADERS, REQ_END). websockets writes each frame with its own ``send``
syscall, so the peer may wake up (and cross a process boundary) once per frame. Written
together they usually arrive in one segment and are handled in one wake-up: measured in
``bench/tunnel.py``. Used by the agent's client connection and the relay's agent
connection; the frames themselves still come from :mod:`.codec`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from websockets.asyncio.connection import Connection

from .codec import TextFrame

#: Bursts up to this size are joined into one write (larger ones are written as they are:
#: joining would copy body bytes for nothing).
COALESCE_LIMIT = 64 * 1024


def write_coalesced(conn: Connection) -> None:
    """``Connection.send_data`` that writes a burst of small frames at once."""
    chunks = conn.protocol.data_to_send()
    if len(chunks) > 1 and all(chunks) and sum(map(len, chunks)) <= COALESCE_LIMIT:
        conn.transport.write(b"".join(chunks))
        return
    for data in chunks:
        if data:
            conn.transport.write(data)
        elif conn.transport.can_write_eof():  # as websockets does: half-close, or close
            with contextlib.suppress(Exception):  # websockets ignores it too
                conn.transport.write_eof()
        else:  # pragma: no cover - TLS
            conn.transport.close()


async def send_frames(conn: Connection, messages: Sequence[str | bytes | TextFrame]) -> None:
    """Send ``messages`` back to back, in one write when small: ``str`` and
    :class:`~.codec.TextFrame` as text frames, ``bytes`` as binary frames.

    websockets' documented pattern for user code (``send_context`` + ``protocol.send_*``);
    raises ``ConnectionClosed`` like ``send``.
    """
    async with conn.send_context():
        for message in messages:
            if isinstance(message, str):
                conn.protocol.send_text(message.encode())
            elif isinstance(message, TextFrame):
                conn.protocol.send_text(message.data)
            else:
                conn.protocol.send_binary(message)
