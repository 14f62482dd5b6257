"""Notebook benchmark: ``%load_ext taskapp_notebook`` and a ``%%taskapp`` cell to healthy.

* ``%load_ext``: timed inside fresh ipykernel kernels; baseline in the same run:
  ``%load_ext autoreload`` (an IPython built-in extension).
* the cell: a real ipykernel kernel through jupyter_client, the way JupyterLab sends cells
  (with a cell id, so each run replaces the previous app). Baseline in the same run: the
  same cell body without the magic (the app's own definition), so the difference is what
  the magic adds — stop the previous app, start the new one, wait for ``/health``.

    python bench/notebook.py [--runs 20] [--write-docs]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from _common import write_table

APP_BODY = """from fastapi import FastAPI
app = FastAPI()

@app.get("/health")
async def health():
    return {"healthy": True}
"""


def load_ext_times(extension: str, runs: int) -> list[float]:
    """``%load_ext`` timed inside fresh kernels (as a notebook user pays it)."""
    from jupyter_client.manager import start_new_kernel

    code = (
        "import time\n"
        "_t = time.perf_counter()\n"
        f"get_ipython().run_line_magic('load_ext', {extension!r})\n"
        "print(time.perf_counter() - _t)\n"
    )
    out = []
    for _ in range(runs):
        manager, client = start_new_kernel(kernel_name="python3")
        try:
            client.execute(code)
            while True:
                msg = client.get_iopub_msg(timeout=60)
                if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
                    out.append(float(msg["content"]["text"].strip().splitlines()[-1]))
                    break
                if msg["msg_type"] == "error":
                    raise RuntimeError(msg["content"]["evalue"])
        finally:
            client.stop_channels()
            manager.shutdown_kernel(now=True)
    return out


def execute(client: Any, code: str, cell_id: str) -> float:
    started = time.perf_counter()
    msg_id = client.execute(code, store_history=True)
    # jupyter_client has no cell-id argument; JupyterLab puts it in the request's metadata.
    reply = client.get_shell_msg(timeout=60)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = client.get_shell_msg(timeout=60)
    elapsed = time.perf_counter() - started
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"cell failed: {reply['content']}")
    return elapsed


def cell_times(runs: int) -> tuple[list[float], list[float]]:
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3")
    try:
        _send_with_cell_id(client)
        execute(client, "%load_ext taskapp_notebook\n" + APP_BODY, "setup")
        plain = [execute(client, APP_BODY, "plain") for _ in range(runs)]
        magic_cell = "%%taskapp --tunnel local --no-widget --name bench\n" + APP_BODY
        magic = [execute(client, magic_cell, "magic") for _ in range(runs)]
        execute(client, "%taskapp stop --all", "teardown")
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=False)
    return plain, magic


def _send_with_cell_id(client: Any) -> None:
    """Make ``client.execute`` put a fixed ``cellId`` in the metadata, as JupyterLab does."""
    original = client.session.msg

    def msg(
        msg_type: str,
        content: Any = None,
        parent: Any = None,
        header: Any = None,
        metadata: Any = None,
    ) -> Any:
        if msg_type == "execute_request":
            metadata = {**(metadata or {}), "cellId": "bench-cell"}
        return original(msg_type, content, parent, header, metadata)

    client.session.msg = msg


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} ms"


def table(runs: int) -> str:
    ours = load_ext_times("taskapp_notebook", runs)
    builtin = load_ext_times("autoreload", runs)
    plain, magic = cell_times(runs)
    added = [m - p for m, p in zip(sorted(magic), sorted(plain), strict=True)]
    return "\n".join(
        [
            f"Medians of {runs} runs; the cell timings are round trips through a real kernel "
            "(execute_request → reply), re-running one cell id as JupyterLab does.",
            "",
            "| what | time |",
            "|---|---|",
            f"| `%load_ext taskapp_notebook` (fresh kernel) | {ms(ours)} |",
            f"| `%load_ext autoreload` (IPython built-in, baseline) | {ms(builtin)} |",
            f"| cell defining a FastAPI app, no magic (baseline) | {ms(plain)} |",
            f"| same cell under `%%taskapp --tunnel local` (re-run: stop old, start new, healthy) "
            f"| {ms(magic)} |",
            f"| → what the magic adds | {ms(added)} |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Notebook extension benchmark")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    text = table(args.runs)
    print(text)
    if args.write_docs:
        write_table("notebook", text)


if __name__ == "__main__":
    main()
