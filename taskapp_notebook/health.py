"""Health checks: wait for ``GET /health`` to answer 200, fast at first.

The start path polls with a schedule that begins at half a millisecond and doubles to
100 ms, so a healthy app is seen in milliseconds while a slow one is not hammered.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import HealthCheckError

if TYPE_CHECKING:
    import ssl

    import httpx

logger = logging.getLogger(__name__)

_FIRST_DELAY = 0.0005
_MAX_DELAY = 0.1


@dataclass(frozen=True)
class HealthResult:
    """The outcome of one ``GET /health``."""

    ok: bool
    status: int | None
    error: str | None
    seconds: float
    at: float

    def describe(self) -> str:
        if self.status is not None:
            return f"HTTP {self.status}"
        return self.error or "no answer"


@functools.cache
def ssl_context() -> ssl.SSLContext:
    """One verifying SSL context per process (building one costs ~20 ms)."""
    import httpx

    context: ssl.SSLContext = httpx.create_ssl_context()
    return context


def make_client() -> httpx.AsyncClient:
    """An httpx client for health checks: no proxies from the environment, shared SSL."""
    import httpx

    return httpx.AsyncClient(trust_env=False, verify=ssl_context())


def auth_headers(api_key: str, *, internal: bool = False) -> dict[str, str]:
    """Headers that authenticate to a task app with ``api_key``.

    ``internal=True`` marks our own health checks so the app's request stats skip them.
    """
    headers = {"X-API-Key": api_key, "Authorization": f"Bearer {api_key}"}
    if internal:
        from .stats import INTERNAL_HEADER, INTERNAL_VALUE

        headers[INTERNAL_HEADER] = INTERNAL_VALUE
    return headers


async def check_once(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], timeout: float
) -> HealthResult:
    """One ``GET {url}/health``; never raises for HTTP or connection errors."""
    import httpx

    started = time.perf_counter()
    try:
        response = await client.get(url.rstrip("/") + "/health", headers=headers,
                                    timeout=timeout)
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return HealthResult(False, None, error, time.perf_counter() - started, time.time())
    elapsed = time.perf_counter() - started
    code = _error_code(response) if response.status_code == 503 else None
    return HealthResult(response.status_code == 200, response.status_code, code, elapsed,
                        time.time())


#: The error code task apps (ours and synth-ai's) answer with when no key is configured.
_NO_KEY = "missing_environment_api_key"


def _error_code(response: httpx.Response) -> str | None:
    """``detail.error.code`` of an SDK-shaped error body, if there is one."""
    try:
        body = response.json()
        code = body["detail"]["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


async def wait_healthy(
    url: str,
    headers: dict[str, str],
    *,
    timeout: float,
    what: str = "task app",
    client: httpx.AsyncClient | None = None,
    local: bool = True,
) -> HealthResult:
    """Poll ``GET {url}/health`` until 200 or ``timeout`` seconds; raise HealthCheckError.

    ``local=True`` (the app itself, already serving): 401/403 and 404/405 are final answers
    and fail at once. Through a tunnel (``local=False``) they may be transient, so polling
    goes on until the deadline.
    """

    own_client = client is None
    if client is None:
        client = make_client()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = _FIRST_DELAY
    attempts = 0
    answered: HealthResult | None = None  # the last check that got an HTTP status
    try:
        while True:
            remaining = max(deadline - loop.time(), 0.001)
            result = await check_once(client, url, headers, timeout=min(remaining, 10.0))
            attempts += 1
            if result.status is not None:
                answered = result
            logger.debug("Health check %d of %s: %s", attempts, url, result.describe())
            if result.ok:
                return result
            if local and result.status in (404, 405):
                raise HealthCheckError(
                    f"The {what} at {url} has no GET /health route (HTTP {result.status}). "
                    "A task app must answer GET /health with 200; apps built from a "
                    "TaskAppConfig get one from create_task_app."
                )
            if local and result.status in (400, 401, 403):
                # 400: synth-ai 0.7 task apps answer a wrong or missing key with it.
                raise HealthCheckError(
                    f"The {what} at {url} rejected the key (HTTP {result.status} on /health): "
                    "set ENVIRONMENT_API_KEY or pass api_key= with the key the app expects."
                )
            if local and result.status == 503 and result.error == _NO_KEY:
                raise HealthCheckError(
                    f"The {what} at {url} has no API key configured (HTTP 503 on /health, "
                    f"{_NO_KEY}): set ENVIRONMENT_API_KEY before starting it, or pass api_key=."
                )
            if loop.time() + delay >= deadline:
                # The last check may have been cut short by the deadline (ReadTimeout);
                # the app's last real answer is what explains the failure.
                last = result.describe()
                if answered is not None and answered is not result:
                    last = f"{answered.describe()}, then {last}"
                raise HealthCheckError(
                    f"The {what} at {url} did not become healthy within {timeout:g} s "
                    f"({attempts} checks; last: {last}). Check that it serves "
                    "GET /health with status 200 and accepts the X-API-Key header, or raise "
                    "health_check_timeout."
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_DELAY)
    finally:
        if own_client:
            await client.aclose()
