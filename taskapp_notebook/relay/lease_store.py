"""Leases: tokens, lifetimes, ownership, renewal, and what is left of expired ones.

Pure bookkeeping (no I/O). Secret tokens are indexed by their SHA-256 digest so that a
lookup never compares a secret byte by byte; the worker token is checked with
:func:`hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .sessions import AgentSession

#: Route and agent tokens of ended leases remembered so their URL answers ``lease_expired``.
MAX_TOMBSTONES = 10_000


def new_token() -> str:
    """A URL-safe secret with 256 bits of entropy."""
    return secrets.token_urlsafe(32)


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def iso_z(ts: float) -> str:
    """``ts`` as ISO-8601 UTC with a ``Z`` suffix (seconds precision)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Lease:
    """One lease: a public route, its worker token and the agent token that serves it."""

    lease_id: str
    route_token: str
    agent_token: str
    worker_token: str
    owner: bytes
    client_instance_id: str
    local_target: dict[str, Any]
    metadata: dict[str, Any]
    created_at: float
    expires_at: float
    #: The attached agent, if any (set by the relay state).
    session: AgentSession | None = None
    #: Requests in flight through this lease right now.
    inflight: int = 0
    ever_attached: bool = False

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at

    def worker_token_ok(self, candidate: str) -> bool:
        """Constant-time check of a caller's worker token."""
        return hmac.compare_digest(digest(candidate), digest(self.worker_token))


class LeaseStore:
    """All live leases of one relay, indexed by id, route token and agent token."""

    def __init__(self) -> None:
        self._by_id: dict[str, Lease] = {}
        self._by_route: dict[bytes, Lease] = {}
        self._by_agent: dict[bytes, Lease] = {}
        self._tombstones: OrderedDict[bytes, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Any:
        return iter(list(self._by_id.values()))

    def create(
        self,
        *,
        owner: bytes,
        client_instance_id: str,
        local_target: dict[str, Any],
        metadata: dict[str, Any],
        ttl: float,
    ) -> Lease:
        now = time.time()
        lease = Lease(
            lease_id="lease_" + secrets.token_hex(12),
            route_token=new_token(),
            agent_token=new_token(),
            worker_token=new_token(),
            owner=owner,
            client_instance_id=client_instance_id,
            local_target=local_target,
            metadata=metadata,
            created_at=now,
            expires_at=now + ttl,
        )
        self._by_id[lease.lease_id] = lease
        self._by_route[digest(lease.route_token)] = lease
        self._by_agent[digest(lease.agent_token)] = lease
        return lease

    def renewable(self, lease_id: str, owner: bytes) -> Lease | None:
        """The live lease ``lease_id`` if ``owner`` created it, else None."""
        lease = self._by_id.get(lease_id)
        if lease is None or lease.owner != owner or lease.expired():
            return None
        return lease

    def get(self, lease_id: str) -> Lease | None:
        return self._by_id.get(lease_id)

    def by_route(self, route_token: str) -> Lease | None:
        return self._by_route.get(digest(route_token))

    def by_agent_token(self, agent_token: str) -> Lease | None:
        return self._by_agent.get(digest(agent_token))

    def tombstone(self, token: str) -> str | None:
        """Why a route or agent token no longer works (``lease_expired``/``lease_deleted``)."""
        return self._tombstones.get(digest(token))

    def remove(self, lease: Lease, reason: str) -> None:
        """Forget ``lease``; its route answers ``reason`` from now on."""
        if self._by_id.pop(lease.lease_id, None) is None:
            return
        self._by_route.pop(digest(lease.route_token), None)
        self._by_agent.pop(digest(lease.agent_token), None)
        self._tombstones[digest(lease.route_token)] = reason
        self._tombstones[digest(lease.agent_token)] = reason
        while len(self._tombstones) > MAX_TOMBSTONES:
            self._tombstones.popitem(last=False)

    def expired(self, now: float | None = None) -> list[Lease]:
        now = time.time() if now is None else now
        return [lease for lease in self._by_id.values() if lease.expired(now)]
