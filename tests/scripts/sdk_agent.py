"""Expose a local port through a SynthTunnel relay with the real synth-ai SDK (0.9.11).

Runs under ``.venv-sdk/bin/python`` (made by ``scripts/sdk-venv``), never under our venv.
It takes the SDK's own code path, ``TunneledContainer.create(backend=SynthTunnel)``: the
lease is POSTed by ``synth_ai.core.tunnels.synth_tunnel.SynthTunnelClient`` and the
compiled Rust agent (``synth_ai_py.synth_tunnel_start``) connects to ``agent_connect.url``;
the SDK then polls ``GET <public_url>/health`` with the worker token until it answers 200.

Usage: ``sdk_agent.py PORT`` with ``SYNTH_BACKEND_URL`` and ``SYNTH_API_KEY`` set.
Prints one JSON line ``{"url", "worker_token", "lease_id", "up_s"}`` on stdout once the
tunnel is up, then waits until stdin is closed or SIGTERM/SIGINT arrives, closes the tunnel
(agent stopped, lease DELETEd, as ``TunneledContainer.close_async`` does) and prints
``{"closed": true, "close_s": ...}``. Errors go to stderr with exit status 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time


async def main(port: int) -> int:
    from synth_ai.core.tunnels import TunnelBackend, TunneledContainer

    backend_url = os.environ["SYNTH_BACKEND_URL"]
    api_key = os.environ["SYNTH_API_KEY"]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def wait_stdin() -> None:
        sys.stdin.read()  # returns at EOF: the parent closed our stdin
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_stdin, name="stdin-eof", daemon=True).start()

    t0 = time.perf_counter()
    tunnel = await TunneledContainer.create(
        local_port=port,
        backend=TunnelBackend.SynthTunnel,
        api_key=api_key,
        backend_url=backend_url,
        # Only used to pick the local key; the 0.9.11 agent injects none (protocol doc §4).
        # Passing one keeps the SDK from generating and storing a key of its own.
        env_api_key="sdk-interop-local-key",
        verify_dns=False,
    )
    up_s = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "url": tunnel.url,
                "worker_token": tunnel.worker_token,
                "lease_id": tunnel._lease_id,
                "up_s": up_s,
            }
        ),
        flush=True,
    )
    await stop.wait()
    t1 = time.perf_counter()
    await tunnel.close_async()
    print(json.dumps({"closed": True, "close_s": time.perf_counter() - t1}), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: sdk_agent.py PORT", file=sys.stderr)
        sys.exit(2)
    try:
        code = asyncio.run(main(int(sys.argv[1])))
    except Exception as exc:  # one readable line for the test's failure message
        print(f"sdk_agent: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        code = 1
    sys.exit(code)
