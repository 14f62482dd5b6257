"""Child process of bench/sdk_compare.py: one side's start/stop lifecycle, printed as JSON.

Run with that side's venv python; imports nothing from this repository, so the same file runs
in ``.venv`` (``--impl ours``) and in ``.venv-sdk`` (``--impl sdk``).

    python bench/_lifecycle_driver.py --impl ours|sdk [--cycles 20] [--warmup 2]

Each variant gets one free port, fixed for all its cycles. start → healthy: from the call
until it returns (both sides return only after a ``GET /health`` answered 200). stop → port
free: from the stop call until a fresh socket can bind the port (same probe as
``taskapp_notebook.ports.is_port_free``). Prints one JSON line on stdout::

    {"impl": ..., "variants": {label: {"port": int, "start": [s...], "stop": [s...]}}}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

HOST = "127.0.0.1"
API_KEY = "bench"

AsyncCycle = Callable[[int], Awaitable[tuple[float, float]]]
SyncCycle = Callable[[int], tuple[float, float]]


def make_app() -> Any:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"healthy": True}

    return app


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def is_port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
        return True


def wait_port_free(port: int, started: float) -> float:
    while not is_port_free(port):
        time.sleep(0.0002)
    return time.perf_counter() - started


def check_health(url: str) -> None:
    """Untimed sanity check that the app really answers at ``url`` (no proxies)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"{url}/health", headers={"X-API-Key": API_KEY})
    with opener.open(request, timeout=5) as response:
        if response.status != 200:
            raise SystemExit(f"{url}/health answered {response.status}")


def sdk_variants(app: Any) -> dict[str, AsyncCycle | SyncCycle]:
    # What a user writes to get the SDK's in-process runner (0.9.11 names it InProcessContainer).
    from synth_ai import InProcessContainer

    async def cycle(port: int) -> tuple[float, float]:
        # tunnel_mode="local": the SDK's no-tunnel branch (no backend, no key, no network).
        # api_key given, so it never reads ~/.synth-ai or mints a key. Driven exactly as
        # ``async with InProcessContainer(...)`` does: __aenter__ then __aexit__.
        container = InProcessContainer(
            app=app, port=port, host=HOST, tunnel_mode="local", api_key=API_KEY
        )
        t0 = time.perf_counter()
        await container.__aenter__()
        start = time.perf_counter() - t0
        if container.port != port or container.url != f"http://{HOST}:{port}":
            raise SystemExit(f"SDK moved off the fixed port: {container.port} {container.url}")
        t0 = time.perf_counter()
        await container.__aexit__(None, None, None)
        return start, wait_port_free(port, t0)

    return {"sdk": cycle}


def ours_variants(app: Any) -> dict[str, AsyncCycle | SyncCycle]:
    from taskapp_notebook import InProcessTaskApp

    def thread_cycle(port: int) -> tuple[float, float]:
        # serve_on="thread" with the sync API, called from plain sync code (no running loop).
        ta = InProcessTaskApp(
            app=app, tunnel_mode="local", port=port, host=HOST, serve_on="thread", api_key=API_KEY
        )
        t0 = time.perf_counter()
        ta.start()
        start = time.perf_counter() - t0
        if ta.port != port:
            raise SystemExit(f"ours moved off the fixed port: {ta.port}")
        t0 = time.perf_counter()
        ta.stop()
        return start, wait_port_free(port, t0)

    async def loop_cycle(port: int) -> tuple[float, float]:
        ta = InProcessTaskApp(
            app=app, tunnel_mode="local", port=port, host=HOST, serve_on="loop", api_key=API_KEY
        )
        t0 = time.perf_counter()
        await ta.astart()
        start = time.perf_counter() - t0
        if ta.port != port:
            raise SystemExit(f"ours moved off the fixed port: {ta.port}")
        t0 = time.perf_counter()
        await ta.astop()
        return start, wait_port_free(port, t0)

    return {"thread": thread_cycle, "loop": loop_cycle}


def run(impl: str, cycles: int, warmup: int) -> dict[str, Any]:
    app = make_app()
    variants = sdk_variants(app) if impl == "sdk" else ours_variants(app)
    out: dict[str, Any] = {}
    for label, cycle in variants.items():
        port = free_port()

        async def repeat(cycle: Any = cycle, port: int = port) -> list[tuple[float, float]]:
            # async cycles all run on one event loop, as inside one ``asyncio.run(main())``
            return [await cycle(port) for _ in range(warmup + cycles)]

        if asyncio.iscoroutinefunction(cycle):
            results = asyncio.run(repeat())
        else:
            results = [cycle(port) for _ in range(warmup + cycles)]
        results = results[warmup:]  # warm-up cycles (imports, code paths) are not counted
        out[label] = {
            "port": port,
            "start": [r[0] for r in results],
            "stop": [r[1] for r in results],
        }
    return out


async def sanity(impl: str) -> None:
    """One untimed start → real GET /health → stop, so a silent no-op can't look fast."""
    app = make_app()
    port = free_port()
    if impl == "sdk":
        from synth_ai import InProcessContainer

        async with InProcessContainer(
            app=app, port=port, host=HOST, tunnel_mode="local", api_key=API_KEY
        ) as container:
            await asyncio.to_thread(check_health, container.url)
    else:
        from taskapp_notebook import InProcessTaskApp

        async with InProcessTaskApp(
            app=app, tunnel_mode="local", port=port, host=HOST, serve_on="loop", api_key=API_KEY
        ) as ta:
            assert ta.url is not None
            await asyncio.to_thread(check_health, ta.url)
    wait_port_free(port, time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--impl", choices=("ours", "sdk"), required=True)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(sanity(args.impl))
    variants = run(args.impl, args.cycles, args.warmup)
    print(json.dumps({"impl": args.impl, "variants": variants}), flush=True)


if __name__ == "__main__":
    main()
