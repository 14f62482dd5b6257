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
