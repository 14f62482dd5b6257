"""Load through relay + agent, bounded: bursts of 128 requests in flight with bodies from
0 B to 1 MiB, separated by idle pauses of ~5 s (where the client pools and uvicorn used to
expire keep-alive connections at the same moment). Every request must come back 200 with
its body byte-exact; the mechanism itself is reproduced deterministically in
tests/test_local_http.py and tests/test_relay.py."""

from __future__ import annotations

import asyncio
import os
import random

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from support import free_port

from taskapp_notebook import InProcessTaskApp
from taskapp_notebook.relay import RelayServer

pytestmark = pytest.mark.timeout(120)


def echo_app() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"healthy": True}

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        return Response(await request.body())

    return app


async def test_no_request_lost_at_128_in_flight_across_keep_alive_expiry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(14)
    sizes = [0, 1, 100, 65_535, 65_536, 65_537, 300_000, 1024 * 1024]
    async with RelayServer(api_keys=["load-key"]) as relay:
        monkeypatch.setenv("SYNTH_BACKEND_URL", relay.url)
        monkeypatch.setenv("SYNTH_API_KEY", "load-key")
        app = InProcessTaskApp(app=echo_app(), serve_on="thread", port=free_port())
        async with app:
            assert app.url and app.task_app_worker_token
            headers = {"Authorization": f"Bearer {app.task_app_worker_token}"}
            limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
            results: list[bool] = []
            async with httpx.AsyncClient(timeout=60, limits=limits, trust_env=False) as client:

                async def one(size: int) -> None:
                    body = os.urandom(size)
                    r = await client.post(f"{app.url}/echo", content=body, headers=headers)
                    results.append(r.status_code == 200 and r.content == body)

                for burst in range(3):
                    if burst:
                        await asyncio.sleep(5.0 + rng.uniform(-0.05, 0.05))
                    await asyncio.gather(*(one(rng.choice(sizes)) for _ in range(128)))
            assert len(results) == 3 * 128 and all(results), results.count(False)
