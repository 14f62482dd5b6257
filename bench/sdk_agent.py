"""Latency through our relay: the real synth-ai SDK agent (0.9.11) vs our agent, same app.

Everything on loopback, one run: ``taskapp-relay`` in a thread; one task app served by
``InProcessTaskApp(tunnel_mode="synthtunnel")`` (so our agent exposes it); the SDK's
compiled agent exposes the same app's port from ``.venv-sdk`` (``scripts/sdk-venv``) via
``tests/scripts/sdk_agent.py``. Rows: direct to the port (baseline), our agent, the SDK's
agent, and the SDK's agent on a relay connection without the immediate-ACK fix (the SDK's
agent keeps Nagle on; see ``taskapp_notebook/relay/endpoint.py``).

    python bench/sdk_agent.py [--requests 300] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _common import echo_app, write_table

from taskapp_notebook import InProcessTaskApp
from taskapp_notebook.relay import RelayServer
from taskapp_notebook.relay import endpoint as relay_endpoint

ROOT = Path(__file__).resolve().parent.parent
SDK_PYTHON = ROOT / ".venv-sdk" / "bin" / "python"
DRIVER = ROOT / "tests" / "scripts" / "sdk_agent.py"
MIB = 1024 * 1024


def start_sdk(
    relay: RelayServer, port: int, home: str
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    env = dict(os.environ, SYNTH_BACKEND_URL=relay.url, SYNTH_API_KEY=relay.api_key, HOME=home)
    proc = subprocess.Popen(
        [str(SDK_PYTHON), str(DRIVER), str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"the SDK driver failed (exit {proc.wait()})")
    return proc, json.loads(line)


def stop_sdk(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(30)


def measure(client: httpx.Client, url: str, headers: dict[str, str], n: int) -> dict[str, float]:
    for _ in range(5):  # warm the connection
        client.get(f"{url}/health", headers=headers).raise_for_status()
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.get(f"{url}/health", headers=headers).raise_for_status()
        lat.append(time.perf_counter() - t0)
    body = os.urandom(MIB)
    echo = []
    for _ in range(10):
        t0 = time.perf_counter()
        r = client.post(f"{url}/echo", headers=headers, content=body)
        echo.append(time.perf_counter() - t0)
        assert r.status_code == 200 and r.content == body
    return {"health_ms": statistics.median(lat) * 1000, "echo_ms": statistics.median(echo) * 1000}


def run(n: int) -> str:
    if not SDK_PYTHON.exists():
        raise SystemExit("no .venv-sdk: run scripts/sdk-venv first")
    rows: list[tuple[str, dict[str, float]]] = []
    with RelayServer(api_keys=["bench-key"]) as relay, tempfile.TemporaryDirectory() as home:
        os.environ["SYNTH_BACKEND_URL"] = relay.url
        os.environ["SYNTH_API_KEY"] = relay.api_key
        app = InProcessTaskApp(app=echo_app(), tunnel_mode="synthtunnel", serve_on="thread")
        app.start()
        try:
            with httpx.Client(timeout=60, trust_env=False) as client:
                rows.append(("direct to 127.0.0.1 (baseline)",
                             measure(client, f"http://127.0.0.1:{app.port}", {}, n)))
                assert app.url and app.task_app_worker_token
                ours = {"Authorization": f"Bearer {app.task_app_worker_token}"}
                rows.append(("our relay + our agent", measure(client, app.url, ours, n)))
                proc, info = start_sdk(relay, app.port, home)
                try:
                    sdk = {"Authorization": f"Bearer {info['worker_token']}"}
                    rows.append(("our relay + SDK 0.9.11 agent",
                                 measure(client, info["url"], sdk, n)))
                finally:
                    stop_sdk(proc)
                saved = relay_endpoint.TCP_QUICKACK
                relay_endpoint.TCP_QUICKACK = None  # new agent sockets: delayed ACKs again
                try:
                    proc, info = start_sdk(relay, app.port, home)
                finally:
                    relay_endpoint.TCP_QUICKACK = saved
                try:
                    sdk = {"Authorization": f"Bearer {info['worker_token']}"}
                    rows.append(("SDK agent, relay without immediate ACKs",
                                 measure(client, info["url"], sdk, n)))
                finally:
                    stop_sdk(proc)
        finally:
            app.stop()
    base = rows[0][1]["health_ms"]
    lines = [
        f"Loopback, median of {n} sequential `GET /health`; a 1 MiB POST echoed back "
        "(median of 10). Same app and relay for every row, one run.",
        "",
        "| path | GET /health | 1 MiB echo |",
        "|---|---|---|",
    ]
    for name, m in rows:
        ratio = m["health_ms"] / base
        lines.append(f"| {name} | {m['health_ms']:.2f} ms ({ratio:.1f}× baseline) "
                     f"| {m['echo_ms']:.1f} ms |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="SDK agent vs our agent through our relay")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    text = run(args.requests)
    print(text)
    sys.stdout.flush()
    if args.write_docs:
        write_table("sdk", text)


if __name__ == "__main__":
    main()
