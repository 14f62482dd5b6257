"""QuickTunnel / NamedTunnel against a FAKE cloudflared and a fake Synth backend.

Every test here checks OUR code: the argv we build, how we parse cloudflared's output and
metrics server, our error messages, and how we start, watch, stop and reap the child.
The FAKE cloudflared (tests/fake_cloudflared/fake_cloudflared.py) opens no tunnel, so none
of this is evidence that a real Cloudflare tunnel works.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest

from taskapp_notebook.errors import TunnelError
from taskapp_notebook.tunnels import cloudflare
from taskapp_notebook.tunnels.base import Tunnel, TunnelContext, TunnelState, create_tunnel
from taskapp_notebook.tunnels.cloudflare import NamedTunnel, QuickTunnel, find_cloudflared

FAKE_DIR = Path(__file__).parent / "fake_cloudflared"
FAKE_SCRIPT = FAKE_DIR / "fake_cloudflared.py"
REPO = Path(__file__).resolve().parents[1]
APP_KEY = "app-key-0123456789"
SYNTH_KEY = "sk_test_synth_0123456789abcdef"
ENV_VARS = (
    "CLOUDFLARED_PATH",
    "TASKAPP_CLOUDFLARED",
    "TASKAPP_CLOUDFLARED_TIMEOUT",
    "TUNNEL_TOKEN",
    "CLOUDFLARE_TUNNEL_TOKEN",
    "CLOUDFLARE_TUNNEL_URL",
    "SYNTH_API_KEY",
    "SYNTH_BACKEND_URL",
)


def fake_token(secret: str = "s3cr3t-tunnel-secret") -> str:
    """A token in cloudflared's shape (base64 JSON with a/t/s), for the FAKE cloudflared."""
    payload = {"a": "account-id", "t": "tunnel-id-1234", "s": secret}
    return base64.b64encode(json.dumps(payload).encode()).decode()


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as dead)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


class FakeCloudflared:
    """Handle on the FAKE cloudflared: knobs via env, the JSON lines it records."""

    def __init__(self, launcher: Path, record: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.launcher = launcher
        self.record = record
        self._mp = monkeypatch

    def set(self, **knobs: str) -> None:
        for name, value in knobs.items():
            self._mp.setenv(f"FAKE_CLOUDFLARED_{name.upper()}", value)

    def records(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]


@pytest.fixture(scope="session")
def fake_launcher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An executable named ``cloudflared`` that runs the FAKE cloudflared script."""
    directory = tmp_path_factory.mktemp("fake-cloudflared-bin")
    launcher = directory / "cloudflared"
    script = f'exec "{sys.executable}" "{FAKE_SCRIPT}" "$@"'
    launcher.write_text(f"#!/bin/sh\n# FAKE cloudflared (tests only)\n{script}\n")
    launcher.chmod(0o755)
    return launcher


@pytest.fixture
def fake(
    fake_launcher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeCloudflared]:
    """FAKE cloudflared first on PATH, a clean environment, and a leak check afterwards."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    for var in [v for v in os.environ if v.startswith("FAKE_CLOUDFLARED_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("PATH", f"{fake_launcher.parent}{os.pathsep}{os.environ['PATH']}")
    handle = FakeCloudflared(fake_launcher, tmp_path / "record.jsonl", monkeypatch)
    monkeypatch.setenv("FAKE_CLOUDFLARED_RECORD", str(handle.record))
    yield handle
    leaked = [r["pid"] for r in handle.records() if alive(r["pid"])]
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, f"FAKE cloudflared left running: {leaked}"


def state(tunnel: QuickTunnel | NamedTunnel) -> TunnelState:
    """The tunnel's state, read fresh (it changes behind mypy's back)."""
    return tunnel.status.state


def make_ctx(port: int = 8123, **kw: Any) -> tuple[TunnelContext, list[str]]:
    events: list[str] = []
    ctx = TunnelContext(
        local_host="127.0.0.1", local_port=port, api_key=APP_KEY, on_event=events.append, **kw
    )
    return ctx, events


# -- binary lookup -------------------------------------------------------------------------


def test_missing_binary_says_how_to_install(
    fake: FakeCloudflared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OUR lookup: no cloudflared anywhere → preflight explains how to install it."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(cloudflare, "_EXTRA_DIRS", ())
    with pytest.raises(TunnelError) as info:
        QuickTunnel().preflight(make_ctx()[0])
    message = str(info.value)
    assert "cloudflared was not found" in message
    assert "brew install cloudflared" in message and "pkg.cloudflare.com" in message
    assert "CLOUDFLARED_PATH" in message


@pytest.mark.parametrize("var", ["CLOUDFLARED_PATH", "TASKAPP_CLOUDFLARED"])
def test_binary_from_env_var(
    fake: FakeCloudflared, var: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OUR lookup honours the env vars (FAKE cloudflared not on PATH here)."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv(var, str(fake.launcher))
    assert find_cloudflared() == str(fake.launcher)


def test_bad_binary_env_var_is_named(
    fake: FakeCloudflared, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OUR lookup: a wrong CLOUDFLARED_PATH is reported as such, not silently skipped."""
    monkeypatch.setenv("CLOUDFLARED_PATH", "/nonexistent/cloudflared")
    with pytest.raises(TunnelError, match=r"CLOUDFLARED_PATH is '/nonexistent/cloudflared'"):
        find_cloudflared()


def test_backends_satisfy_protocol() -> None:
    assert isinstance(QuickTunnel(), Tunnel) and isinstance(NamedTunnel(), Tunnel)
    assert type(create_tunnel("cloudflare_quick")) is QuickTunnel
    assert type(create_tunnel("managed")) is NamedTunnel


# -- quick tunnels -------------------------------------------------------------------------


async def test_quick_url_from_metrics_quicktunnel(
    fake: FakeCloudflared, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OUR parsing of /quicktunnel + /ready (the FAKE prints no URL in its log here)."""
    fake.set(mode="quiet-url", hostname="from-metrics-42.trycloudflare.com")
    monkeypatch.setenv("TUNNEL_TOKEN", "must-not-reach-a-quick-tunnel")
    ctx, events = make_ctx(port=8123)
    tunnel = QuickTunnel(timeout=20)
    tunnel.preflight(ctx)
    assert await tunnel.open(ctx) == "https://from-metrics-42.trycloudflare.com"
    assert tunnel.url == "https://from-metrics-42.trycloudflare.com"
    assert state(tunnel) is TunnelState.CONNECTED
    assert tunnel.verification_headers() == {"X-API-Key": APP_KEY}
    (record,) = fake.records()
    argv = record["argv"]
    assert argv[:4] == ["tunnel", "--no-autoupdate", "--config", os.devnull]
    assert argv[argv.index("--url") + 1] == "http://127.0.0.1:8123"
    assert argv[argv.index("--metrics") + 1].startswith("127.0.0.1:")
    assert record["tunnel_token"] == ""
    assert record["sid"] == record["pid"] != os.getsid(0)  # its own session
    assert any("connected: https://from-metrics-42" in e for e in events)
    await tunnel.close()
    assert not psutil.pid_exists(record["pid"])  # stopped and reaped
    assert state(tunnel) is TunnelState.CLOSED
    await tunnel.close()  # idempotent


async def test_quick_url_from_log_when_no_metrics(fake: FakeCloudflared) -> None:
    """OUR log-regex fallback when the metrics server has no /quicktunnel (older builds)."""
    fake.set(mode="no-metrics", hostname="from-log-7.trycloudflare.com")
    tunnel = QuickTunnel(timeout=20)
    try:
        assert await tunnel.open(make_ctx()[0]) == "https://from-log-7.trycloudflare.com"
    finally:
        await tunnel.close()


@pytest.mark.parametrize(
    ("mode", "expected", "log_text"),
    [
        ("rate-limited", "rate-limiting quick tunnels", "429 Too Many Requests"),
        ("outage", "having an outage", "failed to request quick Tunnel"),
    ],
)
async def test_quick_cloudflare_refusals_are_explained(
    fake: FakeCloudflared, mode: str, expected: str, log_text: str
) -> None:
    """OUR classification of the FAKE's rate-limit / outage output, with its log lines."""
    fake.set(mode=mode)
    tunnel = QuickTunnel(timeout=20)
    with pytest.raises(TunnelError) as info:
        await tunnel.open(make_ctx()[0])
    assert expected in str(info.value)
    assert any(log_text in line for line in info.value.log_lines)
    assert "Last log lines:" in str(info.value)
    assert state(tunnel) is TunnelState.DOWN and tunnel.status.last_error
    assert not psutil.pid_exists(fake.records()[0]["pid"])


async def test_quick_early_exit_reports_code_and_lines(fake: FakeCloudflared) -> None:
    """OUR handling of a child that exits before connecting."""
    fake.set(mode="exit-early")
    with pytest.raises(TunnelError) as info:
        await QuickTunnel(timeout=20).open(make_ctx()[0])
    assert "exited with code 7" in str(info.value)
    assert any("something broke" in line for line in info.value.log_lines)


async def test_quick_deadline_stops_child(fake: FakeCloudflared) -> None:
    """OUR deadline: the FAKE never reports an edge connection → error, child reaped."""
    fake.set(mode="never-ready")
    tunnel = QuickTunnel(timeout=1.0)
    with pytest.raises(TunnelError) as info:
        await tunnel.open(make_ctx()[0])
    message = str(info.value)
    assert "did not connect within 1s" in message and "no edge connection" in message
    assert any("timed out" in line for line in info.value.log_lines)
    pid = fake.records()[0]["pid"]
    assert not psutil.pid_exists(pid)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_timeout_env_var(fake: FakeCloudflared, monkeypatch: pytest.MonkeyPatch) -> None:
    """OUR reading of TASKAPP_CLOUDFLARED_TIMEOUT (and its validation)."""
    fake.set(mode="never-ready")
    monkeypatch.setenv("TASKAPP_CLOUDFLARED_TIMEOUT", "0.5")
    with pytest.raises(TunnelError, match="within 0.5s"):
        await QuickTunnel().open(make_ctx()[0])
    monkeypatch.setenv("TASKAPP_CLOUDFLARED_TIMEOUT", "soon")
    with pytest.raises(TunnelError, match="not a positive number"):
        QuickTunnel().preflight(make_ctx()[0])


async def test_stop_escalates_to_sigkill(fake: FakeCloudflared) -> None:
    """OUR stop: a child that ignores SIGTERM gets SIGKILL and is reaped."""
    fake.set(ignore_sigterm="1")
    tunnel = QuickTunnel(timeout=20, stop_timeout=0.5)
    await tunnel.open(make_ctx()[0])
    proc = tunnel.process
    assert proc is not None and proc.pid is not None
    await tunnel.close()
    assert proc.returncode == -signal.SIGKILL
    assert any("ignoring SIGTERM" in line for line in proc.log_lines())  # SIGTERM came first
    assert not psutil.pid_exists(proc.pid)


async def test_child_death_after_connect_marks_down(fake: FakeCloudflared) -> None:
    """OUR watcher: the FAKE exits after connecting → status DOWN and an on_event line."""
    fake.set(exit_after="0.3")
    ctx, events = make_ctx()
    tunnel = QuickTunnel(timeout=20)
    await tunnel.open(ctx)
    for _ in range(200):
        if state(tunnel) is TunnelState.DOWN:
            break
        await asyncio.sleep(0.05)
    assert state(tunnel) is TunnelState.DOWN
    assert tunnel.status.last_error and "exited with code 12" in tunnel.status.last_error
    assert any("exited with code 12" in e for e in events)
    await tunnel.close()
    assert state(tunnel) is TunnelState.CLOSED


# -- live state while cloudflared runs (edge connections lost / back) ----------------------
#
# These check OUR parsing of cloudflared's connection log lines and /ready answers and OUR
# state machine; the FAKE prints those lines in real cloudflared's formats. A pass says
# nothing about how a real tunnel behaves when its edge connections drop.

LOST, DOWN, BACK = "lost its connection and is reconnecting", "and is down", "is connected again"


def tracked(tunnel: QuickTunnel | NamedTunnel) -> tuple[TunnelContext, list[tuple[str, Any]]]:
    """A context whose on_event records (line, the tunnel's state when it was reported)."""
    events: list[tuple[str, Any]] = []
    ctx = TunnelContext(
        local_host="127.0.0.1",
        local_port=8123,
        api_key=APP_KEY,
        on_event=lambda line: events.append((line, tunnel.status.state)),
    )
    return ctx, events


def transitions(events: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The live-state transitions among the events, as (kind, state)."""
    kinds = {LOST: "lost", DOWN: "down", BACK: "back"}
    return [(kind, st) for line, st in events for text, kind in kinds.items() if text in line]


async def until(check: Any, what: str, seconds: float = 20.0) -> None:
    """Poll ``check()`` until true, failing after a generous deadline (not a timing check)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        # connection/observer.go (current releases)
        (
            "2025-01-01T10:00:00Z INF Registered tunnel connection connIndex=2 "
            "connection=6c1a3c52-0e7b-4c55-9f6a-1e0e8e0b3a11 event=0 ip=198.41.200.13 "
            "location=lhr01 protocol=quic",
            ("registered", 2),
        ),
        # connection/rpc.go (older releases)
        (
            "2021-03-01T10:00:00Z INF Connection 25e2ee72-4f2c-4e5b-9b3c-0c0b1b7b3f1e "
            "registered connIndex=1 location=LHR",
            ("registered", 1),
        ),
        # --log-format json
        (
            '{"level":"info","connIndex":3,"message":"Registered tunnel connection"}',
            ("registered", 3),
        ),
        # connection/control.go: contains "registered tunnel connection", but is a loss
        (
            "2025-01-01T10:00:00Z INF Unregistered tunnel connection connIndex=0 event=0 "
            "ip=198.41.200.13",
            ("lost", 0),
        ),
        # supervisor/supervisor.go, supervisor/tunnel.go, connection/http2.go
        ('2025-01-01T10:00:00Z WRN Connection terminated error="x" connIndex=3', ("lost", 3)),
        (
            '2025-01-01T10:00:00Z ERR Serve tunnel error error="timeout: no recent network '
            'activity" connIndex=1 event=0 ip=198.41.192.47',
            ("lost", 1),
        ),
        ("2025-01-01T10:00:00Z INF Retrying connection in up to 2s connIndex=0", ("lost", 0)),
        ("2022-01-01T10:00Z INF Retrying connection in up to 2s seconds connIndex=0", ("lost", 0)),
        ("2025-01-01T10:00:00Z INF Lost connection with the edge connIndex=1", ("lost", 1)),
        ("2025-01-01T10:00:00Z ERR failed to connect to the edge", ("lost", None)),
        ("2025-01-01T10:00:00Z INF Starting metrics server on 127.0.0.1:1/metrics", None),
        ("2025-01-01T10:00:00Z INF |  https://a-b.trycloudflare.com  |", None),
    ],
)
def test_parse_connection_lines(line: str, expected: tuple[str, int | None] | None) -> None:
    """OUR parsing of cloudflared's connection lines (formats from its source, not a FAKE)."""
    event = cloudflare.parse_connection_line(line)
    assert (None if event is None else (event.kind, event.conn_index)) == expected


@pytest.mark.parametrize(
    ("backend", "style", "said_so"),
    [
        ("quick", "quic", "Serve tunnel error"),
        ("quick", "unregister", "Unregistered tunnel connection"),
        ("named", "http2", "Lost connection with the edge"),
    ],
)
async def test_edge_loss_then_reconnect_from_log_lines(
    fake: FakeCloudflared, backend: str, style: str, said_so: str
) -> None:
    """OUR log-line tracking (/ready polling off): the FAKE, still running, loses its only
    connection and registers it again → CONNECTED → RECONNECTING → CONNECTED, each reported
    once, last_error = the line that said so."""
    fake.set(drop_after="0.3", reconnect_after="1.0", drop_style=style)
    tunnel: QuickTunnel | NamedTunnel
    if backend == "quick":
        tunnel = QuickTunnel(timeout=20, ready_interval=0)
    else:
        tunnel = NamedTunnel(
            token=fake_token(), url="https://app.example.com", timeout=20, ready_interval=0
        )
    ctx, events = tracked(tunnel)
    try:
        await tunnel.open(ctx)
        await until(lambda: any(BACK in line for line, _ in events), "the reconnect event")
        assert transitions(events) == [
            ("lost", TunnelState.RECONNECTING),
            ("back", TunnelState.CONNECTED),
        ]
        assert state(tunnel) is TunnelState.CONNECTED
        assert tunnel.status.last_error is not None and said_so in tunnel.status.last_error
        assert "connIndex=0" in tunnel.status.last_error
        lost_line = next(line for line, _ in events if LOST in line)
        assert said_so in lost_line and tunnel.url is not None and tunnel.url in lost_line
        assert tunnel.live_connections == {0}
    finally:
        await tunnel.close()
    assert state(tunnel) is TunnelState.CLOSED


async def test_edge_loss_goes_down_after_down_after(fake: FakeCloudflared) -> None:
    """OUR DOWN timer: no connection comes back → RECONNECTING, then DOWN after down_after;
    close() ends tracking (no event after it)."""
    fake.set(drop_after="0.3")
    tunnel = QuickTunnel(timeout=20, ready_interval=0, down_after=0.5)
    ctx, events = tracked(tunnel)
    try:
        await tunnel.open(ctx)
        await until(lambda: state(tunnel) is TunnelState.DOWN, "state DOWN")
        assert transitions(events) == [
            ("lost", TunnelState.RECONNECTING),
            ("down", TunnelState.DOWN),
        ]
        error = tunnel.status.last_error
        assert error is not None and error.startswith("no connection for 0.5s")
        assert "Serve tunnel error" in error
        assert tunnel.process is not None and tunnel.process.poll() is None  # still running
    finally:
        await tunnel.close()
    count = len(events)
    await asyncio.sleep(0.1)
    assert state(tunnel) is TunnelState.CLOSED and len(events) == count


async def test_down_then_back_when_a_connection_registers(fake: FakeCloudflared) -> None:
    """OUR state machine: DOWN (no connection) is not final while cloudflared runs; the next
    Registered line brings it back to CONNECTED."""
    fake.set(drop_after="0.2", reconnect_after="1.5")
    tunnel = QuickTunnel(timeout=20, ready_interval=0, down_after=0.3)
    ctx, events = tracked(tunnel)
    try:
        await tunnel.open(ctx)
        await until(lambda: any(BACK in line for line, _ in events), "the reconnect event")
        assert transitions(events) == [
            ("lost", TunnelState.RECONNECTING),
            ("down", TunnelState.DOWN),
            ("back", TunnelState.CONNECTED),
        ]
    finally:
        await tunnel.close()


async def test_losing_one_of_several_connections_stays_connected(fake: FakeCloudflared) -> None:
    """OUR connIndex set: one of two connections lost → still CONNECTED, no event."""
    fake.set(connections="2", drop_after="0.2", drop_count="1")
    tunnel = QuickTunnel(timeout=20, ready_interval=0)
    ctx, events = tracked(tunnel)
    try:
        await tunnel.open(ctx)
        proc = tunnel.process
        assert proc is not None
        # The FAKE prints this after its loss lines; the reader handled those lines first.
        await until(lambda: any("fake: dropped 1, 1 left" in ln for ln in proc.log_lines()), "drop")
        await asyncio.sleep(0.05)  # let the loop run the callbacks queued for those lines
        assert tunnel.live_connections == {1}
        assert state(tunnel) is TunnelState.CONNECTED and transitions(events) == []
    finally:
        await tunnel.close()


async def test_silent_loss_seen_through_ready(fake: FakeCloudflared) -> None:
    """OUR /ready polling: the FAKE loses and regains its connection without a log line;
    only /ready (503, then 200) shows it."""
    fake.set(drop_after="0.4", reconnect_after="1.0", drop_style="silent")
    tunnel = QuickTunnel(timeout=20, ready_interval=0.1)
    ctx, events = tracked(tunnel)
    try:
        await tunnel.open(ctx)
        await until(lambda: any(BACK in line for line, _ in events), "the reconnect event")
        assert transitions(events) == [
            ("lost", TunnelState.RECONNECTING),
            ("back", TunnelState.CONNECTED),
        ]
        lost = next(line for line, _ in events if LOST in line)
        assert "/ready with HTTP 503" in lost and "readyConnections=0" in lost
        assert "/ready reports 1 edge connection" in next(ln for ln, _ in events if BACK in ln)
    finally:
        await tunnel.close()


async def test_log_lines_and_ready_together_report_once(fake: FakeCloudflared) -> None:
    """OUR combination of both signals: each transition is still reported exactly once."""
    fake.set(drop_after="0.3", reconnect_after="1.0")
    tunnel = QuickTunnel(timeout=20, ready_interval=0.1)
    ctx, events = tracked(tunnel)
    try:
        await tunnel.open(ctx)
        await until(lambda: any(BACK in line for line, _ in events), "the reconnect event")
        await asyncio.sleep(0.3)  # a few more polls: they must not add transitions
        assert transitions(events) == [
            ("lost", TunnelState.RECONNECTING),
            ("back", TunnelState.CONNECTED),
        ]
    finally:
        await tunnel.close()


async def test_exit_while_reconnecting_is_down(fake: FakeCloudflared) -> None:
    """OUR exit watcher also covers a child that dies while RECONNECTING."""
    fake.set(drop_after="0.2", exit_after="1.0")
    tunnel = QuickTunnel(timeout=20, ready_interval=0)
    ctx, events = tracked(tunnel)
    try:
        await tunnel.open(ctx)
        await until(lambda: any("exited with code 12" in ln for ln, _ in events), "exit event")
        assert transitions(events) == [("lost", TunnelState.RECONNECTING)]
        assert state(tunnel) is TunnelState.DOWN
        assert tunnel.status.last_error and "exited with code 12" in tunnel.status.last_error
    finally:
        await tunnel.close()


# -- the child versus its parent (a kernel stand-in in a subprocess) -----------------------


class Parent:
    """tests/fake_cloudflared/parent_with_tunnel.py in its own session, lines in a queue."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE_DIR / "parent_with_tunnel.py"), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()

    def _pump(self, pipe: Any) -> None:
        with pipe:
            for line in pipe:
                self.lines.put(line.strip())

    def expect(self, prefix: str) -> str:
        line = self.lines.get(timeout=30)
        assert line.startswith(prefix), line
        return line

    def child_pid(self) -> int:
        pid: int = json.loads(self.expect("{"))["child_pid"]
        return pid

    def finish(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()


def wait_until_dead(pid: int, seconds: float = 15.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_child_survives_sigint_to_parent_group(fake: FakeCloudflared) -> None:
    """OUR start_new_session: "Interrupt kernel" (SIGINT to its group) spares the FAKE."""
    parent = Parent()
    try:
        child = parent.child_pid()
        assert os.getpgid(child) != parent.proc.pid
        os.killpg(parent.proc.pid, signal.SIGINT)
        parent.expect("sigint")
        assert alive(child)
        assert parent.proc.stdin is not None
        parent.proc.stdin.write("stop\n")
        parent.proc.stdin.flush()
        parent.expect("closed")
        assert parent.proc.wait(timeout=30) == 0
        assert not alive(child)
    finally:
        parent.finish()


def test_child_dies_with_sigkilled_parent(fake: FakeCloudflared) -> None:
    """OUR PR_SET_PDEATHSIG: SIGKILL the parent → the FAKE gets SIGTERM and goes away."""
    if not sys.platform.startswith("linux"):
        pytest.skip("parent-death signal is Linux-only")
    parent = Parent()
    try:
        child = parent.child_pid()
        parent.proc.kill()
        parent.proc.wait()
        assert wait_until_dead(child)
    finally:
        parent.finish()


def test_without_pdeathsig_the_child_is_orphaned(fake: FakeCloudflared) -> None:
    """Negative control for the test above: with the signal disabled the FAKE outlives it."""
    parent = Parent("--no-pdeathsig")
    child = None
    try:
        child = parent.child_pid()
        parent.proc.kill()
        parent.proc.wait()
        time.sleep(1.0)
        assert alive(child)
    finally:
        parent.finish()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)
            wait_until_dead(child)


def test_atexit_stops_a_child_left_running(fake: FakeCloudflared) -> None:
    """OUR atexit safety net: the parent exits without close() (and without PDEATHSIG)."""
    parent = Parent("--no-pdeathsig", "--exit-without-close")
    try:
        child = parent.child_pid()
        assert parent.proc.wait(timeout=30) == 0
        assert not alive(child)
    finally:
        parent.finish()


async def test_close_while_connecting(fake: FakeCloudflared) -> None:
    """OUR close() during open(): the child is stopped and open() fails clearly."""
    fake.set(mode="never-ready")
    tunnel = QuickTunnel(timeout=20)
    opening = asyncio.create_task(tunnel.open(make_ctx()[0]))
    while tunnel.process is None:
        await asyncio.sleep(0.02)
    pid = tunnel.process.pid
    assert pid is not None
    await tunnel.close()
    with pytest.raises(TunnelError, match="closed while it was connecting"):
        await opening
    assert state(tunnel) is TunnelState.CLOSED
    assert not psutil.pid_exists(pid)


# -- named tunnels -------------------------------------------------------------------------


async def test_named_token_via_env_not_argv(
    fake: FakeCloudflared, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """OUR named argv/env: token only in TUNNEL_TOKEN, masked in every log line we keep."""
    caplog.set_level("DEBUG")
    token = fake_token()
    fake.set(echo_token="1")
    monkeypatch.setenv("CLOUDFLARE_TUNNEL_TOKEN", token)
    monkeypatch.setenv("CLOUDFLARE_TUNNEL_URL", "app.example.com/")
    monkeypatch.setenv("SYNTH_API_KEY", SYNTH_KEY)
    ctx, _ = make_ctx()
    tunnel = NamedTunnel(timeout=20)
    tunnel.preflight(ctx)
    try:
        assert await tunnel.open(ctx) == "https://app.example.com"
        assert tunnel.process is not None
        lines = tunnel.process.log_lines()
    finally:
        await tunnel.close()
    (record,) = fake.records()
    assert record["tunnel_token"] == token
    assert token not in " ".join(record["argv"]) and "--token" not in record["argv"]
    assert record["argv"][-1] == "run" and "--metrics" in record["argv"]
    assert not record["synth_api_key_in_env"]
    assert any("token:…" in line for line in lines)
    assert token not in "\n".join(lines) and token not in caplog.text


async def test_named_malformed_token_is_fatal(fake: FakeCloudflared) -> None:
    """OUR reading of the FAKE's "Provided Tunnel token is not valid." line."""
    token = "definitely-not-a-cloudflared-token"
    tunnel = NamedTunnel(token=token, url="https://app.example.com", timeout=20)
    with pytest.raises(TunnelError) as info:
        await tunnel.open(make_ctx()[0])
    message = str(info.value)
    assert "rejected the named tunnel token" in message and "not valid" in message
    assert "force_new_tunnel=True" in message and token not in message


@pytest.mark.parametrize("mode", ["unauthorized", "tunnel-not-found"])
async def test_named_edge_rejections_are_fatal(fake: FakeCloudflared, mode: str) -> None:
    """OUR fatal-line detection: the FAKE keeps running, we stop it and explain."""
    fake.set(mode=mode)
    tunnel = NamedTunnel(token=fake_token(), url="https://app.example.com", timeout=20)
    with pytest.raises(TunnelError, match="rejected the named tunnel token") as info:
        await tunnel.open(make_ctx()[0])
    assert any("Unauthorized" in line for line in info.value.log_lines)
    assert not psutil.pid_exists(fake.records()[0]["pid"])


def test_named_preflight_needs_a_token_source(fake: FakeCloudflared) -> None:
    """OUR preflight: no SYNTH_API_KEY and no CLOUDFLARE_TUNNEL_TOKEN → clear error."""
    with pytest.raises(TunnelError, match="SYNTH_API_KEY"):
        NamedTunnel().preflight(make_ctx()[0])
    with pytest.raises(TunnelError, match="CLOUDFLARE_TUNNEL_URL is not"):
        NamedTunnel(token=fake_token()).preflight(make_ctx()[0])


# -- the Synth backend's /api/v1/tunnels/ (a local stand-in) -------------------------------


class FakeSynthBackend:
    """A stand-in for the remote Synth backend on 127.0.0.1: canned routes, recorded calls."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], tuple[int, Any]] = {}
        self.calls: list[dict[str, Any]] = []
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                backend.calls.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "auth": self.headers.get("Authorization"),
                        "json": json.loads(raw) if raw else None,
                    }
                )
                status, body = backend.routes.get((self.command, self.path), (404, {}))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def synth() -> Iterator[FakeSynthBackend]:
    backend = FakeSynthBackend()
    yield backend
    backend.close()


def tunnel_row(port: int, host: str) -> dict[str, Any]:
    return {"hostname": host, "tunnel_token": fake_token(host), "local_port": port}


async def test_backend_reuses_tunnel_for_this_port(
    fake: FakeCloudflared, synth: FakeSynthBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OUR client: GET /api/v1/tunnels/ → the row for our port; env SYNTH_* honoured."""
    monkeypatch.setenv("SYNTH_API_KEY", SYNTH_KEY)
    monkeypatch.setenv("SYNTH_BACKEND_URL", synth.url + "/")
    rows = [tunnel_row(9000, "other.usesynth.ai"), tunnel_row(8123, "mine.usesynth.ai")]
    synth.routes[("GET", "/api/v1/tunnels/")] = (200, rows)
    tunnel = NamedTunnel(timeout=20)
    try:
        assert await tunnel.open(make_ctx(port=8123)[0]) == "https://mine.usesynth.ai"
    finally:
        await tunnel.close()
    assert [(c["method"], c["path"]) for c in synth.calls] == [("GET", "/api/v1/tunnels/")]
    assert synth.calls[0]["auth"] == f"Bearer {SYNTH_KEY}"
    assert fake.records()[0]["tunnel_token"] == rows[1]["tunnel_token"]


async def test_backend_creates_tunnel_when_none_fits(
    fake: FakeCloudflared, synth: FakeSynthBackend
) -> None:
    """OUR client: nothing for this port → POST /api/v1/tunnels/ with port and subdomain."""
    synth.routes[("GET", "/api/v1/tunnels/")] = (200, [tunnel_row(9000, "other.usesynth.ai")])
    synth.routes[("POST", "/api/v1/tunnels/")] = (200, tunnel_row(8123, "new.usesynth.ai"))
    tunnel = NamedTunnel(synth_api_key=SYNTH_KEY, backend_url=synth.url, timeout=20)
    try:
        assert await tunnel.open(make_ctx(port=8123)[0]) == "https://new.usesynth.ai"
    finally:
        await tunnel.close()
    post = synth.calls[-1]
    assert (post["method"], post["path"]) == ("POST", "/api/v1/tunnels/")
    assert post["json"]["local_port"] == 8123 and post["json"]["subdomain"] == "task-app-8123"


async def test_backend_rotate_on_force_new_tunnel(
    fake: FakeCloudflared, synth: FakeSynthBackend
) -> None:
    """OUR client: force_new_tunnel → POST /api/v1/tunnels/rotate only."""
    synth.routes[("POST", "/api/v1/tunnels/rotate")] = (200, tunnel_row(8123, "fresh.usesynth.ai"))
    tunnel = NamedTunnel(synth_api_key=SYNTH_KEY, backend_url=synth.url, timeout=20)
    try:
        url = await tunnel.open(make_ctx(port=8123, force_new_tunnel=True)[0])
    finally:
        await tunnel.close()
    assert url == "https://fresh.usesynth.ai"
    assert [(c["method"], c["path"]) for c in synth.calls] == [("POST", "/api/v1/tunnels/rotate")]
    assert synth.calls[0]["json"]["local_port"] == 8123


async def test_backend_auth_error_masks_key(fake: FakeCloudflared, synth: FakeSynthBackend) -> None:
    """OUR client: a 401 names SYNTH_API_KEY (masked); cloudflared is never started."""
    synth.routes[("GET", "/api/v1/tunnels/")] = (401, {"detail": "Invalid API key"})
    tunnel = NamedTunnel(synth_api_key=SYNTH_KEY, backend_url=synth.url, timeout=20)
    with pytest.raises(TunnelError) as info:
        await tunnel.open(make_ctx()[0])
    message = str(info.value)
    assert "answered 401" in message and "Invalid API key" in message
    assert "SYNTH_API_KEY (…cdef)" in message and SYNTH_KEY not in message
    assert fake.records() == []
