"""Check that importing taskapp_notebook installs no signal handler, and that the handler
installed on the first start chains to the one that was there before (test helper).

Usage: ``python signal_chain.py PORT``. Prints one JSON object with what it saw.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from types import FrameType

mine_calls: list[int] = []


def mine(signum: int, frame: FrameType | None) -> None:
    mine_calls.append(signum)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def main() -> None:
    port = int(sys.argv[1])
    signal.signal(signal.SIGTERM, mine)
    watched = (signal.SIGTERM, signal.SIGINT)
    before = {s: signal.getsignal(s) for s in watched}

    import taskapp_notebook
    from taskapp_notebook import InProcessTaskApp, registry
    from taskapp_notebook import runner as _runner  # noqa: F401 - the heavy modules too

    after_import = {s: signal.getsignal(s) for s in watched}
    taskapp_notebook.stop_all()  # the lazy attribute: still nothing installed
    after_stop_all = {s: signal.getsignal(s) for s in watched}

    from fastapi import FastAPI

    fastapi_app = FastAPI()

    @fastapi_app.get("/health")
    def health() -> dict[str, bool]:
        return {"ok": True}

    app = InProcessTaskApp(app=fastapi_app, port=port, tunnel_mode="local",
                           auto_find_port=False)
    app.start()
    after_start = {s: signal.getsignal(s) for s in watched}
    running_before_signal = app.is_running

    signal.raise_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not mine_calls and time.monotonic() < deadline:
        time.sleep(0.001)

    result = {
        "unchanged_by_import": after_import == before,
        "unchanged_by_stop_all": after_stop_all == before,
        "installed_on_start": all(
            after_start[s] is registry._handle_signal for s in watched
        ),
        "running_before_signal": running_before_signal,
        "mine_calls": mine_calls,
        "state_after_signal": str(app.state),
        "port_free_after_signal": port_is_free(port),
        "still_alive": True,
    }
    registry.uninstall_hooks()
    result["restored"] = {
        signal.Signals(s).name: signal.getsignal(s) == before[s] for s in watched
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
