"""Serve task apps written for the synth-ai SDK unchanged (0.7.x LocalAPI, 0.9.x Container).

Three things the SDK's own runner does, done here the same way:

* **SDK config objects** — a ``build_config()`` (or registry entry, ``config=``,
  ``config_factory=``) that returns the SDK's ``ContainerConfig`` (0.9.x) or
  ``LocalAPIConfig`` / ``TaskAppConfig`` (0.7.x) is turned into an app by the SDK's own
  factory (``create_container`` / ``create_task_app``), taken from the module that defined
  the object's class. We recognise such objects by their type's module and never import
  synth-ai ourselves: if the object exists, the SDK is already loaded.
* **Factories and the registry** — :data:`SDK_FACTORY_NAMES` and :func:`registry_config`
  mirror the SDK's ``get_asgi_app`` and its ``APP_ID`` registry fallback.
* **The key in the environment** — SDK-built apps read ``ENVIRONMENT_API_KEY`` per request
  (0.7.x auth; 0.9.x exports it too). :class:`EnvKeyedApp` exports the runner's key while
  the app's lifespan runs, reference-counted across apps and restored when the last one
  stops. The variable is process-wide, so a second SDK app with a *different* key does
  not overwrite it: that app's requests are checked against its own key here (constant
  time) and a matching key is handed on as the exported one; any other key is removed, so
  neither app accepts the other's key.

synth-ai 0.7 answers a wrong key with the first 15 characters of the key it expects (in the
body, and printed to stdout); in error bodies of apps served here those characters are
blanked, same length. What the SDK itself prints cannot be changed here.
"""

from __future__ import annotations

import hmac
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

from .errors import TaskAppLoadError

__all__ = [
    "SDK_FACTORY_NAMES",
    "EnvKeyedApp",
    "build_sdk_app",
    "exported_key",
    "is_sdk_app",
    "is_sdk_config",
    "key_at_start",
    "registry_config",
    "sdk_generation",
    "warn_if_token_auth",
]

logger = logging.getLogger(__name__)

#: Zero-argument ASGI factories the SDK's ``get_asgi_app`` calls, in its order.
SDK_FACTORY_NAMES: tuple[str, ...] = (
    "fastapi_app",
    "create_app",
    "build_app",
    "configure_app",
    "get_app",
    "app_factory",
)
#: The SDK's config classes (0.9.x ``ContainerConfig``; 0.7.x ``LocalAPIConfig`` and its
#: base ``TaskAppConfig``) and the factory each generation's module defines, in that order.
_SDK_CONFIG_CLASSES = frozenset({"ContainerConfig", "LocalAPIConfig", "TaskAppConfig"})
_SDK_APP_FACTORIES = ("create_container", "create_task_app", "create_local_api")
#: Registries of ``register_container`` (0.9.x) and ``register_task_app`` (0.7.x).
_SDK_REGISTRIES = ("synth_ai.sdk.container.apps", "synth_ai.sdk.localapi.apps")

KEY_ENV = "ENVIRONMENT_API_KEY"
#: 0.7.x apps copy the key here at startup (``os.environ.setdefault``); restored as well.
_DEV_KEY_ENV = "DEV_ENVIRONMENT_API_KEY"


def _is_sdk_module(name: object) -> bool:
    return isinstance(name, str) and (name == "synth_ai" or name.startswith("synth_ai."))


def _sdk_config_class(obj: object) -> type | None:
    for cls in type(obj).__mro__:
        if cls.__name__ in _SDK_CONFIG_CLASSES and _is_sdk_module(cls.__module__):
            return cls
    return None


def is_sdk_config(obj: object) -> bool:
    """Is ``obj`` a synth-ai config object (``ContainerConfig`` / ``LocalAPIConfig``)?"""
    return _sdk_config_class(obj) is not None


def sdk_generation(obj: object) -> str | None:
    """``"0.9"`` (Container), ``"0.7"`` (LocalAPI) or None, from a config's or app's module."""
    cls = _sdk_config_class(obj)
    modules = [cls.__module__] if cls is not None else _app_modules(obj)
    for module in modules:
        if module.startswith("synth_ai.sdk.container"):
            return "0.9"
        if module.startswith(("synth_ai.sdk.localapi", "synth_ai.sdk.task")):
            return "0.7"
    return None


def build_sdk_app(config: object, where: str) -> Callable[..., Any]:
    """Build ``config`` with the SDK's own factory, from the module that defined its class."""
    cls = _sdk_config_class(config)
    if cls is None:
        raise TaskAppLoadError(f"{where}: {type(config).__name__} is not a synth-ai config.")
    module = sys.modules.get(cls.__module__)
    factory = next(
        (getattr(module, n) for n in _SDK_APP_FACTORIES if callable(getattr(module, n, None))),
        None,
    )
    if factory is None:
        raise TaskAppLoadError(
            f"{where} is a synth-ai {cls.__name__}, but {cls.__module__} has none of "
            f"{', '.join(_SDK_APP_FACTORIES)} to build it with. Build the app yourself "
            "(app = create_container(config)) or use taskapp_notebook.TaskAppConfig."
        )
    try:
        app = factory(config)
    except Exception as exc:
        raise TaskAppLoadError(
            f"{where}: synth-ai's {factory.__name__}() raised {type(exc).__name__}: {exc}"
        ) from exc
    logger.debug("Built %s with synth-ai's %s.%s", where, cls.__module__, factory.__name__)
    return app  # type: ignore[no-any-return]


def registry_config(module: ModuleType, default_id: str) -> tuple[str, Any] | None:
    """The SDK's last resort: the config of the registry entry ``APP_ID`` (or the file stem).

    Looks only in registries already imported (by the file's ``register_*`` call).
    Returns ``(app_id, config)`` or None when no registry knows the id.
    """
    app_id = getattr(module, "APP_ID", None) or default_id
    if not isinstance(app_id, str):
        return None
    for name in _SDK_REGISTRIES:
        registry = getattr(sys.modules.get(name), "registry", None)
        getter = getattr(registry, "get", None)
        if not callable(getter):
            continue
        try:
            entry = getter(app_id)
        except KeyError:  # the SDK's registries raise for unknown ids
            continue
        factory = getattr(entry, "config_factory", None)
        if not callable(factory):
            continue
        try:
            return app_id, factory()
        except Exception as exc:
            raise TaskAppLoadError(
                f"The config_factory of synth-ai registry entry {app_id!r} ({name}) raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    return None


# --- is an app built with the SDK? -------------------------------------------------------


def _callables_of(app: object) -> Iterable[object]:
    router = getattr(app, "router", None)
    yield getattr(router, "lifespan_context", None)
    for route in getattr(router, "routes", None) or ():
        yield getattr(route, "endpoint", None)
        pending = list(getattr(getattr(route, "dependant", None), "dependencies", None) or ())
        while pending:
            dependant = pending.pop()
            yield getattr(dependant, "call", None)
            pending.extend(getattr(dependant, "dependencies", None) or ())


def _app_modules(app: object) -> list[str]:
    names = (getattr(fn, "__module__", None) for fn in _callables_of(app))
    return [n for n in names if _is_sdk_module(n)]  # type: ignore[misc]


def is_sdk_app(app: object) -> bool:
    """Did synth-ai build ``app``, or guard its routes with its auth (and so read the key
    from ``ENVIRONMENT_API_KEY``)? Judged from its routes' and lifespan's modules."""
    return bool(_app_modules(app))


# --- ENVIRONMENT_API_KEY, exported while SDK apps run ------------------------------------


class _Export:
    """The one process-wide export: which key, how many apps hold it, what was there."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: str | None = None
        self.holders = 0
        self.saved: dict[str, str | None] = {}

    def acquire(self, key: str) -> str:
        """Hold the export; set it to ``key`` if nobody holds it. Return the exported key."""
        with self.lock:
            if self.holders == 0:
                self.saved = {name: os.environ.get(name) for name in (KEY_ENV, _DEV_KEY_ENV)}
                os.environ[KEY_ENV] = key
                self.key = key
            self.holders += 1
            assert self.key is not None
            return self.key

    def release(self) -> None:
        with self.lock:
            if self.holders == 0:
                return
            self.holders -= 1
            if self.holders:
                return
            exported, self.key = self.key, None
            for name, before in self.saved.items():
                now = os.environ.get(name)
                if now == before or now != exported:
                    continue  # untouched by the app, or changed by someone else since
                if before is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = before
            self.saved = {}


_EXPORT = _Export()


def exported_key() -> str | None:
    """The key exported to ``ENVIRONMENT_API_KEY`` for running SDK apps (None: no export)."""
    return _EXPORT.key


_KEY_HEADERS = (b"x-api-key", b"x-api-keys", b"authorization")


def _matches(candidate: str, key: bytes) -> bool:
    return hmac.compare_digest(candidate.strip().encode(), key)


def _translate(headers: Iterable[tuple[bytes, bytes]], own: bytes, exported: bytes) -> list[
    tuple[bytes, bytes]
]:
    """Headers with this app's key replaced by the exported one and other keys removed."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        lower = name.lower()
        if lower not in _KEY_HEADERS:
            out.append((name, value))
            continue
        text = value.decode("latin-1")
        if lower == b"authorization":
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() != "bearer":
                out.append((name, value))
            elif _matches(token, own):
                out.append((name, b"Bearer " + exported))
        elif lower == b"x-api-keys":
            if any(_matches(part, own) for part in text.split(",")):
                out.append((name, exported))
        elif _matches(text, own):
            out.append((name, exported))
    return out


class EnvKeyedApp:
    """ASGI wrapper: export ``key`` as ``ENVIRONMENT_API_KEY`` while ``app``'s lifespan runs.

    The export is taken before the app's own startup (0.7.x apps read the key there) and
    released after its shutdown. If another SDK app already exported a different key,
    requests are translated instead (see the module docstring) — unless ``translate`` is
    False (0.9 containers, whose auth does not read the variable).
    """

    def __init__(
        self, app: Callable[..., Any], key: str, name: str = "task app", *, translate: bool = True
    ) -> None:
        self.app = app
        self.key = key
        self.name = name
        #: False for 0.9 containers: their auth never reads the variable.
        self.translate = translate
        self._own = key.encode()
        self._exported: bytes | None = None

    def __getattr__(self, name: str) -> Any:
        # ``state``, ``router``, ... of the wrapped app stay reachable.
        if name == "app":
            raise AttributeError(name)
        return getattr(self.app, name)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            held = _EXPORT.acquire(self.key)
            if held != self.key and self.translate:
                logger.info(
                    "%s: ENVIRONMENT_API_KEY is held by another synth-ai app in this process "
                    "with a different key; this app's requests are checked against its own "
                    "key and passed on with the exported one",
                    self.name,
                )
                self._exported = held.encode()
            try:
                await self.app(scope, receive, send)
            finally:
                self._exported = None
                _EXPORT.release()
            return
        exported = self._exported
        if exported is not None and scope["type"] in ("http", "websocket"):
            scope = {**scope, "headers": _translate(scope["headers"], self._own, exported)}
        if scope["type"] == "http":
            send = _blanking_key_prefixes(send, [self._own, exported or self._own])
        await self.app(scope, receive, send)


#: synth-ai 0.7 answers a wrong key with the first 15 characters of the keys it accepts.
_LEAKED_PREFIX = 15


def _blanking_key_prefixes(send: Any, keys: list[bytes]) -> Any:
    """``send`` that blanks key prefixes in error bodies (same length: Content-Length holds)."""
    prefixes = {key[:_LEAKED_PREFIX] for key in keys if len(key) >= 8}
    failed = False

    async def blanked(message: dict[str, Any]) -> None:
        nonlocal failed
        if message["type"] == "http.response.start":
            failed = int(message.get("status", 200)) >= 400
        elif failed and message["type"] == "http.response.body":
            body = message.get("body", b"")
            for prefix in prefixes:
                body = body.replace(prefix, b"*" * len(prefix))
            message = {**message, "body": body}
        await send(message)

    return blanked


def key_at_start(api_key: str, source: str) -> tuple[str, str]:
    """The key for an SDK app at start: like the SDK's runner, which reads the variable only
    then, a key put into ``ENVIRONMENT_API_KEY`` since (e.g. by the task-app file itself)
    wins over one we generated. A key exported for another running app does not count."""
    if source == "generated" and _EXPORT.key is None:
        env = os.environ.get(KEY_ENV, "").strip()
        if env:
            return env, KEY_ENV
    return api_key, source


_AUTH_MODE_ENV = "SYNTH_CONTAINER_AUTH_MODE"


def warn_if_token_auth(app: object, name: str) -> None:
    """0.9.x containers accept only backend-signed tokens on /info, /task_info and /rollout
    unless ``SYNTH_CONTAINER_AUTH_MODE`` relaxes it; say so once at start."""
    if sdk_generation(app) != "0.9" or os.environ.get(_AUTH_MODE_ENV, "").strip():
        return
    logger.warning(
        "%s is a synth-ai 0.9 container: its /info, /task_info and /rollout accept only "
        "backend-signed tokens (header x-synth-container-authorization), not the API key. "
        "Jobs run by the Synth backend send them. For local calls set %s=optional_local "
        "(loopback callers) before starting, as synth-ai's own run_container does.",
        name,
        _AUTH_MODE_ENV,
    )
