"""taskapp-relay's lease lifetimes and quotas: a lease whose agent vanished (a SIGKILLed
process or notebook kernel) ends after ``agent_grace``; per-key quotas on leases and metadata.
Real relays, real agents (ours, the tests', a real ipykernel), all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from relay_agent import RelayTestAgent, TaskApp, attach_raw, serve_app
from relay_leases import KEY, LEASES, OTHER_KEY, auth, new_lease, post_lease, until, worker
from support import free_port, wait_for
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from taskapp_notebook.relay import RelayConfig, RelayServer


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30, trust_env=False) as c:
        yield c


# -- agent grace ------------------------------------------------------------------------------


async def test_lease_of_a_vanished_agent_ends_after_the_grace(client: httpx.AsyncClient) -> None:
    config = RelayConfig(agent_grace=0.6, sweep_interval=0.05)
    async with RelayServer([KEY], config=config) as relay:
        lease = await new_lease(client, relay)
        never = await new_lease(client, relay)
        ws = await attach_raw(lease)
        await asyncio.sleep(0.8)  # attached: the grace does not run
        r = await client.get(f"{relay.url}{LEASES}/{lease['lease_id']}", headers=auth())
        assert r.status_code == 200 and r.json()["agent_attached"] is True
        ws.transport.abort()  # the kernel is SIGKILLed: no close frame

        r = await client.get(lease["public_url"] + "/x", headers=worker(lease))
        assert r.status_code == 503 and r.json()["code"] == "agent_offline"

        async def ended() -> bool:
            r = await client.get(lease["public_url"] + "/x", headers=worker(lease))
            return r.status_code == 410 and r.json()["code"] == "lease_expired"

        started = time.monotonic()
        await until(ended, timeout=5)
        assert time.monotonic() - started < 3
        # A lease no agent ever attached to ends the same way.
        r = await client.get(never["public_url"] + "/x", headers=worker(never))
        assert r.status_code == 410
        with pytest.raises(InvalidStatus) as refused:
            await connect(
                lease["agent_connect"]["url"],
                additional_headers={
                    "Authorization": f"Bearer {lease['agent_connect']['agent_token']}"
                },
            )
        assert refused.value.response.status_code == 410
        r = await client.get(f"{relay.url}{LEASES}/{lease['lease_id']}", headers=auth())
        assert r.status_code == 404

    # None keeps such leases for their whole TTL.
    config = RelayConfig(agent_grace=None, sweep_interval=0.05)
    async with RelayServer([KEY], config=config) as relay:
        lease = await new_lease(client, relay)
        await asyncio.sleep(0.5)
        r = await client.get(lease["public_url"] + "/x", headers=worker(lease))
        assert r.status_code == 503


async def test_reconnect_within_the_grace_keeps_the_lease(client: httpx.AsyncClient) -> None:
    config = RelayConfig(agent_grace=1.0, sweep_interval=0.05)
    async with RelayServer([KEY], config=config) as relay, serve_app(TaskApp().asgi()) as app:
        lease = await new_lease(client, relay)
        for _ in range(3):  # three drops, each shorter than the grace
            ws = await attach_raw(lease)
            await asyncio.sleep(0.1)
            ws.transport.abort()
            await asyncio.sleep(0.7)
        async with RelayTestAgent(lease, app):
            r = await client.get(lease["public_url"] + "/echo", headers=worker(lease))
            assert r.status_code == 200


# -- quotas ----------------------------------------------------------------------------------


async def test_lease_and_metadata_quotas_per_key(client: httpx.AsyncClient) -> None:
    config = RelayConfig(max_leases_per_key=3, max_metadata_bytes=1000)
    async with RelayServer([KEY, OTHER_KEY], config=config) as relay:
        leases = [await new_lease(client, relay) for _ in range(3)]
        r = await post_lease(client, relay)
        problem = r.json()
        assert r.status_code == 429 and problem["code"] == "lease_quota_exceeded"
        assert "max_leases_per_key=3" in problem["detail"] and "DELETE" in problem["detail"]
        # Renewing a lease at the quota is fine; another key has its own quota.
        r = await post_lease(client, relay, renew_lease_id=leases[0]["lease_id"])
        assert r.status_code == 200
        await new_lease(client, relay, key=OTHER_KEY)
        # Deleting (or the lease ending) frees a slot.
        r = await client.delete(f"{relay.url}{LEASES}/{leases[1]['lease_id']}", headers=auth())
        assert r.status_code == 204
        await new_lease(client, relay)

        r = await post_lease(client, relay, key=OTHER_KEY, metadata={"blob": "x" * 2000})
        problem = r.json()
        assert r.status_code == 413 and problem["code"] == "metadata_too_large"
        assert "max_metadata_bytes" in problem["detail"]
        await new_lease(client, relay, key=OTHER_KEY, metadata={"blob": "x" * 900})
        health = (await client.get(relay.url + "/health")).json()
        assert health["leases"] == 5


def test_default_quotas_bound_one_key() -> None:
    d = RelayConfig()
    assert d.max_leases_per_key == 100 and d.max_metadata_bytes == 64 * 1024
    assert d.agent_grace == 300.0 and d.header_timeout == 15.0
    for bad in ({"max_leases_per_key": 0}, {"max_metadata_bytes": -1}, {"agent_grace": 0},
                {"header_timeout": 0}, {"max_connections": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RelayConfig(**bad)  # type: ignore[arg-type]


CHILD_APP = """
import sys, time
from fastapi import FastAPI
from taskapp_notebook import InProcessTaskApp
app = FastAPI()

@app.get("/health")
async def health():
    return {"healthy": True}

task_app = InProcessTaskApp(app=app, serve_on="thread", port=int(sys.argv[1]))
task_app.start()
print(task_app.url, task_app.task_app_worker_token, flush=True)
time.sleep(600)
"""


def test_sigkilled_process_lease_ends_after_the_grace() -> None:
    """A process serving a lease (our agent) is SIGKILLed: callers get 503 during the grace,
    then 410, not 503 for the rest of the TTL."""
    config = RelayConfig(agent_grace=1.5, sweep_interval=0.1, ping_interval=0.5,
                         ping_timeout=0.5)
    with RelayServer([KEY], config=config) as relay:
        env = {**os.environ, "SYNTH_BACKEND_URL": relay.url, "SYNTH_API_KEY": KEY}
        child = subprocess.Popen([sys.executable, "-c", CHILD_APP, str(free_port())], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            url, token = child.stdout.readline().split()
            headers = {"Authorization": f"Bearer {token}"}
            assert httpx.get(f"{url}/health", headers=headers, trust_env=False).status_code == 200
            child.kill()
            child.wait(10)
            killed = time.monotonic()

            def status() -> int:
                return httpx.get(f"{url}/health", headers=headers, trust_env=False).status_code

            assert wait_for(lambda: status() == 503, timeout=5)
            assert wait_for(lambda: status() == 410, timeout=10)
            assert time.monotonic() - killed < 6
            r = httpx.get(f"{url}/health", headers=headers, trust_env=False)
            assert r.json()["code"] == "lease_expired"
            assert httpx.get(relay.url + "/health", trust_env=False).json()["leases"] == 0
        finally:
            if child.poll() is None:
                child.kill()
            child.communicate()


KERNEL_CELL = """%%taskapp --tunnel synthtunnel --no-widget --serve-on loop --port {port} --var app
from fastapi import FastAPI

app = FastAPI()

@app.get("/health")
async def health():
    return {{"healthy": True}}
"""


@pytest.mark.kernel
@pytest.mark.timeout(180)
def test_sigkilled_kernel_lease_ends_after_the_grace(tmp_path: Path) -> None:
    """The issue's case: a notebook kernel serving a SynthTunnel lease is SIGKILLed. Its lease
    ends after ``agent_grace`` (410), instead of 503 for the rest of its hour."""
    from jupyter_client.manager import KernelManager

    config = RelayConfig(agent_grace=2.0, sweep_interval=0.1)
    with RelayServer([KEY], config=config) as relay:
        km = KernelManager(kernel_name="python3")
        env = {**os.environ, "SYNTH_BACKEND_URL": relay.url, "SYNTH_API_KEY": KEY}
        km.start_kernel(cwd=str(tmp_path), env=env)
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            for code in ("%load_ext taskapp_notebook", KERNEL_CELL.format(port=free_port())):
                reply = kc.execute_interactive(code, timeout=60, output_hook=lambda msg: None)
                assert reply["content"]["status"] == "ok", reply["content"]
            out: list[str] = []
            kc.execute_interactive(
                "print('LEASE', app.url, app.task_app_worker_token)",
                timeout=30,
                output_hook=lambda msg: out.append(msg["content"].get("text", "")),
            )
            line = next(x for x in "".join(out).splitlines() if x.startswith("LEASE "))
            _, url, token = line.split()
            headers = {"Authorization": f"Bearer {token}"}

            def status() -> int:
                return httpx.get(f"{url}/health", headers=headers, trust_env=False).status_code

            assert status() == 200
            pid = km.provisioner.pid  # type: ignore[union-attr]
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            assert wait_for(lambda: status() == 503, timeout=10)
            assert wait_for(lambda: status() == 410, timeout=15)
            assert time.monotonic() - killed < 10
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
