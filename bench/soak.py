"""Soak: requests lost or corrupted through relay + agent under sustained load.

The relay runs as its own process (``taskapp-relay``, as a team deploys it); the echo app of
``_common.py`` and our agent (``InProcessTaskApp(tunnel_mode="synthtunnel")``) run in this
process on a thread; one httpx client keeps ``--inflight`` requests going, with bodies drawn
from 0 B to 1 MiB, each echoed back and compared byte for byte. Every ``--pause-every`` s the
client stops for ~5 s, the idle time at which client pools and uvicorn used to expire
keep-alive connections together (the mechanism behind the losses issue 14 reported).

    python bench/soak.py [--seconds 180] [--inflight 128]

Prints one Markdown row per run: requests, OK, lost (an error at the caller or a non-200),
wrong bodies. Loopback only; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
from collections import Counter

import httpx
from _common import echo_app

from taskapp_notebook import InProcessTaskApp
from taskapp_notebook.ports import pick_free_port

KEY = "bench-soak-relay-key"
SIZES = [0, 1, 100, 65_535, 65_536, 65_537, 300_000, 1024 * 1024]


def start_relay(port: int) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "taskapp_notebook.relay", "--port", str(port),
            "--log-level", "WARNING"]
    env = {**os.environ, "TASKAPP_RELAY_API_KEYS": KEY}
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_health(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise SystemExit("the relay did not start")


async def soak(url: str, token: str, seconds: float, inflight: int,
               pause_every: float) -> Counter[str]:
    rng = random.Random(14)
    outcome: Counter[str] = Counter()
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=inflight, max_keepalive_connections=inflight)
    end = time.monotonic() + seconds
    next_pause = time.monotonic() + pause_every
    async with httpx.AsyncClient(timeout=120, limits=limits, trust_env=False) as client:

        async def one(size: int) -> None:
            body = os.urandom(size)
            try:
                response = await client.post(f"{url}/echo", content=body, headers=headers)
            except httpx.HTTPError as exc:
                outcome[f"lost: {type(exc).__name__}"] += 1
                return
            if response.status_code != 200:
                outcome[f"lost: HTTP {response.status_code}"] += 1
            elif response.content != body:
                outcome["wrong body"] += 1
            else:
                outcome["ok"] += 1

        while time.monotonic() < end:
            batch = [asyncio.create_task(one(rng.choice(SIZES))) for _ in range(inflight)]
            await asyncio.gather(*batch)
            if time.monotonic() >= next_pause:
                await asyncio.sleep(5.0 + rng.uniform(-0.05, 0.05))
                next_pause = time.monotonic() + pause_every
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--inflight", type=int, default=128)
    parser.add_argument("--pause-every", type=float, default=20.0)
    args = parser.parse_args()
    port = pick_free_port()
    relay = start_relay(port)
    try:
        wait_health(port)
        os.environ["SYNTH_BACKEND_URL"] = f"http://127.0.0.1:{port}"
        os.environ["SYNTH_API_KEY"] = KEY
        app = InProcessTaskApp(app=echo_app(), serve_on="thread", port=pick_free_port())
        with app:
            assert app.url and app.task_app_worker_token
            started = time.monotonic()
            outcome = asyncio.run(soak(app.url, app.task_app_worker_token, args.seconds,
                                       args.inflight, args.pause_every))
            elapsed = time.monotonic() - started
    finally:
        relay.terminate()
        relay.wait(30)
    total = sum(outcome.values())
    lost = sum(n for key, n in outcome.items() if key.startswith("lost"))
    print(f"| {elapsed:.0f} s | {args.inflight} | {total} | {outcome['ok']} | {lost} | "
          f"{outcome['wrong body']} |")
    for key, n in sorted(outcome.items()):
        if key not in ("ok", "wrong body"):
            print(f"  {key}: {n}")


if __name__ == "__main__":
    main()
