"""``%taskapp`` / ``%%taskapp`` on a real IPython InteractiveShell (no kernel).

Without a running event loop the magics serve on a thread (``serve_on`` falls back from
"loop"), so every app here is a real uvicorn server on a real loopback port.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from support import free_port, port_is_free

from taskapp_notebook import InProcessTaskApp, registry
from taskapp_notebook.notebook.extension import loaded_magics

pytestmark = pytest.mark.timeout(120)

APP_BODY = """
from fastapi import FastAPI
app = FastAPI()

@app.get("/health")
def health():
    return {"ok": True}
"""

CONFIG_BODY = """
from taskapp_notebook import TaskAppConfig

def _rollout(request):
    return {"reward_info": {"outcome_reward": 1.0}}

config = TaskAppConfig(app_id="demo", name="Demo", description="demo", rollout=_rollout)
"""


@pytest.fixture
def shell(monkeypatch: pytest.MonkeyPatch) -> Iterator[InteractiveShell]:
    monkeypatch.delenv("SYNTH_API_KEY", raising=False)
    monkeypatch.delenv("ENVIRONMENT_API_KEY", raising=False)
    ip = InteractiveShell.instance()
    ip.reset()  # a clean namespace: the cell magic looks for app / config there
    ip.run_line_magic("load_ext", "taskapp_notebook")
    yield ip
    ip.run_line_magic("unload_ext", "taskapp_notebook")
    ip.config.pop("TaskAppMagics", None)
    assert registry.running() == []


def cell(ip: InteractiveShell, line: str, body: str = APP_BODY) -> Any:
    return ip.run_cell_magic("taskapp", line, body)


def run_cell(ip: InteractiveShell, code: str, cell_id: str | None = None) -> tuple[Any, str]:
    """Run ``code`` as a notebook cell; return (result, captured stdout+stderr)."""
    with capture_output() as captured:
        result = ip.run_cell(code, store_history=True, cell_id=cell_id)
    return result, captured.stdout + captured.stderr


def usage_error(ip: InteractiveShell, code: str) -> str:
    """Run ``code``; assert it showed one UsageError line and no traceback; return it."""
    result, out = run_cell(ip, code)
    assert isinstance(result.error_in_exec, UsageError), (code, out)
    assert "Traceback" not in out, out
    assert out.startswith("UsageError: "), out
    return out


def get_health(app: InProcessTaskApp) -> int:
    headers = {"X-API-Key": app.api_key}
    return httpx.get(f"{app.url}/health", headers=headers, trust_env=False).status_code


# ------------------------------------------------------------------------ loading


def test_load_registers_magics_cheaply() -> None:
    code = textwrap.dedent("""
        import sys
        from IPython.core.interactiveshell import InteractiveShell
        ip = InteractiveShell.instance()
        ip.run_line_magic("load_ext", "taskapp_notebook")
        assert "taskapp" in ip.magics_manager.magics["line"]
        assert "taskapp" in ip.magics_manager.magics["cell"]
        heavy = sorted(m for m in ("fastapi", "uvicorn", "starlette", "websockets")
                       if m in sys.modules)
        print("HEAVY", heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert "HEAVY []" in out


def test_unload_stops_apps_and_restores_hooks(shell: InteractiveShell) -> None:
    registry.uninstall_hooks()  # earlier tests in this process may have left them installed
    sigterm_before = signal.getsignal(signal.SIGTERM)
    hooks_before = list(shell.events.callbacks["pre_run_cell"])
    app = cell(shell, f"--tunnel local --no-widget --port {free_port()}")
    port = app.port
    assert signal.getsignal(signal.SIGTERM) is not sigterm_before  # registry's handler
    magics = loaded_magics(shell)
    assert magics is not None and magics in shell.configurables

    shell.run_line_magic("unload_ext", "taskapp_notebook")
    assert registry.running() == [] and str(app.state) == "stopped" and port_is_free(port)
    assert "taskapp" not in shell.magics_manager.magics["line"]
    assert "taskapp" not in shell.magics_manager.magics["cell"]
    assert "TaskAppMagics" not in shell.magics_manager.registry
    assert magics not in shell.configurables
    assert len(shell.events.callbacks["pre_run_cell"]) == len(hooks_before) - 1
    assert shell.events.callbacks["post_run_cell"] == []
    assert signal.getsignal(signal.SIGTERM) is sigterm_before
    shell.run_line_magic("load_ext", "taskapp_notebook")  # for the fixture's teardown


def test_reload_ext_stops_apps_and_keeps_magics(shell: InteractiveShell) -> None:
    app = cell(shell, f"--tunnel local --no-widget --port {free_port()}")
    shell.run_line_magic("reload_ext", "taskapp_notebook")
    assert str(app.state) == "stopped" and registry.running() == []
    assert "taskapp" in shell.magics_manager.magics["cell"]
    assert len(shell.events.callbacks["post_run_cell"]) == 1


# ------------------------------------------------------------------------ %%taskapp


def test_cell_magic_serves_app_returns_it_and_binds_var(shell: InteractiveShell) -> None:
    port = free_port()
    result, out = run_cell(
        shell, f"%%taskapp --tunnel local --no-widget --port {port} --var ta\n{APP_BODY}"
    )
    app = result.result
    assert isinstance(app, InProcessTaskApp) and app.is_running, out
    assert shell.user_ns["ta"] is app and shell.user_ns["_"] is app
    assert app.port == port and app.url == f"http://127.0.0.1:{port}"
    assert get_health(app) == 200
    assert app.serve_on == "thread"  # no loop runs in a terminal shell


def test_cell_magic_accepts_config_factory_and_app_var(shell: InteractiveShell) -> None:
    app = cell(shell, "--tunnel local --no-widget --name cfg", CONFIG_BODY)
    assert app.is_running and get_health(app) == 200
    app2 = cell(shell, "--tunnel local --no-widget --name factory",
                "def config_factory():\n    return config")
    assert app2.is_running and get_health(app2) == 200
    app3 = cell(shell, "--tunnel local --no-widget --name chosen --app mine",
                APP_BODY.replace("app = FastAPI()", "mine = app = FastAPI()"))
    assert app3.is_running and get_health(app3) == 200
    assert sorted(a.name for a in registry.running()) == ["cfg", "chosen", "factory"]


def test_rerun_same_cell_id_replaces_app_on_same_port(shell: InteractiveShell) -> None:
    code = f"%%taskapp --tunnel local --no-widget\n{APP_BODY}"
    first, _ = run_cell(shell, code, cell_id="cell-1")
    second, _ = run_cell(shell, code, cell_id="cell-1")
    other, _ = run_cell(shell, code, cell_id="cell-2")
    a, b, c = first.result, second.result, other.result
    assert str(a.state) == "stopped" and b.is_running and c.is_running
    assert b.port == a.port and b.name == a.name and c.name != a.name
    assert b.api_key == a.api_key and c.api_key != a.api_key  # generated key carried over
    assert registry.running() == [b, c]


def test_without_cell_id_name_then_arguments_key_the_rerun(shell: InteractiveShell) -> None:
    a = cell(shell, "--tunnel local --no-widget --name same")
    b = cell(shell, "--tunnel local --no-widget --name same --health-timeout 9")
    assert str(a.state) == "stopped" and b.is_running and b.port == a.port
    c = cell(shell, "--tunnel local --no-widget")
    d = cell(shell, "--tunnel local --no-widget")
    assert str(c.state) == "stopped" and d.is_running
    assert {x.name for x in registry.running()} == {"same", d.name}


def test_body_runs_like_a_cell(shell: InteractiveShell) -> None:
    body = "import asyncio\nawait asyncio.sleep(0)\n_files = !echo hi\n" + APP_BODY
    app = cell(shell, "--tunnel local --no-widget", body)
    assert app.is_running and shell.user_ns["_files"] == ["hi"]


def test_body_errors(shell: InteractiveShell) -> None:
    result, out = run_cell(shell, "%%taskapp --tunnel local\nraise KeyError('boom')")
    assert isinstance(result.error_in_exec, KeyError)  # user code: a normal traceback
    err = usage_error(shell, "%%taskapp --tunnel local\nfrom taskapp_notebook import "
                             "TaskAppConfig\nconfig = TaskAppConfig(app_id='', name='x', "
                             "description='')")
    assert "TaskAppConfig.app_id must be a non-empty string" in err
    assert registry.running() == []


# ------------------------------------------------------------------------ %taskapp


def test_line_subcommands(shell: InteractiveShell, tmp_path: Path) -> None:
    port = free_port()
    app = cell(shell, f"--tunnel local --no-widget --name one --port {port}")
    assert get_health(app) == 200

    with capture_output() as cap:
        shell.run_line_magic("taskapp", "list")
    text, html = cap.outputs[0].data["text/plain"], cap.outputs[0].data["text/html"]
    assert text.splitlines()[0].split() == ["name", "state", "URL", "port", "tunnel",
                                            "health", "uptime", "requests"]
    assert text.splitlines()[2].split()[:5] == ["one", "running", app.url, str(port), "local"]
    assert "<table" in html and "<td>one</td>" in html

    assert shell.run_line_magic("taskapp", "url") == app.url
    assert shell.run_line_magic("taskapp", "url one") == app.url

    with capture_output() as cap:
        shell.run_line_magic("taskapp", "status one")
    status = cap.outputs[0].data["text/plain"]
    assert "state" in status and "running" in status and app.api_key not in status
    assert app.api_key[-4:] in status  # masked: only the last 4 characters

    with capture_output() as cap:
        shell.run_line_magic("taskapp", "logs one -n 5")
    assert "state: running" in cap.stdout and "GET /health 200" in cap.stdout

    with capture_output() as cap:
        shell.run_line_magic("taskapp", "restart one")
    assert app.is_running and app.port == port and "Restarted" in cap.stdout

    task_file = tmp_path / "my_task.py"
    task_file.write_text(APP_BODY)
    started = shell.run_line_magic("taskapp", f"start {task_file} --tunnel local --no-widget")
    assert started.name == "my_task" and get_health(started) == 200

    with capture_output() as cap:
        shell.run_line_magic("taskapp", "stop one")
    assert str(app.state) == "stopped" and "Stopped task app 'one'" in cap.stdout
    with capture_output():
        shell.run_line_magic("taskapp", "stop")  # the only one left
        shell.run_line_magic("taskapp", "stop --all")
    assert registry.running() == [] and port_is_free(port)
    with capture_output() as cap:
        shell.run_line_magic("taskapp", "list")
    assert cap.outputs[0].data["text/plain"] == "No task apps are running."


def test_help_prints_usage_without_error(shell: InteractiveShell) -> None:
    result, out = run_cell(shell, "%taskapp -h")
    assert result.success and out.startswith("%%taskapp [options]")
    assert "%taskapp stop [NAME | --all]" in out
    result, out = run_cell(shell, "%taskapp start -h")
    assert result.success and "usage: %taskapp start" in out and "--tunnel" in out
    result, out = run_cell(shell, "%%taskapp --help\napp = None")
    assert result.success and "--serve-on {loop,thread}" in out
    assert registry.running() == []


BAD_INPUTS = [
    ("%taskapp frobnicate", "Valid: start, stop, restart, list, status, url, logs"),
    ("%taskapp stop nope", "No running task app named 'nope'"),
    ("%taskapp stop one --all", "give NAME or --all"),
    ("%taskapp url", "No task app is running"),
    ("%taskapp status ghost", "No running task app named 'ghost'"),
    ("%taskapp logs -n 0", "-n must be at least 1"),
    ("%taskapp list extra", "unrecognized arguments: extra"),
    ("%taskapp start", "the following arguments are required: PATH.py"),
    ("%taskapp start /nonexistent/app.py --tunnel local", "/nonexistent/app.py"),
    ("%taskapp start 'unbalanced", "No closing quotation"),
    ("%%taskapp --tunnel nowhere\napp = 1", "invalid choice: 'nowhere'"),
    ("%%taskapp --serve-on fork\napp = 1", "invalid choice: 'fork' (choose from"),
    ("%%taskapp --port abc\napp = 1", "not a port number: 'abc'"),
    ("%%taskapp --port 80 --tunnel local\n" + APP_BODY, "Port must be in range [1024, 65535]"),
    ("%%taskapp --health-timeout -1\napp = 1", "positive number of seconds"),
    ("%%taskapp --var 1x\napp = 1", "not a Python variable name"),
    ("%%taskapp --tunnel local\nx = 1", "defines none of 'app'"),
    ("%%taskapp --tunnel local\napp = 42", "'app' is an int"),
    ("%%taskapp --tunnel local\nfrom fastapi import FastAPI\napp = FastAPI",
     "did you mean app = FastAPI(...)"),
    ("%%taskapp --tunnel local --app missing\napp = 1", "no variable named 'missing'"),
    ("%%taskapp --tunnel local\nconfig = 'nope'", "'config' is a str"),
    ("%%taskapp --api-key-env TASKAPP_TEST_UNSET_VAR --tunnel local\n" + APP_BODY,
     "'TASKAPP_TEST_UNSET_VAR' is not set"),
    ("%%taskapp --tunnel local --url http://x\n" + APP_BODY, "--url is for --tunnel preconfigured"),
    ("%%taskapp --tunnel preconfigured\n" + APP_BODY, "needs preconfigured_url"),
    ("%%taskapp --tunnel synthtunnel\n" + APP_BODY, "SYNTH_API_KEY is not set"),
    ("%%taskapp --serve-on loop --tunnel local\n" + APP_BODY, "needs a running event loop"),
]


@pytest.mark.parametrize(("code", "expected"), BAD_INPUTS)
def test_bad_input_is_one_usage_error_line(shell: InteractiveShell, code: str,
                                           expected: str) -> None:
    out = usage_error(shell, code)
    assert expected in out, out
    assert registry.running() == []


def test_failed_start_leaves_nothing_running_and_masks_secrets(
    shell: InteractiveShell, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "tok-" + "s3cr3t" * 6
    monkeypatch.setenv("TASKAPP_TEST_TOKEN", token)
    monkeypatch.setenv("TASKAPP_TEST_KEY", "key-" + "k3y" * 10)
    port = free_port()
    out = usage_error(shell, (
        f"%%taskapp --url http://127.0.0.1:{free_port()} --auth-header X-Token "
        f"--auth-token-env TASKAPP_TEST_TOKEN --api-key-env TASKAPP_TEST_KEY --verify-tunnel "
        f"--health-timeout 0.3 --port {port} --no-widget\n{APP_BODY}"
    ))
    assert "did not start" in out and token not in out and "k3yk3yk3y" not in out
    assert registry.running() == [] and port_is_free(port)


def test_config_traits(shell: InteractiveShell) -> None:
    magics = loaded_magics(shell)
    assert magics is not None
    shell.run_line_magic("config", 'TaskAppMagics.tunnel = "local"')
    shell.run_line_magic("config", "TaskAppMagics.widget = False")
    shell.run_line_magic("config", f"TaskAppMagics.port = {free_port()}")
    shell.run_line_magic("config", "TaskAppMagics.health_timeout = 5.0")
    shell.run_line_magic("config", 'TaskAppMagics.serve_on = "thread"')
    assert (magics.tunnel, magics.widget, magics.health_timeout) == ("local", False, 5.0)
    assert shell.run_line_magic("config", "TaskAppMagics.tunnel") == "local"
    with capture_output() as cap:
        app = cell(shell, "")
    assert app.tunnel_mode == "local" and app.port == magics.port
    assert app.health_check_timeout == 5.0 and app.serve_on == "thread"
    assert cap.outputs == []  # widget off
    with capture_output() as cap:
        shell.run_line_magic("config", "TaskAppMagics")
    assert "TaskAppMagics.serve_on" in cap.stdout
    with capture_output() as cap:
        shell.run_line_magic("config", 'TaskAppMagics.tunnel = "bogus"')
    assert magics.tunnel == "local"  # invalid values are refused


def test_widget_is_displayed_and_closed_on_rerun(shell: InteractiveShell) -> None:
    code = f"%%taskapp --tunnel local\n{APP_BODY}"
    with capture_output() as cap:
        first = shell.run_cell(code, store_history=True, cell_id="w")
    assert any("text/html" in o.data and "application/vnd.jupyter.widget-view+json" in o.data
               for o in cap.outputs), cap.outputs
    magics = loaded_magics(shell)
    assert magics is not None
    (view,) = magics.views.values()
    # The widget shows the app, so no Out[] repr line; ``_`` is bound to the instance.
    assert first.result is None
    first_app = shell.user_ns["_"]
    assert view.app is first_app and view.monitor is not None
    shell.run_cell(code, store_history=True, cell_id="w")
    second_app = shell.user_ns["_"]
    assert str(first_app.state) == "stopped" and second_app.is_running
    (new_view,) = magics.views.values()
    assert new_view is not view and new_view.app is second_app
    assert view.monitor.closed  # the replaced app's monitor was closed with its view


# ------------------------------------------------------------------------ fuzz

FUZZ_TOKENS = [
    "start", "stop", "restart", "list", "status", "url", "logs", "help", "--all", "--name",
    "one", "-n", "0", "3", "--port", "80", "99999", "abc", "--tunnel", "local", "bogus",
    "synthtunnel", "preconfigured", "--serve-on", "loop", "thread", "--health-timeout",
    "0.3", "nan", "-1", "--url", "http://127.0.0.1:1", "--api-key-env", "NOPE_UNSET_VAR",
    "--var", "1x", "fz", "--app", "nothing", "app", "'", '"', "--", "-", "=", "--port=",
    "missing.py", "--no-auto-find-port", "--verify-tunnel", "--no-widget", "--host", "0.0.0.0",
    "--auth-header", "X-A", "--auth-token-env", "ünï", "%", "$HOME", "\\", ";",
    "--force-new-tunnel",
]


def test_fuzz_random_arguments_never_crash_the_shell(shell: InteractiveShell) -> None:
    shell.run_line_magic("config", 'TaskAppMagics.tunnel = "local"')
    shell.run_line_magic("config", "TaskAppMagics.widget = False")
    shell.run_line_magic("config", "TaskAppMagics.health_timeout = 0.3")
    shell.run_line_magic("config", f"TaskAppMagics.port = {free_port()}")
    rng = random.Random(20240611)
    outcomes = {"ok": 0, "usage": 0}
    for i in range(300):
        line = " ".join(rng.choice(FUZZ_TOKENS) for _ in range(rng.randint(0, 6)))
        if rng.random() < 0.2:
            line += "".join(rng.choice("-=' \"x\t%") for _ in range(rng.randint(1, 5)))
        try:
            with capture_output():
                if i % 2:
                    shell.run_line_magic("taskapp", line)
                else:
                    cell(shell, line)
        except UsageError:
            outcomes["usage"] += 1
        else:
            outcomes["ok"] += 1
        registry.stop_all()
    print(f"\nfuzz: {outcomes}")
    assert outcomes["usage"] > 0 and outcomes["ok"] > 0
    result, _ = run_cell(shell, "40 + 2")
    assert result.result == 42


# ------------------------------------------------------------------------ a newcomer's first hour


def test_key_and_port_stay_the_same_over_five_reruns(shell: InteractiveShell) -> None:
    code = f"%%taskapp --tunnel local --no-widget\n{APP_BODY}"
    apps = [run_cell(shell, code, cell_id="rerun-5")[0].result for _ in range(5)]
    assert all(isinstance(a, InProcessTaskApp) for a in apps)
    assert len({a.api_key for a in apps}) == 1, [a.api_key[-4:] for a in apps]
    assert len({a.port for a in apps}) == 1 and len({a.name for a in apps}) == 1
    assert registry.running() == [apps[-1]] and get_health(apps[-1]) == 200


def test_cell_help_alone_prints_every_option(shell: InteractiveShell) -> None:
    for code in ("%%taskapp -h", "%%taskapp --help\n", "%%taskapp --tunnel local -h\n\n"):
        result, out = run_cell(shell, code)
        assert result.success, (code, out)
        assert "usage: %%taskapp" in out and "--serve-on {loop,thread}" in out, out
        assert "--no-auto-find-port" in out and "cell body is empty" not in out
    # the line magic's help is complete too: every subcommand and every %%taskapp option
    result, out = run_cell(shell, "%taskapp -h")
    assert result.success and "] ..." not in out and "…" not in out, out
    assert "%taskapp stop [NAME | --all]" in out and "--health-timeout SECONDS" in out
    assert registry.running() == []


def test_body_defining_nothing_does_not_serve_a_stale_app(shell: InteractiveShell) -> None:
    first = cell(shell, "--tunnel local --no-widget --name first")
    assert first.is_running
    # `app` and `config` from earlier cells are still in the namespace
    shell.run_cell(CONFIG_BODY)
    out = usage_error(shell, "%%taskapp --tunnel local --no-widget --name second\nx = 1")
    assert "defines none of 'app'" in out
    assert registry.running() == [first]
    # re-binding the same object counts as defining it; so does an import
    same = cell(shell, "--tunnel local --no-widget --name third", "app = app")
    assert same.is_running
    shell.run_cell("import types, sys; sys.modules['nc_mod'] = types.ModuleType('nc_mod')")
    shell.user_ns["nc_mod"] = sys.modules["nc_mod"]
    sys.modules["nc_mod"].app = shell.user_ns["app"]  # type: ignore[attr-defined]
    imported = cell(shell, "--tunnel local --no-widget --name fourth", "from nc_mod import app")
    assert imported.is_running
    del sys.modules["nc_mod"]


def test_body_error_shows_the_users_frames_only(shell: InteractiveShell) -> None:
    shell.run_line_magic("colors", "nocolor")
    body = "def helper():\n    raise KeyError('boom')\n\nhelper()"
    result, out = run_cell(shell, f"%%taskapp --tunnel local --no-widget\n{body}")
    assert isinstance(result.error_in_exec, KeyError)
    assert "KeyError: 'boom'" in out and "helper()" in out, out
    assert "raise KeyError('boom')" in out, out
    assert "taskapp_notebook" not in out and "run_cell_magic" not in out, out
    assert registry.running() == []


def test_auto_find_port_is_one_name_with_deprecated_aliases(shell: InteractiveShell) -> None:
    magics = loaded_magics(shell)
    assert magics is not None
    port = free_port()
    blocker = __import__("socket").socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        out = usage_error(shell, f"%%taskapp --tunnel local --no-widget --port {port} "
                                 f"--no-auto-find-port\n{APP_BODY}")
        assert f"Port {port}" in out
        with pytest.warns(DeprecationWarning, match="--no-auto-find-port"):
            with pytest.raises(UsageError, match=f"Port {port}"):
                cell(shell, f"--tunnel local --no-widget --port {port} --no-auto-port")
        shell.run_line_magic("config", "TaskAppMagics.auto_find_port = False")
        assert magics.auto_find_port is False
        with pytest.raises(UsageError, match=f"Port {port}"):
            cell(shell, f"--tunnel local --no-widget --port {port}")
        with pytest.warns(DeprecationWarning, match="TaskAppMagics.auto_find_port"):
            shell.run_line_magic("config", "TaskAppMagics.auto_port = True")
        assert magics.auto_find_port is True
        moved = cell(shell, f"--tunnel local --no-widget --port {port}")
        assert moved.port != port and moved.auto_find_port is True
    finally:
        blocker.close()


def test_wrong_type_message_reads_well(shell: InteractiveShell) -> None:
    assert "'app' is an int," in usage_error(shell, "%%taskapp --tunnel local\napp = 42")
    assert "'config' is an int," in usage_error(shell, "%%taskapp --tunnel local\nconfig = 4")


def test_failed_rerun_restores_the_working_app(shell: InteractiveShell) -> None:
    port = free_port()
    code = f"%%taskapp --tunnel local --no-widget --port {port}\n{APP_BODY}"
    working = run_cell(shell, code, cell_id="restore")[0].result
    assert working.is_running and get_health(working) == 200
    broken = APP_BODY.replace('return {"ok": True}',
                              "from fastapi import Response\n    return Response(status_code=503)")
    out = usage_error_with_id(shell, f"%%taskapp --tunnel local --no-widget --port {port} "
                                     f"--health-timeout 0.5\n{broken}", "restore")
    assert "did not start" in out and "previous app" in out and "running again" in out, out
    assert working.is_running and working.port == port and get_health(working) == 200
    assert registry.running() == [working]
    with capture_output() as logs:
        shell.run_line_magic("taskapp", f"logs {working.name}")
    assert "re-run failed:" in logs.stdout and "HTTP 503" in logs.stdout, logs.stdout
    # the next good re-run replaces the restored app as usual, same key
    again = run_cell(shell, code, cell_id="restore")[0].result
    assert again.is_running and again.api_key == working.api_key and again.port == port
    assert str(working.state) == "stopped"


def usage_error_with_id(ip: InteractiveShell, code: str, cell_id: str) -> str:
    result, out = run_cell(ip, code, cell_id=cell_id)
    assert isinstance(result.error_in_exec, UsageError), (code, out)
    assert "Traceback" not in out, out
    return out


def test_every_view_renders_from_the_one_presenter(shell: InteractiveShell) -> None:
    from taskapp_notebook.notebook.widget import TaskAppView

    app = cell(shell, "--tunnel local --no-widget --name shown")
    app.started_at = __import__("time").time() - 185  # up for 3 min 5 s
    view = TaskAppView(app, monitor=False)
    try:
        with capture_output() as listed:
            shell.run_line_magic("taskapp", "list")
        with capture_output() as status:
            shell.run_line_magic("taskapp", "status shown")
        table = listed.outputs[0].data["text/plain"]
        detail = status.outputs[0].data["text/plain"]
        for text in (table, detail, view.summary_text(), view.summary_html()):
            assert "3m 05s" in text, text
            assert app.api_key not in text and app.api_key[-4:] in text or text is table
        with capture_output() as logs:
            shell.run_line_magic("taskapp", "logs shown -n 40")
        assert logs.stdout.splitlines()[1:] == view.log_lines()[-40:]
    finally:
        view.close()
