"""Small lease-API helpers shared by tests/test_relay_state.py and
tests/test_relay_grace_quotas.py (the relay under test is always a real one)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from taskapp_notebook.relay import RelayServer

KEY, OTHER_KEY = "relay-state-key-one", "relay-state-key-two"
LEASES = "/api/v1/synthtunnel/leases"


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def worker(lease: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {lease['worker_token']}"}


async def post_lease(
    client: httpx.AsyncClient, relay: RelayServer, key: str = KEY, **body: Any
) -> httpx.Response:
    body = {"client_instance_id": "client-0123456789abcdef", **body}
    return await client.post(relay.url + LEASES, json=body, headers=auth(key))


async def new_lease(client: httpx.AsyncClient, relay: RelayServer, **kw: Any) -> dict[str, Any]:
    r = await post_lease(client, relay, **kw)
    assert r.status_code == 201, r.text
    lease: dict[str, Any] = r.json()
    return lease


async def until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.05)
