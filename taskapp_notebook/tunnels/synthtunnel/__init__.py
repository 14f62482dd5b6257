"""SynthTunnel: the ``synthtunnel`` tunnel backend and the protocol it speaks.

Spec: ``docs/synthtunnel-protocol.md``. Modules, one concept each:

- :mod:`.protocol` — constants, error codes, typed frames (stdlib only, no I/O; the relay
  uses it too); :mod:`.codec` — the encoder and one parser per direction;
- :mod:`.headers` — the header rules of both ends;
- :mod:`.batching` — several frames in one TCP write on a websockets connection;
- :mod:`.lease_client` — the lease API client (create, renew, delete);
- :mod:`.attach` — opening the agent's WebSocket (ATTACH, ATTACH_ACK) and reconnect delays;
- :mod:`.agent` — one lease's WebSocket to the relay (receive loop, reconnects, limits);
- :mod:`.forward` — one request forwarded to the local app, with bounded body buffers;
- :mod:`.local_http` — the HTTP/1.1 keep-alive client the agent calls the app with
  (:mod:`.http_connection`: one of its connections);
- :mod:`.tunnel` — :class:`SynthTunnel`, the backend (lease renewal, open/close).

Importing this package imports none of them (``SynthTunnel`` is loaded on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .tunnel import SynthTunnel

__all__ = ["SynthTunnel"]


def __getattr__(name: str) -> Any:
    if name == "SynthTunnel":
        from .tunnel import SynthTunnel

        return SynthTunnel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
