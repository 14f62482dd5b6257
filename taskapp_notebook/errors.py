"""Errors raised by taskapp_notebook: every exception class the package defines, drawn once.

The tree keeps the seed's contract (ValueError / FileNotFoundError / RuntimeError) by
subclassing those built-ins, so ``except RuntimeError`` in user code keeps working.
Classes defined outside this module name their module (``tests/test_errors.py`` checks that
every exception class in the package is drawn here, under its real parent)::

    TaskAppError
    ├── InvalidParameterError     (ValueError)         bad argument to InProcessTaskApp
    │   └── JobConfigError                             a job config the backend refuses
    │                                                  (jobs.job_config)
    ├── TaskAppNotFoundError      (FileNotFoundError)  task_app_path does not exist
    ├── TaskAppLoadError          (ValueError)         a module that defines no app/config
    ├── StartError                (RuntimeError)       the app could not be started
    │   ├── PortInUseError                             port busy and not freed
    │   ├── ServerStartError                           uvicorn/lifespan failed
    │   ├── HealthCheckError                           /health never answered 200
    │   ├── ModeNotAvailableError                      tunnel mode not implemented here
    │   └── TunnelError                                a tunnel could not be opened
    │       ├── TunnelVerificationError                the tunnel does not reach the app
    │       ├── LeaseRequestError                      the lease API answered an error status
    │       │                                          (tunnels.synthtunnel.lease_client)
    │       └── LeaseRejectedError                     the relay refused the agent token
    │                                                  (tunnels.synthtunnel.attach)
    ├── StateFileError            (RuntimeError)       the relay's --state file cannot be
    │                                                  used (relay.store)
    ├── JobError                  (RuntimeError)       a job refused or unreadable
    │   │                                              (jobs.backend)
    │   └── JobTimeoutError       (TimeoutError)       no terminal status in time
    │                                                  (jobs.backend)
    └── GepaError                                      a local GEPA run (gepa.exceptions)
        ├── GepaParameterError    (ValueError)         a bad argument, before anything
        │                                              starts (gepa.exceptions)
        ├── GepaNotInstalledError (ImportError)        the gepa extra is missing
        │                                              (gepa.exceptions)
        ├── DeadlockError         (RuntimeError)       a blocking call on the app's loop
        │                                              (gepa.exceptions)
        └── GepaRunError          (RuntimeError)       the run failed; .result has what it
                                                       found (gepa.exceptions)

Internal: raised and handled inside the package, never seen by a user::

    FrameError                    (ValueError)         a message that is not a usable
                                                       SynthTunnel frame: skipped, or its
                                                       request answered with an error
                                                       (tunnels.synthtunnel.protocol)
    InvalidLeaseRequestError      (ValueError)         a lease POST body the relay cannot
                                                       honour → 400 (relay.state)
    AgentGoneError                (Exception)          sending to an agent whose WebSocket
                                                       closed (relay.sessions)
    LocalHTTPError                (OSError)            the agent could not reach the app,
                                                       or it broke the exchange: answered
                                                       with a RESP_ERROR
                                                       (tunnels.synthtunnel.http_connection)
    HelpRequested                 (Exception)          ``%taskapp -h``: print the help
                                                       (notebook.options)
    AppUnavailable                (Exception)          a GEPA rollout found the task app
                                                       gone (gepa.adapter)
    RunInterrupted                (BaseException)      ends a GEPA run from inside gepa's
                                                       engine, which catches Exception
                                                       (gepa.adapter)

Messages say what failed, why, and what to do, with user values in ``!r``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any


class TaskAppError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidParameterError(TaskAppError, ValueError):
    """An argument to :class:`~taskapp_notebook.InProcessTaskApp` is invalid."""


class TaskAppNotFoundError(TaskAppError, FileNotFoundError):
    """``task_app_path`` does not exist."""


class TaskAppLoadError(TaskAppError, ValueError):
    """A task-app module was loaded but defines nothing we can serve."""


class StartError(TaskAppError, RuntimeError):
    """The task app could not be started; everything begun was undone."""


class PortInUseError(StartError):
    """The port is busy and could not be freed."""


class ServerStartError(StartError):
    """uvicorn could not start the app (for example its lifespan startup failed)."""


class HealthCheckError(StartError):
    """``GET /health`` did not answer 200 before ``health_check_timeout``."""


class ModeNotAvailableError(StartError):
    """The requested tunnel mode is not available in this build."""


class TunnelError(StartError):
    """A tunnel could not be opened or kept open.

    ``log_lines`` holds the last lines a tunnel subprocess printed, when there is one.
    """

    def __init__(self, message: str, *, log_lines: Sequence[str] = ()) -> None:
        self.log_lines = list(log_lines)
        if self.log_lines:
            message = message + "\nLast log lines:\n  " + "\n  ".join(self.log_lines)
        super().__init__(message)


class TunnelVerificationError(TunnelError):
    """The tunnel opened but ``GET {url}/health`` through it did not answer 200."""


def describe_error(exc: BaseException) -> str:
    """An error in one line: ``'PortInUseError: Port 8114 on ...'`` (its first line)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def mask_secret(value: str | None, *, keep: int = 4) -> str:
    """Return ``value`` with all but its last ``keep`` characters hidden (``'…abcd'``)."""
    if not value:
        return "<none>"
    if len(value) <= keep * 2:
        return "…" + "*" * 4
    return "…" + value[-keep:]


def scrub_secrets(text: str, secrets: Sequence[str | None]) -> str:
    """``text`` with every occurrence of each secret (4+ characters) masked."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, mask_secret(secret))
    return text


_CREDENTIAL_HEADER = re.compile(
    r"(?i)((?:authorization|x-api-keys?|x-synthtunnel-worker-token)\s*[:=]\s*(?:bearer\s+)?)"
    r"([^\s,'\"]+)"
)


class RedactingLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger for a library (websockets logs handshake headers at DEBUG) whose lines are
    scrubbed: credential header values (``Authorization``, ``X-API-Key(s)``, the worker-token
    header) and the given ``secrets`` are masked before the record is made."""

    def __init__(self, logger: logging.Logger, secrets: Sequence[str | None] = ()) -> None:
        super().__init__(logger, {})
        self.secrets = secrets

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        text = str(msg) % args if args else str(msg)
        text = _CREDENTIAL_HEADER.sub(lambda m: m.group(1) + mask_secret(m.group(2)), text)
        kwargs.setdefault("stacklevel", 2)
        self.logger.log(level, "%s", scrub_secrets(text, self.secrets), **kwargs)
