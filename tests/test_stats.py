"""Request statistics count callers' traffic, not our own health checks."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from support import free_port

from taskapp_notebook import InProcessTaskApp
from taskapp_notebook.health import auth_headers


def app_with_error() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"healthy": True}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    return app


async def test_stats_skip_internal_health_checks_and_count_errors() -> None:
    async with InProcessTaskApp(
        app=app_with_error(), tunnel_mode="local", serve_on="loop", port=free_port(),
        api_key="k",
    ) as task_app:
        assert task_app.stats.count == 0, "the start's own health check is not traffic"
        async with httpx.AsyncClient(base_url=task_app.local_url, trust_env=False) as client:
            internal = await client.get("/health", headers=auth_headers("k", internal=True))
            assert internal.status_code == 200
            assert task_app.stats.count == 0
            assert (await client.get("/health", headers=auth_headers("k"))).status_code == 200
            forged = {**auth_headers("k"), "x-taskapp-internal": "1"}  # callers can't hide
            assert (await client.get("/health", headers=forged)).status_code == 200
            assert (await client.get("/boom")).status_code == 500
        snapshot = task_app.snapshot()
        assert (snapshot["requests"], snapshot["errors"]) == (3, 1)
        assert [r.path for r in task_app.stats.recent] == ["/health", "/health", "/boom"]


async def test_requests_in_flight_by_path() -> None:
    """What a stopping GEPA run waits for: the app's rollouts still being served."""
    import asyncio

    release = asyncio.Event()
    app = app_with_error()

    @app.post("/rollout")
    async def rollout() -> dict[str, bool]:
        await release.wait()
        return {"ok": True}

    async with InProcessTaskApp(app=app, tunnel_mode="local", serve_on="loop",
                                port=free_port(), api_key="k") as task_app:
        async with httpx.AsyncClient(base_url=task_app.local_url, trust_env=False) as client:
            calls = [asyncio.create_task(client.post("/rollout")) for _ in range(2)]
            for _ in range(200):
                if task_app.stats.in_flight("/rollout") == 2:
                    break
                await asyncio.sleep(0.01)
            assert task_app.stats.in_flight("/rollout") == 2
            assert task_app.stats.in_flight() == 2 and task_app.stats.in_flight("/x") == 0
            release.set()
            assert [r.status_code for r in await asyncio.gather(*calls)] == [200, 200]
        assert task_app.stats.in_flight() == 0 and task_app.stats.count == 2
