"""API-key checks for task apps, free of any web framework.

A request may carry its key as ``X-API-Key: k``, ``X-API-Keys: k1,k2`` or
``Authorization: Bearer k``; keys are compared in constant time. The keys an app accepts
are looked up per request, first non-empty source wins:

1. ``api_keys`` given to :func:`~taskapp_notebook.contract.create_task_app`;
2. ``app.state.taskapp_api_keys`` (set by the in-process runner on apps we built);
3. ``ENVIRONMENT_API_KEY`` plus the comma-separated ``ENVIRONMENT_API_KEY_ALIASES``.

Key values are never logged or put in error messages.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "ALIASES_ENV",
    "KEY_ENV",
    "KeyCheck",
    "allowed_keys_from_env",
    "check_headers",
    "normalize_keys",
    "resolve_allowed_keys",
]

KEY_ENV = "ENVIRONMENT_API_KEY"
ALIASES_ENV = "ENVIRONMENT_API_KEY_ALIASES"

_KNOWN_SCHEMES = frozenset({"basic", "digest", "token", "negotiate", "hoba", "mutual", "apikey"})


def normalize_keys(keys: Iterable[str] | None) -> tuple[str, ...]:
    """Strip, drop empties and de-duplicate ``keys`` (order kept)."""
    seen: dict[str, None] = {}
    for key in keys or ():
        stripped = key.strip() if isinstance(key, str) else ""
        if stripped:
            seen.setdefault(stripped, None)
    return tuple(seen)


def allowed_keys_from_env(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Keys from ``ENVIRONMENT_API_KEY`` and comma-separated ``ENVIRONMENT_API_KEY_ALIASES``."""
    env = os.environ if environ is None else environ
    primary = env.get(KEY_ENV, "")
    aliases = env.get(ALIASES_ENV, "").split(",")
    return normalize_keys([primary, *aliases])


def resolve_allowed_keys(
    explicit: Iterable[str] | None, state_keys: object
) -> tuple[tuple[str, ...], str]:
    """Return ``(keys, where_they_came_from)`` following the lookup order above."""
    keys = normalize_keys(explicit)
    if keys:
        return keys, "api_keys passed to create_task_app"
    if isinstance(state_keys, str):
        state_keys = (state_keys,)
    if isinstance(state_keys, Iterable):
        keys = normalize_keys(k for k in state_keys if isinstance(k, str))
        if keys:
            return keys, "app.state.taskapp_api_keys"
    return allowed_keys_from_env(), f"{KEY_ENV} / {ALIASES_ENV}"


@dataclass(frozen=True)
class KeyCheck:
    """Outcome of :func:`check_headers`. ``headers_seen`` holds names only, never values."""

    ok: bool
    headers_seen: tuple[str, ...]


def _presented(headers: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Candidate keys and a description of which auth headers were present."""
    candidates: list[str] = []
    seen: dict[str, None] = {}
    for raw_name, value in headers:
        name = raw_name.lower()
        if name == "x-api-key":
            seen.setdefault(name, None)
            candidates.append(value.strip())
        elif name == "x-api-keys":
            seen.setdefault(name, None)
            candidates.extend(part.strip() for part in value.split(","))
        elif name == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                seen.setdefault("authorization (Bearer)", None)
                candidates.append(token.strip())
            else:
                # Name only well-known schemes: a bare key in this header must not leak.
                label = repr(scheme.lower()) if scheme.lower() in _KNOWN_SCHEMES else "unrecognised"
                seen.setdefault(f"authorization (scheme {label}, not Bearer)", None)
    return [c for c in candidates if c], list(seen)


def check_headers(headers: Iterable[tuple[str, str]], allowed: Iterable[str]) -> KeyCheck:
    """Does any key in ``headers`` (name/value pairs) match one of ``allowed``?

    Every candidate is compared with every allowed key using :func:`hmac.compare_digest`,
    without stopping at the first match.
    """
    candidates, seen = _presented(headers)
    allowed_bytes = [key.encode() for key in allowed]
    ok = False
    for candidate in candidates:
        encoded = candidate.encode()
        for key in allowed_bytes:
            ok |= hmac.compare_digest(encoded, key)
    return KeyCheck(ok=ok, headers_seen=tuple(seen))
