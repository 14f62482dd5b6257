"""``run_in_process_job``: serve a task app in this process and run a Synth job against it.

Mirrors the synth-ai SDK helper of the same name: start an
:class:`~taskapp_notebook.runner.InProcessTaskApp` (tunnel included), submit the job to the
backend over HTTP with the task app's URL, API key and SynthTunnel worker token wired in,
poll until the job ends, stop the app, and return an :class:`InProcessJobResult`.

Wire details (the SDK's Python endpoints; ``JOB_ENDPOINTS`` holds them)::

    POST {backend}/api/prompt-learning/online/jobs   {"algorithm", "config_body", ...}
    GET  {backend}/api/prompt-learning/online/jobs/{job_id}
    POST {backend}/api/eval/jobs                      flat config + task_app_url
    GET  {backend}/api/eval/jobs/{job_id}

Requests carry ``Authorization: Bearer <SYNTH_API_KEY>``; a worker token travels in the
``X-SynthTunnel-Worker-Token`` header (and, for prompt learning, ``metadata.worker_token``).
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import json
import logging
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from .errors import InvalidParameterError, TaskAppError, scrub_secrets

__all__ = [
    "InProcessJobResult",
    "JobError",
    "JobTimeoutError",
    "merge_dot_overrides",
    "resolve_backend_url",
    "run_in_process_job",
    "run_in_process_job_sync",
    "submit_and_poll_job",
]

logger = logging.getLogger(__name__)

DEFAULT_BACKEND_URL = "https://api.usesynth.ai"
WORKER_TOKEN_HEADER = "X-SynthTunnel-Worker-Token"
#: job_type -> (create path, status path).
JOB_ENDPOINTS: dict[str, tuple[str, str]] = {
    "prompt_learning": (
        "/api/prompt-learning/online/jobs",
        "/api/prompt-learning/online/jobs/{job_id}",
    ),
    "eval": ("/api/eval/jobs", "/api/eval/jobs/{job_id}"),
}
SUCCESS_STATUSES = frozenset({"succeeded", "completed", "success"})
TERMINAL_STATUSES = SUCCESS_STATUSES | {"failed", "error", "errored", "cancelled", "canceled"}
#: Longest job error message (after secrets are masked).
_MAX_ERROR = 1000
_MAX_POLL_ERRORS = 5


class JobError(TaskAppError, RuntimeError):
    """The backend refused the job, or its status could not be read."""


class JobTimeoutError(JobError, TimeoutError):
    """The job did not reach a terminal status within ``timeout`` seconds."""


@dataclass
class InProcessJobResult:
    """What :func:`run_in_process_job` returns (the SDK's fields plus the worker token)."""

    job_id: str
    status: dict[str, Any]
    task_app_url: str
    backend_url: str
    task_app_worker_token: str | None = field(default=None, repr=False)

    @property
    def succeeded(self) -> bool:
        """True when the job's final status is a success status."""
        return str(self.status.get("status", "")).lower() in SUCCESS_STATUSES


def resolve_backend_url(override: str | None = None) -> str:
    """``override``, else ``SYNTH_BACKEND_URL``, else the public backend; no ``/api`` suffix."""
    candidate = (override or os.environ.get("SYNTH_BACKEND_URL") or DEFAULT_BACKEND_URL).strip()
    base = candidate.rstrip("/")
    return base.removesuffix("/api") if base.endswith("/api") else base


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def merge_dot_overrides(
    base: Mapping[str, Any] | None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Deep-merge ``extra`` into a copy of ``base``; keys like ``"a.b.c"`` address nesting."""
    merged: dict[str, Any] = copy.deepcopy(dict(base or {}))
    for dotted, value in (extra or {}).items():
        *parents, leaf = str(dotted).split(".")
        node = merged
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            node[leaf] = merge_dot_overrides(node[leaf], value)
        else:
            node[leaf] = copy.deepcopy(value)
    return merged


def _load_job_config(
    config_path: str | os.PathLike[str] | None, config_dict: Mapping[str, Any] | None
) -> dict[str, Any]:
    if (config_path is None) == (config_dict is None):
        raise InvalidParameterError("Pass exactly one of config_path= (TOML/JSON) or config_dict=.")
    if config_dict is not None:
        return copy.deepcopy(dict(config_dict))
    assert config_path is not None
    path = Path(config_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Job config file {str(config_path)!r} not found.")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            data = tomllib.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise InvalidParameterError(f"Job config {str(path)!r} is not valid: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidParameterError(f"Job config {str(path)!r} must hold a table/object.")
    return data


def _build_payload(
    job_type: str,
    config: dict[str, Any],
    *,
    task_app_url: str,
    task_app_api_key: str | None,
    task_app_worker_token: str | None,
    allow_experimental: bool | None,
) -> dict[str, Any]:
    """The create-job body, with the task app's URL, key and worker token wired in."""
    wiring: dict[str, Any] = {"task_app_url": task_app_url}
    if task_app_api_key:
        wiring["task_app_api_key"] = task_app_api_key
    if job_type == "eval":
        payload = {**config, **wiring}
    else:
        section = config.setdefault("prompt_learning", {})
        section.update(wiring)
        metadata: dict[str, Any] = {}
        if task_app_worker_token:
            metadata["worker_token"] = task_app_worker_token
        payload = {
            "algorithm": section.get("algorithm", "gepa"),
            "config_body": config,
            "overrides": {},
            "metadata": metadata,
            "auto_start": True,
        }
    if allow_experimental is not None:
        payload["allow_experimental"] = allow_experimental
    return payload


async def _poll(
    client: httpx.AsyncClient,
    url: str,
    *,
    interval: float,
    timeout: float,
    on_status: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    errors = 0
    status: dict[str, Any] = {}
    while True:
        problem: str | None = None
        try:
            response = await client.get(url)
        except httpx.TransportError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code >= 500:
                problem = f"HTTP {response.status_code}"
            elif response.status_code >= 400:
                raise JobError(
                    f"Reading job status at {url} failed: HTTP {response.status_code}: "
                    f"{response.text}"
                )
            else:
                try:
                    body = response.json()
                except ValueError:
                    body = None
                if isinstance(body, dict):
                    status = body
                else:
                    problem = "the answer is not a JSON object"
        if problem is not None:
            errors += 1
            logger.warning("Polling %s failed (%d/%d): %s", url, errors, _MAX_POLL_ERRORS, problem)
            if errors >= _MAX_POLL_ERRORS:
                raise JobError(f"Polling {url} failed {errors} times in a row: {problem}")
        else:
            errors = 0
            if on_status is not None:
                try:
                    on_status(status)
                except Exception:
                    logger.warning("on_status callback raised; ignoring", exc_info=True)
            if str(status.get("status", "")).lower() in TERMINAL_STATUSES:
                return status
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise JobTimeoutError(
                f"Job at {url} did not finish within {timeout:g} s "
                f"(last status: {status.get('status', 'unknown')!r})."
            )
        await asyncio.sleep(min(interval, remaining))


async def submit_and_poll_job(
    *,
    job_type: str = "prompt_learning",
    task_app_url: str,
    task_app_api_key: str | None = None,
    task_app_worker_token: str | None = None,
    config_path: str | os.PathLike[str] | None = None,
    config_dict: Mapping[str, Any] | None = None,
    backend_url: str | None = None,
    api_key: str | None = None,
    allow_experimental: bool | None = None,
    overrides: Mapping[str, Any] | None = None,
    poll: bool = True,
    poll_interval: float = 5.0,
    timeout: float = 3600.0,
    on_status: Callable[[dict[str, Any]], None] | None = None,
) -> InProcessJobResult:
    """Submit a job for an already reachable task app and (optionally) poll it to the end."""
    if job_type not in JOB_ENDPOINTS:
        raise InvalidParameterError(
            f"job_type must be one of {', '.join(map(repr, JOB_ENDPOINTS))}; got {job_type!r}."
        )
    synth_key = (api_key or os.environ.get("SYNTH_API_KEY") or "").strip()
    if not synth_key:
        raise InvalidParameterError(
            "A Synth backend API key is required: set SYNTH_API_KEY or pass api_key=."
        )
    base = resolve_backend_url(backend_url)
    config = merge_dot_overrides(_load_job_config(config_path, config_dict), overrides)
    payload = _build_payload(
        job_type,
        config,
        task_app_url=task_app_url,
        task_app_api_key=task_app_api_key,
        task_app_worker_token=task_app_worker_token,
        allow_experimental=allow_experimental,
    )
    headers = {"Authorization": f"Bearer {synth_key}"}
    if task_app_worker_token:
        headers[WORKER_TOKEN_HEADER] = task_app_worker_token
    try:
        return await _submit_and_poll(
            job_type, payload, headers, base, task_app_url, task_app_worker_token,
            poll=poll, poll_interval=poll_interval, timeout=timeout, on_status=on_status,
        )
    except JobError as exc:
        # Backends echo request bodies in their errors (FastAPI's 422 does): never let the
        # worker token or either key reach the message in full. Scrub the whole text, then
        # shorten it; raise outside this block so the unscrubbed error is not its context.
        secrets = (synth_key, task_app_api_key, task_app_worker_token)
        text = scrub_secrets(str(exc), secrets)
        error = type(exc)(text if len(text) <= _MAX_ERROR else text[:_MAX_ERROR] + " …")
        cause = exc.__cause__
    raise error from cause


async def _submit_and_poll(
    job_type: str,
    payload: dict[str, Any],
    headers: dict[str, str],
    base: str,
    task_app_url: str,
    task_app_worker_token: str | None,
    *,
    poll: bool,
    poll_interval: float,
    timeout: float,
    on_status: Callable[[dict[str, Any]], None] | None,
) -> InProcessJobResult:
    create_path, status_path = JOB_ENDPOINTS[job_type]
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60.0) as client:
        try:
            response = await client.post(create_path, json=payload)
        except httpx.TransportError as exc:
            raise JobError(f"Could not reach the Synth backend at {base!r}: {exc}") from exc
        if response.status_code not in (200, 201, 202):
            raise JobError(
                f"Submitting the {job_type} job to {base}{create_path} failed: "
                f"HTTP {response.status_code}: {response.text}"
            )
        created = response.json()
        job_id = str(created.get("job_id") or created.get("id") or "").strip()
        if not job_id:
            raise JobError(f"The backend accepted the job but returned no job id: {created!r}")
        logger.info("Submitted %s job %s to %s for %s", job_type, job_id, base, task_app_url)
        if poll:
            status = await _poll(
                client,
                status_path.format(job_id=job_id),
                interval=poll_interval,
                timeout=timeout,
                on_status=on_status,
            )
        else:
            status = {"status": "submitted", "job_id": job_id}
    return InProcessJobResult(
        job_id=job_id,
        status=status,
        task_app_url=task_app_url,
        backend_url=base,
        task_app_worker_token=task_app_worker_token,
    )


async def run_in_process_job(
    *,
    job_type: str = "prompt_learning",
    config_path: str | os.PathLike[str] | None = None,
    config_dict: Mapping[str, Any] | None = None,
    backend_url: str | None = None,
    api_key: str | None = None,
    task_app_api_key: str | None = None,
    allow_experimental: bool | None = None,
    overrides: Mapping[str, Any] | None = None,
    poll: bool = True,
    poll_interval: float = 5.0,
    timeout: float = 3600.0,
    on_status: Callable[[dict[str, Any]], None] | None = None,
    app: Any | None = None,
    config: Any | None = None,
    config_factory: Callable[[], Any] | None = None,
    task_app_path: str | os.PathLike[str] | None = None,
    tunnel_mode: str = "synthtunnel",
    tunnel_backend: Any | None = None,
    preconfigured_url: str | None = None,
    preconfigured_auth_header: str | None = None,
    preconfigured_auth_token: str | None = None,
    skip_tunnel_verification: bool = True,
    force_new_tunnel: bool = True,
    host: str = "127.0.0.1",
    port: int = 8114,
    auto_find_port: bool = True,
    health_check_timeout: float = 30.0,
) -> InProcessJobResult:
    """Start the task app (with its tunnel), run the job against it, stop the app.

    Exactly one of ``app`` / ``config`` / ``config_factory`` / ``task_app_path``. With a
    loopback backend and the default ``tunnel_mode``, no tunnel is opened (``"local"``),
    as the SDK does. The task app's key is ``task_app_api_key``, else the runner's own
    (``ENVIRONMENT_API_KEY`` or a generated one); it is sent with the job.
    """
    from .runner import InProcessTaskApp

    base = resolve_backend_url(backend_url)
    if tunnel_backend is None and tunnel_mode == "synthtunnel" and _is_loopback(base):
        logger.info("Backend %s is on this machine; serving the task app without a tunnel", base)
        tunnel_mode = "local"
    if (
        tunnel_backend is None
        and tunnel_mode == "synthtunnel"
        and base != resolve_backend_url(None)
    ):
        # The tunnel takes its lease from SYNTH_BACKEND_URL (as the seed specifies), not from
        # backend_url; say so rather than lease from a different backend silently.
        logger.warning(
            "backend_url=%s is used for the job; the SynthTunnel lease still comes from "
            "SYNTH_BACKEND_URL (%s). Set SYNTH_BACKEND_URL to lease from the same backend.",
            base,
            resolve_backend_url(None),
        )
    # Fail on a bad job config or missing Synth key before starting anything.
    job_config = _load_job_config(config_path, config_dict)
    if not (api_key or os.environ.get("SYNTH_API_KEY", "").strip()):
        raise InvalidParameterError(
            "A Synth backend API key is required: set SYNTH_API_KEY or pass api_key=."
        )
    async with InProcessTaskApp(
        app=app,
        config=config,
        config_factory=config_factory,
        task_app_path=None if task_app_path is None else Path(task_app_path),
        host=host,
        port=port,
        tunnel_mode=tunnel_mode,
        tunnel_backend=tunnel_backend,
        preconfigured_url=preconfigured_url,
        preconfigured_auth_header=preconfigured_auth_header,
        preconfigured_auth_token=preconfigured_auth_token,
        api_key=task_app_api_key,
        health_check_timeout=health_check_timeout,
        auto_find_port=auto_find_port,
        skip_tunnel_verification=skip_tunnel_verification,
        force_new_tunnel=force_new_tunnel,
    ) as task_app:
        url = task_app.url or f"http://{task_app.host}:{task_app.port}"
        return await submit_and_poll_job(
            job_type=job_type,
            task_app_url=url,
            task_app_api_key=task_app.api_key,
            task_app_worker_token=task_app.task_app_worker_token,
            config_dict=job_config,
            backend_url=base,
            api_key=api_key,
            allow_experimental=allow_experimental,
            overrides=overrides,
            poll=poll,
            poll_interval=poll_interval,
            timeout=timeout,
            on_status=on_status,
        )


def run_in_process_job_sync(**kwargs: Any) -> InProcessJobResult:
    """Blocking :func:`run_in_process_job`, for scripts (in a notebook, ``await`` the async one)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_in_process_job(**kwargs))
    raise RuntimeError(
        "run_in_process_job_sync() cannot run inside a running event loop (a Jupyter kernel "
        "has one); use `await run_in_process_job(...)` instead."
    )
