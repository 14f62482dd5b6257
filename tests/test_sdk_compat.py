"""synth-ai compatibility that needs no synth-ai: names, factories, config fields, key errors.

The behaviour against the real SDK (its templates, its configs, its runner, two keys in one
process) is in tests/test_sdk_files.py, which runs synth-ai 0.9.11 and 0.7.3 in their venvs.
"""

from __future__ import annotations

import logging
import signal
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from support import port_is_free, serve

import taskapp_notebook
from taskapp_notebook import (
    HealthCheckError,
    InProcessContainer,
    InProcessTaskApp,
    InvalidParameterError,
    TaskAppConfig,
    TaskAppLoadError,
    create_task_app,
)
from taskapp_notebook.loading import load_task_app_module
from taskapp_notebook.sdk_compat import (
    SDK_FACTORY_NAMES,
    EnvKeyedApp,
    exported_key,
    is_sdk_app,
    is_sdk_config,
)

KEY = "compat-key-0123456789abcdef"

CONFIG = """
from taskapp_notebook import TaskAppConfig

def _make(app_id):
    return TaskAppConfig(app_id=app_id, name="n", description="d")
"""


def write(directory: Path, name: str, source: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(source))
    return path


@contextmanager
def client_for(app: Any) -> Iterator[httpx.Client]:
    """A client of ``app`` served by a real uvicorn on 127.0.0.1."""
    with serve(app) as url, httpx.Client(base_url=url, trust_env=False) as client:
        yield client


# --- names from synth-ai 0.9 ----------------------------------------------------------------


def test_in_process_container_is_in_process_task_app(tmp_path: Path) -> None:
    assert InProcessContainer is InProcessTaskApp
    assert "InProcessContainer" in taskapp_notebook.__all__
    path = write(tmp_path, "c.py", CONFIG + "config = _make('c')\n")
    app = InProcessContainer(container_path=path, tunnel_mode="local")
    assert app.task_app_path == path.resolve() and app.name == "c"
    assert app.container_worker_token is None
    with pytest.raises(InvalidParameterError, match="task_app_path= or its alias container_path="):
        InProcessTaskApp(task_app_path=path, container_path=path)
    with pytest.raises(InvalidParameterError, match="exactly one of"):
        InProcessTaskApp(container_path=path, app=FastAPI())


def test_container_path_serves_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "served.py", CONFIG + "config = _make('served')\n")
    with InProcessContainer(container_path=str(path), tunnel_mode="local", api_key=KEY) as app:
        response = httpx.get(f"{app.url}/", trust_env=False)
        assert response.json() == {"status": "ok", "service": "served"}
    assert port_is_free(app.port)


# --- synth-ai's factory names ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "winner"),
    [
        ("def get_app():\n    return create_task_app(_make('g'))\n"
         "def create_app():\n    return create_task_app(_make('c'))\n", "create_app"),
        ("def app_factory():\n    return create_task_app(_make('f'))\n"
         "def build_config():\n    return _make('b')\n", "app_factory"),
        ("app = create_task_app(_make('a'))\n"
         "def fastapi_app():\n    return create_task_app(_make('f'))\n", "app"),
        ("def build_app(settings):\n    raise AssertionError('never called')\n"
         "config = _make('c')\n", "config"),
        ("def configure_app():\n    return _make('configured')\n", "configure_app"),
        ("def get_app():\n    return 42\nconfig = _make('c')\n", "config"),
    ],
    ids=["create_app before get_app", "factory before build_config", "app first",
         "factory needing arguments skipped", "factory returning a config",
         "factory returning no app skipped"],
)
def test_factory_names_in_synth_ai_order(tmp_path: Path, body: str, winner: str) -> None:
    assert SDK_FACTORY_NAMES == (
        "fastapi_app", "create_app", "build_app", "configure_app", "get_app", "app_factory"
    )
    source = CONFIG + "from taskapp_notebook import create_task_app\n" + body
    assert load_task_app_module(write(tmp_path, "f.py", source)).source == winner


def test_factory_that_raises_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "boom.py", "def create_app():\n    raise RuntimeError('no db')\n")
    with pytest.raises(TaskAppLoadError, match=r"`create_app\(\)` in .* raised RuntimeError"):
        load_task_app_module(path)


def test_lookalike_config_class_is_not_synth_ai(tmp_path: Path) -> None:
    path = write(tmp_path, "look.py", """
        class ContainerConfig:  # same name as synth-ai's, defined elsewhere
            pass

        def build_config():
            return ContainerConfig()
    """)
    with pytest.raises(TaskAppLoadError, match="returned ContainerConfig, not a TaskAppConfig"):
        load_task_app_module(path)
    own = TaskAppConfig(app_id="x", name="x", description="")
    assert not is_sdk_config(own) and not is_sdk_app(create_task_app(own))


def test_signal_handlers_installed_at_import_off_the_main_thread(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file (like synth-ai 0.7's runner module) that installs handlers at import loads on
    the server thread: the handler is skipped with a warning, the app serves."""
    path = write(tmp_path, "sig.py", CONFIG + textwrap.dedent("""
        import signal
        signal.signal(signal.SIGTERM, lambda *a: None)
        config = _make('sig')
    """))
    with caplog.at_level(logging.WARNING, logger="taskapp_notebook.loading"):
        with InProcessTaskApp(task_app_path=path, tunnel_mode="local", serve_on="thread") as app:
            assert app.is_running
            assert getattr(signal.getsignal(signal.SIGTERM), "__name__", "") != "<lambda>"
    # Not the file's lambda (the runner's own handler may be installed meanwhile).
    assert getattr(signal.getsignal(signal.SIGTERM), "__name__", "") != "<lambda>"
    assert any("installs a handler for signal" in r.getMessage() for r in caplog.records)


# --- TaskAppConfig takes synth-ai's fields ------------------------------------------------


def test_sdk_config_fields_are_accepted() -> None:
    config = TaskAppConfig(
        app_id="all", name="All", description="every SDK field",
        dataset_registry={"train": "ds"}, proxy=None, expose_debug_env=True,
        ensure_localapi_auth=False, ensure_container_auth=False,
        validate_candidate=lambda request: {"status": "valid"},
    )
    clone = config.clone()
    assert (clone.dataset_registry, clone.ensure_localapi_auth) == ({"train": "ds"}, False)
    app = create_task_app(config, api_keys=[KEY])
    assert app.state.taskapp_config.dataset_registry == {"train": "ds"}
    with pytest.raises(InvalidParameterError, match="validate_candidate must be callable"):
        TaskAppConfig(app_id="v", name="v", description="", validate_candidate="nope")


def test_validate_candidate_route() -> None:
    def validate(request: Any, fastapi_request: Any) -> dict[str, Any]:
        good = "{q}" in str(request.artifact_payload)
        errors = [] if good else [{"code": "missing_q", "path": "artifact_payload"}]
        return {"status": "valid" if good else "invalid", "errors": errors}

    config = TaskAppConfig(app_id="v", name="v", description="", validate_candidate=validate)
    body = {"candidate_id": "c1", "artifact_kind": "prompt", "artifact_payload": "Q: {q}"}
    auth = {"X-API-Key": KEY}
    with client_for(create_task_app(config, api_keys=[KEY])) as client:
        ok = client.post("/validate-candidate", json=body, headers=auth)
        bad = client.post("/validate-candidate", json={**body, "artifact_payload": "x"},
                          headers=auth)
        missing = client.post("/validate-candidate", json={"artifact_kind": "p"}, headers=auth)
        unauthorised = client.post("/validate-candidate", json=body)
    assert ok.status_code == 200 and ok.json()["status"] == "valid" and ok.json()["errors"] == []
    assert bad.json()["errors"][0]["code"] == "missing_q"
    assert missing.status_code == 422
    assert {e["loc"][-1] for e in missing.json()["detail"]} == {
        "candidate_id", "artifact_payload"
    }
    assert unauthorised.status_code == 401

    broken = TaskAppConfig(app_id="b", name="b", description="",
                           validate_candidate=lambda r: {"no": "status"})
    with client_for(create_task_app(broken, api_keys=[KEY])) as client:
        response = client.post("/validate-candidate", json=body, headers=auth)
    assert response.status_code == 500
    assert response.json()["detail"]["error"]["code"] == "invalid_validate_candidate_response"
    plain = TaskAppConfig(app_id="p", name="p", description="")
    with client_for(create_task_app(plain, api_keys=[KEY])) as client:
        assert client.post("/validate-candidate", json=body, headers=auth).status_code == 404


def test_debug_env_says_which_keys_are_set_never_their_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value-123456")
    monkeypatch.delenv("GROQ_API_KEY", raising=False)
    config = TaskAppConfig(app_id="d", name="d", description="")
    with client_for(create_task_app(config, api_keys=[KEY])) as client:
        response = client.get("/debug/env", headers={"X-API-Key": KEY})
        assert client.get("/debug/env").status_code == 401
    assert response.json()["has_OPENAI_API_KEY"] is True
    assert response.json()["has_GROQ_API_KEY"] is False
    assert "sk-" not in response.text
    hidden = TaskAppConfig(app_id="h", name="h", description="", expose_debug_env=False)
    with client_for(create_task_app(hidden, api_keys=[KEY])) as client:
        assert client.get("/debug/env", headers={"X-API-Key": KEY}).status_code == 404


def test_enabled_vendor_proxy_is_not_served_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    class ProxyConfig:  # the shape of synth-ai's ProxyConfig
        enable_openai = True
        enable_groq = False

    config = TaskAppConfig(app_id="px", name="px", description="", proxy=ProxyConfig())
    with caplog.at_level(logging.WARNING, logger="taskapp_notebook.sdk_routes"):
        app = create_task_app(config, api_keys=[KEY])
    assert any("does not serve" in r.getMessage() for r in caplog.records)
    with client_for(app) as client:
        response = client.post("/proxy/v1/chat/completions", json={}, headers={"X-API-Key": KEY})
    assert response.status_code == 404


# --- a wrong or missing key fails at once -----------------------------------------------------


def refusing_app(status: int, code: str) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"detail": {"error": {"code": code, "message": "no"}}}, status)

    return app


@pytest.mark.parametrize(
    ("status", "code", "says"),
    [
        (400, "unauthorised", "rejected the key (HTTP 400"),
        (503, "missing_environment_api_key", "has no API key configured (HTTP 503"),
    ],
    ids=["400 wrong key (synth-ai 0.7)", "503 no key configured"],
)
def test_key_refusal_fails_at_once_saying_what_to_do(
    status: int, code: str, says: str, port: int
) -> None:
    app = InProcessTaskApp(app=refusing_app(status, code), tunnel_mode="local", port=port,
                           auto_find_port=False, api_key=KEY, health_check_timeout=30)
    started = time.monotonic()
    with pytest.raises(HealthCheckError) as info:
        app.start()
    assert time.monotonic() - started < 10  # not the 30 s health timeout
    message = str(info.value)
    assert says in message and "ENVIRONMENT_API_KEY" in message and "api_key=" in message
    assert KEY not in message and port_is_free(port)


# --- the environment export, with a stand-in for a synth-ai app ---------------------------


def env_reading_app() -> FastAPI:
    """Stand-in for a synth-ai 0.7 app: compares X-API-Key with ENVIRONMENT_API_KEY per
    request and, like it, shows the key's first 15 characters when refusing. Its endpoint
    claims synth-ai's module, which is what marks SDK-built apps."""
    import os

    app = FastAPI()

    async def info(request: Request) -> JSONResponse:
        expected = os.environ.get("ENVIRONMENT_API_KEY", "")
        if request.headers.get("x-api-key") == expected:
            return JSONResponse({"ok": True})
        # like synth-ai 0.7: the first 15 characters of the expected key in the 400
        return JSONResponse({"ok": False, "allowed_first15": [expected[:15]]}, 400)

    info.__module__ = "synth_ai.sdk.localapi._impl.server"
    app.add_api_route("/info", info)
    app.add_api_route("/health", info)
    return app


def test_env_export_is_held_while_running_and_put_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os

    monkeypatch.setenv("ENVIRONMENT_API_KEY", "the-user-s-own")
    app = env_reading_app()
    assert is_sdk_app(app)
    with InProcessTaskApp(app=app, tunnel_mode="local", api_key=KEY) as served:
        assert exported_key() == KEY and os.environ["ENVIRONMENT_API_KEY"] == KEY
        with httpx.Client(trust_env=False) as client:
            good = client.get(f"{served.url}/info", headers={"X-API-Key": KEY})
            bad = client.get(f"{served.url}/info", headers={"X-API-Key": "the-user-s-own"})
        assert (good.status_code, bad.status_code) == (200, 400)
        assert bad.json()["allowed_first15"] == ["*" * 15]  # blanked, same length
    assert exported_key() is None and os.environ["ENVIRONMENT_API_KEY"] == "the-user-s-own"


def test_env_keyed_wrapper_forwards_attributes() -> None:
    inner = env_reading_app()
    wrapped = EnvKeyedApp(inner, KEY, "w")
    assert wrapped.state is inner.state and wrapped.router is inner.router


@pytest.mark.kernel
@pytest.mark.timeout(120)
def test_file_cannot_take_the_kernels_interrupt(tmp_path: Path) -> None:
    """synth-ai 0.7's runner module replaces SIGINT's handler when imported (its handler
    swallows the signal). Loaded by us in a real kernel, such a file leaves the kernel's
    handler in place: "interrupt" still interrupts the next cell."""
    from test_kernel import ok, run, start_kernel, stop_kernel

    path = write(tmp_path, "grabs_sigint.py", CONFIG + textwrap.dedent("""
        import signal
        signal.signal(signal.SIGINT, lambda signum, frame: None)  # what synth-ai 0.7 does
        config = _make('grabs')
    """))
    kernel = start_kernel(tmp_path)
    try:
        reply = ok(kernel.kc, textwrap.dedent(f"""
            import json, signal
            from taskapp_notebook import InProcessTaskApp
            before = signal.getsignal(signal.SIGINT)
            app = InProcessTaskApp(task_app_path={str(path)!r}, tunnel_mode="local")
            app.start()
            print("SIG", json.dumps({{
                "running": app.is_running,
                "kept": signal.getsignal(signal.SIGINT) is before,
            }}))
        """))
        assert reply.json_line("SIG") == {"running": True, "kept": True}
        msg_id = kernel.kc.execute("import time; time.sleep(30)")
        time.sleep(1.0)
        kernel.km.interrupt_kernel()
        from test_kernel import collect

        interrupted = collect(kernel.kc, msg_id, timeout=20)
        assert interrupted.ename == "KeyboardInterrupt"
        assert run(kernel.kc, "app.stop(); print('STOPPED', app.state)").stdout.strip() == (
            "STOPPED stopped"
        )
    finally:
        stop_kernel(kernel)
