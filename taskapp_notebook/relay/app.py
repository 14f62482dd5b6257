"""The relay's HTTP side as a plain ASGI app: lease API, public route, health.

WebSocket upgrades never reach it: uvicorn hands them to :mod:`.endpoint`.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import unquote

from .problems import (
    Receive,
    Scope,
    Send,
    bearer,
    header,
    new_request_id,
    read_body,
    send_json,
    send_problem,
)
from .proxy import proxy
from .state import AGENT_PATH, LEASES_PATH, ROUTE_PREFIX, InvalidLeaseRequestError, RelayState

logger = logging.getLogger(__name__)

#: Largest lease-API request body.
MAX_API_BODY = 1024 * 1024


class RelayApp:
    """ASGI app over a :class:`RelayState`."""

    def __init__(self, state: RelayState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        rid = new_request_id()
        path: str = scope["path"]
        raw = bytes(scope.get("raw_path") or path.encode("latin-1"))
        method: str = scope["method"]
        if raw.startswith(ROUTE_PREFIX.encode()):
            await proxy(self.state, scope, receive, send, rid)
        elif path == LEASES_PATH:
            if method != "POST":
                await self._not_allowed(send, rid, "POST")
            else:
                await self._create(scope, receive, send, rid)
        elif path.startswith(LEASES_PATH + "/"):
            lease_id = unquote(path[len(LEASES_PATH) + 1 :])
            if method not in ("GET", "DELETE"):
                await self._not_allowed(send, rid, "GET, DELETE")
            else:
                await self._one_lease(scope, send, rid, lease_id, delete=method == "DELETE")
        elif path in ("/health", "/healthz"):
            doc = {
                "status": "closing" if self.state.closing else "ok",
                "leases": len(self.state.store),
                "agents": len(self.state.sessions),
            }
            await send_json(send, 200, json.dumps(doc).encode(), rid)
        elif path == AGENT_PATH:
            await send_problem(
                send,
                426,
                "upgrade_required",
                "agents connect here with a WebSocket",
                rid,
                [(b"upgrade", b"websocket")],
            )
        else:
            await send_problem(send, 404, "not_found", f"no such endpoint: {path[:200]!r}", rid)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    @staticmethod
    async def _not_allowed(send: Send, rid: str, allow: str) -> None:
        await send_problem(
            send, 405, "method_not_allowed", f"allowed: {allow}", rid, [(b"allow", allow.encode())]
        )

    async def _owner(self, scope: Scope, send: Send, rid: str) -> bytes | None:
        owner = self.state.owner(bearer(header(scope, b"authorization")))
        if owner is None:
            await send_problem(
                send,
                401,
                "unauthorized",
                "send Authorization: Bearer <relay API key>",
                rid,
                [(b"www-authenticate", b"Bearer")],
            )
        return owner

    async def _create(self, scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        owner = await self._owner(scope, send, rid)
        if owner is None:
            return
        if self.state.closing:
            await send_problem(send, 503, "relay_closing", "the relay is shutting down", rid)
            return
        raw = await read_body(receive, MAX_API_BODY)
        if raw is None:
            await send_problem(
                send,
                413,
                "body_too_large",
                f"lease requests are limited to {MAX_API_BODY} bytes",
                rid,
            )
            return
        try:
            body = json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError):  # RecursionError: '[[[[...' past the limit
            await send_problem(send, 400, "invalid_json", "the body is not JSON", rid)
            return
        try:
            lease, created = self.state.create_or_renew(owner, body)
        except InvalidLeaseRequestError as exc:
            await send_problem(send, exc.status, exc.code, str(exc), rid)
            return
        doc = self.state.lease_document(lease)
        await send_json(send, 201 if created else 200, json.dumps(doc).encode(), rid)

    async def _one_lease(
        self, scope: Scope, send: Send, rid: str, lease_id: str, *, delete: bool
    ) -> None:
        owner = await self._owner(scope, send, rid)
        if owner is None:
            return
        lease = self.state.store.get(lease_id)
        if lease is None:
            await send_problem(send, 404, "lease_not_found", f"no live lease {lease_id!r}", rid)
            return
        if lease.owner != owner:
            await send_problem(
                send,
                403,
                "forbidden",
                "only the API key that created a lease may read or delete it",
                rid,
            )
            return
        if not delete:
            doc = self.state.lease_document(lease)
            doc["agent_attached"] = lease.session is not None and lease.session.usable
            doc["inflight"] = lease.inflight
            await send_json(send, 200, json.dumps(doc).encode(), rid)
            return
        self.state.drop_lease(lease, "lease_deleted")
        logger.info("Lease %s deleted", lease.lease_id)
        await send(
            {
                "type": "http.response.start",
                "status": 204,
                "headers": [(b"x-request-id", rid.encode())],
            }
        )
        await send({"type": "http.response.body", "body": b"", "more_body": False})
