"""Stop-grace benchmark: stop with stuck handlers, and a start whose ``/health`` hangs.

For each case, the median over ``--runs`` of: how long ``stop()`` (or the failed
``start()``) took, and when the port was free, counted from the call. Two handlers are
stuck (one in ``await asyncio.sleep(3600)``, one looping on ``await asyncio.sleep(0)``);
the baseline, measured in the same run, is the stop of an idle app.

    python bench/stop_grace.py [--runs 5] [--write-docs]

Run it against an older checkout (``PYTHONPATH=old/``) for the numbers before the grace
existed: the script passes ``stop_grace`` only when ``InProcessTaskApp`` takes it.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import socket
import statistics
import threading
import time
from typing import Any

from _common import write_table
from fastapi import FastAPI

from taskapp_notebook import InProcessTaskApp
from taskapp_notebook.errors import StartError
from taskapp_notebook.ports import is_port_free, pick_free_port

HAS_GRACE = "stop_grace" in inspect.signature(InProcessTaskApp).parameters


def make_app(in_handler: threading.Semaphore, *, health_hangs: bool = False) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, bool]:
        if health_hangs:
            await asyncio.sleep(3600)
        return {"healthy": True}

    @app.get("/sleep")
    async def sleep_forever() -> None:
        in_handler.release()
        await asyncio.sleep(3600)

    @app.get("/spin")
    async def spin_forever() -> None:
        in_handler.release()
        while True:
            await asyncio.sleep(0)

    return app


def call(port: int, path: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: k\r\n\r\n".encode())
        while conn.recv(65536):
            pass


def timed(action: Any, port: int) -> tuple[float, float]:
    """Seconds ``action()`` took and seconds until ``port`` was free, from the call."""
    freed: list[float] = []
    started = time.perf_counter()

    def watch() -> None:
        while not is_port_free(port):
            time.sleep(0.0002)
        freed.append(time.perf_counter() - started)

    watcher = threading.Thread(target=watch)
    watcher.start()
    action()
    took = time.perf_counter() - started
    watcher.join(30)
    return took, freed[0]


def one_stop(stuck: int, grace: float | None) -> tuple[float, float]:
    in_handler = threading.Semaphore(0)
    port = pick_free_port("127.0.0.1")
    extra = {"stop_grace": grace} if HAS_GRACE and grace is not None else {}
    app = InProcessTaskApp(app=make_app(in_handler), tunnel_mode="local", serve_on="thread",
                           port=port, api_key="k", **extra)
    app.start()
    callers = [threading.Thread(target=call, args=(port, path))
               for path in ("/sleep", "/spin")[:stuck]]
    for caller in callers:
        caller.start()
    for _ in callers:
        in_handler.acquire(timeout=30)
    result = timed(app.stop, port)
    for caller in callers:
        caller.join(30)
    return result


def one_failed_start(timeout: float) -> tuple[float, float]:
    """Seconds until ``start()`` raised; the port column is 0 if it was free by then."""
    port = pick_free_port("127.0.0.1")
    app = InProcessTaskApp(app=make_app(threading.Semaphore(0), health_hangs=True),
                           tunnel_mode="local", serve_on="thread", port=port, api_key="k",
                           health_check_timeout=timeout)
    started = time.perf_counter()
    try:
        app.start()
    except StartError:
        pass
    took = time.perf_counter() - started
    return took, 0.0 if is_port_free(port) else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    cases: list[tuple[str, Any]] = [  # the port column of a failed start: free when it raised
        ("stop, idle app (baseline)", lambda: one_stop(0, None)),
        ("stop, 2 stuck handlers, default grace", lambda: one_stop(2, None)),
        ("stop, 2 stuck handlers, stop_grace=0.2", lambda: one_stop(2, 0.2)),
        ("failed start, /health hangs, health_check_timeout=0.3",
         lambda: one_failed_start(0.3)),
    ]
    rows = ["| case | call returns | port free |", "|---|---|---|"]
    for label, run in cases:
        took, freed = zip(*(run() for _ in range(args.runs)), strict=True)
        rows.append(f"| {label} | {statistics.median(took) * 1000:.1f} ms "
                    f"| {statistics.median(freed) * 1000:.2f} ms |")
    grace = "with stop_grace" if HAS_GRACE else "before stop_grace existed"
    table = "\n".join(rows) + (
        f"\n\nMedians of {args.runs} runs ({grace}); port free is counted from the stop call "
        "(for the failed start: 0 = free when start raised)."
    )
    print(table)
    if args.write_docs:
        write_table("stop_grace", table)


if __name__ == "__main__":
    main()
