"""Hosted GEPA / eval jobs on Synth's offline job API (synth-ai 0.9.x wire).

``run_in_process_job(...)`` serves a task app in this process, creates the job and follows
it live; it returns a :class:`HostedJob` handle at once (``await`` it for the result). The
wire is documented in ``docs/hosted-jobs-wire.md``. Modules::

    config   load a TOML/JSON/dict config, dot-path overrides, refusals, the create body
    backend  host resolution, create / status / events / cancel, the SSE stream
    events   job events and statuses -> RunProgress
    follow   SSE with Last-Event-ID reconnects, polling fallback, the final status
    handle   HostedJob (awaitable, cancel, run view) and InProcessJobResult
    run      run_in_process_job, run_in_process_job_sync, submit_and_poll_job
"""

from __future__ import annotations

from .backend import JobError, JobTimeoutError, resolve_backend_url, resolve_job_host
from .handle import HostedJob, InProcessJobResult
from .in_process import run_in_process_job, run_in_process_job_sync, submit_and_poll_job
from .job_config import JobConfigError, merge_dot_overrides

__all__ = [
    "HostedJob",
    "InProcessJobResult",
    "JobConfigError",
    "JobError",
    "JobTimeoutError",
    "merge_dot_overrides",
    "resolve_backend_url",
    "resolve_job_host",
    "run_in_process_job",
    "run_in_process_job_sync",
    "submit_and_poll_job",
]
