"""The Synth job backend over HTTP: which host, create, status, events (SSE and polled), cancel.

Host resolution and paths follow ``docs/hosted-jobs-wire.md``: prompt-learning jobs go to
the "Rust backend" (``api.usesynth.ai`` -> ``infra-api.usesynth.ai``), eval jobs to the
backend itself; both under ``/api/v1/offline/jobs``. Every request carries
``Authorization: Bearer <SYNTH_API_KEY>``; the worker token travels only on the create of a
prompt-learning job, in ``X-SynthTunnel-Worker-Token``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from ..errors import TaskAppError

__all__ = [
    "DEFAULT_BACKEND_URL",
    "JobBackend",
    "JobError",
    "JobTimeoutError",
    "api_base",
    "is_loopback",
    "resolve_backend_url",
    "resolve_job_host",
]

logger = logging.getLogger(__name__)

DEFAULT_BACKEND_URL = "https://api.usesynth.ai"
WORKER_TOKEN_HEADER = "X-SynthTunnel-Worker-Token"
_KNOWN_HOSTS = {"api.usesynth.ai": "infra-api.usesynth.ai",
                "api-dev.usesynth.ai": "infra-api-dev.usesynth.ai"}
_HOST_ENV = ("SYNTH_RUST_BACKEND_URL", "LOCAL_RUST_BACKEND_URL", "DEV_RUST_BACKEND_URL",
             "PROD_RUST_BACKEND_URL", "RUST_BACKEND_URL")
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "host.docker.internal"}


class JobError(TaskAppError, RuntimeError):
    """The backend refused the job, or its state could not be read."""


class JobTimeoutError(JobError, TimeoutError):
    """The job did not end within ``timeout`` seconds (it was cancelled on the backend)."""


def _strip_api(url: str) -> str:
    base = url.strip().rstrip("/")
    for suffix in ("/api/v1", "/api"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def resolve_backend_url(override: str | None = None) -> str:
    """``override``, else ``SYNTH_BACKEND_URL``, else the public backend; no ``/api`` suffix."""
    return _strip_api(override or os.environ.get("SYNTH_BACKEND_URL") or DEFAULT_BACKEND_URL)


def api_base(backend: str) -> str:
    """``https://host`` -> ``https://host/api`` (synth-ai's ``ensure_api_base``)."""
    return _strip_api(backend) + "/api"


def resolve_job_host(backend: str) -> str:
    """The host prompt-learning jobs are created on, as synth-ai 0.9.11 resolves it.

    ``SYNTH_RUST_BACKEND_URL_OVERRIDE``; Synth's public hosts mapped to their ``infra-``
    twins; the ``*_RUST_BACKEND_URL`` variables; a loopback backend on 8000-8009 -> port
    +80. Any other backend is used as is (the SDK would fall back to
    ``http://localhost:8080`` there, which is never the user's backend).
    """
    override = os.environ.get("SYNTH_RUST_BACKEND_URL_OVERRIDE", "").strip()
    if override:
        return _strip_api(override)
    parts = urlsplit(backend.strip())
    host = (parts.hostname or "").lower()
    if host in _KNOWN_HOSTS:
        netloc = _KNOWN_HOSTS[host] + (f":{parts.port}" if parts.port else "")
        return _strip_api(urlunsplit(parts._replace(netloc=netloc)))
    for name in _HOST_ENV:
        value = os.environ.get(name, "").strip()
        if value:
            return _strip_api(value)
    if host in _LOCAL_HOSTS and parts.port is not None and 8000 <= parts.port <= 8009:
        return _strip_api(urlunsplit(parts._replace(netloc=f"{host}:{parts.port + 80}")))
    return _strip_api(backend)


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class JobBackend:
    """One job's HTTP conversation with the backend (an ``httpx.AsyncClient`` of its own)."""

    def __init__(self, host: str, api_key: str, *, timeout: float = 60.0) -> None:
        self.host = _strip_api(host)
        self._client = httpx.AsyncClient(
            base_url=self.host + "/api",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(timeout, read=None),
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def create(
        self, path: str, body: dict[str, Any], *, worker_token: str | None = None
    ) -> str:
        """POST the job; return its id."""
        headers = {WORKER_TOKEN_HEADER: worker_token} if worker_token else {}
        try:
            response = await self._client.post(path, json=body, headers=headers)
        except httpx.TransportError as exc:
            raise JobError(f"Could not reach the Synth backend at {self.host!r}: {exc}") from exc
        if response.status_code not in (200, 201, 202):
            raise JobError(
                f"Creating the job at {self.host}/api{path} failed: HTTP "
                f"{response.status_code}: {response.text}"
            )
        try:
            created = response.json()
        except ValueError:
            created = None
        job_id = ""
        if isinstance(created, dict):
            job_id = str(created.get("job_id") or created.get("id") or "").strip()
        if not job_id:
            raise JobError(f"The backend accepted the job but returned no job id: {created!r}")
        return job_id

    async def status(self, job_id: str) -> dict[str, Any]:
        """``GET …/offline/jobs/{id}``; transport and 5xx errors raise ``httpx`` errors."""
        response = await self._client.get(f"/v1/offline/jobs/{job_id}")
        return _json_object(response, "job status")

    async def events(self, job_id: str, since_seq: int) -> list[dict[str, Any]]:
        """``GET …/events?since_seq=&limit=`` (the polling fallback)."""
        response = await self._client.get(
            f"/v1/offline/jobs/{job_id}/events", params={"since_seq": since_seq, "limit": 500}
        )
        doc = _json_object(response, "job events")
        events = doc.get("events", doc.get("data", []))
        return [e for e in events if isinstance(e, dict)] if isinstance(events, list) else []

    async def cancel(self, job_id: str) -> None:
        """Cancel on the backend: ``PATCH …/offline/jobs/{id} {"state": "cancelled"}``
        (synth-ai 0.9.11 ``PolicyOptimizationOfflineJob.cancel``)."""
        response = await self._client.patch(
            f"/v1/offline/jobs/{job_id}", json={"state": "cancelled"}, timeout=15.0
        )
        if response.status_code >= 400:
            raise JobError(f"Cancelling job {job_id} failed: HTTP {response.status_code}: "
                           f"{response.text}")

    async def stream(self, job_id: str, last_event_id: int | None) -> AsyncIterator[
        dict[str, Any]
    ]:
        """Events from ``…/events/stream`` (SSE) until the server ends the stream.

        Raises :class:`LookupError` when the backend has no stream for this job (404/405),
        ``httpx`` errors when the connection fails.
        """
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = str(last_event_id)
        async with self._client.stream(
            "GET", f"/v1/offline/jobs/{job_id}/events/stream", headers=headers
        ) as response:
            if response.status_code in (404, 405, 501):
                raise LookupError(f"no event stream (HTTP {response.status_code})")
            if response.status_code >= 400:
                await response.aread()
                raise httpx.HTTPStatusError(
                    f"event stream: HTTP {response.status_code}: {response.text[:300]}",
                    request=response.request, response=response,
                )
            async for event in parse_sse(response.aiter_lines()):
                yield event


async def parse_sse(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """JSON objects from SSE frames (``data:`` lines joined; ``id:`` fills a missing seq).

    ``[DONE]`` and ``sse.stream.ended`` end the stream; comments and other fields are
    skipped.
    """
    data: list[str] = []
    frame_id: str | None = None
    async for raw in lines:
        line = raw.rstrip("\r")
        if line.startswith(":"):
            continue
        if line:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                data.append(value)
            elif field == "id":
                frame_id = value
            continue
        text, data = "\n".join(data), []
        event_id, frame_id = frame_id, None
        if not text:
            continue
        if text.strip() == "[DONE]":
            return
        try:
            event = json.loads(text)
        except ValueError:
            logger.debug("Skipping a non-JSON SSE frame (%d bytes)", len(text))
            continue
        if not isinstance(event, dict):
            continue
        if str(event.get("type", "")).lower() == "sse.stream.ended":
            return
        if event.get("seq") is None and event_id and event_id.isdigit():
            event["seq"] = int(event_id)
        yield event


def _json_object(response: httpx.Response, what: str) -> dict[str, Any]:
    if response.status_code >= 500:
        response.raise_for_status()
    if response.status_code >= 400:
        raise JobError(f"Reading the {what} failed: HTTP {response.status_code}: "
                       f"{response.text}")
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise JobError(f"The {what} is not a JSON object: {response.text[:200]!r}")
    return doc
