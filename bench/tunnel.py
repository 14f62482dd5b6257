"""SynthTunnel speed, deployed as people deploy it: four processes on loopback, one run.

1. the relay, ``taskapp-relay`` (as a team hosts it);
2. the echo app of ``_common.py`` behind OUR agent (``_tunnel_ours.py``:
   ``InProcessTaskApp(tunnel_mode="synthtunnel")``, app and agent on one loop);
3. the same echo app behind synth-ai 0.9.11's compiled agent (``_tunnel_sdk.py``, run by
   ``.venv-sdk/bin/python`` from ``scripts/sdk-venv``): the BASELINE;
4. this process, the client, one keep-alive pool per path: ``--client httpx`` (default: a
   typical Python caller, as the issue measured) or ``--client raw`` (the plain HTTP/1.1
   client our agent uses, ``local_http``: ~10× cheaper per request, so the servers, not the
   client, set the pace at 16 in flight).

For each path — straight to each app's port, through the relay to our agent, through the
relay to the SDK's agent — it measures sequential ``GET /health`` latency, requests/s with
16 in flight, and 1 MiB and 8 MiB POSTs echoed back. Paths are measured in turn, round after
round, and each figure is the median over rounds (the machine is shared: read the ratios,
which come from the same rounds).

    python bench/tunnel.py [--rounds 5] [--requests 200]
                           [--profile-ours FILE] [--profile-relay FILE] [--only-ours]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import httpx

from taskapp_notebook.tunnels.synthtunnel.local_http import LocalHTTP

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = Path(sys.executable)
SDK_PYTHON = ROOT / ".venv-sdk" / "bin" / "python"
RELAY = PYTHON.parent / "taskapp-relay"
KEY = "bench-relay-key"
MIB = 1024 * 1024


@dataclass
class Path_:
    label: str
    url: str
    headers: dict[str, str]
    figures: dict[str, list[float]] = field(default_factory=dict)

    raw: bool = False

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        assert parts.hostname and parts.port
        self.client = LocalHTTP(parts.hostname, parts.port)
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
        self.httpx = httpx.AsyncClient(trust_env=False, timeout=120, limits=limits)
        self.prefix = parts.path.rstrip("/").encode()
        self.raw_headers = [(k.encode(), v.encode()) for k, v in self.headers.items()]

    async def call(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if not self.raw:
            r = await self.httpx.request(
                method, self.url + path, content=body or None, headers=self.headers
            )
            return r.status_code, r.content
        response = await self.client.request(
            method, self.prefix + path.encode(), self.raw_headers, body
        )
        try:
            data = b"".join([chunk async for chunk in response.body()])
        finally:
            await response.aclose()
        return response.status, data

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.httpx.aclose()

    def add(self, name: str, value: float) -> None:
        self.figures.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        return statistics.median(self.figures[name])


def _line(stream: IO[str], proc: subprocess.Popen[str], what: str) -> str:
    line = stream.readline()
    if not line:
        raise SystemExit(f"{what} exited (status {proc.wait()}) before it was ready")
    return line


def start_relay(port: int, profile: str | None, loop: str = "auto") -> subprocess.Popen[str]:
    command = [str(PYTHON), "-m", "cProfile", "-o", profile, "-m", "taskapp_notebook.relay"]
    proc = subprocess.Popen(
        [
            *(command if profile else [str(RELAY)]),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--api-key",
            KEY,
            "--loop",
            loop,
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    _line(proc.stdout, proc, "taskapp-relay")  # "taskapp-relay serving on ..."
    return proc


def start_child(python: Path, script: str, env: dict[str, str]) -> tuple[Any, dict[str, Any]]:
    proc = subprocess.Popen(
        [str(python), str(BENCH / script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=BENCH,
        text=True,
    )
    assert proc.stdout is not None
    return proc, json.loads(_line(proc.stdout, proc, script))


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
    else:
        proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def sequential(p: Path_, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        status, _ = await p.call("GET", "/health")
        times.append(time.perf_counter() - t0)
        assert status == 200, (p.label, status)
    return statistics.median(times) * 1000


async def in_flight(p: Path_, n: int, width: int = 16) -> float:
    sem = asyncio.Semaphore(width)

    async def one() -> None:
        async with sem:
            status, _ = await p.call("GET", "/health")
            assert status == 200, (p.label, status)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - t0)


async def echo(p: Path_, body: bytes, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        status, data = await p.call("POST", "/echo", body)
        times.append(time.perf_counter() - t0)
        if status != 200 or data != body:
            raise SystemExit(f"{p.label}: echo came back wrong ({status})")
    return statistics.median(times) * 1000


async def measure(paths: list[Path_], rounds: int, requests: int) -> None:
    one, eight = os.urandom(MIB), os.urandom(8 * MIB)
    try:
        for p in paths:  # warm up every connection pool and both agents
            await in_flight(p, 64)
            await echo(p, one, 1)
        for r in range(rounds):
            # Metric by metric, path after path: the paths compared are measured seconds
            # apart, under the same load.
            for p in paths:
                p.add("latency_ms", await sequential(p, requests))
            for p in paths:
                p.add("rps", await in_flight(p, requests * 2))
            for p in paths:
                p.add("echo1_ms", await echo(p, one, 5))
            for p in paths:
                p.add("echo8_ms", await echo(p, eight, 3))
            print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    finally:
        for p in paths:
            await p.aclose()


def table(paths: list[Path_], rounds: int, requests: int, client: str) -> str:
    by = {p.label: p for p in paths}
    sdk = by["through the relay, SDK 0.9.11 agent (baseline)"]
    direct = by["direct to our app"]
    lines = [
        f"Loopback, 4 processes (relay, our app + agent, the same app + the SDK's compiled "
        f"agent, client: {client}), one run: medians over {rounds} rounds of {requests} sequential "
        f"`GET /health`, {2 * requests} `GET /health` with 16 in flight, 5 × 1 MiB and "
        "3 × 8 MiB `POST /echo` (body sent and echoed back). Ratios: against the SDK's "
        "agent (tunnel rows) and against direct (req/s).",
        "",
        "| path | latency | requests/s, 16 in flight | 1 MiB echo | 8 MiB echo |",
        "|---|---|---|---|---|",
    ]
    for p in paths:
        lat, rps = p.median("latency_ms"), p.median("rps")
        e1, e8 = p.median("echo1_ms"), p.median("echo8_ms")
        if p.label.startswith("through"):
            cells = [
                f"{lat:.2f} ms ({sdk.median('latency_ms') / lat:.2f}× SDK speed)",
                f"{rps:.0f} ({rps / sdk.median('rps'):.2f}× SDK, "
                f"{rps / direct.median('rps'):.2f}× direct)",
                f"{e1:.1f} ms ({sdk.median('echo1_ms') / e1:.2f}× SDK speed)",
                f"{e8:.1f} ms ({sdk.median('echo8_ms') / e8:.2f}× SDK speed)",
            ]
        else:
            cells = [f"{lat:.2f} ms", f"{rps:.0f}", f"{e1:.1f} ms", f"{e8:.1f} ms"]
        lines.append(f"| {p.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="SynthTunnel: our agent vs the SDK's")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--profile-ours", help="write a cProfile of our agent's process here")
    parser.add_argument("--profile-relay", help="write a cProfile of the relay's process here")
    parser.add_argument(
        "--relay-loop",
        default="auto",
        choices=["auto", "asyncio", "uvloop"],
        help="the relay's event loop (auto: uvloop when installed)",
    )
    parser.add_argument("--client", default="httpx", choices=["httpx", "raw"])
    parser.add_argument(
        "--json-bodies",
        action="store_true",
        help="our agent keeps to JSON body frames (as with a relay that does not agree)",
    )
    parser.add_argument("--only-ours", action="store_true", help="skip the SDK's agent")
    parser.add_argument("--write-docs", action="store_true",
                        help="replace the httpx table in docs/performance.md")
    args = parser.parse_args()
    if not SDK_PYTHON.exists() and not args.only_ours:
        raise SystemExit("no .venv-sdk: run scripts/sdk-venv first (the SDK is the baseline)")
    from taskapp_notebook.ports import pick_free_port

    relay_port = pick_free_port()
    relay = start_relay(relay_port, args.profile_relay, args.relay_loop)
    children = []
    with tempfile.TemporaryDirectory() as home:
        env = dict(
            os.environ,
            SYNTH_BACKEND_URL=f"http://127.0.0.1:{relay_port}",
            SYNTH_API_KEY=KEY,
            HOME=home,
            PYTHONPATH=str(BENCH),
        )
        env.pop("BENCH_PROFILE", None)
        if args.json_bodies:
            env["BENCH_JSON_BODIES"] = "1"
        try:
            ours_env = dict(
                env, **({"BENCH_PROFILE": args.profile_ours} if args.profile_ours else {})
            )
            proc, ours = start_child(PYTHON, "_tunnel_ours.py", ours_env)
            children.append(proc)
            paths = [
                Path_("direct to our app", ours["local_url"], {}),
                Path_(
                    "through the relay, our agent",
                    ours["url"],
                    {"Authorization": f"Bearer {ours['worker_token']}"},
                ),
            ]
            if not args.only_ours:
                proc, sdk = start_child(SDK_PYTHON, "_tunnel_sdk.py", env)
                children.append(proc)
                paths[1:1] = [Path_("direct to the SDK process's app", sdk["local_url"], {})]
                paths.append(
                    Path_(
                        "through the relay, SDK 0.9.11 agent (baseline)",
                        sdk["url"],
                        {"Authorization": f"Bearer {sdk['worker_token']}"},
                    )
                )
            for p in paths:
                p.raw = args.client == "raw"
            asyncio.run(measure(paths, args.rounds, args.requests))
        finally:
            for proc in children:
                stop(proc)
            relay.terminate()
            relay.wait(30)
    if args.only_ours:
        for p in paths:
            print(p.label, {k: round(p.median(k), 2) for k in p.figures})
    else:
        text = table(paths, args.rounds, args.requests, args.client)
        print(text)
        if args.write_docs:
            from _common import write_table

            write_table("tunnel", text)


if __name__ == "__main__":
    main()
