"""Our relay serves the real synth-ai SDK's compiled agent (synth-ai 0.9.11, ``synth_ai_py``).

The SDK lives in its own venv (``.venv-sdk``, made by ``scripts/sdk-venv``; never in ours):
``tests/scripts/sdk_agent.py`` runs there and opens a SynthTunnel with the SDK's own code
path (lease POSTed by ``SynthTunnelClient``, Rust agent from ``synth_tunnel_start``) against
our in-process ``RelayServer``, for a real uvicorn app. The tests then call the public URL
through the relay, record the frames the agent sends and receives, and stop or expire the
lease. Everything stays on 127.0.0.1; nothing is downloaded here.

Latency figures: ``python bench/tunnel.py`` (or ``-o log_cli=true --log-cli-level=INFO``
here for the frame summary and a short timing line).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import selectors
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from support import free_port

from taskapp_notebook import InProcessTaskApp
from taskapp_notebook.relay import RelayConfig, RelayServer
from taskapp_notebook.relay import endpoint as relay_endpoint
from taskapp_notebook.relay import sessions as relay_sessions
from taskapp_notebook.tunnels.synthtunnel.codec import TextFrame

ROOT = Path(__file__).resolve().parent.parent
#: ``TASKAPP_SDK_PYTHON`` points elsewhere (tests/test_sdk_oracle_required.py uses it).
SDK_PYTHON = Path(os.environ.get("TASKAPP_SDK_PYTHON") or ROOT / ".venv-sdk" / "bin" / "python")
DRIVER = ROOT / "tests" / "scripts" / "sdk_agent.py"
KEY = "sdk-interop-relay-key"
LEASES = "/api/v1/synthtunnel/leases"
MiB = 1024 * 1024


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="module", autouse=True)
def sdk_venv() -> None:
    """These tests are the only external oracle of the wire format: without ``.venv-sdk``
    they skip on a developer's machine, and FAIL in CI (``CI=true``), where a skip would
    let a protocol regression pass unseen."""
    if SDK_PYTHON.exists():
        return
    if in_ci():
        pytest.fail(
            f"{SDK_PYTHON} is missing: scripts/sdk-venv could not install synth-ai 0.9.11. "
            "In CI the SDK interop tests must run; fix the SDK venv step.",
            pytrace=False,
        )
    pytest.skip("no .venv-sdk with synth-ai 0.9.11: run scripts/sdk-venv to check the wire")


logger = logging.getLogger(__name__)


# -- the task app ---------------------------------------------------------------------------


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"healthy": True}

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")

    @app.get("/query")
    async def query(request: Request) -> dict[str, Any]:
        return {"raw": request.url.query, "a": request.query_params.getlist("a")}

    @app.get("/headers")
    async def headers(request: Request) -> dict[str, str]:
        return dict(request.headers)

    @app.get("/boom")
    async def boom() -> JSONResponse:
        return JSONResponse({"error": "kaput"}, status_code=500, headers={"x-app": "boom"})

    return app


# -- frames seen by the relay ---------------------------------------------------------------


@dataclass
class Frame:
    direction: str  # "in" (agent → relay) or "out" (relay → agent)
    type: str
    size: int  # bytes of the WebSocket message
    doc: dict[str, Any]
    chunk: int | None = None  # decoded bytes of a REQ_BODY / RESP_BODY chunk


@dataclass
class FrameLog:
    frames: list[Frame] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, direction: str, message: str | bytes | TextFrame) -> None:
        if isinstance(message, TextFrame):  # a JSON text frame built as UTF-8 bytes
            message = message.data.decode()
        try:
            doc = json.loads(message)
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        chunk = None
        if isinstance(doc.get("chunk_b64"), str):
            try:
                chunk = len(base64.b64decode(doc["chunk_b64"]))
            except ValueError:
                chunk = -1
            doc = {k: v for k, v in doc.items() if k != "chunk_b64"}
        with self.lock:
            self.frames.append(Frame(direction, str(doc.get("type")), len(message), doc, chunk))

    def of_rid(self, rid: str) -> list[Frame]:
        with self.lock:
            return [f for f in self.frames if f.doc.get("rid") == rid]

    def where(self, pred: Callable[[Frame], bool]) -> list[Frame]:
        with self.lock:
            return [f for f in self.frames if pred(f)]


def spy_on_frames(mp: pytest.MonkeyPatch, log: FrameLog) -> None:
    """Record every message the relay parses from an agent and every frame it sends."""
    for module in (relay_endpoint, relay_sessions):
        real_parse = module.parse_agent_frame

        def parse(message: str | bytes, _real: Any = real_parse, **options: Any) -> Any:
            log.record("in", message)
            return _real(message, **options)

        mp.setattr(module, "parse_agent_frame", parse)

    real_send_many = relay_sessions.AgentSession.send_many

    async def send_many(
        self: relay_sessions.AgentSession, messages: list[str | bytes | TextFrame]
    ) -> None:
        for message in messages:
            log.record("out", message)
        await real_send_many(self, messages)

    mp.setattr(relay_sessions.AgentSession, "send_many", send_many)


# -- the SDK driver -------------------------------------------------------------------------


def read_line(stream: IO[str], timeout: float) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return stream.readline()


@dataclass
class SdkTunnel:
    proc: subprocess.Popen[str]
    stderr: Path
    url: str
    worker_token: str
    lease_id: str
    up_s: float

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.worker_token}"}

    def stop(self, how: str = "stdin", timeout: float = 30.0) -> dict[str, Any]:
        """Tell the driver to close its tunnel; return its closing report."""
        assert self.proc.stdin and self.proc.stdout
        if how == "stdin":
            self.proc.stdin.close()
        else:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)  # its output is a few lines: the pipe cannot fill
        assert code == 0, self.errors()
        rest = self.proc.stdout.read()
        report: dict[str, Any] = json.loads(rest.strip().splitlines()[-1])
        return report

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()

    def errors(self) -> str:
        return self.stderr.read_text(errors="replace")[-4000:]


def start_sdk_tunnel(relay: RelayServer, port: int, home: Path) -> SdkTunnel:
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env.update(
        SYNTH_BACKEND_URL=relay.url,
        SYNTH_API_KEY=KEY,
        HOME=str(home),  # the SDK keeps its client_instance_id in ~/.synth
        NO_PROXY="127.0.0.1,localhost",
        PYTHONUNBUFFERED="1",
    )
    home.mkdir(parents=True, exist_ok=True)
    stderr = home / f"sdk_agent-{time.monotonic_ns()}.stderr"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [str(SDK_PYTHON), str(DRIVER), str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            text=True,
        )
    assert proc.stdout is not None
    line = read_line(proc.stdout, 90.0)
    if not line:
        proc.kill()
        proc.communicate(timeout=10)
        pytest.fail(f"the SDK driver printed no tunnel: {stderr.read_text()[-4000:]}")
    info = json.loads(line)
    return SdkTunnel(
        proc, stderr, info["url"], info["worker_token"], info["lease_id"], info["up_s"]
    )


# -- fixtures -------------------------------------------------------------------------------


@dataclass
class Setup:
    relay: RelayServer
    app: InProcessTaskApp
    sdk: SdkTunnel
    frames: FrameLog
    home: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    frames = FrameLog()
    with pytest.MonkeyPatch.context() as mp:
        spy_on_frames(mp, frames)
        relay = RelayServer(api_keys=[KEY]).start_in_thread()
        app = InProcessTaskApp(
            app=make_app(), tunnel_mode="local", serve_on="thread", port=free_port()
        )
        try:
            app.start()
            home = tmp_path_factory.mktemp("sdk-home")
            sdk = start_sdk_tunnel(relay, app.port, home)
            try:
                yield Setup(relay, app, sdk, frames, home)
            finally:
                sdk.kill()
        finally:
            app.stop()
            relay.stop_in_thread()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30.0, trust_env=False) as c:
        yield c


def rid_of_last(frames: FrameLog, method: str, path: str) -> str:
    sent = frames.where(
        lambda f: (
            f.type == "REQ_HEADERS" and f.doc.get("method") == method and f.doc.get("path") == path
        )
    )
    assert sent, f"no REQ_HEADERS for {method} {path}"
    return str(sent[-1].doc["rid"])


def lease_doc(client: httpx.Client, relay: RelayServer, lease_id: str) -> httpx.Response:
    return client.get(f"{relay.url}{LEASES}/{lease_id}", headers={"Authorization": f"Bearer {KEY}"})


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


# -- tests ----------------------------------------------------------------------------------


def test_sdk_agent_attaches_as_documented(setup: Setup, client: httpx.Client) -> None:
    assert setup.sdk.url.startswith(f"{setup.relay.url}/s/rt_")
    attach = setup.frames.where(lambda f: f.direction == "in" and f.type == "ATTACH")
    assert attach, "the SDK agent sent no ATTACH"
    doc = attach[0].doc
    assert [x.get("lease_id") for x in doc["leases"]] == [setup.sdk.lease_id]
    assert doc["leases"][0]["local_target"] == {"host": "127.0.0.1", "port": setup.app.port}
    assert isinstance(doc.get("agent_id"), str) and isinstance(doc.get("capabilities"), dict)
    ack = setup.frames.where(lambda f: f.direction == "out" and f.type == "ATTACH_ACK")
    assert ack, "the relay sent no ATTACH_ACK"
    r = lease_doc(client, setup.relay, setup.sdk.lease_id)
    assert r.status_code == 200 and r.json()["agent_attached"] is True
    logger.info(
        "SDK agent up in %.3fs (lease + ATTACH + health poll); ATTACH: %s",
        setup.sdk.up_s,
        json.dumps({k: v for k, v in doc.items() if k != "leases"}),
    )


def test_requests_through_the_sdk_agent(setup: Setup, client: httpx.Client) -> None:
    url, auth = setup.sdk.url, setup.sdk.auth

    r = client.get(f"{url}/health", headers=auth)
    assert r.status_code == 200 and r.json() == {"healthy": True}

    r = client.get(f"{url}/query?a=1&b=x%20y&a=2", headers=auth)
    assert r.status_code == 200
    assert r.json() == {"raw": "a=1&b=x%20y&a=2", "a": ["1", "2"]}
    rid = rid_of_last(setup.frames, "GET", "/query")
    assert setup.frames.of_rid(rid)[0].doc["query"] == "a=1&b=x%20y&a=2"

    r = client.get(f"{url}/boom", headers=auth)
    assert r.status_code == 500 and r.json() == {"error": "kaput"}
    assert r.headers["x-app"] == "boom"

    # The relay strips the worker token; other caller headers reach the app.
    r = client.get(f"{url}/headers", headers={**auth, "X-API-Key": "app-key", "X-Trace": "t1"})
    assert r.status_code == 200
    seen = r.json()
    assert seen["x-api-key"] == "app-key" and seen["x-trace"] == "t1"
    assert "authorization" not in seen and setup.sdk.worker_token not in json.dumps(seen)

    # No worker token, or a wrong one: the relay answers; the agent never sees the request.
    before = len(setup.frames.where(lambda f: f.type == "REQ_HEADERS"))
    assert client.get(f"{url}/health").status_code == 401
    wrong = client.get(f"{url}/health", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code in (401, 403)
    assert len(setup.frames.where(lambda f: f.type == "REQ_HEADERS")) == before

    # Every request finished: nothing left in flight on the lease.
    lease = setup.sdk.lease_id
    assert eventually(lambda: lease_doc(client, setup.relay, lease).json()["inflight"] == 0)


def test_one_mib_body_both_ways(setup: Setup, client: httpx.Client) -> None:
    body = os.urandom(MiB)
    r = client.post(f"{setup.sdk.url}/echo", headers=setup.sdk.auth, content=body)
    assert r.status_code == 200 and r.content == body

    frames = setup.frames.of_rid(rid_of_last(setup.frames, "POST", "/echo"))
    sent = [f.chunk or 0 for f in frames if f.type == "REQ_BODY"]
    got = [f.chunk or 0 for f in frames if f.type == "RESP_BODY"]
    assert sum(sent) == MiB and max(sent) <= 64 * 1024  # the relay's chunks, as documented
    assert sum(got) == MiB
    assert [f.type for f in frames if f.direction == "in"][-1] == "RESP_END"
    largest = max(f.size for f in frames if f.direction == "in")
    logger.info(
        "1 MiB echo via the SDK agent: %d REQ_BODY frames out, %d RESP_BODY frames in "
        "(largest decoded chunk %d bytes, largest message %d bytes)",
        len(sent),
        len(got),
        max(got),
        largest,
    )

    # A short timing line (no assertion): the full comparison is bench/tunnel.py.
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        client.get(f"{setup.sdk.url}/health", headers=setup.sdk.auth).raise_for_status()
        times.append(time.perf_counter() - t0)
    logger.info(
        "GET /health via the SDK agent: median %.2f ms (50 requests)",
        statistics.median(times) * 1000,
    )


def test_stopping_the_sdk_tunnel_deletes_its_lease(setup: Setup, client: httpx.Client) -> None:
    # A second SDK tunnel (same client id, same app) next to the first one.
    second = start_sdk_tunnel(setup.relay, setup.app.port, setup.home)
    try:
        assert second.lease_id != setup.sdk.lease_id
        assert client.get(f"{second.url}/health", headers=second.auth).status_code == 200
        report = second.stop(how="signal")  # SIGTERM: agent stopped, lease DELETEd
        assert report["closed"] is True
    finally:
        second.kill()
    assert lease_doc(client, setup.relay, second.lease_id).status_code == 404
    gone = client.get(f"{second.url}/health", headers=second.auth)
    assert gone.status_code == 410 and "lease_deleted" in gone.text
    # The relay keeps serving: its health, and the first SDK tunnel.
    assert client.get(f"{setup.relay.url}/health").json()["status"] == "ok"
    r = client.get(f"{setup.sdk.url}/health", headers=setup.sdk.auth)
    assert r.status_code == 200


def test_lease_expiry_with_the_sdk_agent_attached(tmp_path: Path, client: httpx.Client) -> None:
    """The relay caps the TTL; at expiry it closes the SDK agent's socket (4001) and
    refuses its reconnects (410); the relay keeps serving and the driver still exits 0."""
    config = RelayConfig(default_ttl=2.0, max_ttl=2.0, sweep_interval=0.1)
    relay = RelayServer(api_keys=[KEY], config=config).start_in_thread()
    app = InProcessTaskApp(app=make_app(), tunnel_mode="local", serve_on="thread", port=free_port())
    try:
        app.start()
        sdk = start_sdk_tunnel(relay, app.port, tmp_path / "home")
        try:
            assert client.get(f"{sdk.url}/health", headers=sdk.auth).status_code == 200
            assert eventually(
                lambda: client.get(f"{sdk.url}/health", headers=sdk.auth).status_code == 410
            )
            time.sleep(1.0)  # the agent's reconnects (≈ 0.25 s, 0.5 s) are refused meanwhile
            health = client.get(f"{relay.url}/health").json()
            assert health == {"status": "ok", "leases": 0, "agents": 0}
            # A new lease on the same relay works (with a fresh SDK tunnel).
            again = start_sdk_tunnel(relay, app.port, tmp_path / "home")
            try:
                assert client.get(f"{again.url}/health", headers=again.auth).status_code == 200
                assert again.stop()["closed"] is True
            finally:
                again.kill()
            assert sdk.stop()["closed"] is True  # DELETE of the expired lease: 404, tolerated
        finally:
            sdk.kill()
    finally:
        app.stop()
        relay.stop_in_thread()


def test_sdk_agent_reattaches_after_a_relay_restart_with_state(
    tmp_path: Path, client: httpx.Client
) -> None:
    """With ``state_path`` the relay restores its leases; the SDK's agent reconnects with its
    agent token (≈ 0.25 s, 0.5 s, … backoff) and the OLD URL and worker token work again."""
    port = free_port()
    config = RelayConfig(state_path=tmp_path / "relay.sqlite3")
    relay = RelayServer(api_keys=[KEY], port=port, config=config).start_in_thread()
    app = InProcessTaskApp(app=make_app(), tunnel_mode="local", serve_on="thread",
                           port=free_port())
    back: RelayServer | None = None
    try:
        app.start()
        sdk = start_sdk_tunnel(relay, app.port, tmp_path / "home")
        try:
            assert client.get(f"{sdk.url}/health", headers=sdk.auth).status_code == 200
            relay.stop_in_thread()
            back = RelayServer(api_keys=[KEY], port=port, config=config).start_in_thread()
            assert eventually(
                lambda: client.get(f"{sdk.url}/health", headers=sdk.auth).status_code == 200,
                timeout=30,
            ), sdk.errors()
            r = client.post(f"{sdk.url}/echo", content=b"same lease", headers=sdk.auth)
            assert r.status_code == 200 and r.content == b"same lease"
            assert sdk.stop()["closed"] is True
        finally:
            sdk.kill()
    finally:
        app.stop()
        relay.stop_in_thread()
        if back is not None:
            back.stop_in_thread()
