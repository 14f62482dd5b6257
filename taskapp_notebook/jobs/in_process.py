"""``run_in_process_job``: serve a task app here and run a hosted GEPA / eval job against it.

Everything that can be checked is checked before anything starts (Synth key, job config,
tunnel mode); then the handle runs in the background: start the app (with its tunnel) →
create the job → follow it (SSE) → read the final status → stop the app, in every outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import InvalidParameterError, scrub_secrets
from ..progress import RunProgress
from ..tunnels.base import canonical_mode
from .backend import (
    JobBackend,
    JobError,
    JobTimeoutError,
    api_base,
    is_loopback,
    resolve_backend_url,
    resolve_job_host,
)
from .events import JobEventFeed, final_state, map_strings
from .follow import follow_job
from .handle import HostedJob, InProcessJobResult
from .job_config import JobSpec, build_job_spec, load_job_config, merge_dot_overrides

if TYPE_CHECKING:
    from ..runner import ServeOn

__all__ = ["run_in_process_job", "run_in_process_job_sync", "submit_and_poll_job"]

logger = logging.getLogger(__name__)

_MAX_ERROR = 1000
_CLOUDFLARE_HOSTS = (".trycloudflare.com", ".cfargotunnel.com")
_PLACEHOLDER_URL = "http://127.0.0.1:9/"
StatusCallback = Callable[[dict[str, Any]], None]


def _synth_key(api_key: str | None) -> str:
    key = (api_key or os.environ.get("SYNTH_API_KEY") or "").strip()
    if not key:
        raise InvalidParameterError(
            "A Synth API key is required to run a hosted job: set SYNTH_API_KEY (or pass "
            "api_key=). Nothing was started."
        )
    return key


def _checked_spec(job_type: str, config: Mapping[str, Any], **kwargs: Any) -> JobSpec:
    """Build the create request once with a placeholder URL: refuses a bad config early."""
    return build_job_spec(job_type, config, container_url=_PLACEHOLDER_URL,
                          backend_api_base="http://placeholder/api", **kwargs)


def _refuse_cloudflare(job_type: str, tunnel_mode: str, preconfigured_url: str | None) -> None:
    host = (urlsplit(preconfigured_url or "").hostname or "").lower()
    if job_type == "prompt_learning" and (
        tunnel_mode in ("quick", "named") or host.endswith(_CLOUDFLARE_HOSTS)
    ):
        raise InvalidParameterError(
            f"tunnel_mode={tunnel_mode!r} gives a Cloudflare URL, which Synth's backend refuses "
            "for GEPA jobs (synth-ai 0.9 rejects *.trycloudflare.com / *.cfargotunnel.com). "
            "Use tunnel_mode='synthtunnel' (the default). Nothing was started."
        )


async def _submit_and_follow(
    handle: HostedJob,
    spec: JobSpec,
    *,
    host: str,
    synth_key: str,
    task_app_url: str,
    header_token: str | None,
    secrets: tuple[str | None, ...],
    poll: bool,
    poll_interval: float,
    timeout: float,
    on_status: StatusCallback | None,
    on_event: StatusCallback | None,
) -> InProcessJobResult:
    """Create the job and follow it; cancel it on the backend when cut short. Errors come
    out with every secret masked."""
    progress = handle.progress

    scrub = functools.partial(scrub_secrets, secrets=secrets)

    backend = JobBackend(host, synth_key)
    stats: dict[str, int] = {}
    try:
        try:
            job_id = handle.job_id = await _create(backend, spec, header_token, handle)
            logger.info("Created %s job %s on %s for %s", spec.kind, job_id, host, task_app_url)
            progress.update(state="running", message=f"job {job_id} created",
                            extra={**progress.snapshot().extra, "job_id": job_id})
            if not poll:
                status: dict[str, Any] = {"status": "submitted", "job_id": job_id}
            else:
                feed = JobEventFeed(progress, scrub)
                async with asyncio.timeout(timeout):
                    status = await follow_job(backend, job_id, feed, poll_interval=poll_interval,
                                              on_status=on_status, on_event=on_event,
                                              stats=stats)
        except TimeoutError:
            await _cancel_on_backend(backend, handle)
            raise JobTimeoutError(f"Job {handle.job_id} did not end within {timeout:g} s; it "
                                  "was cancelled on the backend.") from None
        except asyncio.CancelledError:
            refused = await _cancel_on_backend(backend, handle)
            if handle.cancel_reason is None:
                raise  # the caller was cancelled (interrupt): cancelled job, stopped app
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            status = await _status_after_cancel(backend, handle, scrub(refused or ""))
    except JobError as exc:
        text = scrub(str(exc))
        progress.update(state="failed", message=(text or type(exc).__name__).splitlines()[0][:300])
        error = type(exc)(text if len(text) <= _MAX_ERROR else text[:_MAX_ERROR] + " …")
        cause = exc.__cause__
    else:
        status = map_strings(status, scrub)
        result = InProcessJobResult(job_id=handle.job_id or "", status=status,
                                    task_app_url=task_app_url, backend_url=host,
                                    kind=spec.kind, follow_stats=stats)
        _finish_progress(progress, result)
        return result
    finally:
        await backend.aclose()
    raise error from cause


async def _create(backend: JobBackend, spec: JobSpec, worker_token: str | None,
                  handle: HostedJob) -> str:
    """Create the job. Cancelled while the request is on its way, it still learns the new
    job's id (waiting up to 15 s), so the job is cancelled on the backend, not left running."""
    creating = asyncio.ensure_future(backend.create(spec.path, spec.body,
                                                    worker_token=worker_token))
    try:
        return await asyncio.shield(creating)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            handle.job_id = await asyncio.wait_for(creating, 15.0)
        raise


async def _cancel_on_backend(backend: JobBackend, handle: HostedJob) -> str | None:
    """Cancel the job on the backend; why that failed (None when it worked)."""
    if handle.job_id is None:
        return None
    try:
        await asyncio.wait_for(asyncio.shield(backend.cancel(handle.job_id)), 15.0)
        logger.info("Cancelled job %s on the backend", handle.job_id)
        return None
    except Exception as exc:  # the app stops regardless; say why the cancel did not land
        logger.warning("Could not cancel job %s on the backend: %s", handle.job_id,
                       type(exc).__name__)
        return (str(exc) or type(exc).__name__).splitlines()[0][:200]


async def _status_after_cancel(backend: JobBackend, handle: HostedJob,
                               refused: str = "") -> dict[str, Any]:
    """The backend's status once more (scores so far), marked with how and why it ended;
    a cancel the backend did not confirm is said (the job may still run there)."""
    status: dict[str, Any] = {"job_id": handle.job_id}
    if handle.job_id is not None:
        try:
            status = await asyncio.wait_for(backend.status(handle.job_id), 5.0)
        except Exception as exc:  # the result still says what happened
            logger.debug("Status after cancel: %s", type(exc).__name__)
    error = handle.cancel_reason
    if refused:
        error = (f"{error}; the backend did not confirm the cancel ({refused}): job "
                 f"{handle.job_id} may still be running there, cancel it on the backend")
    return {**status, "status": handle.cancel_outcome, "error": error}


def _finish_progress(progress: RunProgress, result: InProcessJobResult) -> None:
    changes: dict[str, Any] = {"state": final_state(result.state or "failed")}
    if result.best_reward is not None:
        changes["best_score"] = result.best_reward
    if result.baseline_reward is not None:
        changes["seed_score"] = result.baseline_reward
    changes["message"] = result.error or f"job {result.job_id} {result.state}"
    if result.state == "submitted":
        changes = {"message": f"job {result.job_id} submitted (not followed)"}
    progress.update(**changes)


def _new_progress(spec: JobSpec, name: str | None) -> RunProgress:
    """The run's progress; its budget from the config (rollout budget or total rollouts)."""
    gepa = spec.body["config"].get("prompt_learning", {}).get("gepa")
    budget = None
    if isinstance(gepa, dict):
        rollout, stop = gepa.get("rollout"), gepa.get("termination_conditions")
        budget = (rollout.get("budget") if isinstance(rollout, dict) else None) or (
            stop.get("total_rollouts") if isinstance(stop, dict) else None)
    return RunProgress(spec.progress_kind, name or spec.body["system"]["name"],
                       budget_total=budget if isinstance(budget, int) else None)


async def submit_and_poll_job(
    *,
    job_type: str = "prompt_learning",
    task_app_url: str,
    task_app_worker_token: str | None = None,
    task_app_api_key: str | None = None,
    config_path: str | os.PathLike[str] | None = None,
    config_dict: Mapping[str, Any] | None = None,
    backend_url: str | None = None,
    api_key: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    system_name: str | None = None,
    seed_prompt: str | Mapping[str, str] | None = None,
    poll: bool = True,
    poll_interval: float = 5.0,
    timeout: float = 3600.0,
    on_status: StatusCallback | None = None,
    on_event: StatusCallback | None = None,
    progress: RunProgress | None = None,
) -> InProcessJobResult:
    """Submit a job for an already reachable task app and follow it to the end.

    ``task_app_api_key`` is never sent; it is only masked out of errors.
    """
    synth_key = _synth_key(api_key)
    backend = resolve_backend_url(backend_url)
    config = merge_dot_overrides(load_job_config(config_path, config_dict), overrides)
    spec = build_job_spec(job_type, config, container_url=task_app_url,
                          backend_api_base=api_base(backend),
                          container_worker_token=task_app_worker_token,
                          system_name=system_name, seed_prompt=seed_prompt)
    eval_job = spec.kind == "eval"
    secrets = (synth_key, task_app_api_key, task_app_worker_token)

    async def runner(handle: HostedJob) -> InProcessJobResult:
        return await _submit_and_follow(
            handle, spec, host=backend if eval_job else resolve_job_host(backend),
            synth_key=synth_key, task_app_url=task_app_url,
            header_token=None if eval_job else task_app_worker_token, secrets=secrets,
            poll=poll, poll_interval=poll_interval, timeout=timeout, on_status=on_status,
            on_event=on_event,
        )

    return await HostedJob(runner, progress or _new_progress(spec, None)).wait()


def run_in_process_job(
    *,
    job_type: str = "prompt_learning",
    config_path: str | os.PathLike[str] | None = None,
    config_dict: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    seed_prompt: str | Mapping[str, str] | None = None,
    system_name: str | None = None,
    backend_url: str | None = None,
    api_key: str | None = None,
    poll: bool = True,
    poll_interval: float = 5.0,
    timeout: float = 3600.0,
    on_status: StatusCallback | None = None,
    on_event: StatusCallback | None = None,
    app: Any | None = None,
    config: Any | None = None,
    config_factory: Callable[[], Any] | None = None,
    task_app_path: str | os.PathLike[str] | None = None,
    task_app_api_key: str | None = None,
    tunnel_mode: str | None = None,
    preconfigured_url: str | None = None,
    preconfigured_auth_header: str | None = None,
    preconfigured_auth_token: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8114,
    auto_find_port: bool = True,
    health_check_timeout: float = 30.0,
    serve_on: ServeOn = "auto",
    name: str | None = None,
) -> HostedJob:
    """Start the task app (with its tunnel) and run a hosted job against it, in the background.

    Returns a :class:`HostedJob` at once: ``await`` it for the :class:`InProcessJobResult`,
    ``.cancel()`` it, watch ``.progress``; in a notebook, end a cell with it to see the run.
    Raises before starting anything on a missing ``SYNTH_API_KEY``, a config the backend
    refuses, or a Cloudflare tunnel for a GEPA job. ``tunnel_mode`` defaults to
    ``"synthtunnel"`` (``"local"`` when the backend is on this machine, as synth-ai does).
    The app's key (``task_app_api_key`` or the runner's own) never leaves this machine.
    Re-running the notebook cell cancels the job it started before.
    """
    from ..runner import InProcessTaskApp

    synth_key = _synth_key(api_key)
    backend = resolve_backend_url(backend_url)
    if tunnel_mode is None:
        tunnel_mode = "local" if is_loopback(backend) else "synthtunnel"
    mode = canonical_mode(tunnel_mode)
    _refuse_cloudflare(job_type, mode, preconfigured_url)
    job_config = merge_dot_overrides(load_job_config(config_path, config_dict), overrides)
    spec = _checked_spec(job_type, job_config, system_name=system_name, seed_prompt=seed_prompt)
    task_app = InProcessTaskApp(
        app=app, config=config, config_factory=config_factory,
        task_app_path=None if task_app_path is None else Path(task_app_path),
        host=host, port=port, tunnel_mode=mode, preconfigured_url=preconfigured_url,
        preconfigured_auth_header=preconfigured_auth_header,
        preconfigured_auth_token=preconfigured_auth_token, api_key=task_app_api_key,
        health_check_timeout=health_check_timeout, auto_find_port=auto_find_port,
        skip_tunnel_verification=True, force_new_tunnel=True,
        serve_on=serve_on,
        name=name,
    )

    async def runner(handle: HostedJob) -> InProcessJobResult:
        handle.task_app = task_app
        handle.progress.update(message="starting the task app")
        try:
            await task_app.astart()
            task_app.add_listener(handle.on_app_change)
            url = handle.submitted_url = task_app.url or task_app.local_url
            token = task_app.task_app_worker_token
            spec = build_job_spec(job_type, job_config, container_url=url,
                                  backend_api_base=api_base(backend),
                                  container_worker_token=token, system_name=system_name,
                                  seed_prompt=seed_prompt)
            eval_job = spec.kind == "eval"
            return await _submit_and_follow(
                handle, spec, host=backend if eval_job else resolve_job_host(backend),
                synth_key=synth_key, task_app_url=url,
                header_token=None if eval_job else token,
                secrets=(synth_key, task_app.api_key, token), poll=poll,
                poll_interval=poll_interval, timeout=timeout, on_status=on_status,
                on_event=on_event,
            )
        finally:
            task_app.remove_listener(handle.on_app_change)
            await task_app.astop()

    return _replacing_the_cells_job(HostedJob(runner, _new_progress(spec, name)))


#: The last job each notebook cell started (by the frontend's cell id).
_job_of_cell: dict[str, HostedJob] = {}


def _replacing_the_cells_job(job: HostedJob) -> HostedJob:
    """Re-running a cell replaces the job it started, as for a local GEPA run: the job
    still going is cancelled on the backend and its app stopped (its view, in the cleared
    output, is closed when the new one is shown)."""
    from ..notebook.run_outputs import current_execution

    cell, _ = current_execution()
    if cell is None:
        return job
    old, _job_of_cell[cell] = _job_of_cell.get(cell), job
    if old is not None and not old.done():
        logger.info("Cancelling hosted job %s: replaced by a new run of the same cell",
                    old.job_id or "(not created yet)")
        old.cancel("replaced by a new run of the same cell")
    return job


def run_in_process_job_sync(**kwargs: Any) -> InProcessJobResult:
    """Blocking :func:`run_in_process_job`, for scripts (in a notebook, ``await`` the handle).
    Ctrl-C cancels the job on the backend and stops the app."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        job = run_in_process_job(**kwargs)
        return asyncio.run(job.wait())
    raise RuntimeError(
        "run_in_process_job_sync() cannot run inside a running event loop (a Jupyter kernel "
        "has one); use `job = run_in_process_job(...)` and `await job` instead."
    )
