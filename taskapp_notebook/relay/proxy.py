"""The public route ``/s/rt_<route_token>/<path>``: a streamed request out to the agent as
REQ_* frames, its RESP_* frames streamed back.

A response the agent abandons after it started (RESP_ERROR, a dropped socket, the deadline)
is aborted: the handler returns without finishing it, so uvicorn closes the connection
mid-body and the caller sees a broken response instead of a truncated "success".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..tunnels.synthtunnel.codec import chunks, encode, encode_body
from ..tunnels.synthtunnel.headers import caller_response_headers, relay_request_headers
from ..tunnels.synthtunnel.protocol import (
    ERROR_STATUS,
    Cancel,
    ReqBody,
    ReqEnd,
    ReqHeaders,
    RespBody,
    RespEnd,
    RespError,
    RespHeaders,
)
from .lease_store import Lease
from .problems import Receive, Scope, Send, bearer, header, send_problem
from .sessions import (
    AgentGoneError,
    AgentLost,
    AgentSession,
    BadFrame,
    CallerGone,
    Exchange,
    Overflow,
)
from .state import ROUTE_PREFIX, RelayState

logger = logging.getLogger(__name__)

RETRY_AFTER = [(b"retry-after", b"1")]


def _split_target(scope: Scope) -> tuple[str, str]:
    """(route token, path for the app) from the raw request path."""
    raw = scope.get("raw_path") or scope["path"].encode("latin-1")
    target = bytes(raw).decode("latin-1")[len(ROUTE_PREFIX) :]
    token, slash, rest = target.partition("/")
    return token, "/" + rest if slash else "/"


async def proxy(
    state: RelayState, scope: Scope, receive: Receive, send: Send, rid_hint: str
) -> None:
    """Serve one public-route request (``rid_hint`` is the relay's request id)."""
    token, path = _split_target(scope)
    lease = state.store.by_route(token) if token else None
    if lease is not None and lease.expired():
        state.drop_lease(lease, "lease_expired")
        lease = None
    if lease is None:
        ended = state.store.tombstone(token) if token else None
        if ended:
            await send_problem(
                send,
                410,
                ended,
                "the lease behind this URL has ended; the task app must open a new tunnel",
                rid_hint,
            )
        else:
            await send_problem(send, 404, "route_not_found", "no lease has this URL", rid_hint)
        return

    x_token = header(scope, b"x-synthtunnel-worker-token")
    auth_token = bearer(header(scope, b"authorization"))
    if x_token is None and auth_token is None:
        await send_problem(
            send,
            401,
            "worker_token_required",
            "send Authorization: Bearer <worker_token> or X-SynthTunnel-Worker-Token",
            rid_hint,
            [(b"www-authenticate", b"Bearer")],
        )
        return
    x_ok = x_token is not None and lease.worker_token_ok(x_token)
    auth_ok = auth_token is not None and lease.worker_token_ok(auth_token)
    if not (x_ok or auth_ok):
        await send_problem(send, 403, "worker_token_invalid", "wrong worker token", rid_hint)
        return

    session = lease.session
    if session is None or not session.usable:
        await send_problem(
            send,
            503,
            "agent_offline",
            "no agent is attached to this lease; is the task app's tunnel running?",
            rid_hint,
            RETRY_AFTER,
        )
        return
    limit = state.max_inflight(lease)
    if lease.inflight >= limit:
        await send_problem(
            send,
            429,
            "too_many_requests",
            f"this lease already has {limit} requests in flight (max_inflight)",
            rid_hint,
            RETRY_AFTER,
        )
        return

    headers = relay_request_headers(
        [
            (bytes(name).decode("latin-1"), bytes(value).decode("latin-1"))
            for name, value in scope.get("headers", [])
        ],
        worker_token_in_authorization=auth_ok,
    )

    lease.inflight += 1
    exchange = session.open_exchange(lease.lease_id)
    try:
        await _run(state, lease, session, exchange, scope, receive, send, path, headers)
    finally:
        lease.inflight -= 1
        session.forget(exchange.rid)


async def _cancel(session: AgentSession, rid: str) -> None:
    """Send CANCEL unless the agent is gone (or too stuck to take it within 5 s)."""
    if session.usable:
        with contextlib.suppress(AgentGoneError, TimeoutError):
            async with asyncio.timeout(5.0):
                await session.send(encode(Cancel(rid)))


def _has_body(scope: Scope) -> bool:
    """False when the request carries no body (no Transfer-Encoding, Content-Length 0 or
    none): then REQ_END goes out with REQ_HEADERS."""
    for name, value in scope.get("headers", []):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


async def _pump(
    session: AgentSession, exchange: Exchange, receive: Receive, *, ended: bool
) -> None:
    """Stream the caller's body to the agent (unless ``ended``: REQ_END was sent with the
    headers), then watch for the caller leaving."""
    rid = exchange.rid
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                exchange.interrupt(CallerGone())
                return
            if not ended:
                for chunk in chunks(message.get("body", b"")):
                    await session.send(encode_body(ReqBody(rid, chunk), binary=session.binary))
            if not message.get("more_body", False):
                break
        if not ended:
            await session.send(encode(ReqEnd(rid)))
        # Returns when the caller disconnects (or, harmlessly, when the response is done).
        message = await receive()
        if message["type"] == "http.disconnect":
            exchange.interrupt(CallerGone())
    except AgentGoneError:
        return  # the session's teardown fails the exchange


async def _run(
    state: RelayState,
    lease: Lease,
    session: AgentSession,
    exchange: Exchange,
    scope: Scope,
    receive: Receive,
    send: Send,
    path: str,
    headers: list[tuple[str, str]],
) -> None:
    cfg = state.config
    rid = exchange.rid
    method = str(scope["method"]).upper()
    started = False
    body_allowed = True
    sent_bytes = 0
    outcome = "aborted"
    pump: asyncio.Task[None] | None = None

    async def stop_pump() -> None:
        if pump is not None and not pump.done():
            pump.cancel()
            await asyncio.wait([pump])

    async def cancel() -> None:
        # The body pump stops first: nothing follows a CANCEL for this rid.
        await stop_pump()
        await _cancel(session, rid)

    async def fail(status: int, code: str, detail: str) -> None:
        # Before the headers: a problem response. After: abort (return unfinished).
        nonlocal outcome
        outcome = code
        if not started:
            await send_problem(send, status, code, detail, rid)
        else:
            logger.warning(
                "Lease %s rid %s: aborting a started response: %s (%s)",
                lease.lease_id,
                rid,
                code,
                detail,
            )

    try:
        async with asyncio.timeout(cfg.request_timeout) as deadline:
            head = ReqHeaders(
                lease.lease_id,
                rid,
                method,
                path,
                bytes(scope.get("query_string", b"")).decode("latin-1"),
                tuple(headers),
                int(cfg.request_timeout * 1000),
            )
            ended = not _has_body(scope)
            if ended:  # one write, so the agent reads the whole request at once
                await session.send_many([encode(head), encode(ReqEnd(rid))])
            else:
                await session.send(encode(head))
            pump = asyncio.create_task(_pump(session, exchange, receive, ended=ended))
            while True:
                event = await exchange.get()
                if isinstance(event, RespHeaders) and not started:
                    body_allowed = method != "HEAD" and event.status not in (204, 304)
                    await send(
                        {
                            "type": "http.response.start",
                            "status": event.status,
                            "headers": caller_response_headers(event.headers),
                        }
                    )
                    started = True
                elif isinstance(event, RespBody) and started:
                    sent_bytes += len(event.data)
                    if sent_bytes > cfg.max_response_bytes:
                        await cancel()
                        await fail(
                            502,
                            "response_too_large",
                            f"the response exceeds {cfg.max_response_bytes} bytes",
                        )
                        return
                    if body_allowed and event.data:
                        await send(
                            {
                                "type": "http.response.body",
                                "body": bytes(event.data),
                                "more_body": True,
                            }
                        )
                elif isinstance(event, RespEnd) and started:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    outcome = "ok"
                    return
                elif isinstance(event, RespError):
                    # An agent that refuses for load or time says so; anything else means the
                    # task app could not be reached.
                    status = ERROR_STATUS.get(event.code, 502)
                    await fail(
                        status,
                        "agent_error",
                        f"the agent could not reach the task app: "
                        f"{event.code} {event.message[:200]}".rstrip(),
                    )
                    return
                elif isinstance(event, AgentLost):
                    lost = event.reason
                    code = lost if lost.startswith("lease_") else "agent_disconnected"
                    await fail(502, code, f"the agent went away ({lost})")
                    return
                elif isinstance(event, CallerGone):
                    outcome = "caller_gone"
                    await cancel()
                    return
                elif isinstance(event, Overflow):
                    await cancel()
                    await fail(
                        502,
                        "caller_too_slow",
                        "the caller reads slower than the app answers, past the relay's buffer",
                    )
                    return
                else:
                    if isinstance(event, BadFrame):
                        reason = event.reason
                    else:
                        reason = f"{type(event).__name__} out of order"
                    await cancel()
                    await fail(502, "bad_agent_response", f"the agent broke the protocol: {reason}")
                    return
    except TimeoutError:
        if not deadline.expired():
            raise
        await cancel()
        await fail(
            504, "deadline_exceeded", f"no complete response within {cfg.request_timeout:g}s"
        )
    except AgentGoneError:
        await fail(502, "agent_disconnected", "the agent went away")
    finally:
        await stop_pump()
        logger.debug("Lease %s rid %s %s: %s", lease.lease_id, rid, method, outcome)
