"""Serve a synth-ai task-app file with synth-ai's own runner or with ours, in an SDK venv.

Runs under ``.venv-sdk/bin/python`` (synth-ai 0.9.11) or ``.venv-sdk07/bin/python``
(synth-ai 0.7.3), made by ``scripts/sdk-venv``; never under our venv. The file is loaded
the way each runner loads it, unchanged.

Usage: ``sdk_serve.py RUNNER FILE PORT`` where RUNNER is

* ``sdk``  — synth-ai's in-process runner: 0.9's ``InProcessContainer(container_path=...)``
  or 0.7's ``InProcessTaskApp(task_app_path=...)``, ``tunnel_mode="local"``;
* ``ours`` — ``taskapp_notebook.InProcessContainer(container_path=...)`` from this checkout
  (0.9 code with only its import line changed), ``tunnel_mode="local"``.

``api_key=`` is the value of ``TEST_APP_KEY`` when set. Prints one JSON line once serving:
``{"url", "generation", "key_exported"}`` (no secret, only whether ``ENVIRONMENT_API_KEY``
holds the key), waits until stdin is closed, stops, and prints
``{"stopped": true, "env_restored": bool}``. Errors go to stderr with exit status 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
WATCHED = ("ENVIRONMENT_API_KEY", "DEV_ENVIRONMENT_API_KEY")
#: Our protocol lines go here; anything the SDK prints goes to stderr (see main).
PROTOCOL = sys.stdout


def generation() -> str:
    try:
        import synth_ai.sdk.container  # noqa: F401
    except ImportError:
        return "0.7"
    return "0.9"


def say(doc: dict[str, Any]) -> None:
    PROTOCOL.write(json.dumps(doc) + "\n")
    PROTOCOL.flush()


def started(url: str, key: str | None) -> None:
    exported = key is not None and os.environ.get("ENVIRONMENT_API_KEY") == key
    say({"url": url, "generation": generation(), "key_exported": exported})


async def wait_for_stdin_eof() -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    threading.Thread(
        target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(done.set)), daemon=True
    ).start()
    await done.wait()


async def serve_with_sdk(path: Path, port: int, key: str | None) -> None:
    if generation() == "0.9":
        from synth_ai.sdk.container._impl.in_process import InProcessContainer

        runner: Any = InProcessContainer(
            container_path=path, port=port, tunnel_mode="local", api_key=key,
            auto_find_port=False, health_check_timeout=20.0,
        )
    else:
        from synth_ai.sdk.localapi._impl.in_process import InProcessTaskApp as SdkRunner

        runner = SdkRunner(
            task_app_path=path, port=port, tunnel_mode="local", api_key=key,
            auto_find_port=False, health_check_timeout=20.0,
        )
    async with runner:
        started(runner.url, key)
        await wait_for_stdin_eof()


def serve_with_ours(path: Path, port: int, key: str | None) -> None:
    sys.path.insert(0, str(ROOT))
    from taskapp_notebook import InProcessContainer

    runner = InProcessContainer(
        container_path=path, port=port, tunnel_mode="local", api_key=key,
        auto_find_port=False, health_check_timeout=20.0,
    )
    with runner:
        started(runner.url or "", key)
        sys.stdin.read()


def main(argv: list[str]) -> int:
    sys.stdout = sys.stderr  # synth-ai 0.7 prints auth failures to stdout
    which, file, port_text = argv
    path, port = Path(file), int(port_text)
    key = os.environ.get("TEST_APP_KEY") or None
    before = {name: os.environ.get(name) for name in WATCHED}
    if which == "sdk":
        asyncio.run(serve_with_sdk(path, port, key))
    elif which == "ours":
        serve_with_ours(path, port, key)
    else:
        raise SystemExit(f"unknown runner {which!r}")
    after = {name: os.environ.get(name) for name in WATCHED}
    say({"stopped": True, "env_restored": after == before})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Exception as exc:  # noqa: BLE001 - reported to the parent on stderr
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
        sys.exit(1)
