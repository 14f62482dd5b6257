"""Leases: tokens, lifetimes, ownership, renewal, and what is left of expired ones.

Bookkeeping in memory over the durable record of :mod:`.store`. Secret tokens are indexed by
their SHA-256 digest so that a lookup never compares a secret byte by byte; the worker token
is checked with :func:`hmac.compare_digest`. A lease's tokens are derived from a random salt
and the API key that created it (:func:`derive_tokens`), so the store keeps no token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .store import LeaseDatabase, LeaseRow, StateFileError

if TYPE_CHECKING:
    from .sessions import AgentSession

logger = logging.getLogger(__name__)

#: Route and agent tokens of ended leases remembered so their URL answers ``lease_expired``.
MAX_TOMBSTONES = 10_000
PRUNE_BATCH = 500


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def derive_tokens(api_key: str, salt: bytes) -> tuple[str, str, str]:
    """(route, agent, worker) tokens of a lease: HMAC-SHA256 of its 32-byte random ``salt``
    under the API key that created it, URL-safe base64 (256 bits each). Unpredictable without
    the salt, and without the key."""
    key = api_key.encode("utf-8", "surrogateescape")

    def one(label: bytes) -> str:
        mac = hmac.new(key, b"taskapp-relay lease token\x00" + label + b"\x00" + salt, "sha256")
        return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode("ascii")

    return one(b"route"), one(b"agent"), one(b"worker")


def iso_z(ts: float) -> str:
    """``ts`` as ISO-8601 UTC with a ``Z`` suffix (seconds precision)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Lease:
    """One lease: a public route, its worker token and the agent token that serves it."""

    lease_id: str
    #: Secrets (and what they derive from) stay out of the repr.
    route_token: str = field(repr=False)
    agent_token: str = field(repr=False)
    worker_token: str = field(repr=False)
    owner: bytes = field(repr=False)
    client_instance_id: str
    local_target: dict[str, Any]
    metadata: dict[str, Any]
    created_at: float
    expires_at: float
    #: The random salt its tokens are derived from (what the store keeps instead).
    salt: bytes = field(default=b"", repr=False)
    #: The attached agent, if any (set by the relay state).
    session: AgentSession | None = field(default=None, repr=False)
    #: Requests in flight through this lease right now.
    inflight: int = 0
    ever_attached: bool = False
    #: ``time.monotonic()`` since when no agent serves it (None while one does).
    offline_since: float | None = field(default_factory=time.monotonic)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at

    def worker_token_ok(self, candidate: str) -> bool:
        """Constant-time check of a caller's worker token."""
        return hmac.compare_digest(digest(candidate), digest(self.worker_token))


class LeaseStore:
    """All live leases of one relay, indexed by id, route token and agent token, kept in a
    :class:`~.store.LeaseDatabase`. ``owner_keys`` maps each owner id (API key digest) to
    its API key, from which lease tokens are derived."""

    def __init__(self, db: LeaseDatabase, owner_keys: Mapping[bytes, str]) -> None:
        self.db = db
        self._owner_keys = dict(owner_keys)
        self._by_id: dict[str, Lease] = {}
        self._by_route: dict[bytes, Lease] = {}
        self._by_agent: dict[bytes, Lease] = {}
        self._per_owner: Counter[bytes] = Counter()
        self._tombstones: OrderedDict[bytes, str] = OrderedDict(db.tombstones(MAX_TOMBSTONES))
        self._write_failure_logged = -60.0

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Any:
        return iter(list(self._by_id.values()))

    def load(self) -> tuple[int, int]:
        """Bring back the leases in the database. Returns (restored, dropped): leases of an
        API key the relay no longer has are dropped (``lease_deleted``), expired ones end
        (``lease_expired``)."""
        restored = dropped = 0
        now = time.time()
        for row in self.db.leases():
            key = self._owner_keys.get(row.owner)
            if key is None or len(row.salt) != 32:
                self._forget_row(row, "lease_deleted", now)
                dropped += 1
                continue
            lease = self._lease(row, key)
            if lease.expired(now):
                self._remember(lease)
                self.remove(lease, "lease_expired")
                dropped += 1
                continue
            self._remember(lease)
            restored += 1
        return restored, dropped

    def _forget_row(self, row: LeaseRow, reason: str, now: float) -> None:
        # Without the key its tokens cannot be derived: the route answers 404 from now on.
        self.db.remove(row.lease_id, (), reason, now)

    @staticmethod
    def _lease(row: LeaseRow, key: str) -> Lease:
        route, agent, worker = derive_tokens(key, row.salt)
        return Lease(
            lease_id=row.lease_id,
            route_token=route,
            agent_token=agent,
            worker_token=worker,
            owner=row.owner,
            client_instance_id=row.client_instance_id,
            local_target=row.local_target,
            metadata=row.metadata,
            created_at=row.created_at,
            expires_at=row.expires_at,
            salt=row.salt,
        )

    def _remember(self, lease: Lease) -> None:
        self._by_id[lease.lease_id] = lease
        self._by_route[digest(lease.route_token)] = lease
        self._by_agent[digest(lease.agent_token)] = lease
        self._per_owner[lease.owner] += 1

    def owned_by(self, owner: bytes) -> int:
        """How many live leases ``owner`` holds."""
        return self._per_owner[owner]

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
        row = LeaseRow(
            lease_id="lease_" + secrets.token_hex(12),
            owner=owner,
            salt=secrets.token_bytes(32),
            client_instance_id=client_instance_id,
            local_target=local_target,
            metadata=metadata,
            created_at=now,
            expires_at=now + ttl,
        )
        self.db.add(row)
        lease = self._lease(row, self._owner_keys[owner])
        self._remember(lease)
        return lease

    def renew(self, lease: Lease, expires_at: float) -> None:
        self.db.set_expiry(lease.lease_id, expires_at)
        lease.expires_at = expires_at

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
        self._per_owner[lease.owner] -= 1
        if self._per_owner[lease.owner] <= 0:
            del self._per_owner[lease.owner]
        ended = (digest(lease.route_token), digest(lease.agent_token))
        self._by_route.pop(ended[0], None)
        self._by_agent.pop(ended[1], None)
        for token_digest in ended:
            self._tombstones[token_digest] = reason
        # Trimmed in batches: pruning the file's table costs a scan of it.
        pruned = len(self._tombstones) > MAX_TOMBSTONES + PRUNE_BATCH
        while pruned and len(self._tombstones) > MAX_TOMBSTONES:
            self._tombstones.popitem(last=False)
        if self.db.closed:
            return
        try:
            self.db.remove(lease.lease_id, ended, reason, time.time())
            if pruned:
                self.db.prune_tombstones(MAX_TOMBSTONES)
        except StateFileError as exc:
            # The lease has ended in memory all the same; it comes back at a restart.
            now = time.monotonic()
            if now - self._write_failure_logged > 60:
                self._write_failure_logged = now
                logger.warning("Lease %s ended, but %s", lease.lease_id, exc)

    def expired(self, now: float | None = None) -> list[Lease]:
        now = time.time() if now is None else now
        return [lease for lease in self._by_id.values() if lease.expired(now)]

    def abandoned(self, grace: float, now: float | None = None) -> list[Lease]:
        """Leases no agent has served for longer than ``grace`` seconds."""
        now = time.monotonic() if now is None else now
        return [
            lease
            for lease in self._by_id.values()
            if lease.offline_since is not None and now - lease.offline_since > grace
        ]
