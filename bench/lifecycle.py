"""Lifecycle benchmark: start→healthy, stop→port-free, and import time.

Compares InProcessTaskApp (serve_on loop and thread, tunnel_mode="local") with a baseline
measured in the same run: the approach of the synth-ai SDK — ``uvicorn.Server.run()`` in a
thread, ``/health`` polled every 200 ms, stop by ``should_exit`` + ``join``.

    python bench/lifecycle.py [--cycles 20] [--write-readme]

Prints a Markdown table; ``--write-readme`` replaces the table between the markers in
README.md. Figures are medians; the machine is shared and noisy, so compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from _common import write_readme_table

from taskapp_notebook.ports import is_port_free, pick_free_port


def make_app() -> Any:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"healthy": True}

    return app


def wait_port_free(port: int, started: float) -> float:
    while not is_port_free(port):
        time.sleep(0.0002)
    return time.perf_counter() - started


def bench_thread(app: Any, cycles: int) -> tuple[list[float], list[float]]:
    from taskapp_notebook import InProcessTaskApp

    starts, stops = [], []
    port = pick_free_port()
    for _ in range(cycles):
        ta = InProcessTaskApp(
            app=app, tunnel_mode="local", port=port, serve_on="thread", api_key="bench"
        )
        t0 = time.perf_counter()
        ta.start()
        starts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ta.stop()
        stops.append(wait_port_free(port, t0))
    return starts, stops


def bench_loop(app: Any, cycles: int) -> tuple[list[float], list[float]]:
    from taskapp_notebook import InProcessTaskApp

    starts: list[float] = []
    stops: list[float] = []
    port = pick_free_port()

    async def main() -> None:
        for _ in range(cycles):
            ta = InProcessTaskApp(
                app=app, tunnel_mode="local", port=port, serve_on="loop", api_key="bench"
            )
            t0 = time.perf_counter()
            await ta.astart()
            starts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await ta.astop()
            stops.append(wait_port_free(port, t0))

    asyncio.run(main())
    return starts, stops


def bench_baseline(app: Any, cycles: int) -> tuple[list[float], list[float]]:
    """The SDK's way: uvicorn.Server.run in a thread, /health polled every 200 ms."""
    import httpx
    import uvicorn

    starts, stops = [], []
    port = pick_free_port()
    for _ in range(cycles):
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        t0 = time.perf_counter()
        thread.start()
        with httpx.Client(trust_env=False) as client:
            while True:
                time.sleep(0.2)
                try:
                    if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
        starts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        server.should_exit = True
        thread.join()
        stops.append(wait_port_free(port, t0))
    return starts, stops


def bench_import(module: str, runs: int) -> list[float]:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    out = []
    for _ in range(runs):
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        out.append(float(result.stdout.strip()))
    return out


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} ms"


def ratio(values: list[float], baseline: list[float]) -> str:
    return f"{statistics.median(baseline) / statistics.median(values):.0f}× faster"


def table(cycles: int) -> str:
    app = make_app()
    bench_thread(app, 2)  # warm imports and code paths
    results: dict[str, tuple[list[float], list[float]]] = {}
    runs: list[tuple[str, Callable[[Any, int], tuple[list[float], list[float]]]]] = [
        ("baseline: uvicorn.run in a thread + 200 ms poll (SDK's way)", bench_baseline),
        ('InProcessTaskApp serve_on="thread"', bench_thread),
        ('InProcessTaskApp serve_on="loop"', bench_loop),
    ]
    for label, fn in runs:
        results[label] = fn(app, cycles)
    base_start, base_stop = results[runs[0][0]]
    lines = [
        f'Medians of {cycles} cycles, `tunnel_mode="local"`, on the 2-core development '
        "machine (shared and noisy: read the ratios).",
        "",
        "| what | start → healthy | stop → port free |",
        "|---|---|---|",
    ]
    for label, (starts, stops) in results.items():
        if label == runs[0][0]:
            lines.append(f"| {label} | {ms(starts)} | {ms(stops)} |")
        else:
            lines.append(
                f"| {label} | {ms(starts)} ({ratio(starts, base_start)}) "
                f"| {ms(stops)} ({ratio(stops, base_stop)}) |"
            )
    imports = max(10, cycles // 2)
    ours = bench_import("taskapp_notebook", imports)
    heavy = bench_import("fastapi, uvicorn", imports)
    lines += [
        "",
        f"| import (median of {imports} fresh interpreters) | time |",
        "|---|---|",
        f"| `import taskapp_notebook` | {ms(ours)} |",
        f"| `import fastapi, uvicorn` (what a non-lazy package would pay) | {ms(heavy)} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    text = table(args.cycles)
    print(text)
    if args.write_readme:
        write_readme_table("lifecycle", text)


if __name__ == "__main__":
    main()
