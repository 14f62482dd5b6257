"""The relay's shared state: API keys, leases, attached agents and their lifecycle."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Coroutine, Sequence
from typing import Any
from urllib.parse import quote

from ..errors import mask_secret
from .config import RelayConfig
from .lease_store import Lease, LeaseStore, digest, iso_z
from .sessions import AgentSession
from .store import LeaseDatabase, StateFileError

logger = logging.getLogger(__name__)

LEASES_PATH = "/api/v1/synthtunnel/leases"
AGENT_PATH = "/api/v1/synthtunnel/agent"
ROUTE_PREFIX = "/s/rt_"

#: Shorter API keys draw a warning when leases are kept in a state file.
MIN_STATE_KEY_LENGTH = 24

#: Close codes the relay uses on agent sockets.
CLOSE_REPLACED = 4000
CLOSE_LEASE_GONE = 4001
CLOSE_GOING_AWAY = 1001


class InvalidLeaseRequestError(ValueError):
    """A lease POST the relay cannot honour: answered with ``status`` and problem ``code``."""

    def __init__(self, detail: str, status: int = 422, code: str = "invalid_request") -> None:
        super().__init__(detail)
        self.status = status
        self.code = code


#: How deep ``metadata`` / ``local_target`` may nest (the relay stores and returns them).
MAX_JSON_DEPTH = 32


def _depth(value: Any, limit: int = MAX_JSON_DEPTH + 1) -> int:
    """Nesting depth of a parsed JSON value, counted up to ``limit`` (no recursion)."""
    depth, level = 0, [value]
    while level and depth < limit:
        depth += 1
        level = [
            child
            for item in level
            if isinstance(item, dict | list)
            for child in (item.values() if isinstance(item, dict) else item)
        ]
    return depth


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class RelayState:
    """Everything one relay knows; owned by the event loop the relay runs on."""

    def __init__(self, config: RelayConfig, api_keys: Sequence[str], public_base_url: str) -> None:
        self.config = config
        self._keys = [digest(key) for key in api_keys]
        db = LeaseDatabase(config.state_path)
        try:
            self.store = LeaseStore(db, {digest(key): key for key in api_keys})
            restored, dropped = self.store.load()
        except BaseException:
            db.close()
            raise
        if config.state_path is not None:
            for key in api_keys:
                if len(key) < MIN_STATE_KEY_LENGTH:
                    logger.warning(
                        "API key %s is short (%d characters). With a state file, whoever "
                        "copies the file and knows a public URL can guess a short key "
                        "offline; use random keys of %d+ characters",
                        mask_secret(key),
                        len(key),
                        MIN_STATE_KEY_LENGTH,
                    )
            logger.info(
                "Relay state %s: %d lease(s) restored, %d ended while the relay was down or "
                "belonged to API keys it no longer has",
                config.state_path,
                restored,
                dropped,
            )
        self.public_base_url = public_base_url.rstrip("/")
        self.sessions: set[AgentSession] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closing = False

    # -- API keys and lease documents -------------------------------------------------

    def owner(self, api_key: str | None) -> bytes | None:
        """The owner id (key digest) for a relay API key, or None if it is not one."""
        if not api_key:
            return None
        candidate = digest(api_key)
        found = None
        for key in self._keys:
            if hmac.compare_digest(candidate, key):
                found = key
        return found

    def agent_url(self, lease: Lease) -> str:
        base = self.public_base_url
        scheme, sep, rest = base.partition("://")
        ws_scheme = {"https": "wss", "http": "ws"}.get(scheme.lower(), scheme)
        return f"{ws_scheme}{sep}{rest}{AGENT_PATH}?lease_id={quote(lease.lease_id)}"

    def max_inflight(self, lease: Lease) -> int:
        limit = self.config.max_inflight
        session = lease.session
        if session is not None and session.max_inflight is not None:
            limit = min(limit, session.max_inflight)
        return limit

    def lease_document(self, lease: Lease) -> dict[str, Any]:
        base = self.public_base_url
        return {
            "lease_id": lease.lease_id,
            "route_token": lease.route_token,
            "public_base_url": base,
            "public_url": f"{base}{ROUTE_PREFIX}{lease.route_token}",
            "agent_connect": {"url": self.agent_url(lease), "agent_token": lease.agent_token},
            "worker_token": lease.worker_token,
            "expires_at": iso_z(lease.expires_at),
            "limits": {
                "max_inflight": self.config.max_inflight,
                "max_response_bytes": self.config.max_response_bytes,
            },
            "heartbeat": {
                "relay_ping_interval_seconds": self.config.ping_interval,
                "relay_ping_timeout_seconds": self.config.ping_timeout,
            },
            "client_instance_id": lease.client_instance_id,
            "local_target": lease.local_target,
        }

    def create_or_renew(self, owner: bytes, body: Any) -> tuple[Lease, bool]:
        """Create a lease, or renew ``body["renew_lease_id"]``. Returns (lease, created)."""
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise InvalidLeaseRequestError("the body must be a JSON object")
        client = body.get("client_instance_id", "")
        target = body.get("local_target", {})
        metadata = body.get("metadata", {})
        ttl_raw = body.get("requested_ttl_seconds", self.config.default_ttl)
        renew = body.get("renew_lease_id")
        if not isinstance(client, str):
            raise InvalidLeaseRequestError("client_instance_id must be a string")
        if not isinstance(target, dict) or not isinstance(metadata, dict):
            raise InvalidLeaseRequestError("local_target and metadata must be JSON objects")
        if _depth(target) > MAX_JSON_DEPTH or _depth(metadata) > MAX_JSON_DEPTH:
            raise InvalidLeaseRequestError(
                f"local_target and metadata are nested deeper than {MAX_JSON_DEPTH} levels"
            )
        if ttl_raw is None:
            ttl_raw = self.config.default_ttl
        if not _number(ttl_raw) or not ttl_raw > 0:
            raise InvalidLeaseRequestError(
                f"requested_ttl_seconds must be a positive number, got {ttl_raw!r}"
            )
        if renew is not None and not isinstance(renew, str):
            raise InvalidLeaseRequestError("renew_lease_id must be a string")
        ttl = min(float(ttl_raw), self.config.max_ttl)
        if renew:
            lease = self.store.renewable(renew, owner)
            if lease is not None:
                try:
                    self.store.renew(lease, time.time() + ttl)
                except StateFileError as exc:
                    raise self._state_unavailable(exc) from None
                logger.info("Lease %s renewed until %s", lease.lease_id, iso_z(lease.expires_at))
                return lease, False
            logger.info(
                "Lease %s cannot be renewed (unknown, expired or not yours); creating a new one",
                renew,
            )
        self._check_quota(owner, metadata)
        try:
            lease = self.store.create(
                owner=owner,
                client_instance_id=client,
                local_target=target,
                metadata=metadata,
                ttl=ttl,
            )
        except StateFileError as exc:
            raise self._state_unavailable(exc) from None
        logger.info(
            "Lease %s created for client %r (route %s, ttl %.0fs)",
            lease.lease_id,
            client,
            mask_secret(lease.route_token),
            ttl,
        )
        return lease, True

    @staticmethod
    def _state_unavailable(exc: StateFileError) -> InvalidLeaseRequestError:
        logger.error("Lease request refused: %s", exc)
        return InvalidLeaseRequestError(
            "the relay cannot record leases right now (its state file is not writable); "
            "retry later",
            503,
            "state_unavailable",
        )

    def _check_quota(self, owner: bytes, metadata: dict[str, Any]) -> None:
        """Refuse a new lease past the per-key quotas (429 leases, 413 metadata)."""
        cfg = self.config
        size = len(json.dumps(metadata, separators=(",", ":")).encode())
        if size > cfg.max_metadata_bytes:
            raise InvalidLeaseRequestError(
                f"metadata is {size} bytes of JSON; this relay accepts at most "
                f"{cfg.max_metadata_bytes} (max_metadata_bytes). Send less metadata.",
                413,
                "metadata_too_large",
            )
        held = self.store.owned_by(owner)
        if held >= cfg.max_leases_per_key:
            raise InvalidLeaseRequestError(
                f"this API key already holds {held} live leases, the most this relay allows "
                f"(max_leases_per_key={cfg.max_leases_per_key}). DELETE leases you no longer "
                "use, renew instead of creating (renew_lease_id), or wait for them to expire.",
                429,
                "lease_quota_exceeded",
            )

    # -- agents -------------------------------------------------------------------------

    def attach(self, session: AgentSession, lease: Lease) -> None:
        """Make ``session`` serve ``lease``; a previous socket for it is replaced."""
        old = lease.session
        if old is not None and old is not session:
            old.lease_ids.discard(lease.lease_id)
            lost = old.fail_exchanges("replaced by a newer agent connection", lease.lease_id)
            logger.info(
                "Lease %s: %s replaces %s (%d request(s) in flight failed)",
                lease.lease_id,
                session.label,
                old.label,
                lost,
            )
            if not old.lease_ids:
                self.retire(old, CLOSE_REPLACED, "replaced by a newer connection")
        lease.session = session
        lease.ever_attached = True
        lease.offline_since = None
        session.lease_ids.add(lease.lease_id)
        self.sessions.add(session)

    def detach(self, session: AgentSession, reason: str) -> None:
        """Forget a session whose socket ended; its requests in flight fail. Idempotent."""
        if session.detached:
            return
        session.detached = session.closing = True
        self.sessions.discard(session)
        for lease_id in list(session.lease_ids):
            lease = self.store.get(lease_id)
            if lease is not None and lease.session is session:
                lease.session = None
                lease.offline_since = time.monotonic()
        lost = session.fail_exchanges(reason)
        logger.info("%s detached: %s (%d request(s) in flight failed)", session.label, reason, lost)
        if session.malformed:
            logger.info("%s sent %d malformed frame(s) in all", session.label, session.malformed)

    def drop_lease(self, lease: Lease, reason: str) -> None:
        """Remove a lease (``lease_expired`` / ``lease_deleted``) and detach its agent."""
        self.store.remove(lease, reason)
        session, lease.session = lease.session, None
        if session is None:
            return
        session.lease_ids.discard(lease.lease_id)
        session.fail_exchanges(reason, lease.lease_id)
        if not session.lease_ids:
            self.retire(session, CLOSE_LEASE_GONE, reason)

    def retire(self, session: AgentSession, code: int, reason: str) -> None:
        """Close a session's socket in the background."""
        session.closing = True
        self.spawn(session.conn.close(code, reason))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- lifecycle ----------------------------------------------------------------------

    def sweep(self) -> None:
        for lease in self.store.expired():
            logger.info("Lease %s expired at %s", lease.lease_id, iso_z(lease.expires_at))
            self.drop_lease(lease, "lease_expired")
        grace = self.config.agent_grace
        if grace is not None:
            for lease in self.store.abandoned(grace):
                logger.info(
                    "Lease %s ended early: %s for more than %gs (agent_grace)",
                    lease.lease_id,
                    "its agent has been gone" if lease.ever_attached else "no agent attached",
                    grace,
                )
                self.drop_lease(lease, "lease_expired")

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            try:
                self.sweep()
            except Exception:  # never let one bad lease stop expiry
                logger.exception("Lease sweep failed")

    async def aclose(self) -> None:
        """Close every agent socket (1001) and fail what is in flight."""
        self.closing = True
        try:
            for session in list(self.sessions):
                self.retire(session, CLOSE_GOING_AWAY, "relay shutting down")
                self.detach(session, "relay shutting down")
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=5.0)
        finally:
            self.close_store()  # releases the state file's lock, whatever happened

    def close_store(self) -> None:
        """Close the lease database (the leases stay in a state file). Idempotent."""
        self.store.db.close()
