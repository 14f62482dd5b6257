"""A script that runs an InProcessTaskApp until a signal arrives (test helper).

Usage::

    python signal_app.py thread|loop PORT

Prints ``ready`` once the app serves, then ``handlers SIGINT=<h> SIGTERM=<h>`` (``ours``,
``ignored``, ``default`` or ``other``), then waits forever. Every cleanup step it reaches
prints one line ``cleanup <where> state=<state> port_free=<bool>`` (``where`` is ``with``
for the with-block's exit path, ``finally`` for the outermost ``finally``), and
``lifespan shutdown`` when the app's shutdown hook ran; a KeyboardInterrupt prints
``KeyboardInterrupt`` and is re-raised.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from taskapp_notebook import InProcessTaskApp


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    print("lifespan shutdown", flush=True)


app = FastAPI(lifespan=lifespan)


@app.get("/health")
def health() -> dict[str, bool]:
    return {"ok": True}


def report(where: str, task_app: InProcessTaskApp) -> None:
    print(
        f"cleanup {where} state={task_app.state} port_free={port_is_free(task_app.port)}",
        flush=True,
    )


def describe_handler(sig: signal.Signals) -> str:
    from taskapp_notebook import registry

    handler = signal.getsignal(sig)
    if handler is registry._handle_signal:
        return "ours"
    if handler == signal.SIG_IGN:
        return "ignored"
    if handler in (signal.SIG_DFL, signal.default_int_handler):
        return "default"
    return "other"


def announce() -> None:
    print("ready", flush=True)
    print(
        f"handlers SIGINT={describe_handler(signal.SIGINT)} "
        f"SIGTERM={describe_handler(signal.SIGTERM)}",
        flush=True,
    )


def run_thread(port: int, task_app: InProcessTaskApp) -> None:
    try:
        with task_app:
            announce()
            while True:
                time.sleep(3600)
    finally:
        report("with", task_app)


async def run_loop(port: int, task_app: InProcessTaskApp) -> None:
    try:
        async with task_app:
            announce()
            await asyncio.Event().wait()
    finally:
        report("with", task_app)


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    task_app = InProcessTaskApp(
        app=app,
        port=port,
        tunnel_mode="local",
        serve_on=mode,  # type: ignore[arg-type]
        auto_find_port=False,
    )
    try:
        if mode == "thread":
            run_thread(port, task_app)
        else:
            asyncio.run(run_loop(port, task_app))
    except KeyboardInterrupt:
        print("KeyboardInterrupt", flush=True)
        raise
    finally:
        report("finally", task_app)


if __name__ == "__main__":
    main()
