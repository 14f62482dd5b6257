"""``taskapp-relay``: a SynthTunnel-compatible relay server.

It speaks the lease API and frames of ``docs/synthtunnel-protocol.md`` on one port, so the whole
caller → relay → agent → task-app path runs on loopback (tests, offline demos) and a team
can host its own relay. Any agent that follows the document works with it, the SDK's
compiled agent included::

    POST   /api/v1/synthtunnel/leases            Bearer <relay API key> → lease JSON
    GET    /api/v1/synthtunnel/leases/{id}       the lease + agent_attached, inflight
    DELETE /api/v1/synthtunnel/leases/{id}       → 204 (only the key that created it)
    WS     /api/v1/synthtunnel/agent?lease_id=…  Bearer <agent_token>; ATTACH → ATTACH_ACK
    ANY    /s/rt_<route_token>/<path>            worker token → proxied to the agent
    GET    /health

Quick use (the relay runs in-process; point the SDK or our agent at it)::

    from taskapp_notebook.relay import RelayServer
    with RelayServer(api_keys=["dev-key"]) as relay:          # thread; or `async with`
        os.environ["SYNTH_BACKEND_URL"] = relay.url
        os.environ["SYNTH_API_KEY"] = relay.api_key

Renewal (for agent authors)
---------------------------
* A plain POST always creates a **new** lease (new route, URL and tokens); older leases of
  the same client stay valid until they expire or are deleted. This is what any relay
  does, so "create a new lease, ATTACH it, switch URLs, DELETE the old one" always works.
* To keep the **same** lease (same lease_id, public URL, worker and agent tokens, no
  reconnect), POST with ``"renew_lease_id": "<current lease_id>"`` in the body (plus the
  usual fields and ``requested_ttl_seconds``). This relay answers **200** with the same
  lease and a new ``expires_at`` (= now + TTL, capped at ``max_ttl``). If the lease is
  unknown, expired or owned by another key, or the relay ignores the field (Synth's
  hosted relay does not know it), the answer is **201** with a new lease — so an agent can
  always send the field and compare ``lease_id``: unchanged → extended, nothing to do;
  changed → replace as above (never DELETE a lease_id equal to the one it keeps).

Other behaviour worth knowing: the relay pings an agent only after ATTACH_ACK (every
``ping_interval`` s; no pong within ``ping_timeout`` s drops it); a new ATTACH with the
same agent token replaces the old socket (closed with 4000); an expired or deleted lease
answers ``lease_expired`` / ``lease_deleted`` (410) and its socket is closed with 4001 when
it serves no other lease; requests in flight when an agent goes end in 502 (or an aborted
response if headers were already sent).

Limits and state (``RelayConfig``, all documented in ``docs/relay.md``): a lease whose agent
has been gone longer than ``agent_grace`` ends early; ``max_leases_per_key`` and
``max_metadata_bytes`` bound what one API key can create (429 / 413); ``header_timeout`` and
``max_connections`` keep slowloris and fd exhaustion from taking the relay down; with
``state_path`` leases live in SQLite and survive a restart (same URL and tokens once the
agent reconnects).
"""

from __future__ import annotations

from .config import RelayConfig
from .relay_server import RelayServer

__all__ = ["RelayConfig", "RelayServer"]
