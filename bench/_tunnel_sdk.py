"""Child of ``bench/tunnel.py``: the same echo app behind synth-ai 0.9.11's compiled agent.

Runs under ``.venv-sdk/bin/python`` (``scripts/sdk-venv``). uvicorn serves the echo app of
``bench/_common.py`` in a thread (with httptools, as our servers: ``scripts/sdk-venv``
installs it), on a socket created with ``IPPROTO_TCP`` (else asyncio
leaves Nagle on for accepted connections: docs/synthtunnel-protocol.md, transport facts);
the SDK's own code path then opens the tunnel (``TunneledContainer.create``, lease POSTed by
its client, Rust agent from ``synth_ai_py``). Prints ``{"url", "worker_token",
"local_url"}``, runs until stdin closes, then closes the tunnel as the SDK does.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time

import uvicorn
from _common import echo_app


def serve_app() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(echo_app(), log_config=None, access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    port: int = sock.getsockname()[1]
    return port


async def main() -> None:
    from synth_ai.core.tunnels import TunnelBackend, TunneledContainer

    port = serve_app()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    threading.Thread(
        target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(done.set)), daemon=True
    ).start()
    tunnel = await TunneledContainer.create(
        local_port=port,
        backend=TunnelBackend.SynthTunnel,
        api_key=os.environ["SYNTH_API_KEY"],
        backend_url=os.environ["SYNTH_BACKEND_URL"],
        env_api_key="bench-local-key",
        verify_dns=False,
    )
    print(
        json.dumps(
            {
                "url": tunnel.url,
                "worker_token": tunnel.worker_token,
                "local_url": f"http://127.0.0.1:{port}",
            }
        ),
        flush=True,
    )
    await done.wait()
    await tunnel.close_async()


if __name__ == "__main__":
    asyncio.run(main())
