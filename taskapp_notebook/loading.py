"""Load a task app from a ``.py`` file.

:func:`load_task_app` executes the file as a fresh, uniquely named module (re-loading the
same path runs the current source again, never a cached copy) and looks for, in the order
synth-ai's own runner does (``get_asgi_app``, then ``build_config``, then its registry):

1. ``app`` — an ASGI application (for example a FastAPI instance);
2. a zero-argument factory ``fastapi_app`` / ``create_app`` / ``build_app`` /
   ``configure_app`` / ``get_app`` / ``app_factory`` that returns one;
3. ``build_config()`` — returns a :class:`~taskapp_notebook.models.TaskAppConfig`;
4. ``config`` — a ``TaskAppConfig``;
5. ``config_factory()`` — returns a ``TaskAppConfig``;
6. the synth-ai registry entry named by ``APP_ID`` (or the file's stem), registered by the
   file with ``register_container`` / ``register_task_app``.

Wherever a ``TaskAppConfig`` is expected, synth-ai's own config (0.9.x ``ContainerConfig``,
0.7.x ``LocalAPIConfig``) is accepted too and built by synth-ai's factory
(:mod:`taskapp_notebook.sdk_compat`). :func:`load_task_app` returns the ASGI app, or our
``TaskAppConfig`` (turn it into an app with ``create_task_app``). :func:`load_task_app_module`
returns a :class:`LoadedTaskApp` with the module and which name was used as well. While
the file runs, its directory is first on ``sys.path`` so it can import sibling modules;
siblings imported that way are re-imported on the next load from that directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import itertools
import logging
import os
import re
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from . import sdk_compat
from .errors import InvalidParameterError, TaskAppLoadError, TaskAppNotFoundError

if TYPE_CHECKING:
    from .models import TaskAppConfig

__all__ = [
    "LOOKED_FOR",
    "BuiltApp",
    "LoadedTaskApp",
    "load_task_app",
    "load_task_app_module",
    "release_asgi_app",
    "validate_task_app_path",
]

logger = logging.getLogger(__name__)

#: What a task-app file may define, in the order it is looked for.
LOOKED_FOR: tuple[str, ...] = (
    "`app` (an ASGI application, e.g. a FastAPI instance)",
    "a factory " + "/".join(f"`{n}()`" for n in sdk_compat.SDK_FACTORY_NAMES)
    + " (returns an ASGI app)",
    "`build_config()` (returns a TaskAppConfig or synth-ai's ContainerConfig/LocalAPIConfig)",
    "`config` (a TaskAppConfig)",
    "`config_factory()` (returns a TaskAppConfig)",
    "the synth-ai registry entry `APP_ID` (register_container / register_task_app)",
)

_counter = itertools.count(1)
_lock = threading.RLock()
#: directory -> names of sibling modules that loading a file from it imported.
_siblings: dict[Path, set[str]] = {}


@dataclass(frozen=True)
class LoadedTaskApp:
    """What :func:`load_task_app` found. Exactly one of ``app`` / ``config`` is set.

    A synth-ai config is built at once by synth-ai's factory: ``app`` holds the result and
    ``sdk_config`` the config object.
    """

    path: Path
    module: ModuleType
    source: str
    app: Callable[..., Any] | None = None
    config: TaskAppConfig | None = None
    sdk_config: Any = None

    def build_app(self, *, api_keys: Sequence[str] | None = None) -> Callable[..., Any]:
        """The ASGI app: ``app`` as is, or ``create_task_app(config, api_keys=...)``."""
        if self.app is not None:
            return self.app
        from .contract import create_task_app

        assert self.config is not None
        return create_task_app(self.config, api_keys=api_keys)


def validate_task_app_path(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` resolved; it must be an existing ``.py`` file."""
    if not isinstance(path, str | os.PathLike):
        raise InvalidParameterError(
            f"task_app_path must be a str or Path; got {type(path).__name__} {path!r}."
        )
    given = Path(path).expanduser()
    resolved = given.resolve()
    if not resolved.exists():
        raise TaskAppNotFoundError(
            f"task_app_path {str(path)!r} does not exist (looked at {str(resolved)!r}; "
            f"relative paths start from the current directory {os.getcwd()!r})."
        )
    if resolved.is_dir():
        raise InvalidParameterError(
            f"task_app_path {str(path)!r} is a directory; pass the .py file that defines the app."
        )
    if resolved.suffix != ".py":
        raise InvalidParameterError(
            f"task_app_path {str(path)!r} must be a .py file; got a {resolved.suffix or 'no'!s} "
            "suffix."
        )
    return resolved


def _module_name(path: Path) -> str:
    stem = re.sub(r"\W", "_", path.stem) or "app"
    return f"_taskapp_file_{stem}_{next(_counter)}"


def _forget_siblings(directory: Path) -> None:
    """Drop the siblings a previous load imported, and their .pyc (it may be stale)."""
    for name in _siblings.pop(directory, set()):
        file = getattr(sys.modules.pop(name, None), "__file__", None)
        if file and file.endswith(".py"):
            with contextlib.suppress(OSError, NotImplementedError, ValueError):
                Path(importlib.util.cache_from_source(file)).unlink(missing_ok=True)


def _record_siblings(directory: Path, before: set[str]) -> None:
    """Remember modules this load imported *from directory itself* (not site-packages)."""
    found: set[str] = set()
    for name in set(sys.modules) - before:
        file = getattr(sys.modules.get(name), "__file__", None)
        if not file or name.split(".")[0] == "taskapp_notebook":
            continue
        try:
            first = Path(file).resolve().relative_to(directory).parts[0]
        except ValueError:
            continue
        if first.removesuffix(".py") == name.split(".")[0]:
            found.add(name)
    if found:
        _siblings[directory] = found


def _why_no_signal_handlers() -> str | None:
    """Why a task-app file may not install signal handlers now (None: it may)."""
    if threading.current_thread() is not threading.main_thread():
        return "handlers can only be installed on the main thread and the file is loaded on "\
            "the task app's server thread"
    from .loops import in_ipython_kernel

    if in_ipython_kernel():
        return "in a Jupyter kernel SIGINT is the user's interrupt, and the runner already "\
            "stops its apps on SIGTERM"
    return None


@contextlib.contextmanager
def _no_signal_handlers(path: Path) -> Iterator[None]:
    """While the file runs, a handler it (or a library it imports, e.g. synth-ai's runner
    module) installs is skipped with a warning when :func:`_why_no_signal_handlers` says so.
    A script's main thread is left alone."""
    why = _why_no_signal_handlers()
    if why is None:
        yield
        return
    real = signal.signal

    def skip(signum: int, handler: Any) -> Any:
        logger.warning(
            "%s (or a module it imports) installs a handler for signal %s at import; "
            "skipped: %s",
            path,
            signum,
            why,
        )
        return signal.getsignal(signum)

    signal.signal = skip  # type: ignore[assignment]
    try:
        yield
    finally:
        signal.signal = real


def _execute(path: Path) -> ModuleType:
    """Run ``path`` as a new module with its directory importable; return the module."""
    name = _module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:  # pragma: no cover - only for paths importlib cannot handle at all
        raise TaskAppLoadError(f"Cannot create a module spec for {str(path)!r}.")
    module = importlib.util.module_from_spec(spec)
    directory = path.parent
    with _lock:
        _forget_siblings(directory)
        importlib.invalidate_caches()
        added = str(directory) not in sys.path
        if added:
            sys.path.insert(0, str(directory))
        before = set(sys.modules)
        sys.modules[name] = module
        try:
            # Compile the current source ourselves: a cached .pyc could be stale when the
            # file was edited within the same second, and fresh code is the point here.
            code = compile(path.read_bytes(), str(path), "exec")
            with _no_signal_handlers(path):
                exec(code, module.__dict__)
        except (Exception, SystemExit) as exc:
            sys.modules.pop(name, None)
            raise TaskAppLoadError(
                f"Executing task app file {str(path)!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            _record_siblings(directory, before | {name})
            if added:
                try:
                    sys.path.remove(str(directory))
                except ValueError:
                    pass
    return module


def _takes_no_arguments(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return all(
        p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params
    )


def _call_factory(path: Path, attr: str, factory: Any) -> Any:
    if not callable(factory):
        raise TaskAppLoadError(
            f"`{attr}` in {str(path)!r} must be callable (got {type(factory).__name__})."
        )
    try:
        return factory()
    except Exception as exc:
        raise TaskAppLoadError(
            f"`{attr}()` in {str(path)!r} raised {type(exc).__name__}: {exc}"
        ) from exc


def load_task_app(path: str | os.PathLike[str]) -> Callable[..., Any] | TaskAppConfig:
    """Execute the task-app file at ``path``; return its ASGI ``app`` or its ``TaskAppConfig``."""
    loaded = load_task_app_module(path)
    if loaded.app is not None:
        return loaded.app
    assert loaded.config is not None
    return loaded.config


def _found(
    resolved: Path, module: ModuleType, source: str, value: Any, what: str
) -> LoadedTaskApp:
    """Wrap what ``source`` gave: an ASGI app, our TaskAppConfig or a synth-ai config.

    ``what`` names it for messages, e.g. "`build_config()`" or "registry entry 'x'".
    """
    from .models import TaskAppConfig

    where = str(resolved)
    if isinstance(value, TaskAppConfig):
        logger.debug("Loaded TaskAppConfig %r via `%s` from %s", value.app_id, source, where)
        return LoadedTaskApp(path=resolved, module=module, source=source, config=value)
    if sdk_compat.is_sdk_config(value):
        app = sdk_compat.build_sdk_app(value, f"the {type(value).__name__} of {what} in {where!r}")
        return LoadedTaskApp(
            path=resolved, module=module, source=source, app=app, sdk_config=value
        )
    if source in ("app", *sdk_compat.SDK_FACTORY_NAMES) and callable(value):
        logger.debug("Loaded ASGI app via `%s` from %s", source, where)
        return LoadedTaskApp(path=resolved, module=module, source=source, app=value)
    verb = "returned" if what.endswith("()`") else "is"
    raise TaskAppLoadError(
        f"{what} in {where!r} {verb} {type(value).__name__}, not a TaskAppConfig (use "
        "taskapp_notebook.TaskAppConfig, or synth-ai's ContainerConfig / LocalAPIConfig)."
    )


def load_task_app_module(path: str | os.PathLike[str]) -> LoadedTaskApp:
    """Execute the task-app file at ``path`` and report what it defines (see module doc)."""
    from .models import TaskAppConfig

    resolved = validate_task_app_path(path)
    module = _execute(resolved)
    where = str(resolved)
    found = vars(module)

    if "app" in found:
        app = found["app"]
        if isinstance(app, TaskAppConfig):
            raise TaskAppLoadError(
                f"`app` in {where!r} is a TaskAppConfig; name it `config` or wrap it with "
                "create_task_app(...)."
            )
        if not callable(app) and not sdk_compat.is_sdk_config(app):
            raise TaskAppLoadError(
                f"`app` in {where!r} is not an ASGI application (got {type(app).__name__})."
            )
        return _found(resolved, module, "app", app, "`app`")

    for name in sdk_compat.SDK_FACTORY_NAMES:
        factory = found.get(name)
        if not callable(factory) or not _takes_no_arguments(factory):
            continue
        produced = _call_factory(resolved, name, factory)
        if callable(produced) or isinstance(produced, TaskAppConfig) or (
            sdk_compat.is_sdk_config(produced)
        ):
            return _found(resolved, module, name, produced, f"`{name}()`")
        logger.debug("`%s()` in %s returned %s; looking further", name, where,
                     type(produced).__name__)

    for attr, is_factory in (("build_config", True), ("config", False), ("config_factory", True)):
        if attr not in found:
            continue
        value = _call_factory(resolved, attr, found[attr]) if is_factory else found[attr]
        return _found(resolved, module, attr, value, f"`{attr}()`" if is_factory else f"`{attr}`")

    entry = sdk_compat.registry_config(module, resolved.stem)
    if entry is not None:
        app_id, value = entry
        return _found(resolved, module, "registry", value, f"registry entry {app_id!r}")

    raise TaskAppLoadError(
        f"{where!r} defines no task app. Looked for, in order: " + "; ".join(LOOKED_FOR) + "."
    )


@dataclass(frozen=True)
class BuiltApp:
    """The ASGI app to serve and the key it was given (see :func:`build_asgi_app`)."""

    app: Callable[..., Any]
    api_key: str
    api_key_source: str
    sdk: str | None = None


def build_asgi_app(
    *,
    app: Any | None = None,
    config: Any | None = None,
    config_factory: Callable[[], Any] | None = None,
    task_app_path: Path | None = None,
    api_key: str,
    api_key_source: str = "argument",
    name: str = "task app",
) -> BuiltApp:
    """The ASGI app for whichever input InProcessTaskApp was given, and its key.

    A TaskAppConfig (direct, from the factory, or from the file) goes through
    ``create_task_app``; an app built that way is told ``api_key`` (``app.state``), so it
    never has to be written into ``os.environ``. The app built for a config is reused by
    the next start with that same, unchanged config once nobody serves it (see
    :func:`release_asgi_app`): a restart costs what a plain FastAPI app's does. A synth-ai
    config is built by synth-ai; an app synth-ai built reads its key from
    ``ENVIRONMENT_API_KEY``, so it is wrapped in
    :class:`~taskapp_notebook.sdk_compat.EnvKeyedApp`, which exports the key while it runs.
    """
    if app is None:
        if config is None and config_factory is not None:
            try:
                config = config_factory()
            except Exception as exc:
                raise TaskAppLoadError(
                    f"config_factory {config_factory!r} raised {type(exc).__name__}: {exc}"
                ) from exc
        if config is None:
            if task_app_path is None:
                raise TaskAppLoadError("No app, config, config_factory or task_app_path given.")
            loaded = load_task_app(task_app_path)
            app, config = (loaded, None) if callable(loaded) else (None, loaded)
        if config is not None:
            from .models import TaskAppConfig as ConfigType

            if sdk_compat.is_sdk_config(config):
                app = sdk_compat.build_sdk_app(config, f"the {type(config).__name__} given")
            elif not isinstance(config, ConfigType):
                raise TaskAppLoadError(
                    f"Expected a TaskAppConfig, got {type(config).__name__}. Build it with "
                    "taskapp_notebook.TaskAppConfig(...)."
                )
            else:
                app = _app_for_config(config)
    if not callable(app):
        raise TaskAppLoadError(f"{app!r} is not an ASGI app (it is not callable).")
    state = getattr(app, "state", None)
    if state is not None and getattr(state, "taskapp_contract", False):
        state.taskapp_api_keys = (api_key,)
        return BuiltApp(app, api_key, api_key_source)
    if not sdk_compat.is_sdk_app(app):
        return BuiltApp(app, api_key, api_key_source)
    api_key, api_key_source = sdk_compat.key_at_start(api_key, api_key_source)
    sdk_compat.warn_if_token_auth(app, name)
    generation = sdk_compat.sdk_generation(app)
    wrapped = sdk_compat.EnvKeyedApp(app, api_key, name, translate=generation != "0.9")
    return BuiltApp(wrapped, api_key, api_key_source, sdk=generation)


@dataclass
class _Built:
    """The app built for one TaskAppConfig, and the config's fields it was built from."""

    config: weakref.ReferenceType[Any]
    fields: tuple[Any, ...]
    app: Callable[..., Any]
    in_use: bool = True


#: id(config) → the app last built for it.
_built: dict[int, _Built] = {}


def _fields_of(config: TaskAppConfig) -> tuple[Any, ...]:
    """A copy of the config's fields, to tell whether it changed since an app was built."""
    return tuple(
        dict(value) if isinstance(value, Mapping) else
        tuple(value) if isinstance(value, list | tuple) else value
        for value in (getattr(config, f.name) for f in dataclasses.fields(config))
    )


def _app_for_config(config: TaskAppConfig) -> Callable[..., Any]:
    """``create_task_app(config)``, or the app built for this very config before when the
    config is unchanged and no running server uses that app (each holds its own key)."""
    from .contract import create_task_app

    fields = _fields_of(config)
    with _lock:
        built = _built.get(id(config))
        if built is not None and built.config() is config and not built.in_use:
            try:
                same = bool(built.fields == fields)
            except Exception:  # noqa: BLE001 - a field whose == fails: build again
                same = False
            if same:
                built.in_use = True
                return built.app
    app = create_task_app(config)
    key = id(config)
    with _lock:
        _built[key] = _Built(weakref.ref(config, lambda _: _forget(key)), fields, app)
    return app


def _forget(key: int) -> None:
    with _lock:
        _built.pop(key, None)


def release_asgi_app(app: object) -> None:
    """The server that used ``app`` has stopped: a later start may reuse it."""
    with _lock:
        for built in _built.values():
            if built.app is app:
                built.in_use = False
