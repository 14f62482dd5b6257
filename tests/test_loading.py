"""Loading task apps from .py files: each accepted form, the lookup order, every failure."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskapp_notebook.contract import TaskAppConfig, create_task_app
from taskapp_notebook.errors import InvalidParameterError, TaskAppLoadError, TaskAppNotFoundError
from taskapp_notebook.loading import (
    LOOKED_FOR,
    load_task_app,
    load_task_app_module,
    validate_task_app_path,
)

KEY = "load-key"

CONFIG_BODY = """
from taskapp_notebook.contract import TaskAppConfig
from taskapp_notebook.models import RewardInfo, RolloutResponse

def _rollout(request, fastapi_request):
    return RolloutResponse(reward_info=RewardInfo(outcome_reward=1.0))

def _make(app_id):
    return TaskAppConfig(
        app_id=app_id, name="Loaded", description="from a file",
        provide_taskset_description=lambda: {"made_by": app_id}, rollout=_rollout,
    )
"""


def write(directory: Path, name: str, source: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(source))
    return path


async def get_json(app: Any, path: str, **headers: str) -> Any:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://loaded") as client:
        response = await client.get(path, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


# --- path validation ---------------------------------------------------------------------------


def test_validate_task_app_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = write(tmp_path, "good.py", "app = None\n")
    assert validate_task_app_path(good) == good.resolve()
    monkeypatch.chdir(tmp_path)
    assert validate_task_app_path("good.py") == good.resolve()

    with pytest.raises(TaskAppNotFoundError, match=r"'missing\.py' does not exist") as missing:
        validate_task_app_path("missing.py")
    assert isinstance(missing.value, FileNotFoundError)
    assert str(tmp_path) in str(missing.value)

    with pytest.raises(InvalidParameterError, match="is a directory"):
        validate_task_app_path(tmp_path)
    notes = write(tmp_path, "notes.txt", "hello")
    with pytest.raises(InvalidParameterError, match=r"must be a \.py file; got a \.txt suffix"):
        validate_task_app_path(notes)
    with pytest.raises(InvalidParameterError, match="str or Path; got int"):
        validate_task_app_path(8114)  # type: ignore[arg-type]


def test_load_missing_file_raises_not_found(tmp_path: Path) -> None:
    with pytest.raises(TaskAppNotFoundError):
        load_task_app(tmp_path / "nope.py")


# --- each accepted form --------------------------------------------------------------------------


async def test_module_level_asgi_app(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "plain_app.py",
        """
        from fastapi import FastAPI
        app = FastAPI()

        @app.get("/hello")
        async def hello():
            return {"from": "plain_app"}
        """,
    )
    loaded = load_task_app_module(path)
    assert loaded.source == "app" and loaded.config is None
    assert loaded.build_app() is loaded.app
    assert await get_json(loaded.build_app(), "/hello") == {"from": "plain_app"}
    app = load_task_app(path)  # a fresh module, so a fresh app object
    assert app is not loaded.app
    assert await get_json(app, "/hello") == {"from": "plain_app"}


@pytest.mark.parametrize(
    ("source", "tail"),
    [
        ("build_config", "def build_config():\n    return _make('via-build-config')\n"),
        ("config", "config = _make('via-config')\n"),
        ("config_factory", "config_factory = lambda: _make('via-config-factory')\n"),
    ],
)
async def test_config_forms(tmp_path: Path, source: str, tail: str) -> None:
    path = write(tmp_path, f"{source}_app.py", CONFIG_BODY + tail)
    loaded = load_task_app_module(path)
    assert loaded.source == source and loaded.app is None
    assert loaded.config is not None
    app_id = loaded.config.app_id
    assert app_id == "via-" + source.replace("_", "-")
    app = loaded.build_app(api_keys=[KEY])
    assert await get_json(app, "/task_info", **{"X-API-Key": KEY}) == {
        "taskset": {"made_by": app_id}
    }
    config = load_task_app(path)
    assert isinstance(config, TaskAppConfig) and config.app_id == app_id
    from_plain = create_task_app(config, api_keys=[KEY])
    health = await get_json(from_plain, "/health", **{"X-API-Key": KEY})
    assert health["healthy"] is True


@pytest.mark.parametrize(
    ("names", "winner"),
    [
        ("app = create_task_app(_make('a'))\nconfig = _make('c')\n", "app"),
        ("def build_config():\n    return _make('b')\nconfig = _make('c')\n", "build_config"),
        ("config = _make('c')\nconfig_factory = lambda: _make('f')\n", "config"),
    ],
)
def test_lookup_order(tmp_path: Path, names: str, winner: str) -> None:
    source = CONFIG_BODY + "from taskapp_notebook.contract import create_task_app\n" + names
    assert load_task_app_module(write(tmp_path, "both.py", source)).source == winner


# --- failures ------------------------------------------------------------------------------------


def test_nothing_defined_lists_what_was_looked_for(tmp_path: Path) -> None:
    path = write(tmp_path, "empty.py", "VALUE = 1\n")
    with pytest.raises(TaskAppLoadError) as error:
        load_task_app(path)
    message = str(error.value)
    assert str(path.resolve()) in message
    assert "Looked for, in order: " + "; ".join(LOOKED_FOR) in message
    assert [name.split("`")[1] for name in LOOKED_FOR] == [
        "app",
        "fastapi_app()",
        "build_config()",
        "config",
        "config_factory()",
        "APP_ID",
    ]
    assert "`get_app()`" in LOOKED_FOR[1] and "register_task_app" in LOOKED_FOR[-1]


@pytest.mark.parametrize(
    ("source", "original"),
    [
        ("raise RuntimeError('boom at import')\n", RuntimeError),
        ("def broken(:\n    pass\n", SyntaxError),
        ("import no_such_module_for_taskapp_tests\n", ModuleNotFoundError),
        ("import sys\nsys.exit(3)\n", SystemExit),
    ],
)
def test_errors_while_executing_name_file_and_cause(
    tmp_path: Path, source: str, original: type[BaseException]
) -> None:
    path = write(tmp_path, "explodes.py", source)
    modules_before = set(sys.modules)
    with pytest.raises(TaskAppLoadError) as error:
        load_task_app(path)
    assert str(path.resolve()) in str(error.value)
    assert original.__name__ in str(error.value)
    assert isinstance(error.value.__cause__, original)
    assert not {m for m in set(sys.modules) - modules_before if m.startswith("_taskapp_file_")}


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        ("def build_config():\n    raise ValueError('bad dataset')\n", "raised ValueError: bad"),
        ("def build_config():\n    return {}\n", r"`build_config\(\)` in .* returned dict, not a"),
        ("config = {'app_id': 'x'}\n", "`config` in .* is dict, not a TaskAppConfig"),
        ("config_factory = 'not callable'\n", r"`config_factory` in .* must be callable \(got str"),
        ("app = 42\n", r"`app` in .* is not an ASGI application \(got int\)"),
        ("app = _make('x')\n", "`app` in .* is a TaskAppConfig; name it `config`"),
    ],
)
def test_wrong_definitions_are_explained(tmp_path: Path, tail: str, expected: str) -> None:
    path = write(tmp_path, "wrong.py", CONFIG_BODY + tail)
    with pytest.raises(TaskAppLoadError, match=expected) as error:
        load_task_app(path)
    if "raised" in expected:
        assert isinstance(error.value.__cause__, ValueError)


# --- module hygiene: siblings, fresh code ---------------------------------------------------------


def test_sibling_imports_and_fresh_code_on_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # let __pycache__ get written
    directory = tmp_path / "project"
    directory.mkdir()
    write(directory, "taskapp_sibling_helper.py", "VALUE = 'one'\n")
    source = CONFIG_BODY + (
        "import taskapp_sibling_helper\n"
        "import dataclasses\n"
        "@dataclasses.dataclass\n"
        "class Sample:\n"
        "    text: str\n"
        "VERSION = 'first'\n"
        "config = _make(taskapp_sibling_helper.VALUE + '-' + VERSION)\n"
    )
    path = write(directory, "sibling_app.py", source)

    first = load_task_app_module(path)
    assert first.config is not None and first.config.app_id == "one-first"
    assert str(directory) not in sys.path
    assert first.module.Sample("x").text == "x"
    assert first.module.__file__ == str(path.resolve())

    # Same length edits: a cached .pyc keyed on mtime+size could otherwise be reused.
    write(directory, "taskapp_sibling_helper.py", "VALUE = 'two'\n")
    path.write_text(source.replace("'first'", "'again'"))
    second = load_task_app_module(path)
    assert second.config is not None and second.config.app_id == "two-again"
    assert second.module is not first.module
    assert second.module.__name__ != first.module.__name__
    assert first.config.app_id == "one-first"


def test_an_unchanged_config_is_built_once_and_never_shared_by_two_servers() -> None:
    import httpx
    from support import free_port

    from taskapp_notebook import InProcessTaskApp, TaskAppConfig
    from taskapp_notebook.loading import build_asgi_app, release_asgi_app

    config = TaskAppConfig(app_id="once", name="Once", description="",
                           rollout=lambda request: {})
    first = build_asgi_app(config=config, api_key="k1").app
    release_asgi_app(first)
    assert build_asgi_app(config=config, api_key="k1").app is first  # reused: not rebuilt
    # in use by a server now: a second server gets its own app (its own key)
    second = build_asgi_app(config=config, api_key="k2").app
    assert second is not first
    release_asgi_app(first)
    release_asgi_app(second)
    config.description = "changed"
    assert build_asgi_app(config=config, api_key="k3").app not in (first, second)

    one = InProcessTaskApp(config=config, tunnel_mode="local", serve_on="thread",
                           port=free_port(), api_key="key-one")
    two = InProcessTaskApp(config=config, tunnel_mode="local", serve_on="thread",
                           port=free_port(), api_key="key-two")
    with one, two:
        for app in (one, two):
            response = httpx.get(f"{app.url}/health", headers={"X-API-Key": app.api_key},
                                 trust_env=False)
            assert response.status_code == 200, (app.name, response.text)
