"""SynthTunnel backend: lease a public URL from a SynthTunnel relay and serve it from here.

Lifecycle of :class:`SynthTunnel` (protocol: ``docs/synthtunnel-protocol.md``):

- ``preflight`` reads ``SYNTH_API_KEY`` / ``SYNTH_BACKEND_URL`` / ``SYNTH_TUNNEL_TIMEOUT_SEC``.
- ``open`` POSTs a lease, connects its agent (``agent``) and ATTACHes.
- A renewal task POSTs again at 80 % of the TTL (or at once when the relay refuses the
  agent token), with ``renew_lease_id`` (our relay then extends the same lease: same
  ``lease_id`` and URL, nothing else to do; the field is dropped if a relay answers 400/422
  to it). A different ``lease_id`` (Synth's hosted API has only POST and DELETE) is
  attached, ``url``/``worker_token`` switch to it, the old lease finishes its in-flight
  requests (at most ``drain_timeout``) and is DELETEd; a URL change is reported through
  ``ctx.on_event``.
- ``close`` stops everything and awaits the DELETE of every lease it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Coroutine
from typing import Any

import httpx

from ...errors import TunnelError, mask_secret
from ..base import TunnelContext, TunnelState, TunnelStatus
from .agent import LeaseAgent
from .forward import (
    AGENT_BUFFER_BYTES,
    BODY_STALL_TIMEOUT,
    REQUEST_BUFFER_BYTES,
    check_body_bounds,
)
from .lease_client import (
    DEFAULT_TTL_SECONDS,
    Lease,
    LeaseClient,
    LeaseRequestError,
    LeaseSettings,
    client_instance_id,
    is_loopback_url,
)
from .local_http import LocalHTTP

logger = logging.getLogger(__name__)

__all__ = ["SynthTunnel"]

#: Never renew sooner than this after the previous lease (guards a tiny or skewed TTL).
MIN_RENEW_DELAY = 1.0


class SynthTunnel:
    """The ``synthtunnel`` backend (see the module docstring)."""

    mode = "synthtunnel"

    def __init__(
        self,
        *,
        max_inflight: int = 128,
        requested_ttl_seconds: int = DEFAULT_TTL_SECONDS,
        renew_fraction: float = 0.8,
        ping_interval: float = 20.0,
        ping_timeout: float = 20.0,
        drain_timeout: float = 30.0,
        delete_timeout: float = 10.0,
        request_buffer_bytes: int = REQUEST_BUFFER_BYTES,
        agent_buffer_bytes: int = AGENT_BUFFER_BYTES,
        body_stall_timeout: float = BODY_STALL_TIMEOUT,
    ) -> None:
        check_body_bounds(request_buffer_bytes, agent_buffer_bytes, body_stall_timeout)
        self.url: str | None = None
        self.worker_token: str | None = None
        self.status = TunnelStatus()
        #: The lease currently published as ``url``.
        self.lease: Lease | None = None
        self.max_inflight = max_inflight
        self.requested_ttl_seconds = requested_ttl_seconds
        self.renew_fraction = renew_fraction
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.drain_timeout = drain_timeout
        self.delete_timeout = delete_timeout
        #: Bounds on buffered request bodies (see ``forward``).
        self.request_buffer_bytes = request_buffer_bytes
        self.agent_buffer_bytes = agent_buffer_bytes
        self.body_stall_timeout = body_stall_timeout
        self._settings: LeaseSettings | None = None
        self._leases: LeaseClient | None = None
        self._ctx: TunnelContext | None = None
        self._http: LocalHTTP | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._agents: list[LeaseAgent] = []
        self._agent: LeaseAgent | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._lease_gone = asyncio.Event()
        self._opened = False
        #: Send ``renew_lease_id`` when renewing (dropped if a relay rejects the field).
        self._send_renew_id = True
        self._closing: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        lease_id = self.lease.lease_id if self.lease else None
        return (
            f"SynthTunnel(state={self.status.state.value!r}, url={self.url!r}, "
            f"lease_id={lease_id!r}, worker_token={mask_secret(self.worker_token)!r})"
        )

    @property
    def agent(self) -> LeaseAgent | None:
        """The agent serving the current lease."""
        return self._agent

    def preflight(self, ctx: TunnelContext) -> None:
        """Raise TunnelError now if SYNTH_API_KEY (or another setting) is missing/invalid."""
        self._settings = LeaseSettings.from_env()

    def verification_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.worker_token}"} if self.worker_token else {}

    def _event(self, line: str) -> None:
        logger.info("%s", line)
        if self._ctx is not None:
            try:
                self._ctx.on_event(line)
            except Exception:  # noqa: BLE001 - an observer must not break the tunnel
                logger.debug("on_event callback failed", exc_info=True)

    # -- open -------------------------------------------------------------------------

    async def open(self, ctx: TunnelContext) -> str:
        """Lease, connect, ATTACH; return the public URL. TunnelError after cleaning up."""
        if self._opened:
            raise TunnelError("This SynthTunnel was already opened; create a new one.")
        self._opened = True
        self._ctx = ctx
        self._loop = asyncio.get_running_loop()
        self.status.set(TunnelState.CONNECTING)
        try:
            settings = self._settings or LeaseSettings.from_env()
            self._leases = LeaseClient(settings)
            # Our own keep-alive client (``local_http``): no default headers (the caller's
            # are forwarded), no redirects, no cookie jar (a jar would keep the app's
            # Set-Cookie from one caller's response and send it with every later caller's
            # request), and none of a general client's per-request layers.
            self._http = LocalHTTP(self._local_host(), ctx.local_port)
            lease = await self._leases.create(
                client_id=client_instance_id(),
                host=self._local_host(),
                port=ctx.local_port,
                ttl_seconds=self.requested_ttl_seconds,
            )
            agent = await self._attach(lease)
        except BaseException as exc:
            if self._http is not None:
                await self._http.aclose()
            self.status.set(TunnelState.DOWN, str(exc) or type(exc).__name__)
            raise
        self._install(agent)
        self._spawn(self._renew_loop())
        self.status.set(TunnelState.CONNECTED)
        self._event(f"SynthTunnel connected: {self.url} ({lease.lease_id})")
        assert self.url is not None
        return self.url

    def _local_host(self) -> str:
        assert self._ctx is not None
        host = httpx.URL(self._ctx.local_url).host
        return host

    async def _attach(self, lease: Lease) -> LeaseAgent:
        """Connect an agent for ``lease`` and start it; on failure delete the lease."""
        assert self._ctx is not None and self._http is not None and self._leases is not None
        agent = LeaseAgent(
            lease,
            agent_id=client_instance_id(),
            local_host=self._local_host(),
            local_port=self._ctx.local_port,
            api_key=self._ctx.api_key,
            http=self._http,
            max_inflight=self.max_inflight,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            open_timeout=self._leases.settings.timeout,
            use_proxy=not is_loopback_url(lease.agent_url),
            on_state=self._on_agent_state,
            on_event=self._event,
            on_lease_gone=self._on_lease_gone,
            request_buffer_bytes=self.request_buffer_bytes,
            agent_buffer_bytes=self.agent_buffer_bytes,
            body_stall_timeout=self.body_stall_timeout,
        )
        try:
            ws = await agent.connect()
        except BaseException:
            await self._leases.delete(lease.lease_id, timeout=self.delete_timeout, quiet=True)
            raise
        self._agents.append(agent)
        agent.start(ws)
        return agent

    def _install(self, agent: LeaseAgent) -> None:
        self._agent = agent
        self.lease = agent.lease
        self.url = agent.lease.public_url
        self.worker_token = agent.lease.worker_token

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_agent_state(self, agent: LeaseAgent, state: TunnelState, error: str | None) -> None:
        if agent is self._agent and self._closing is None:
            self.status.set(state, error)

    def _on_lease_gone(self, agent: LeaseAgent) -> None:
        if agent is self._agent:
            self._lease_gone.set()

    # -- renewal ----------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        while True:
            assert self._agent is not None
            lease = self._agent.lease
            delay = lease.seconds_left() - (1 - self.renew_fraction) * lease.remaining_at_issue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(MIN_RENEW_DELAY, delay)):
                    await self._lease_gone.wait()
            reason = "the relay refused its token" if self._lease_gone.is_set() else "renewal"
            self._lease_gone.clear()
            try:
                await self._replace(reason)
            except TunnelError as exc:
                left = self._agent.lease.seconds_left()
                retry = min(30.0, max(MIN_RENEW_DELAY, left / 4))
                self._event(f"SynthTunnel lease {reason} failed ({exc}); retrying in {retry:.0f}s")
                await asyncio.sleep(retry)

    async def _replace(self, reason: str) -> None:
        """Obtain a new lease, attach it, publish it, retire the old one."""
        assert self._agent is not None and self._leases is not None and self._ctx is not None
        old = self._agent
        request = functools.partial(
            self._leases.create,
            client_id=client_instance_id(),
            host=self._local_host(),
            port=self._ctx.local_port,
            ttl_seconds=self.requested_ttl_seconds,
        )
        if self._send_renew_id:
            try:
                lease = await request(renew_lease_id=old.lease.lease_id)
            except LeaseRequestError as exc:
                if exc.status not in (400, 422):
                    raise
                self._send_renew_id = False  # a strict relay that rejects the extra field
                lease = await request()
        else:
            lease = await request()
        if lease.lease_id == old.lease.lease_id:
            old.lease = lease
            self._install(old)
            self._event(f"SynthTunnel lease {lease.lease_id} extended until {lease.expires_at}")
            return
        new = await self._attach(lease)
        old_url = self.url
        self._install(new)
        self.status.set(TunnelState.CONNECTED)
        change = (
            f"public URL changed from {old_url} to {self.url}; callers need the new URL and "
            f"worker token ({mask_secret(self.worker_token)})"
            if self.url != old_url
            else f"same public URL {self.url}"
        )
        self._event(
            f"SynthTunnel lease replaced ({reason}): {old.lease.lease_id} -> "
            f"{lease.lease_id}, {change}"
        )
        self._spawn(self._retire(old))

    async def _retire(self, agent: LeaseAgent) -> None:
        assert self._leases is not None
        await agent.drain(self.drain_timeout)
        await agent.close()
        await self._leases.delete(agent.lease.lease_id, timeout=self.delete_timeout, quiet=True)
        with contextlib.suppress(ValueError):
            self._agents.remove(agent)

    # -- close ------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the agent and tasks, await the DELETE of every lease. Idempotent; never raises."""
        try:
            loop = asyncio.get_running_loop()
            owner = self._loop
            if owner is not None and owner is not loop and owner.is_running():
                future = asyncio.run_coroutine_threadsafe(self.close(), owner)
                await asyncio.wait_for(asyncio.wrap_future(future), self.delete_timeout + 5)
                return
            if self._closing is None:
                self._closing = loop.create_task(self._close(owner is None or owner is loop))
            await asyncio.shield(self._closing)
        except Exception as exc:  # noqa: BLE001 - close() never raises
            logger.warning("Closing SynthTunnel failed: %r", exc)
        finally:
            self.status.set(TunnelState.CLOSED)

    async def _close(self, on_owner_loop: bool) -> None:
        agents = list(self._agents)
        owner = self._loop
        if not on_owner_loop and owner is not None and owner.is_closed():
            for agent in agents:
                agent.abandon()
        if on_owner_loop:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            agents = list(self._agents)
            await asyncio.gather(*(agent.close() for agent in agents), return_exceptions=True)
        deleted: list[bool] = []
        if self._leases is not None and agents:
            leases = self._leases
            deleted = await asyncio.gather(
                *(
                    leases.delete(agent.lease.lease_id, timeout=self.delete_timeout, quiet=True)
                    for agent in agents
                )
            )
        self._agents.clear()
        if self._http is not None and on_owner_loop:
            await self._http.aclose()
        self.status.set(TunnelState.CLOSED)
        for agent, gone in zip(agents, deleted, strict=True):
            lease = agent.lease
            self._event(
                f"SynthTunnel closed; lease {lease.lease_id} deleted"
                if gone
                else f"SynthTunnel closed; lease {lease.lease_id} could not be deleted "
                f"(it expires at {lease.expires_at.isoformat()})"
            )
