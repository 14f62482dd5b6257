"""The extension in real ipykernel kernels driven through jupyter_client.

Execute requests carry ``metadata={"cellId": ...}`` the way JupyterLab sends them. One
kernel is shared by the independent tests; shutdown, restart and SIGKILL get their own.
"""

from __future__ import annotations

import json
import queue
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager
from support import free_port, launch_kernel, port_is_free

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(240)]

APP_CELL = """%%taskapp --tunnel local --no-widget {options}
from fastapi import FastAPI

app = FastAPI()

@app.get("/health")
def health():
    return {{"ok": True}}
"""

PROBE = """
import asyncio, json, os, threading
from taskapp_notebook import registry
_apps = registry.running()
print("PROBE " + json.dumps({
    "apps": [(a.name, str(a.state), a.port, a.serve_on) for a in _apps],
    "threads": threading.active_count(),
    "fds": len(os.listdir("/proc/self/fd")),
    "tasks": len(asyncio.all_tasks()),
}))
"""


@dataclass
class Reply:
    """What one execute request produced."""

    status: str
    stdout: str = ""
    stderr: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    ename: str | None = None
    evalue: str | None = None
    traceback: list[str] = field(default_factory=list)

    def json_line(self, prefix: str) -> Any:
        for line in self.stdout.splitlines():
            if line.startswith(prefix + " "):
                return json.loads(line[len(prefix) + 1 :])
        raise AssertionError(f"no {prefix!r} line in {self.stdout!r} ({self.evalue})")


def send(kc: BlockingKernelClient, code: str, cell_id: str | None = None) -> str:
    """Send an execute_request the way JupyterLab does; return its msg_id."""
    content = {
        "code": code, "silent": False, "store_history": True, "user_expressions": {},
        "allow_stdin": False, "stop_on_error": True,
    }
    metadata = {"cellId": cell_id} if cell_id else {}
    msg = kc.session.msg("execute_request", content, metadata=metadata)
    kc.shell_channel.send(msg)
    return str(msg["header"]["msg_id"])


def collect(kc: BlockingKernelClient, msg_id: str, timeout: float = 60) -> Reply:
    """Gather iopub output for ``msg_id`` until idle, then its execute_reply."""
    deadline = time.monotonic() + timeout
    reply = Reply(status="?")
    while True:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream" and content["name"] == "stdout":
            reply.stdout += content["text"]
        elif kind == "stream" and content["name"] == "stderr":
            reply.stderr += content["text"]
        elif kind in ("display_data", "execute_result"):
            reply.outputs.append(content["data"])
        elif kind == "error":
            reply.ename, reply.evalue = content["ename"], content["evalue"]
            reply.traceback = content["traceback"]
        elif kind == "status" and content["execution_state"] == "idle":
            break
    while True:
        shell = kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if shell["parent_header"].get("msg_id") == msg_id:
            reply.status = shell["content"]["status"]
            if reply.status == "error" and reply.ename is None:  # UsageError: no iopub error
                reply.ename = shell["content"].get("ename")
                reply.evalue = shell["content"].get("evalue")
            return reply


def run(kc: BlockingKernelClient, code: str, cell_id: str | None = None,
        timeout: float = 60) -> Reply:
    return collect(kc, send(kc, code, cell_id), timeout)


def ok(kc: BlockingKernelClient, code: str, cell_id: str | None = None) -> Reply:
    reply = run(kc, code, cell_id)
    assert reply.status == "ok", (reply.ename, reply.evalue, reply.stdout)
    return reply


@dataclass
class Kernel:
    km: KernelManager
    kc: BlockingKernelClient

    @property
    def pid(self) -> int:
        pid: int = self.km.provisioner.pid  # type: ignore[union-attr]
        return pid

    #: Ports the kernel listened on before any app started (ZMQ channels and the like).
    own_ports: set[int] = field(default_factory=set)

    def listening_ports(self) -> set[int]:
        conns = psutil.Process(self.pid).net_connections(kind="tcp")
        return {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}

    def app_listening_ports(self) -> set[int]:
        """TCP ports the kernel process listens on beyond its own."""
        return self.listening_ports() - self.own_ports


def start_kernel(cwd: Path) -> Kernel:
    km, kc = launch_kernel(cwd)
    kernel = Kernel(km, kc)
    ok(kc, "%load_ext taskapp_notebook")
    kernel.own_ports = kernel.listening_ports()
    return kernel


def stop_kernel(kernel: Kernel) -> None:
    kernel.kc.stop_channels()
    if kernel.km.has_kernel:
        kernel.km.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def shared_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    k = start_kernel(tmp_path_factory.mktemp("kernel"))
    yield k
    stop_kernel(k)


@pytest.fixture
def kernel(shared_kernel: Kernel) -> Kernel:
    """The shared kernel, with no app running."""
    ok(shared_kernel.kc, "%taskapp stop --all")
    assert shared_kernel.app_listening_ports() == set()
    return shared_kernel


@pytest.fixture
def fresh_kernel(tmp_path: Path) -> Iterator[Kernel]:
    k = start_kernel(tmp_path)
    yield k
    stop_kernel(k)


def probe(kc: BlockingKernelClient) -> dict[str, Any]:
    data: dict[str, Any] = ok(kc, PROBE).json_line("PROBE")
    return data


def health(url: str, timeout: float = 30.0) -> int:
    return httpx.get(url + "/health", timeout=timeout, trust_env=False).status_code


def app_url(kc: BlockingKernelClient, name: str) -> str:
    reply = ok(kc, f"_url = %taskapp url {name}\nprint('URL', _url)")
    return reply.stdout.split("URL ", 1)[1].strip()


# ---------------------------------------------------------------------------------- tests


def test_rerun_50_times_leaves_one_app(kernel: Kernel) -> None:
    kc = kernel.kc
    code = APP_CELL.format(options="")
    ports, baseline = [], None
    for i in range(50):
        ok(kc, code, cell_id="cell-rerun")
        snapshot = probe(kc)
        assert len(snapshot["apps"]) == 1, snapshot
        ports.append(snapshot["apps"][0][2])
        if i == 4:
            baseline = snapshot
    assert baseline is not None
    final = probe(kc)
    print(f"\nre-run x50: ports used {sorted(set(ports))}; after run 5: {baseline}; "
          f"after run 50: {final}")
    assert len(set(ports)) == 1, "re-runs should reuse the same port"
    assert final["tasks"] == baseline["tasks"]
    assert final["threads"] == baseline["threads"]
    assert final["fds"] <= baseline["fds"] + 2  # a leak would add one or more per re-run
    table = ok(kc, "%taskapp list").outputs[-1]["text/plain"]
    assert sum(1 for line in table.splitlines() if " running " in line) == 1, table
    assert kernel.app_listening_ports() == {ports[0]}
    assert psutil.Process(kernel.pid).children(recursive=True) == []
    ok(kc, "%taskapp stop --all")
    assert kernel.app_listening_ports() == set()


def test_five_reruns_keep_one_key_and_port_and_body_errors_show_user_frames(
    kernel: Kernel,
) -> None:
    """JupyterLab's way (cellId in the request): the key a cell's first run generated, and
    its port, survive every re-run; a body's error shows the user's frames only."""
    kc = kernel.kc
    seen = set()
    for _ in range(5):
        ok(kc, APP_CELL.format(options="--var keyed"), cell_id="cell-key")
        seen.add(ok(kc, "print('KEY', keyed.api_key[-6:], keyed.port)").stdout.strip())
    assert len(seen) == 1, seen
    reply = run(kc, "%%taskapp --tunnel local\ndef helper():\n    raise KeyError('boom')\n"
                    "helper()", cell_id="cell-error")
    assert reply.status == "error" and reply.ename == "KeyError"
    text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(reply.traceback))
    assert "helper()" in text and "raise KeyError('boom')" in text, text
    assert "taskapp_notebook" not in text and "run_cell_magic" not in text, text
    ok(kc, "%taskapp stop --all")


def test_rerun_with_widget_leaves_one_monitor(kernel: Kernel) -> None:
    code = APP_CELL.format(options="").replace(" --no-widget", "")
    for _ in range(10):
        reply = ok(kernel.kc, code, cell_id="cell-widget")
        assert any("application/vnd.jupyter.widget-view+json" in o for o in reply.outputs)
    reply = ok(kernel.kc, """
import threading, time
def _monitors():
    return [t.name for t in threading.enumerate() if t.name.startswith("taskapp-monitor")]
for _ in range(200):  # replaced monitors' threads exit on their next tick
    if len(_monitors()) <= 1:
        break
    time.sleep(0.05)
print("MONITORS", len(_monitors()))
""")
    assert "MONITORS 1" in reply.stdout
    assert len(probe(kernel.kc)["apps"]) == 1


def test_cell_body_may_await_on_the_kernel_loop(kernel: Kernel) -> None:
    body = APP_CELL.format(options="--name awaits").replace(
        "app = FastAPI()", "import asyncio\nawait asyncio.sleep(0.01)\napp = FastAPI()")
    ok(kernel.kc, body, cell_id="cell-await")
    assert health(app_url(kernel.kc, "awaits")) == 200


def test_interrupt_idle_and_busy_leaves_app_serving(kernel: Kernel) -> None:
    kc = kernel.kc
    ok(kc, APP_CELL.format(options="--name irq"), cell_id="cell-irq")
    url = app_url(kc, "irq")
    assert health(url) == 200

    kernel.km.interrupt_kernel()  # idle kernel
    assert health(url) == 200
    assert probe(kc)["apps"] == [["irq", "running", int(url.rsplit(":", 1)[1]), "loop"]]

    msg_id = send(kc, "import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    _wait_for_stdout(kc, msg_id, "sleeping")
    kernel.km.interrupt_kernel()  # busy kernel
    reply = collect(kc, msg_id)
    assert reply.status == "error" and reply.ename == "KeyboardInterrupt"
    assert health(url) == 200
    assert probe(kc)["apps"][0][:2] == ["irq", "running"]
    ok(kc, "%taskapp stop irq")


def test_blocking_cell_on_loop_then_requests_succeed(kernel: Kernel) -> None:
    kc = kernel.kc
    ok(kc, APP_CELL.format(options="--name blocker --serve-on loop"), cell_id="cell-block")
    url = app_url(kc, "blocker")
    has_monitor = "True" in ok(
        kc, "import importlib.util\nprint(importlib.util.find_spec('taskapp_notebook.monitor')"
            " is not None)").stdout
    if has_monitor:
        ok(kc, "from taskapp_notebook.monitor import HealthMonitor\n"
               "from taskapp_notebook import registry\n"
               "_mon = HealthMonitor.attach(registry.running()[-1], interval=0.2)")

    results: queue.Queue[int | BaseException] = queue.Queue()
    msg_id = send(kc, "import time\nprint('blocking', flush=True)\ntime.sleep(2)")
    _wait_for_stdout(kc, msg_id, "blocking")

    def call() -> None:
        try:
            results.put(health(url, timeout=60))
        except BaseException as exc:  # noqa: BLE001 - reported below
            results.put(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert collect(kc, msg_id).status == "ok"
    caller.join(60)
    assert results.get_nowait() == 200  # answered (late) once the loop was free again
    assert health(url) == 200
    if has_monitor:
        reply = ok(kc, "import time\nfor _ in range(100):\n"
                       "    if _mon.status == 'running': break\n"
                       "    time.sleep(0.05)\n"
                       "    await __import__('asyncio').sleep(0.05)\n"
                       "print('STATUS', _mon.status)\n_mon.close()")
        assert "STATUS running" in reply.stdout
    ok(kc, "%taskapp stop blocker")


def test_unload_stops_apps_and_restores_kernel_handlers(kernel: Kernel) -> None:
    kc = kernel.kc
    ok(kc, APP_CELL.format(options="--name unload"), cell_id="cell-unload")
    port = probe(kc)["apps"][0][2]
    reply = ok(kc, """
_k = get_ipython().kernel
print("WRAPPED", [getattr(t["shutdown_request"], "__wrapped__", None) is not None
                  for t in (_k.control_handlers, _k.shell_handlers)])
%unload_ext taskapp_notebook
from taskapp_notebook import registry
print("AFTER", registry.running(),
      [t["shutdown_request"] == _k.shutdown_request
       for t in (_k.control_handlers, _k.shell_handlers)],
      "taskapp" in get_ipython().magics_manager.magics["line"],
      "taskapp" in get_ipython().magics_manager.magics["cell"],
      [cb.__qualname__ for cb in get_ipython().events.callbacks["pre_run_cell"]])
""")
    assert "WRAPPED [True, True]" in reply.stdout
    assert "AFTER [] [True, True] False False []" in reply.stdout, reply.stdout
    assert port_is_free(port)
    ok(kc, "%load_ext taskapp_notebook")


SLOW_START = """%%taskapp --tunnel local --no-widget --name slow --serve-on {mode}
import asyncio, contextlib
from fastapi import FastAPI

@contextlib.asynccontextmanager
async def lifespan(app):
    print("lifespan started", flush=True)
    await asyncio.sleep(60)
    yield

app = FastAPI(lifespan=lifespan)
"""


@pytest.mark.parametrize("mode", ["loop", "thread"])
def test_interrupt_during_start_leaves_nothing_running(kernel: Kernel, mode: str) -> None:
    kc = kernel.kc
    msg_id = send(kc, SLOW_START.format(mode=mode), cell_id=f"cell-slow-{mode}")
    _wait_for_stdout(kc, msg_id, "lifespan started")
    kernel.km.interrupt_kernel()
    reply = collect(kc, msg_id)
    # Where the interrupt lands decides the outcome: in the magic's wait (the cell raises
    # KeyboardInterrupt) or inside the app's own lifespan (its startup fails: UsageError).
    assert reply.status == "error" and reply.ename in ("KeyboardInterrupt", "UsageError")
    if reply.ename == "UsageError":
        assert "lifespan startup raised (KeyboardInterrupt)" in str(reply.evalue)
    assert probe(kc)["apps"] == []
    assert kernel.app_listening_ports() == set()
    state = ok(kc, "from taskapp_notebook.notebook.extension import loaded_magics\n"
                   "print('STATE', loaded_magics(get_ipython()).known['slow'].state)")
    assert state.stdout.split() in (["STATE", "failed"], ["STATE", "stopped"])


def _wait_for_stdout(kc: BlockingKernelClient, msg_id: str, text: str) -> None:
    """Consume iopub until ``text`` was printed by ``msg_id`` (the cell is then running)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=30)
        if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream"
                and text in msg["content"]["text"]):
            return
    raise AssertionError(f"{text!r} never printed")


# ------------------------------------------------------------- shutdown, restart, SIGKILL

RECORD_STOPS = """
import pathlib
_marker = pathlib.Path({path!r})
def _record(app):
    import threading
    if str(app.state) == "stopping":  # recorded by the thread that initiated the stop
        with _marker.open("a") as f:
            f.write(f"{{app.name}}@{{threading.current_thread().name}}\\n")
from taskapp_notebook import registry
for _a in registry.running():
    _a.add_listener(_record)
"""


def _start_two_apps(kernel: Kernel, marker: Path) -> list[int]:
    kc = kernel.kc
    # Ports off the 8114 range: other test runs on this machine may reuse a freed 8114.
    ok(kc, APP_CELL.format(options=f"--name on-loop --serve-on loop --port {free_port()}"),
       cell_id="c1")
    ok(kc, APP_CELL.format(options=f"--name on-thread --serve-on thread --port {free_port()}"),
       cell_id="c2")
    ok(kc, RECORD_STOPS.format(path=str(marker)))
    ports = [app[2] for app in probe(kc)["apps"]]
    assert len(ports) == 2 and all(not port_is_free(p) for p in ports)
    return ports


def _watch_ports(ports: list[int], started: float, found: dict[int, float],
                 done: threading.Event) -> None:
    while not done.is_set() and len(found) < len(ports):
        for port in ports:
            if port not in found and port_is_free(port):
                found[port] = time.perf_counter() - started
        time.sleep(0.002)


def _shut_down(kernel: Kernel, marker: Path, *, restart: bool, channel: str = "control"
               ) -> None:
    ports = _start_two_apps(kernel, marker)
    old = psutil.Process(kernel.pid)
    children = old.children(recursive=True)
    found: dict[int, float] = {}
    done = threading.Event()
    started = time.perf_counter()
    watcher = threading.Thread(target=_watch_ports, args=(ports, started, found, done))
    watcher.start()
    if channel == "shell":  # what older clients do; ipykernel still handles it
        request = kernel.kc.session.msg("shutdown_request", {"restart": False})
        kernel.kc.shell_channel.send(request)
        old.wait(30)
    elif restart:
        kernel.km.restart_kernel(now=False)
    else:
        kernel.km.shutdown_kernel(now=False)
    total = time.perf_counter() - started
    done.set()
    watcher.join()
    what = "restart" if restart else f"shutdown via {channel}"
    print(f"\nkernel {what}: ports free after "
          + ", ".join(f"{found.get(p, float('nan')) * 1000:.0f} ms" for p in ports)
          + f"; {what} call returned after {total * 1000:.0f} ms")
    assert all(port_is_free(p) for p in ports)
    assert not old.is_running() or old.status() == psutil.STATUS_ZOMBIE
    assert not any(child.is_running() for child in children)
    # Stopped by the wrapped shutdown_request handler (on ipykernel's control thread for
    # the control channel), before ipykernel stopped its loops: not left to atexit.
    thread = "Control" if channel == "control" else "MainThread"
    assert sorted(marker.read_text().split()) == [f"on-loop@{thread}", f"on-thread@{thread}"]


def test_kernel_shutdown_stops_apps_and_frees_ports(fresh_kernel: Kernel,
                                                    tmp_path: Path) -> None:
    _shut_down(fresh_kernel, tmp_path / "stopped.txt", restart=False)


def test_shutdown_request_on_shell_channel_stops_apps(fresh_kernel: Kernel,
                                                      tmp_path: Path) -> None:
    _shut_down(fresh_kernel, tmp_path / "stopped.txt", restart=False, channel="shell")


def test_kernel_restart_stops_apps_and_frees_ports(fresh_kernel: Kernel,
                                                   tmp_path: Path) -> None:
    _shut_down(fresh_kernel, tmp_path / "stopped.txt", restart=True)
    fresh_kernel.kc.wait_for_ready(timeout=60)
    assert probe(fresh_kernel.kc)["apps"] == []


def test_sigkilled_kernel_leaves_no_child_and_no_listener(fresh_kernel: Kernel,
                                                          tmp_path: Path) -> None:
    ports = _start_two_apps(fresh_kernel, tmp_path / "stopped.txt")
    process = psutil.Process(fresh_kernel.pid)
    family = [process, *process.children(recursive=True)]
    fresh_kernel.km.signal_kernel(signal.SIGKILL)
    psutil.wait_procs(family, timeout=10)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family)
    assert all(port_is_free(p) for p in ports)


STUCK_CELL = """%%taskapp --tunnel local --no-widget
import asyncio
from fastapi import FastAPI

app = FastAPI()
entered = globals().setdefault("entered", [])

@app.get("/health")
def health():
    return {"ok": True}

@app.get("/stuck")
async def stuck():
    entered.append(1)
    await asyncio.sleep(3600)
"""


def test_rerun_with_a_stuck_request_cancels_it_quietly(kernel: Kernel) -> None:
    kc = kernel.kc
    ok(kc, STUCK_CELL, cell_id="cell-stuck")
    port = probe(kc)["apps"][0][2]
    answer: list[object] = []

    def call() -> None:
        try:
            answer.append(httpx.get(f"http://127.0.0.1:{port}/stuck", timeout=60,
                                    trust_env=False).status_code)
        except httpx.HTTPError as exc:
            answer.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 30
    while "ENTERED 1" not in ok(kc, "print('ENTERED', len(entered))").stdout:
        assert time.monotonic() < deadline, "the request never reached the handler"
        time.sleep(0.05)
    rerun = ok(kc, STUCK_CELL, cell_id="cell-stuck")  # stops the app (grace), starts anew
    caller.join(30)
    noisy = [word for word in ("Traceback", "CancelledError", "ERROR") if word in rerun.stderr]
    assert noisy == [], rerun.stderr
    assert answer == [503]
    assert len(probe(kc)["apps"]) == 1
    ok(kc, "%taskapp stop --all")
    assert kernel.app_listening_ports() == set()
