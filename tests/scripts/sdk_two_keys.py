"""Two synth-ai 0.7 task apps with different keys in one process, served by our runner.

Runs under ``.venv-sdk07/bin/python`` (synth-ai 0.7.3, whose apps read their key from
``ENVIRONMENT_API_KEY`` on every request). Usage: ``sdk_two_keys.py FILE_A FILE_B`` with
``KEY_A`` and ``KEY_B`` set. Starts A with ``api_key=KEY_A``, then B with ``api_key=KEY_B``,
calls each with each key, stops A, calls B again, stops B. Prints one JSON line of HTTP
statuses and facts about the environment (never a key).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def main(file_a: str, file_b: str) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    import httpx

    from taskapp_notebook import InProcessTaskApp

    key_a, key_b = os.environ["KEY_A"], os.environ["KEY_B"]
    original = os.environ.get("ENVIRONMENT_API_KEY")
    out: dict[str, Any] = {}
    a = InProcessTaskApp(task_app_path=file_a, api_key=key_a, tunnel_mode="local", port=18231)
    b = InProcessTaskApp(task_app_path=file_b, api_key=key_b, tunnel_mode="local", port=18241)
    with httpx.Client(trust_env=False, timeout=30.0) as client:

        def status(app: InProcessTaskApp, key: str, how: str = "x-api-key") -> int:
            headers = (
                {"X-API-Key": key} if how == "x-api-key" else {"Authorization": f"Bearer {key}"}
            )
            return client.get(f"{app.local_url}/info", headers=headers).status_code

        with a:
            out["a_alone"] = [status(a, key_a), status(a, key_b)]
            with b:
                out["env_is_a_while_both_run"] = os.environ.get("ENVIRONMENT_API_KEY") == key_a
                out["a_with_a_b"] = [status(a, key_a), status(a, key_b)]
                out["b_with_a_b"] = [status(b, key_b), status(b, key_a)]
                out["b_bearer_b_a"] = [status(b, key_b, "bearer"), status(b, key_a, "bearer")]
                a.stop()
                out["b_after_a_stopped"] = [status(b, key_b), status(b, key_a)]
                out["env_is_a_after_a_stopped"] = os.environ.get("ENVIRONMENT_API_KEY") == key_a
        out["env_restored"] = os.environ.get("ENVIRONMENT_API_KEY") == original
        out["dev_key_left"] = "DEV_ENVIRONMENT_API_KEY" in os.environ
        # The same key for both: one export, held until the last one stops.
        a = InProcessTaskApp(task_app_path=file_a, api_key=key_b, tunnel_mode="local", port=18231)
        with a, b:
            a.stop()
            out["same_key_b_after_a_stopped"] = status(b, key_b)
            out["same_key_env_kept"] = os.environ.get("ENVIRONMENT_API_KEY") == key_b
        out["same_key_env_restored"] = os.environ.get("ENVIRONMENT_API_KEY") == original
    return out


if __name__ == "__main__":
    protocol, sys.stdout = sys.stdout, sys.stderr  # synth-ai 0.7 prints auth failures
    protocol.write(json.dumps(main(*sys.argv[1:3])) + "\n")
