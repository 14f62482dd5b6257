"""The SynthTunnel wire protocol, once, without I/O: constants, error codes, typed frames.

Spec: ``docs/synthtunnel-protocol.md``. Both ends use this module — the agent
(:mod:`~taskapp_notebook.tunnels.synthtunnel.agent`) and the relay
(:mod:`taskapp_notebook.relay`) — as websockets' ``frames.py`` serves its client and server:

- one typed frame class per frame type (:class:`Attach` ... :class:`RespError`);
- in :mod:`.codec`: one encoder, ``encode`` (frame → JSON text; ``encode_body`` for a
  binary body frame), and one parser per direction, each with its leniency stated in its
  docstring: ``parse_agent_frame`` (the relay reading an agent) and ``parse_relay_frame``
  (an agent reading the relay). Both raise :class:`FrameError`; callers skip the message
  (section 3: malformed frames are never fatal) or fail the request it names (``rid``);
- the constants and ``RESP_ERROR`` codes. The header rules of section 4 are in
  :mod:`.headers`.

Binary body frames (our extension, section "Binary bodies" of the spec document): an agent
offers ``"binary_bodies": 1`` in ATTACH ``capabilities``; a relay that answers with the same
in ATTACH_ACK ``capabilities`` has agreed, and from then on REQ_BODY and RESP_BODY may travel
as binary messages ``kind (1 byte) | len(rid) (1 byte) | rid (UTF-8) | body bytes`` — no
base64, no JSON. A relay that does not know the field (Synth's, the SDK's peers) ignores it,
and both sides keep to JSON text. Without that agreement, and for every other frame type,
frames are JSON **text** messages and a binary message is malformed.

Rules both sides share:
a header pair whose name is not an HTTP token, or whose value carries CR, LF or NUL, is
dropped (it cannot be written on HTTP/1.1), never fatal to the request; headers named by a
``Connection`` header are hop-by-hop (RFC 9110 §7.6.1) and dropped with the fixed set.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Largest decoded body chunk we put in one REQ_BODY / RESP_BODY (and advertise).
MAX_BODY_CHUNK = 64 * 1024
#: Largest WebSocket message either side accepts (the SDK's agent sends ~800 KB frames).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: ``deadline_ms`` assumed when REQ_HEADERS carries none (or an unusable one).
DEFAULT_DEADLINE_MS = 600_000

# -- RESP_ERROR codes ------------------------------------------------------------------------
#: The app refused, closed or did not speak HTTP (spec).
LOCAL_CONNECT_FAILED = "LOCAL_CONNECT_FAILED"
#: The app's response broke off or exceeded ``max_response_bytes`` (spec; may follow
#: RESP_HEADERS and some RESP_BODY).
LOCAL_BAD_RESPONSE = "LOCAL_BAD_RESPONSE"
#: A request frame the agent cannot read (invalid base64, bad method or path, ...).
BAD_REQUEST_FRAME = "BAD_REQUEST_FRAME"
#: Ours: REQ_HEADERS beyond the advertised ``max_inflight``; the app never saw it (→ 503).
AGENT_OVERLOADED = "AGENT_OVERLOADED"
#: Ours: ``deadline_ms`` passed and the local request was aborted (→ 504).
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
#: Ours: the app did not take the request body as fast as it came, past the agent's
#: buffer for it; the local request was aborted (→ 503 before the headers).
REQUEST_BODY_OVERFLOW = "REQUEST_BODY_OVERFLOW"
#: The HTTP status a relay answers for each code (anything else: 502).
ERROR_STATUS: Mapping[str, int] = {
    AGENT_OVERLOADED: 503,
    REQUEST_BODY_OVERFLOW: 503,
    DEADLINE_EXCEEDED: 504,
}


class FrameError(ValueError):
    """A message that is not a usable frame. ``rid``/``lease_id`` are set when the broken
    frame named a request, so that request (and only it) can be failed."""

    def __init__(self, reason: str, rid: str | None = None, lease_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rid = rid
        self.lease_id = lease_id


# -- frames ----------------------------------------------------------------------------------

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class LeaseTarget:
    lease_id: str
    host: str = "127.0.0.1"
    port: int | None = None


@dataclass(frozen=True, slots=True)
class Attach:
    """Agent → relay, first frame on a socket."""

    agent_id: str
    leases: tuple[LeaseTarget, ...]
    capabilities: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AttachAck:
    """Relay → agent, the answer to ATTACH (nothing else may come first)."""

    agent_id: str = ""
    leases: tuple[Mapping[str, Any], ...] = ()
    capabilities: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReqHeaders:
    lease_id: str
    rid: str
    method: str
    path: str
    query: str = ""
    headers: Headers = ()
    deadline_ms: int = DEFAULT_DEADLINE_MS


@dataclass(frozen=True, slots=True)
class ReqBody:
    rid: str
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class ReqEnd:
    rid: str


@dataclass(frozen=True, slots=True)
class Cancel:
    rid: str


@dataclass(frozen=True, slots=True)
class RespHeaders:
    lease_id: str
    rid: str
    status: int
    headers: Headers = ()


@dataclass(frozen=True, slots=True)
class RespBody:
    lease_id: str
    rid: str
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class RespEnd:
    lease_id: str
    rid: str


@dataclass(frozen=True, slots=True)
class RespError:
    lease_id: str
    rid: str
    code: str
    message: str = ""


@dataclass(frozen=True, slots=True)
class Unknown:
    """A frame of a type this side does not handle (skipped, never fatal)."""

    type: str


AgentFrame = Attach | RespHeaders | RespBody | RespEnd | RespError | Unknown
RelayFrame = AttachAck | ReqHeaders | ReqBody | ReqEnd | Cancel | Unknown
Frame = (
    Attach
    | AttachAck
    | ReqHeaders
    | ReqBody
    | ReqEnd
    | Cancel
    | RespHeaders
    | RespBody
    | RespEnd
    | RespError
)


#: The capability (in ATTACH and ATTACH_ACK ``capabilities``) for binary body frames.
BINARY_BODIES = "binary_bodies"


def binary_agreed(capabilities: Mapping[str, Any]) -> bool:
    """True when ``capabilities`` (of an ATTACH or ATTACH_ACK) offer binary body frames."""
    return capabilities.get(BINARY_BODIES) == 1


#: An HTTP token (method, header name).
TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
