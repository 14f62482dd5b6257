"""Validation of InProcessTaskApp's parameters, with messages that say what to do."""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable
from typing import Any

from .errors import InvalidParameterError
from .tunnels.base import TUNNEL_MODES, canonical_mode

SERVE_ON = ("auto", "loop", "thread")

#: Seconds a stop lets in-flight requests finish before it cancels them (``stop_grace``).
DEFAULT_STOP_GRACE = 1.0


def check_one_input(inputs: dict[str, Any]) -> str:
    """Exactly one of the four inputs is given; return its name."""
    given = [name for name, value in inputs.items() if value is not None]
    if len(given) != 1:
        got = "none" if not given else " and ".join(given)
        raise InvalidParameterError(
            f"Provide exactly one of {', '.join(inputs)} (got {got})."
        )
    return given[0]


def path_alias(task_app_path: Any, container_path: Any) -> Any:
    """``container_path`` (synth-ai 0.9's name) is an alias of ``task_app_path``."""
    if container_path is None:
        return task_app_path
    if task_app_path is not None:
        raise InvalidParameterError(
            "Pass task_app_path= or its alias container_path=, not both."
        )
    return container_path


def check_tunnel(tunnel_mode: object, tunnel_backend: object | None) -> str:
    """The canonical mode: ``tunnel_backend`` (any alias) overrides ``tunnel_mode``."""
    if tunnel_backend is not None:
        return canonical_mode(str(getattr(tunnel_backend, "value", tunnel_backend)))
    mode = tunnel_mode.strip().lower() if isinstance(tunnel_mode, str) else tunnel_mode
    if mode not in TUNNEL_MODES:
        raise InvalidParameterError(
            f"tunnel_mode must be one of {', '.join(map(repr, TUNNEL_MODES))}, got "
            f"{tunnel_mode!r}."
        )
    return str(mode)


def check_preconfigured(
    mode: str, url: str | None, auth_header: str | None, auth_token: str | None
) -> None:
    if mode == "preconfigured" and not url:
        raise InvalidParameterError(
            "tunnel_mode='preconfigured' needs preconfigured_url= (the public URL that "
            "already routes to this app), e.g. preconfigured_url='https://my.host'."
        )
    if url is not None and not str(url).startswith(("http://", "https://")):
        raise InvalidParameterError(
            f"preconfigured_url must start with http:// or https://, got {url!r}."
        )
    if bool(auth_header) != bool(auth_token):
        raise InvalidParameterError(
            "Pass preconfigured_auth_header and preconfigured_auth_token together."
        )


def check_timeout(value: object) -> float:
    """A positive, finite number of seconds."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InvalidParameterError(
            f"health_check_timeout must be a positive, finite number of seconds, got {value!r}."
        )
    return float(value)


def check_stop_grace(value: object) -> float:
    """Zero or a positive, finite number of seconds."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise InvalidParameterError(
            f"stop_grace must be a finite number of seconds >= 0, got {value!r}: the time a "
            "stop lets in-flight requests finish before cancelling them (0 cancels at once)."
        )
    return float(value)


def check_serve_on(value: object) -> str:
    if value not in SERVE_ON:
        raise InvalidParameterError(
            f"serve_on must be 'auto', 'loop' or 'thread', got {value!r}."
        )
    return str(value)


def check_callbacks(**callbacks: Callable[..., Any] | None) -> None:
    for label, callback in callbacks.items():
        if callback is not None and not callable(callback):
            raise InvalidParameterError(f"{label} must be callable, got {callback!r}.")


def resolve_api_key(api_key: str | None) -> tuple[str, str]:
    """The app's key and where it came from: the argument, ENVIRONMENT_API_KEY, or a fresh
    random key for this instance (the environment is never rewritten)."""
    if api_key:
        return api_key, "argument"
    env = os.environ.get("ENVIRONMENT_API_KEY")
    if env:
        return env, "ENVIRONMENT_API_KEY"
    return secrets.token_urlsafe(32), "generated"
