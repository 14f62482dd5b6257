"""taskapp-relay's leases across restarts: kept in SQLite (``--state``), our real agent
reconnecting to the same lease, the state file's failure modes, and the CLI's key sources.
Real relays, real agents, real apps, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from relay_agent import RelayTestAgent, TaskApp, attach_raw, serve_app
from relay_leases import KEY, LEASES, OTHER_KEY, auth, new_lease, post_lease, worker
from support import free_port, health_app, port_is_free, wait_for

from taskapp_notebook import InProcessTaskApp
from taskapp_notebook.relay import RelayConfig, RelayServer


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30, trust_env=False) as c:
        yield c


# -- leases survive a restart -------------------------------------------------------------


def test_restart_keeps_url_and_worker_token_and_our_agent_reattaches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "relay.sqlite3"
    port = free_port()
    config = RelayConfig(state_path=state)
    relay = RelayServer([KEY], port=port, config=config).start_in_thread()
    monkeypatch.setenv("SYNTH_BACKEND_URL", relay.url)
    monkeypatch.setenv("SYNTH_API_KEY", KEY)
    app = InProcessTaskApp(app=health_app(), serve_on="thread", port=free_port())
    back: RelayServer | None = None
    try:
        app.start()
        url, token = app.url, app.task_app_worker_token
        assert url and token and app.tunnel is not None
        lease_id = app.tunnel.lease.lease_id  # type: ignore[attr-defined]
        headers = {"Authorization": f"Bearer {token}"}

        def served() -> bool:
            r = httpx.get(f"{url}/health", headers=headers, trust_env=False, timeout=5)
            return r.status_code == 200

        assert served()
        relay.stop_in_thread()
        with pytest.raises(httpx.TransportError):
            served()

        back = RelayServer([KEY], port=port, config=config).start_in_thread()
        assert wait_for(served, timeout=30), "the old URL never worked again after the restart"
        # Our agent reconnected with its agent token to the SAME lease: nothing replaced.
        assert app.url == url and app.task_app_worker_token == token
        assert app.tunnel.lease.lease_id == lease_id  # type: ignore[attr-defined]
        wrong = httpx.get(f"{url}/health", headers={"Authorization": "Bearer nope"},
                          trust_env=False)
        assert wrong.status_code == 403
    finally:
        app.stop()
        relay.stop_in_thread()
        if back is not None:
            back.stop_in_thread()
    # The state file: owner-only, and no secret in it (tokens are derived, never stored).
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    for secret in (KEY, token, url.rsplit("rt_", 1)[1]):
        assert secret.encode() not in raw


async def test_restart_restores_leases_tombstones_and_revokes_removed_keys(
    tmp_path: Path, client: httpx.AsyncClient
) -> None:
    state = tmp_path / "relay.sqlite3"
    port = free_port()
    config = RelayConfig(state_path=str(state), sweep_interval=0.05)
    async with RelayServer([KEY, OTHER_KEY], port=port, config=config) as relay:
        kept = await new_lease(client, relay)
        short = await new_lease(client, relay, requested_ttl_seconds=0.3)
        gone = await new_lease(client, relay)
        revoked = await new_lease(client, relay, key=OTHER_KEY)
        r = await client.delete(f"{relay.url}{LEASES}/{gone['lease_id']}", headers=auth())
        assert r.status_code == 204
    await asyncio.sleep(0.4)  # `short` expires while the relay is down

    # OTHER_KEY is no longer configured: its lease is revoked.
    async with RelayServer([KEY], port=port, config=config) as relay:
        r = await client.get(f"{relay.url}{LEASES}/{kept['lease_id']}", headers=auth())
        assert r.status_code == 200, r.text
        doc = r.json()
        for field in ("public_url", "worker_token", "route_token", "expires_at"):
            assert doc[field] == kept[field]
        assert doc["agent_connect"] == kept["agent_connect"]
        # Renewal keeps the same lease after a restart (same tokens, new expiry).
        r = await post_lease(client, relay, renew_lease_id=kept["lease_id"])
        assert r.status_code == 200 and r.json()["worker_token"] == kept["worker_token"]

        r = await client.get(kept["public_url"] + "/x", headers=worker(kept))
        assert r.status_code == 503 and r.json()["code"] == "agent_offline"
        for ended, code in ((short, "lease_expired"), (gone, "lease_deleted")):
            r = await client.get(ended["public_url"] + "/x", headers=worker(ended))
            assert (r.status_code, r.json()["code"]) == (410, code)
        r = await client.get(revoked["public_url"] + "/x", headers=worker(revoked))
        assert r.status_code == 404

        # And the agent token of the kept lease attaches again.
        async with serve_app(TaskApp().asgi()) as app_url:
            async with RelayTestAgent(kept, app_url):
                r = await client.get(kept["public_url"] + "/echo", headers=worker(kept))
                assert r.status_code == 200


async def test_restored_lease_whose_agent_never_returns_ends_after_the_grace(
    tmp_path: Path, client: httpx.AsyncClient
) -> None:
    state = tmp_path / "relay.sqlite3"
    async with RelayServer([KEY], config=RelayConfig(state_path=state)) as relay:
        lease = await new_lease(client, relay)
        ws = await attach_raw(lease)
    await ws.close()
    config = RelayConfig(state_path=state, agent_grace=0.5, sweep_interval=0.05)
    async with RelayServer([KEY], config=config) as relay:
        r = await client.get(f"{relay.url}{LEASES}/{lease['lease_id']}", headers=auth())
        assert r.status_code == 200  # restored; its grace runs from the relay's start
        await asyncio.sleep(1.0)
        r = await client.get(f"{relay.url}{LEASES}/{lease['lease_id']}", headers=auth())
        assert r.status_code == 404
    async with RelayServer([KEY], config=config) as relay:  # the ending was persisted
        r = await client.get(f"{relay.url}{LEASES}/{lease['lease_id']}", headers=auth())
        assert r.status_code == 404
        assert (await client.get(relay.url + "/health")).json()["leases"] == 0


async def test_state_file_in_use_or_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    state = tmp_path / "relay.sqlite3"
    config = RelayConfig(state_path=state)
    async with RelayServer([KEY], config=config):
        with pytest.raises(RuntimeError, match="in use by another relay"):
            await RelayServer([KEY], config=config).start()
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RuntimeError, match="not a relay state database"):
        await RelayServer([KEY], config=RelayConfig(state_path=junk)).start()
    # The failed starts left the file usable and the port free.
    async with RelayServer([KEY], config=config) as relay:
        assert relay.running
        async with httpx.AsyncClient(trust_env=False) as client:
            await new_lease(client, relay)
    # A damaged row (edited by hand, a bad restore) is a clear error, not a traceback.
    with sqlite3.connect(state) as db:
        db.execute("UPDATE leases SET metadata = '{broken'")
    db.close()
    with pytest.raises(RuntimeError, match="damaged lease row"):
        await RelayServer([KEY], config=config).start()
    with pytest.raises(ValueError, match="state_path"):
        RelayConfig(state_path="  ")


# -- the CLI: keys from the environment or a file, state across process restarts ----------


def _cli(port: int, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "taskapp_notebook.relay", "--port", str(port), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_up(proc: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, proc.communicate()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    return out, err


def test_cli_keys_from_file_and_env_and_state_across_restarts(tmp_path: Path) -> None:
    key_file = tmp_path / "relay-keys"
    key_file.write_text("# relay keys\nfile-key-1\n\nfile-key-2\n")
    key_file.chmod(0o644)
    state = tmp_path / "relay.sqlite3"
    env = {**os.environ, "TASKAPP_RELAY_API_KEYS": "env-key-1"}
    port = free_port()
    args = ("--api-key-file", str(key_file), "--state", str(state))
    proc = _cli(port, env, *args)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_up(proc, port)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"file-key" not in cmdline and b"env-key" not in cmdline
        leases = {}
        for key in ("file-key-2", "env-key-1"):
            r = httpx.post(base + LEASES, json={}, headers=auth(key), trust_env=False)
            assert r.status_code == 201
            leases[key] = r.json()
    finally:
        _, err = _stop(proc)
    assert "file-key" not in err and "env-key" not in err and "--api-key puts" not in err
    assert "is short (10 characters)" in err  # offline guessing with a copy of the state file
    assert "can be read by other users; chmod 600" in err

    proc = _cli(port, env, *args)
    try:
        _wait_up(proc, port)
        for key, lease in leases.items():
            r = httpx.get(f"{base}{LEASES}/{lease['lease_id']}", headers=auth(key),
                          trust_env=False)
            assert r.status_code == 200 and r.json()["worker_token"] == lease["worker_token"]
    finally:
        _, err = _stop(proc)
    assert "2 lease(s) restored" in err

    # --api-key still works, with a warning; the key itself is never printed.
    proc = _cli(port, {k: v for k, v in env.items() if k != "TASKAPP_RELAY_API_KEYS"},
                "--api-key", "cli-visible-key")
    try:
        _wait_up(proc, port)
        r = httpx.post(base + LEASES, json={}, headers=auth("cli-visible-key"), trust_env=False)
        assert r.status_code == 201
    finally:
        _, err = _stop(proc)
    assert "--api-key puts the key on the command line" in err and "cli-visible-key" not in err

    done = subprocess.run(
        [sys.executable, "-m", "taskapp_notebook.relay", "--api-key-file", str(tmp_path / "no")],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and "cannot read --api-key-file" in done.stderr
    other = tmp_path / "other.sqlite3"
    other.write_bytes(b"not sqlite at all" * 64)
    done = subprocess.run(
        [sys.executable, "-m", "taskapp_notebook.relay", "--port", "0", "--state", str(other)],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1 and "not a relay state database" in done.stderr
    assert "Traceback" not in done.stderr


def test_readme_running_your_own_relay_runs_as_printed(tmp_path: Path) -> None:
    """The README's "Running your own relay" block, run by bash as printed (port 8700)."""
    if not port_is_free(8700):
        pytest.skip("port 8700, which the README block uses, is taken on this machine")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## Running your own relay\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    probe = (
        "import os, httpx\n"
        "url = os.environ['SYNTH_BACKEND_URL'] + '/api/v1/synthtunnel/leases'\n"
        "auth = {'Authorization': 'Bearer ' + os.environ['SYNTH_API_KEY']}\n"
        "r = httpx.post(url, json={}, headers=auth, trust_env=False)\n"
        "print('LEASE', r.status_code)\n"
    )
    script = (
        block
        + 'relay=$!\n'
        + 'for i in $(seq 200); do ok=$(python -c "$PROBE" 2>/dev/null) && break; '
        + "sleep 0.1; done\n"
        + 'echo "$ok"\n'
        + 'tr "\\0" " " < /proc/$relay/cmdline | grep -qF "$TASKAPP_RELAY_API_KEYS" '
        + "&& echo KEY-ON-COMMAND-LINE\n"
        + 'kill "$relay"; wait "$relay"; echo "EXIT $?"\n'
    )
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "PROBE": probe}
    env.pop("TASKAPP_RELAY_API_KEYS", None)
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=90)
    assert "LEASE 201" in done.stdout, (done.stdout, done.stderr)
    assert "KEY-ON-COMMAND-LINE" not in done.stdout and "EXIT 0" in done.stdout
    assert (tmp_path / "relay.sqlite3").exists()
    assert port_is_free(8700)


def test_state_file_that_cannot_grow_refuses_new_leases_cleanly(tmp_path: Path) -> None:
    """A full disk, made real with RLIMIT_FSIZE in the relay's process: new leases get 503
    ``state_unavailable``; the relay, its existing leases and its routes keep working."""
    port = free_port()
    state = tmp_path / "relay.sqlite3"
    code = (
        "import resource, runpy, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a core dump\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))\n"
        f"sys.argv = ['taskapp-relay', '--port', '{port}', '--state', {str(state)!r}]\n"
        "runpy.run_module('taskapp_notebook.relay', run_name='__main__')\n"
    )
    env = {**os.environ, "TASKAPP_RELAY_API_KEYS": KEY}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_up(proc, port)
        first = httpx.post(base + LEASES, json={}, headers=auth(), trust_env=False).json()
        statuses = []
        for _ in range(20):  # 60 KB of metadata each: the file hits 256 KiB
            r = httpx.post(base + LEASES, json={"metadata": {"x": "y" * 60_000}},
                           headers=auth(), trust_env=False)
            statuses.append(r.status_code)
            if r.status_code != 201:
                problem = r.json()
                break
        assert statuses[-1] == 503 and problem["code"] == "state_unavailable", statuses
        assert "retry later" in problem["detail"]
        assert httpx.get(base + "/health", trust_env=False).json()["status"] == "ok"
        r = httpx.get(f"{base}{LEASES}/{first['lease_id']}", headers=auth(), trust_env=False)
        assert r.status_code == 200
        r = httpx.get(first["public_url"] + "/x", headers=worker(first), trust_env=False)
        assert r.status_code == 503 and r.json()["code"] == "agent_offline"
    finally:
        _, err = _stop(proc)
    assert "Lease request refused: writing the relay state file failed" in err
    assert "Traceback" not in err


