"""JSON problems (``{"detail", "code", "request_id"}``) and small ASGI helpers."""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

REQUEST_ID_HEADER = "x-request-id"


def new_request_id() -> str:
    return "req_" + secrets.token_hex(8)


def problem_body(code: str, detail: str, request_id: str, **extra: Any) -> bytes:
    """The problem document. ``detail`` starts with ``code`` so that clients matching on
    the detail text (as the SDK does for ``lease_expired`` / ``agent_offline``) find it."""
    doc = {"detail": f"{code}: {detail}", "code": code, "request_id": request_id, **extra}
    return json.dumps(doc).encode()


async def send_json(
    send: Send,
    status: int,
    body: bytes,
    request_id: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (REQUEST_ID_HEADER.encode(), request_id.encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_problem(
    send: Send,
    status: int,
    code: str,
    detail: str,
    request_id: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
    **extra: Any,
) -> None:
    await send_json(
        send, status, problem_body(code, detail, request_id, **extra), request_id, headers
    )


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower-case bytes) in an ASGI scope."""
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def bearer(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value, else None."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None when it exceeds ``limit`` or the caller left."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
