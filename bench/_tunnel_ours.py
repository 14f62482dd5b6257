"""Child of ``bench/tunnel.py``: the echo app behind OUR agent, in a process of its own.

``InProcessTaskApp(tunnel_mode="synthtunnel", serve_on="loop")``: app and agent share this
process's event loop, as in a notebook kernel. Needs ``SYNTH_BACKEND_URL`` and
``SYNTH_API_KEY``. Prints ``{"url", "worker_token", "local_url"}`` once serving, then runs
until stdin closes. ``BENCH_PROFILE=<file>`` writes a cProfile of the serving phase there;
``BENCH_JSON_BODIES=1`` keeps the agent from offering binary body frames (the path it takes
with a relay that does not agree, such as Synth's).
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import os
import sys
import threading

from _common import echo_app

from taskapp_notebook import InProcessTaskApp
from taskapp_notebook.ports import pick_free_port


async def main() -> None:
    if os.environ.get("BENCH_JSON_BODIES") == "1":
        from taskapp_notebook.tunnels.synthtunnel import attach

        attach.OFFER_BINARY_BODIES = False
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    threading.Thread(
        target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(done.set)), daemon=True
    ).start()
    app = InProcessTaskApp(
        app=echo_app(), port=pick_free_port(), tunnel_mode="synthtunnel", serve_on="loop"
    )
    await app.astart()
    print(
        json.dumps(
            {"url": app.url, "worker_token": app.task_app_worker_token, "local_url": app.local_url}
        ),
        flush=True,
    )
    profile_path = os.environ.get("BENCH_PROFILE")
    profiler = cProfile.Profile() if profile_path else None
    if profiler is not None:
        profiler.enable()
    await done.wait()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile_path)
    await app.astop()


if __name__ == "__main__":
    asyncio.run(main())
