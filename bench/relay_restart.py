"""Relay restart benchmark: time from the relay being back to the first successful call
through the OLD public URL with the OLD worker token.

A ``taskapp-relay --state FILE`` child process; an ``InProcessTaskApp`` (our SynthTunnel
agent) in this process. Each run stops the relay (SIGTERM, or SIGKILL with ``--kill``),
starts it again on the same port and state file, and measures:

* relay down → relay back: the child's startup (``/health`` answers);
* relay back → old URL works: our agent's reconnect (its backoff: 0.25, 0.5, 1, 2, 4, 5 s)
  and ATTACH to the lease the relay restored;
* whether the URL, worker token and lease id stayed the same (they must).

Baseline in the same run: a relay without ``--state`` (memory only), where the old URL
never works again (410/404) and the agent has to take a new lease.

    python bench/relay_restart.py [--runs 7] [--kill]

Prints a Markdown table of medians. Loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from taskapp_notebook import InProcessTaskApp
from taskapp_notebook.ports import pick_free_port

KEY = "bench-relay-key"


def start_relay(port: int, state: Path | None) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "taskapp_notebook.relay", "--port", str(port),
            "--log-level", "WARNING"]
    if state is not None:
        args += ["--state", str(state)]
    env = {**os.environ, "TASKAPP_RELAY_API_KEYS": KEY}
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_health(port: int, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False,
                         timeout=1).status_code == 200:
                return time.monotonic()
        if time.monotonic() > deadline:
            raise SystemExit("the relay did not come back")
        time.sleep(0.005)


def stop(proc: subprocess.Popen[bytes], kill: bool) -> None:
    proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    proc.wait(15)


def run(runs: int, kill: bool, persistent: bool) -> dict[str, object]:
    port = pick_free_port("127.0.0.1")
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "relay.sqlite3" if persistent else None
        proc = start_relay(port, state)
        wait_health(port)
        os.environ["SYNTH_BACKEND_URL"] = f"http://127.0.0.1:{port}"
        os.environ["SYNTH_API_KEY"] = KEY
        from fastapi import FastAPI

        app_def = FastAPI()

        @app_def.get("/health")
        async def health() -> dict[str, bool]:
            return {"healthy": True}

        app = InProcessTaskApp(app=app_def, serve_on="thread", port=pick_free_port("127.0.0.1"))
        app.start()
        url, token = app.url, app.task_app_worker_token
        headers = {"Authorization": f"Bearer {token}"}
        startups: list[float] = []
        recoveries: list[float] = []
        same = 0
        try:
            for _ in range(runs):
                stop(proc, kill)
                down = time.monotonic()
                proc = start_relay(port, state)
                back = wait_health(port)
                startups.append(back - down)
                deadline = back + 30
                while time.monotonic() < deadline:
                    try:
                        r = httpx.get(f"{url}/health", headers=headers, trust_env=False,
                                      timeout=5)
                    except httpx.TransportError:
                        r = None
                    if r is not None and r.status_code == 200:
                        recoveries.append(time.monotonic() - back)
                        break
                    if r is not None and r.status_code in (404, 410):
                        break  # the old URL is gone for good
                    time.sleep(0.005)
                if not persistent:
                    # The agent is refused (401), takes a new lease: a new URL and token.
                    deadline = time.monotonic() + 30
                    while app.url == url and time.monotonic() < deadline:
                        time.sleep(0.01)
                same += app.url == url and app.task_app_worker_token == token
                url, token = app.url, app.task_app_worker_token
                headers = {"Authorization": f"Bearer {token}"}
        finally:
            app.stop()
            proc.terminate()
            proc.wait(15)
    return {"startups": startups, "recoveries": recoveries, "same": same, "runs": runs}


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} ms" if values else "never"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--kill", action="store_true", help="SIGKILL the relay, not SIGTERM")
    args = parser.parse_args()
    # The baseline's agent retires leases of relays this bench kills: expected warnings.
    logging.basicConfig(level=logging.ERROR)
    how = "SIGKILL" if args.kill else "SIGTERM"
    print(f"Relay restart ({how}), {args.runs} runs, medians. Loopback.\n")
    print("| relay | down → back (startup) | back → old URL answers 200 | "
          "old URL + token kept |")
    print("|---|---|---|---|")
    for persistent in (False, True):
        res = run(args.runs, args.kill, persistent)
        startups, recoveries = res["startups"], res["recoveries"]
        assert isinstance(startups, list) and isinstance(recoveries, list)
        label = "`--state FILE`" if persistent else "memory only (baseline)"
        extra = "" if not recoveries else f" (min {min(recoveries) * 1000:.0f}, " \
            f"max {max(recoveries) * 1000:.0f})"
        print(f"| {label} | {fmt(startups)} | {fmt(recoveries)}{extra} | "
              f"{res['same']}/{res['runs']} |")


if __name__ == "__main__":
    main()
