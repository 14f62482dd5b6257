"""A stand-in for a Jupyter kernel: opens a QuickTunnel on the FAKE cloudflared, then waits.

Prints ``{"child_pid": ...}`` once open, ``sigint`` for each SIGINT it gets (it survives
them, as ipykernel does), and closes the tunnel when a line arrives on stdin.
``--no-pdeathsig`` disables the parent-death signal (the negative control);
``--exit-without-close`` returns right after opening, leaving the child to our atexit hook.
Tests OUR process handling only; no tunnel is involved.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from types import FrameType

from taskapp_notebook.tunnels import process
from taskapp_notebook.tunnels.base import TunnelContext
from taskapp_notebook.tunnels.cloudflare import QuickTunnel


def on_sigint(signum: int, frame: FrameType | None) -> None:
    print("sigint", flush=True)


async def main() -> None:
    if "--no-pdeathsig" in sys.argv:
        process.parent_death_preexec = lambda sig=signal.SIGTERM: None
    tunnel = QuickTunnel(timeout=20)
    await tunnel.open(TunnelContext(local_host="127.0.0.1", local_port=9, api_key="k"))
    assert tunnel.process is not None
    signal.signal(signal.SIGINT, on_sigint)
    print(json.dumps({"child_pid": tunnel.process.pid}), flush=True)
    if "--exit-without-close" in sys.argv:
        return
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await tunnel.close()
    print("closed", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
