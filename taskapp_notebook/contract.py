"""``create_task_app``: build, from a :class:`TaskAppConfig`, a FastAPI app that speaks the
task-app contract the Synth backend and its clients call.

Routes (all but ``/`` need an API key unless ``require_api_key=False``)::

    GET|HEAD /     {"status": "ok", "service": app_id}
    GET /health    {"healthy": true, "service": app_id, ...}
    GET /info      service / dataset / rubrics / inference / limits
    GET /task_info no seed -> {"taskset": ...}; one seed -> TaskInfo; several -> [TaskInfo]
    POST /rollout  RolloutRequest -> RolloutResponse
    POST /done     {"ok": true, "service": app_id}
    POST /validate-candidate  (when ``validate_candidate`` is set; synth-ai 0.9)
    GET /debug/env (when ``expose_debug_env``, the SDK's default: which keys are set)

Callbacks may be sync or async; sync ones run in starlette's thread pool so they never
block the event loop. Unlike the SDK, ``middleware`` is applied. Error bodies have the SDK's
shape, ``{"detail": {"error": {"code": ..., "message": ...}}}``.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.middleware.cors import CORSMiddleware
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware

from .auth import (
    ALIASES_ENV,
    KEY_ENV,
    allowed_keys_from_env,
    check_headers,
    normalize_keys,
    resolve_allowed_keys,
)
from .errors import InvalidParameterError
from .models import ID_KEYS, Hook, RolloutRequest, RolloutResponse, TaskAppConfig, TaskInfo

__all__ = ["TaskAppConfig", "allowed_keys_from_env", "create_task_app"]

logger = logging.getLogger(__name__)

# --- calling user code -----------------------------------------------------------------------


def _is_async_callable(fn: Any) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async __call__ on callable objects
    )


def positional_arity(fn: Any) -> int:
    """How many positional arguments ``fn`` takes (large when it takes ``*args``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 99
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return 99
    return sum(1 for p in params if p.kind in kinds)


def _call_sync(fn: Callable[..., Any], args: tuple[Any, ...], drain: bool) -> Any:
    result = fn(*args)
    if drain and inspect.isgenerator(result):
        return list(result)
    return result


async def invoke(fn: Callable[..., Any], *args: Any, drain: bool = False) -> Any:
    """Call ``fn``: async ones on the loop, sync ones in the thread pool; await the result.

    With ``drain``, generators (sync or async) are collected into a list.
    """
    if _is_async_callable(fn) or inspect.isasyncgenfunction(fn):
        result = fn(*args)
    else:
        result = await run_in_threadpool(_call_sync, fn, args, drain)
    if inspect.isawaitable(result):
        result = await result
    if drain and inspect.isasyncgen(result):
        result = [item async for item in result]
    return result


def http_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> HTTPException:
    error: dict[str, Any] = {"code": code, "message": message, **extra}
    return HTTPException(status_code=status, detail={"error": error}, headers=dict(headers or {}))


# --- building blocks -------------------------------------------------------------------------


def _middleware_stack(cfg: TaskAppConfig) -> list[Middleware]:
    stack: list[Middleware] = []
    if cfg.cors_origins is not None:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cfg.cors_origins) or ["*"],
                allow_credentials=True,
                allow_methods=["*"],
                allow_headers=["*"],
            )
        )
    for item in cfg.middleware:
        if isinstance(item, Middleware):
            stack.append(item)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Mapping):
            stack.append(Middleware(item[0], **dict(item[1])))
        elif callable(item):
            stack.append(Middleware(item))
        else:
            raise InvalidParameterError(
                f"TaskAppConfig.middleware items must be Middleware(cls, ...), a middleware "
                f"class or a (cls, kwargs) pair; got {item!r}."
            )
    return stack


def _auth_dependency(
    app: FastAPI, cfg: TaskAppConfig, api_keys: Sequence[str] | None
) -> Callable[[Request], Any]:
    explicit = normalize_keys(api_keys)

    async def require_api_key(request: Request) -> None:
        if not cfg.require_api_key:
            return
        state_keys = getattr(app.state, "taskapp_api_keys", None)
        allowed, source = resolve_allowed_keys(explicit, state_keys)
        if not allowed:
            logger.warning(
                "Refused %s %s: task app %r has no API key configured",
                request.method,
                request.url.path,
                cfg.app_id,
            )
            raise http_error(
                503,
                "missing_environment_api_key",
                f"Task app {cfg.app_id!r} requires an API key but none is configured. Set "
                f"{KEY_ENV} (extra keys: comma-separated {ALIASES_ENV}), pass api_key= to "
                "InProcessTaskApp or api_keys= to create_task_app, or build the app with "
                "TaskAppConfig(require_api_key=False).",
            )
        check = check_headers(request.headers.items(), allowed)
        if not check.ok:
            seen = list(check.headers_seen)
            logger.warning(
                "Rejected %s %s: API key missing or invalid (auth headers seen: %s; keys from %s)",
                request.method,
                request.url.path,
                ", ".join(seen) or "none",
                source,
            )
            raise http_error(
                401,
                "unauthorised",
                "API key missing or invalid. Send it as 'X-API-Key: <key>', "
                "'X-API-Keys: <k1>,<k2>' or 'Authorization: Bearer <key>'. "
                f"Auth headers seen: {', '.join(seen) or 'none'}.",
                headers={"WWW-Authenticate": "Bearer"},
                headers_seen=seen,
            )

    return require_api_key


def _parse_seeds(values: Iterable[str]) -> list[int]:
    seeds: list[int] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                seeds.append(int(part))
            except ValueError:
                raise http_error(
                    422, "invalid_seed", f"Seeds must be integers; got {part!r}."
                ) from None
    return seeds


def _as_task_info(obj: Any) -> dict[str, Any]:
    if isinstance(obj, BaseModel) and not isinstance(obj, TaskInfo):
        obj = obj.model_dump(mode="json")
    if isinstance(obj, Mapping):
        obj = TaskInfo.model_validate(dict(obj))
    if not isinstance(obj, TaskInfo):
        raise TypeError(
            f"provide_task_instances must yield TaskInfo objects or mappings; got {obj!r}"
        )
    return obj.model_dump(mode="json")


def _rollout_body(result: Any, request: RolloutRequest, app_id: str) -> dict[str, Any]:
    """Turn what ``rollout()`` returned into the response body, echoing the request's id."""
    if isinstance(result, BaseModel) and not isinstance(result, RolloutResponse):
        result = result.model_dump(mode="json")
    if isinstance(result, RolloutResponse):
        body = result.model_dump(mode="json")
    elif isinstance(result, Mapping):
        try:
            body = RolloutResponse.model_validate(dict(result)).model_dump(mode="json")
        except ValidationError as exc:
            logger.warning(
                "rollout() of task app %r returned a mapping that is not a valid "
                "RolloutResponse; sending it unchanged: %s",
                app_id,
                exc,
            )
            body = dict(jsonable_encoder(dict(result)))
    else:
        raise http_error(
            500,
            "invalid_rollout_result",
            f"rollout() of task app {app_id!r} returned {type(result).__name__}; "
            "it must return a RolloutResponse or a mapping.",
        )
    # Exactly the id key(s) the client sent; the callback's value when it set one.
    given = {key: body.pop(key, None) for key in ID_KEYS}
    echo = {key: given[key] or getattr(request, key) for key in request.received_id_keys}
    return {**echo, **body}


async def _run_hooks(hooks: Sequence[Hook], app: FastAPI, *, keep_going: bool) -> None:
    """Run ``hook()`` / ``hook(app)`` in order; with ``keep_going`` log failures and go on."""
    for hook in hooks:
        try:
            result = hook(app) if positional_arity(hook) >= 1 else hook()
            if inspect.isawaitable(result):
                await result
        except Exception:
            if not keep_going:
                raise
            logger.exception("Shutdown hook %r failed; running the remaining ones", hook)


# --- the app ---------------------------------------------------------------------------------


def create_task_app(config: TaskAppConfig, *, api_keys: Sequence[str] | None = None) -> FastAPI:
    """Build the FastAPI task app described by ``config``.

    ``api_keys``, when given (non-empty), are the only keys accepted; otherwise
    ``app.state.taskapp_api_keys`` and then ``ENVIRONMENT_API_KEY`` (+ aliases) are used,
    looked up at request time. The app is marked ``app.state.taskapp_contract = True``.
    """
    if not isinstance(config, TaskAppConfig):
        raise InvalidParameterError(
            f"create_task_app() needs a TaskAppConfig; got {type(config).__name__}."
        )
    if isinstance(api_keys, str):
        raise InvalidParameterError("api_keys must be a sequence of keys, not a single string.")
    cfg = config.clone()
    base_info = cfg.task_info()
    app_id = cfg.app_id

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await _run_hooks(cfg.startup_hooks, app, keep_going=False)
        try:
            yield
        finally:
            await _run_hooks(cfg.shutdown_hooks, app, keep_going=True)

    app = FastAPI(
        title=cfg.name,
        description=cfg.description,
        lifespan=lifespan,
        middleware=_middleware_stack(cfg),
    )
    for key, value in cfg.app_state.items():
        setattr(app.state, key, value)
    app.state.taskapp_contract = True
    app.state.taskapp_config = cfg
    for router in cfg.routers:
        app.include_router(getattr(router, "router", router))

    auth = [Depends(_auth_dependency(app, cfg, api_keys))]

    @app.api_route("/", methods=["GET", "HEAD"])
    async def root() -> dict[str, Any]:
        return {"status": "ok", "service": app_id}

    @app.get("/health", dependencies=auth)
    async def health() -> dict[str, Any]:
        return {"healthy": True, "service": app_id, "auth": {"required": cfg.require_api_key}}

    @app.get("/info", dependencies=auth)
    async def info() -> dict[str, Any]:
        data = base_info.model_dump(mode="json")
        return {
            "service": {"task": data["task"], "version": data["task"].get("version")},
            "dataset": data["dataset"],
            "rubrics": jsonable_encoder(cfg.rubrics) if cfg.rubrics else None,
            "inference": data["inference"],
            "limits": data["limits"],
            "task_metadata": data["task_metadata"],
        }

    @app.get("/task_info", dependencies=auth)
    async def task_info(
        seed: Annotated[list[str] | None, Query()] = None,
        seeds: Annotated[list[str] | None, Query()] = None,
    ) -> Any:
        wanted = _parse_seeds([*(seed or ()), *(seeds or ())])
        if not wanted:
            describe = cfg.provide_taskset_description
            if describe is None:
                description = base_info.task.model_dump(mode="json", exclude_none=True)
            else:
                description = await invoke(describe)
            return {"taskset": jsonable_encoder(description)}
        if cfg.provide_task_instances is None:
            raise http_error(
                501,
                "task_instances_not_provided",
                f"Task app {app_id!r} cannot describe seeds: "
                "TaskAppConfig.provide_task_instances is not set.",
            )
        instances = await invoke(cfg.provide_task_instances, wanted, drain=True)
        items = [_as_task_info(obj) for obj in instances]
        return items[0] if len(wanted) == 1 and len(items) == 1 else items

    @app.post("/rollout", dependencies=auth)
    async def rollout(rollout_request: RolloutRequest, request: Request) -> dict[str, Any]:
        executor = cfg.rollout
        if executor is None:
            raise http_error(
                501,
                "rollout_not_implemented",
                f"Task app {app_id!r} has no rollout callback; set TaskAppConfig(rollout=...).",
            )
        args = (rollout_request, request)[: min(2, max(1, positional_arity(executor)))]
        try:
            result = await invoke(executor, *args)
        except HTTPException:
            raise
        except Exception as exc:
            logger.exception(
                "rollout %r of task app %r failed", rollout_request.trace_correlation_id, app_id
            )
            raise http_error(
                500, "rollout_failed", f"rollout() raised {type(exc).__name__}: {exc}"
            ) from exc
        return _rollout_body(result, rollout_request, app_id)

    @app.post("/done", dependencies=auth)
    async def done() -> dict[str, Any]:
        return {"ok": True, "service": app_id}

    from .sdk_routes import add_sdk_routes

    add_sdk_routes(app, cfg, auth)
    return app
