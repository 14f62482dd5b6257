"""Relay lifecycle: start→serving and stop→port-free of ``RelayServer``, next to the task
app's own server lifecycle (``InProcessTaskApp(tunnel_mode="local")``), one run.

Both on the caller's loop (``async with``) and in a thread (``with`` / ``start()``).
Medians of ``--cycles`` cycles; the machine may be shared, so compare the ratios.

    python bench/relay_lifecycle.py [--cycles 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from _common import echo_app

from taskapp_notebook import InProcessTaskApp
from taskapp_notebook.ports import is_port_free, pick_free_port
from taskapp_notebook.relay import RelayServer


def _ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


async def relay_async(cycles: int) -> tuple[list[float], list[float]]:
    starts, stops = [], []
    for _ in range(cycles):
        relay = RelayServer(api_keys=["bench"])
        t0 = time.perf_counter()
        await relay.start()
        t1 = time.perf_counter()
        port = relay.port
        await relay.stop()
        t2 = time.perf_counter()
        assert is_port_free(port, "127.0.0.1")
        starts.append(t1 - t0)
        stops.append(t2 - t1)
    return starts, stops


def relay_thread(cycles: int) -> tuple[list[float], list[float]]:
    starts, stops = [], []
    for _ in range(cycles):
        relay = RelayServer(api_keys=["bench"])
        t0 = time.perf_counter()
        relay.start_in_thread()
        t1 = time.perf_counter()
        port = relay.port
        relay.stop_in_thread()
        t2 = time.perf_counter()
        assert is_port_free(port, "127.0.0.1")
        starts.append(t1 - t0)
        stops.append(t2 - t1)
    return starts, stops


async def app_async(cycles: int, app: Any) -> tuple[list[float], list[float]]:
    starts, stops = [], []
    for _ in range(cycles):
        task = InProcessTaskApp(
            app=app, port=pick_free_port(), tunnel_mode="local", serve_on="loop"
        )
        t0 = time.perf_counter()
        await task.astart()
        t1 = time.perf_counter()
        await task.astop()
        stops.append(time.perf_counter() - t1)
        starts.append(t1 - t0)
    return starts, stops


def app_thread(cycles: int, app: Any) -> tuple[list[float], list[float]]:
    starts, stops = [], []
    for _ in range(cycles):
        task = InProcessTaskApp(
            app=app, port=pick_free_port(), tunnel_mode="local", serve_on="thread"
        )
        t0 = time.perf_counter()
        task.start()
        t1 = time.perf_counter()
        task.stop()
        stops.append(time.perf_counter() - t1)
        starts.append(t1 - t0)
    return starts, stops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=30)
    args = parser.parse_args()
    n, app = args.cycles, echo_app()
    rows: list[tuple[str, Callable[[], tuple[list[float], list[float]]]]] = [
        ("task app, caller's loop", lambda: asyncio.run(app_async(n, app))),
        ("relay, caller's loop", lambda: asyncio.run(relay_async(n))),
        ("task app, thread", lambda: app_thread(n, app)),
        ("relay, thread", lambda: relay_thread(n)),
    ]
    print(f"Median of {n} cycles.\n\n| server | start | stop |\n|---|---|---|")
    for label, run in rows:
        starts, stops = run()
        print(f"| {label} | {_ms(starts):.1f} ms | {_ms(stops):.1f} ms |")


if __name__ == "__main__":
    main()
