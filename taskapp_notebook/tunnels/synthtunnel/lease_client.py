"""SynthTunnel's lease API client: settings from the environment, create and delete leases.

Compatible with Synth's hosted backend (``POST``/``DELETE /api/v1/synthtunnel/leases``)
and with our own relay. See ``docs/synthtunnel-protocol.md`` section 1.

Proxies: lease calls (and the agent's WebSocket) honour ``HTTPS_PROXY``/``NO_PROXY`` like
the synth-ai SDK does, because notebooks behind a corporate proxy can only reach
``api.usesynth.ai`` through it; loopback backends (our offline relay, tests) never go through
a proxy. Requests to the local app never use a proxy.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from ...errors import TunnelError, mask_secret, scrub_secrets

logger = logging.getLogger(__name__)

DEFAULT_BACKEND_URL = "https://api.usesynth.ai"
LEASES_PATH = "/api/v1/synthtunnel/leases"
DEFAULT_TIMEOUT_SEC = 30.0
DEFAULT_TTL_SECONDS = 3600
#: Cap on how much of a problem ``detail`` we quote in an error message.
_DETAIL_MAX = 300

_memory_client_id: str | None = None


@dataclass(frozen=True)
class LeaseSettings:
    """Where and how to ask for leases (from the environment unless given)."""

    api_key: str
    backend_url: str = DEFAULT_BACKEND_URL
    timeout: float = DEFAULT_TIMEOUT_SEC

    def __repr__(self) -> str:
        return (
            f"LeaseSettings(api_key={mask_secret(self.api_key)!r}, "
            f"backend_url={self.backend_url!r}, timeout={self.timeout!r})"
        )

    @classmethod
    def from_env(cls, api_key: str | None = None, backend_url: str | None = None) -> LeaseSettings:
        """Read ``SYNTH_API_KEY``, ``SYNTH_BACKEND_URL``, ``SYNTH_TUNNEL_TIMEOUT_SEC``.

        Raises TunnelError with what to do when one is missing or invalid.
        """
        key = (api_key or os.environ.get("SYNTH_API_KEY") or "").strip()
        if not key:
            raise TunnelError(
                "SYNTH_API_KEY is not set: tunnel_mode='synthtunnel' needs a Synth API key to "
                "lease a public URL. Set SYNTH_API_KEY (with SYNTH_BACKEND_URL pointing at your "
                "relay when self-hosting, e.g. `taskapp-relay`), or use tunnel_mode='local'."
            )
        raw_url = backend_url or os.environ.get("SYNTH_BACKEND_URL") or DEFAULT_BACKEND_URL
        url = normalize_backend_url(raw_url)
        raw_timeout = os.environ.get("SYNTH_TUNNEL_TIMEOUT_SEC", "").strip()
        timeout = DEFAULT_TIMEOUT_SEC
        if raw_timeout:
            try:
                timeout = float(raw_timeout)
            except ValueError:
                timeout = -1.0
            if not timeout > 0:
                raise TunnelError(
                    f"SYNTH_TUNNEL_TIMEOUT_SEC={raw_timeout!r} is not a positive number of "
                    "seconds. Unset it (default 30) or set e.g. SYNTH_TUNNEL_TIMEOUT_SEC=30."
                )
        return cls(api_key=key, backend_url=url, timeout=timeout)


def normalize_backend_url(url: str) -> str:
    """``https://host/api/v1/`` → ``https://host`` (as the SDK does); checks the scheme."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TunnelError(
            f"SYNTH_BACKEND_URL={url!r} is not an http(s) URL. "
            f"Set it like {DEFAULT_BACKEND_URL!r} or 'http://127.0.0.1:8700'."
        )
    path = parts.path.rstrip("/")
    for suffix in ("/v1", "/api"):
        if path.endswith(suffix):
            path = path[: -len(suffix)].rstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def is_loopback_url(url: str) -> bool:
    """True when ``url``'s host is localhost or a loopback address."""
    host = (urlsplit(url).hostname or "").strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_instance_id() -> str:
    """This machine's stable id, kept in ``~/.synth/client_instance_id`` like the SDK.

    An unwritable home falls back to an id kept in memory for this process.
    """
    global _memory_client_id
    try:
        path = Path(os.environ.get("HOME") or Path.home()) / ".synth" / "client_instance_id"
        if path.is_file():
            value = path.read_text(encoding="utf-8").strip()
            if len(value) >= 8:
                return value
        new_id = f"client-{secrets.token_hex(8)}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(new_id, encoding="utf-8")
        return new_id
    except (OSError, RuntimeError) as exc:
        if _memory_client_id is None:
            _memory_client_id = f"client-{secrets.token_hex(8)}"
            logger.info(
                "Could not persist the SynthTunnel client id (%s); using %s for this process",
                exc,
                _memory_client_id,
            )
        return _memory_client_id


@dataclass(frozen=True)
class Lease:
    """A parsed lease. ``remaining_at_issue`` is its TTL as the relay's clock saw it."""

    lease_id: str
    route_token: str
    public_base_url: str
    public_url: str
    agent_url: str
    agent_token: str
    worker_token: str
    expires_at: datetime
    remaining_at_issue: float
    limits: dict[str, Any] = field(default_factory=dict)
    heartbeat: dict[str, Any] = field(default_factory=dict)
    #: ``time.monotonic()`` when the lease was received.
    issued_at: float = field(default_factory=time.monotonic)

    def seconds_left(self) -> float:
        """Seconds until ``expires_at``, by the relay's clock at issue plus local elapsed."""
        return self.remaining_at_issue - (time.monotonic() - self.issued_at)

    def __repr__(self) -> str:
        return (
            f"Lease(lease_id={self.lease_id!r}, public_url={self.public_url!r}, "
            f"agent_url={self.agent_url!r}, agent_token={mask_secret(self.agent_token)!r}, "
            f"worker_token={mask_secret(self.worker_token)!r}, "
            f"expires_at={self.expires_at.isoformat()!r})"
        )


_REQUIRED = (
    "lease_id",
    "route_token",
    "public_base_url",
    "public_url",
    "agent_connect.url",
    "agent_connect.agent_token",
    "worker_token",
    "expires_at",
)


def _parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_lease(data: Any, server_date: str | None = None) -> Lease:
    """Parse a lease response; raise TunnelError naming missing or invalid fields."""
    if not isinstance(data, dict):
        raise TunnelError(f"The SynthTunnel lease response is not a JSON object: {data!r:.200}")
    connect = data.get("agent_connect")
    connect = connect if isinstance(connect, dict) else {}
    values: dict[str, Any] = {}
    for name in _REQUIRED:
        source, _, key = name.rpartition(".")
        values[name] = (connect if source else data).get(key)
    missing = [name for name, value in values.items() if not isinstance(value, str) or not value]
    if missing:
        raise TunnelError(
            f"The SynthTunnel lease response lacks {', '.join(missing)}; the relay at "
            "SYNTH_BACKEND_URL does not speak the SynthTunnel lease API."
        )
    try:
        expires_at = _parse_time(values["expires_at"])
    except ValueError:
        raise TunnelError(
            f"The SynthTunnel lease has an unreadable expires_at {values['expires_at']!r}."
        ) from None
    now = datetime.now(UTC)
    if server_date:
        try:
            now = parsedate_to_datetime(server_date)
        except (TypeError, ValueError):
            pass
    limits = data.get("limits")
    heartbeat = data.get("heartbeat")
    return Lease(
        lease_id=values["lease_id"],
        route_token=values["route_token"],
        public_base_url=values["public_base_url"],
        public_url=values["public_url"],
        agent_url=values["agent_connect.url"],
        agent_token=values["agent_connect.agent_token"],
        worker_token=values["worker_token"],
        expires_at=expires_at,
        remaining_at_issue=(expires_at - now).total_seconds(),
        limits=limits if isinstance(limits, dict) else {},
        heartbeat=heartbeat if isinstance(heartbeat, dict) else {},
    )


#: The one masking function (errors.scrub_secrets), under the name this package's code uses.
scrub = scrub_secrets


def describe_problem(response: httpx.Response) -> str:
    """``HTTP 401 (code='...', detail='...', request_id='...')`` from a JSON problem body."""
    parts: list[str] = []
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        for key in ("code", "detail", "request_id"):
            value = body.get(key)
            if value is not None and value != "":
                text = value if isinstance(value, str) else json.dumps(value)
                parts.append(f"{key}={text[:_DETAIL_MAX]!r}")
    elif response.text.strip():
        parts.append(f"body={response.text.strip()[:_DETAIL_MAX]!r}")
    return f"HTTP {response.status_code}" + (f" ({', '.join(parts)})" if parts else "")


def _hint(status: int, problem: str) -> str:
    if status in (401, 403):
        return " Check SYNTH_API_KEY."
    if "lease_expired" in problem:
        return " The lease expired."
    if status == 404:
        return " Check SYNTH_BACKEND_URL."
    if status == 429 or status >= 500:
        return " The relay is unavailable or busy; retry shortly."
    return ""


class LeaseRequestError(TunnelError):
    """The relay answered a lease call with an error status (``status``)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class LeaseClient:
    """Creates and deletes leases on ``settings.backend_url``."""

    def __init__(self, settings: LeaseSettings) -> None:
        self.settings = settings

    def _client(self, timeout: float | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=timeout or self.settings.timeout,
            trust_env=not is_loopback_url(self.settings.backend_url),
            follow_redirects=False,
        )

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.api_key}"}

    def _error(self, action: str, detail: str) -> TunnelError:
        return TunnelError(scrub(f"{action}: {detail}", (self.settings.api_key,)))

    async def create(
        self,
        *,
        client_id: str,
        host: str,
        port: int,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        renew_lease_id: str | None = None,
    ) -> Lease:
        """``POST`` a lease request; TunnelError quoting the relay's problem on failure.

        ``renew_lease_id`` asks a relay that supports it (ours) to extend that lease in
        place; others ignore it and create a new lease (compare ``lease_id``).
        """
        url = self.settings.backend_url + LEASES_PATH
        body: dict[str, Any] = {
            "client_instance_id": client_id,
            "local_target": {"host": host, "port": port},
            "requested_ttl_seconds": ttl_seconds,
            "metadata": {},
            "capabilities": {},
        }
        if renew_lease_id:
            body["renew_lease_id"] = renew_lease_id
        action = f"SynthTunnel lease request to {url!r} failed"
        try:
            async with self._client() as client:
                response = await client.post(url, json=body, headers=self._headers())
        except httpx.TimeoutException:
            raise self._error(
                action, f"no answer within {self.settings.timeout:g}s (SYNTH_TUNNEL_TIMEOUT_SEC)."
            ) from None
        except httpx.HTTPError as exc:
            raise self._error(
                action, f"{type(exc).__name__}: {exc}. Check SYNTH_BACKEND_URL and the network."
            ) from None
        except (ImportError, ValueError) as exc:  # a proxy from the environment we cannot use
            raise self._error(
                action, f"{exc}. Fix HTTPS_PROXY/ALL_PROXY, or add the host to NO_PROXY."
            ) from None
        if response.status_code >= 400:
            problem = describe_problem(response)
            message = f"{action}: {problem}.{_hint(response.status_code, problem)}"
            raise LeaseRequestError(scrub(message, (self.settings.api_key,)), response.status_code)
        try:
            data = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise self._error(
                action, f"HTTP {response.status_code} with a non-JSON body."
            ) from None
        try:
            lease = parse_lease(data, response.headers.get("date"))
        except TunnelError:
            lease_id = data.get("lease_id") if isinstance(data, dict) else None
            if isinstance(lease_id, str) and lease_id and lease_id != renew_lease_id:
                await self.delete(lease_id, quiet=True)
            raise
        logger.info("SynthTunnel lease %s obtained (expires %s)", lease.lease_id, lease.expires_at)
        return lease

    async def delete(
        self, lease_id: str, *, timeout: float | None = None, quiet: bool = False
    ) -> bool:
        """``DELETE`` the lease. Returns True when gone; raises only when ``quiet`` is False."""
        url = f"{self.settings.backend_url}{LEASES_PATH}/{lease_id}"
        action = f"Deleting SynthTunnel lease {lease_id!r} failed"
        try:
            async with self._client(timeout) as client:
                response = await client.delete(url, headers=self._headers())
            if response.status_code >= 400 and response.status_code != 404:
                raise self._error(action, describe_problem(response))
        except (httpx.HTTPError, TunnelError, ImportError, ValueError) as exc:
            error = exc if isinstance(exc, TunnelError) else self._error(action, repr(exc))
            if quiet:
                logger.warning("%s", error)
                return False
            raise error from None
        logger.info("SynthTunnel lease %s deleted", lease_id)
        return True
