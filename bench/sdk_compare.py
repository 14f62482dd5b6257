"""Lifecycle vs the real synth-ai SDK: start→healthy, stop→port-free and import time, one run.

The baseline is the SDK itself, not a re-implementation: synth-ai 0.9.11's in-process runner,
``synth_ai.InProcessContainer`` (``synth_ai/sdk/container/_impl/in_process.py``; 0.9.11 has no
class named ``InProcessTaskApp``), installed in ``.venv-sdk`` by ``scripts/sdk-venv``. Each
side runs ``bench/_lifecycle_driver.py`` with its own venv's python in a child process (same
FastAPI app with a ``/health`` route, same fastapi/uvicorn versions in both venvs), one fixed
port per variant, and prints JSON that this script tabulates with SDK = baseline.

How the SDK is driven: ``async with InProcessContainer(app=app, port=port,
tunnel_mode="local", api_key="bench")`` (its ``__aenter__`` / ``__aexit__`` timed separately).
``tunnel_mode="local"`` is the SDK's own no-tunnel branch: it starts uvicorn in a thread,
polls ``/health`` and sets ``url = http://127.0.0.1:PORT``; it needs no Synth key, backend or
network. Passing ``api_key`` keeps it from reading ``~/.synth-ai`` or minting a key. The
children get a fresh empty ``HOME`` and an environment without ``SYNTH_*``,
``ENVIRONMENT_API_KEY`` and proxy variables (``SYNTH_MANAGED_NGROK_URL`` /
``SYNTH_CONTAINER_URL`` would switch the SDK to a managed tunnel). ``--netns`` runs both
children in an empty network namespace (``unshare -rn``, loopback only) to show that neither
side touches the network; nothing of the SDK is patched or stubbed.

    python bench/sdk_compare.py [--cycles 20] [--imports 10] [--netns] [--write-readme]

Skips (exit 0) when ``.venv-sdk`` is missing. Figures are medians; the machine is shared and
noisy, so compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import write_readme_table

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "bench" / "_lifecycle_driver.py"
SDK_PYTHON = ROOT / ".venv-sdk" / "bin" / "python"
OURS_PYTHON = ROOT / ".venv" / "bin" / "python"
SDK_LABEL = 'synth-ai 0.9.11 `InProcessContainer(tunnel_mode="local")` (baseline)'
SDK_IMPORT = "from synth_ai import InProcessContainer"
# The SDK polls /health every 200 ms: a start slower than this paid at least one poll sleep.
SLOW_START = 0.1
_DROPPED_ENV = ("ENVIRONMENT_API_KEY", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
_NETNS = ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


def child_env(home: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.upper().startswith("SYNTH_") and key.upper() not in _DROPPED_ENV
    }
    env["HOME"] = home
    env.pop("PYTHONPATH", None)
    return env


def run_child(cmd: list[str], env: dict[str, str], netns: bool) -> str:
    full = (_NETNS + cmd) if netns else cmd
    result = subprocess.run(full, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-20:])
        raise SystemExit(f"{' '.join(cmd)} failed (exit {result.returncode}):\n{tail}")
    return result.stdout


def lifecycle(
    python: Path, impl: str, cycles: int, env: dict[str, str], netns: bool
) -> dict[str, Any]:
    out = run_child([str(python), str(DRIVER), "--impl", impl, "--cycles", str(cycles)], env, netns)
    variants: dict[str, Any] = json.loads(out.strip().splitlines()[-1])["variants"]
    return variants


def import_times(
    jobs: list[tuple[Path, str]], runs: int, env: dict[str, str], netns: bool
) -> list[list[float]]:
    """Each statement in ``runs`` fresh interpreters, interleaved so drift hits all alike."""

    def once(python: Path, stmt: str) -> float:
        code = f"import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"
        return float(run_child([str(python), "-c", code], env, netns).strip().splitlines()[-1])

    for python, stmt in jobs:  # untimed: compile .pyc files, warm the page cache
        once(python, stmt)
    times: list[list[float]] = [[] for _ in jobs]
    for _ in range(runs):
        for i, (python, stmt) in enumerate(jobs):
            times[i].append(once(python, stmt))
    return times


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} ms"


def ratio(values: list[float], baseline: list[float]) -> str:
    r = statistics.median(baseline) / statistics.median(values)
    if r >= 1:
        return f"{r:.0f}× faster" if r >= 10 else f"{r:.1f}× faster"
    return f"{1 / r:.1f}× slower"


def table(cycles: int, imports: int, netns: bool) -> str:
    ours_python = OURS_PYTHON if OURS_PYTHON.exists() else Path(sys.executable)
    with tempfile.TemporaryDirectory(prefix="sdk-compare-home-") as home:
        env = child_env(home)
        sdk = lifecycle(SDK_PYTHON, "sdk", cycles, env, netns)["sdk"]
        ours = lifecycle(ours_python, "ours", cycles, env, netns)
        jobs = [
            (SDK_PYTHON, SDK_IMPORT),
            (SDK_PYTHON, "import synth_ai"),
            (ours_python, "import taskapp_notebook"),
            (ours_python, "from taskapp_notebook import InProcessTaskApp"),
        ]
        imp = import_times(jobs, imports, env, netns)

    base_start, base_stop = sdk["start"], sdk["stop"]
    slow = sum(s >= SLOW_START for s in base_start)
    fast = [s for s in base_start if s < SLOW_START] or base_start
    where = "in an empty network namespace (`--netns`), " if netns else ""
    lines = [
        f'Medians of {cycles} cycles, `tunnel_mode="local"`, one run {where}on the '
        "2-core development machine (shared and noisy: read the ratios). Each side runs in its "
        "own venv and child process (`bench/_lifecycle_driver.py`) on a fixed port; the "
        "baseline is the real SDK from `.venv-sdk` (`scripts/sdk-venv`).",
        "",
        "| what | start → healthy | stop → port free |",
        "|---|---|---|",
        f"| {SDK_LABEL} | {ms(base_start)} | {ms(base_stop)} |",
    ]
    for label, key in (
        ('InProcessTaskApp serve_on="thread"', "thread"),
        ('InProcessTaskApp serve_on="loop"', "loop"),
    ):
        starts, stops = ours[key]["start"], ours[key]["stop"]
        lines.append(
            f"| {label} | {ms(starts)} ({ratio(starts, base_start)}) "
            f"| {ms(stops)} ({ratio(stops, base_stop)}) |"
        )
    lines += [
        "",
        f"The SDK's start → healthy is bimodal: {slow} of {cycles} cycles took ≥ "
        f"{SLOW_START * 1000:.0f} ms (its first `/health` probe beat uvicorn's bind, so it "
        f"slept its 200 ms poll interval), the rest a median {ms(fast)}; mean of all "
        f"{statistics.mean(base_start) * 1000:.1f} ms. Its stop sets `should_exit` and "
        "joins the thread: up to one 100 ms uvicorn tick plus uvicorn's fixed 100 ms "
        "shutdown sleep.",
        "",
        f"| import (median of {imports} fresh interpreters) | time |",
        "|---|---|",
        f"| `{SDK_IMPORT}` (baseline: what an SDK user runs) | {ms(imp[0])} |",
        f"| `import synth_ai` (its lazy top level alone) | {ms(imp[1])} |",
        f"| `import taskapp_notebook` | {ms(imp[2])} ({ratio(imp[2], imp[0])}) |",
        f"| `from taskapp_notebook import InProcessTaskApp` | {ms(imp[3])} "
        f"({ratio(imp[3], imp[0])}) |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--imports", type=int, default=10)
    parser.add_argument(
        "--netns",
        action="store_true",
        help="run both children in an empty network namespace (unshare -rn)",
    )
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    if args.cycles < 1 or args.imports < 1:
        parser.error("--cycles and --imports must be >= 1")
    if not SDK_PYTHON.exists():
        print(
            f"skipped: {SDK_PYTHON.relative_to(ROOT)} is missing; create it with "
            "scripts/sdk-venv (installs synth-ai==0.9.11 apart from .venv)"
        )
        return
    text = table(args.cycles, args.imports, args.netns)
    print(text)
    if args.write_readme:
        write_readme_table("sdk-runner", text)


if __name__ == "__main__":
    main()
