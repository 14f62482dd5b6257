"""Tunnel benchmark: request latency and body throughput, direct vs through SynthTunnel.

Everything runs on loopback: ``taskapp-relay`` in a thread, the task app with our agent
(``tunnel_mode="synthtunnel"``) on another. The baseline, measured in the same run, is the
same request sent straight to the app's local port.

    python bench/tunnel.py [--requests 200] [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

from _common import echo_app, write_table

MIB = 1024 * 1024


async def latencies(client: Any, url: str, headers: dict[str, str], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        response = await client.get(f"{url}/health", headers=headers)
        out.append(time.perf_counter() - t0)
        response.raise_for_status()
    return out


async def concurrent(client: Any, url: str, headers: dict[str, str], n: int) -> float:
    """Requests per second with 16 in flight."""
    sem = asyncio.Semaphore(16)

    async def one() -> None:
        async with sem:
            (await client.get(f"{url}/health", headers=headers)).raise_for_status()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - t0)


async def throughput(client: Any, url: str, headers: dict[str, str], mib: int, n: int) -> float:
    """MiB/s for a ``mib``-MiB POST echoed back (both directions counted once)."""
    body = os.urandom(mib * MIB)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        response = await client.post(f"{url}/echo", content=body, headers=headers)
        times.append(time.perf_counter() - t0)
        assert response.content == body
    return mib / statistics.median(times)


async def run(requests: int) -> str:
    import httpx

    from taskapp_notebook import InProcessTaskApp
    from taskapp_notebook.relay import RelayServer

    rows = []
    with RelayServer() as relay:
        os.environ["SYNTH_BACKEND_URL"] = relay.url
        os.environ["SYNTH_API_KEY"] = relay.api_key
        task = InProcessTaskApp(app=echo_app(), serve_on="thread", api_key="bench-key")
        async with task:
            assert task.url and task.task_app_worker_token
            direct_headers = {"X-API-Key": "bench-key"}
            tunnel_headers = {"Authorization": f"Bearer {task.task_app_worker_token}"}
            async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
                await latencies(client, task.local_url, direct_headers, 20)  # warm up
                await latencies(client, task.url, tunnel_headers, 20)
                for label, url, headers in (
                    ("direct to 127.0.0.1 (baseline)", task.local_url, direct_headers),
                    ("through SynthTunnel (relay + agent)", task.url, tunnel_headers),
                ):
                    lat = await latencies(client, url, headers, requests)
                    rps = await concurrent(client, url, headers, requests)
                    mbs = await throughput(client, url, headers, 8, 5)
                    rows.append((label, statistics.median(lat) * 1000, rps, mbs))
    base = rows[0]
    lines = [
        f"Loopback, median of {requests} sequential `GET /health`; {requests} requests with 16 "
        "in flight; an 8 MiB POST echoed back (median of 5).",
        "",
        "| path | latency | requests/s (16 in flight) | 8 MiB echo |",
        "|---|---|---|---|",
    ]
    for label, lat, rps, mbs in rows:
        extra = "" if label == base[0] else f" ({lat / base[1]:.1f}× baseline)"
        lines.append(f"| {label} | {lat:.2f} ms{extra} | {rps:.0f} | {mbs:.0f} MiB/s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="SynthTunnel latency/throughput benchmark")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    text = asyncio.run(run(args.requests))
    print(text)
    if args.write_docs:
        write_table("tunnel", text)


if __name__ == "__main__":
    main()
