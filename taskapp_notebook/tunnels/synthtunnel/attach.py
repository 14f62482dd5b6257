"""Opening the agent's WebSocket (``docs/synthtunnel-protocol.md`` section 2): connect to
``agent_connect.url`` with the agent token, send ATTACH, wait for ATTACH_ACK; and the delays
between reconnects. Used by :class:`~.agent.LeaseAgent`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
from collections.abc import Iterator

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from ...errors import RedactingLogger, TunnelError
from .batching import write_coalesced
from .codec import encode, parse_relay_frame
from .lease_client import Lease, scrub
from .protocol import (
    BINARY_BODIES,
    MAX_BODY_CHUNK,
    MAX_MESSAGE_BYTES,
    Attach,
    AttachAck,
    FrameError,
    LeaseTarget,
    binary_agreed,
)

ATTACH_ACK_TIMEOUT = 10.0
#: Offer binary body frames in ATTACH (used when the relay agrees; see ``protocol``).
OFFER_BINARY_BODIES = True
#: Statuses of a refused WebSocket handshake meaning the lease itself is gone.
_LEASE_GONE = frozenset({401, 403, 404, 410})


class AgentClientConnection(ClientConnection):
    """websockets' client connection, writing a burst of small frames at once
    (``batching``: a small response's three frames reach the relay in one segment)."""

    def send_data(self) -> None:
        write_coalesced(self)


def backoff(jitter: float = 0.2) -> Iterator[float]:
    """Reconnect delays: about 0.25, 0.5, 1, 2, 4, then 5 s forever, each spread by up to
    ``jitter`` (±20 %) so many agents cut off by one relay restart do not return in step."""
    for delay in itertools.chain((0.25, 0.5, 1.0, 2.0, 4.0), itertools.repeat(5.0)):
        yield delay * (1.0 + random.uniform(-jitter, jitter))


class LeaseRejectedError(TunnelError):
    """The relay refused the agent token (the lease expired or was deleted)."""


def _describe(message: str | bytes) -> tuple[str, str]:
    """What a relay sent instead of ATTACH_ACK: its type, and ``": <detail>"`` or ""."""
    try:
        doc = json.loads(message)
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        return "a message that is not a frame", ""
    detail = doc.get("detail") or doc.get("message") or ""
    return repr(doc.get("type")), (f": {detail!r:.300}" if detail else "")


def _problem_text(body: bytes | bytearray | None) -> str:
    if not body:
        return ""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return bytes(body[:300]).decode("utf-8", "replace")
    if isinstance(data, dict):
        parts = [f"{k}={data[k]!r:.300}" for k in ("code", "detail") if data.get(k)]
        return ", ".join(parts)
    return ""


async def open_attached(
    lease: Lease,
    *,
    agent_id: str,
    local_host: str,
    local_port: int,
    max_inflight: int,
    ping_interval: float | None,
    ping_timeout: float | None,
    open_timeout: float,
    use_proxy: bool,
    secrets: tuple[str | None, ...],
) -> tuple[ClientConnection, bool]:
    """The attached WebSocket, and whether binary body frames were agreed. TunnelError
    (LeaseRejectedError when the relay says the lease is gone) on failure."""
    binary = False
    where = f"SynthTunnel relay {lease.agent_url!r}"
    # Compression: websockets' default offer of permessage-deflate is kept on purpose.
    # The relay decides. Over the internet it pays: base64 of JSON bodies deflates to
    # ~6 % at ~125 MB/s, far above an uplink. Base64 of random/binary data only shrinks
    # to ~77 % at ~17-24 MB/s, which would cap loopback throughput -- but our own relay
    # (taskapp_notebook.relay) does not negotiate it, so loopback pays nothing.
    try:
        ws = await connect(
            lease.agent_url,
            additional_headers={"Authorization": f"Bearer {lease.agent_token}"},
            max_size=MAX_MESSAGE_BYTES,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            open_timeout=open_timeout,
            close_timeout=1.0,
            proxy=True if use_proxy else None,
            create_connection=AgentClientConnection,
            # websockets logs handshake headers at DEBUG: mask the agent token there.
            logger=RedactingLogger(logging.getLogger("websockets.client"), secrets),
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        problem = _problem_text(exc.response.body)
        message = f"{where} refused the agent: HTTP {status}" + (f" ({problem})" if problem else "")
        error_cls = LeaseRejectedError if status in _LEASE_GONE else TunnelError
        raise error_cls(scrub(message, secrets)) from None
    except (OSError, TimeoutError, WebSocketException, ImportError) as exc:
        # ImportError: a SOCKS proxy in the environment without python-socks installed.
        message = f"Could not connect to {where}: {type(exc).__name__}: {exc}"
        raise TunnelError(scrub(message, secrets)) from None
    try:
        attach = Attach(
            agent_id,
            (LeaseTarget(lease.lease_id, local_host, local_port),),
            {
                "max_body_chunk_bytes": MAX_BODY_CHUNK,
                "max_inflight": max_inflight,
                "streaming": True,
                "supports_cancel": True,
                **({BINARY_BODIES: 1} if OFFER_BINARY_BODIES else {}),
            },
        )
        await ws.send(encode(attach))
        async with asyncio.timeout(ATTACH_ACK_TIMEOUT):
            ack = await ws.recv()
        try:
            reply = parse_relay_frame(ack)
        except FrameError:
            reply = None
        if isinstance(reply, AttachAck):
            # Binary body frames only when the relay agreed (Synth's relay ignores the
            # offer: JSON text, as the spec says).
            binary = OFFER_BINARY_BODIES and binary_agreed(reply.capabilities)
        else:
            kind, detail = _describe(ack)
            message = f"{where} answered ATTACH with {kind} instead of ATTACH_ACK{detail}"
            raise TunnelError(scrub(message, secrets))
    except TimeoutError:
        await ws.close()
        raise TunnelError(
            f"{where} did not acknowledge ATTACH within {ATTACH_ACK_TIMEOUT:g}s."
        ) from None
    except ConnectionClosed as exc:
        await ws.close()
        raise TunnelError(
            scrub(f"{where} closed the connection during ATTACH: {exc}", secrets)
        ) from None
    except BaseException:
        await ws.close()
        raise
    return ws, binary
