"""The SynthTunnel wire protocol, once, without I/O: frames, their codec, the header rules.

Spec: ``docs/synthtunnel-protocol.md``. Both ends use this module — the agent
(:mod:`~taskapp_notebook.tunnels.synthtunnel.agent`) and the relay
(:mod:`taskapp_notebook.relay`) — as websockets' ``frames.py`` serves its client and server:

- one typed frame class per frame type (:class:`Attach` ... :class:`RespError`);
- one encoder, :func:`encode` (frame → JSON text);
- one parser per direction, each with its leniency stated in its docstring:
  :func:`parse_agent_frame` (the relay reading an agent) and :func:`parse_relay_frame`
  (an agent reading the relay). Both raise :class:`FrameError`; callers skip the message
  (section 3: malformed frames are never fatal) or fail the request it names (``rid``);
- the constants and ``RESP_ERROR`` codes. The header rules of section 4 are in
  :mod:`.headers`.

Rules both sides share: frames are JSON **text** messages (a binary message is malformed);
a header pair whose name is not an HTTP token, or whose value carries CR, LF or NUL, is
dropped (it cannot be written on HTTP/1.1), never fatal to the request; headers named by a
``Connection`` header are hop-by-hop (RFC 9110 §7.6.1) and dropped with the fixed set.
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Iterable, Mapping
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


# -- encoder ---------------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z0-9_.:\-]*")


def _s(text: str) -> str:
    """``text`` as a JSON string (ids are plain, so usually without ``json.dumps``)."""
    return f'"{text}"' if _PLAIN.fullmatch(text) else json.dumps(text)


def _b64(data: bytes | memoryview) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"))


def encode(frame: Frame) -> str:
    """One frame as compact JSON text (field order as in the spec, ``type`` first).

    Body frames are built around their base64 directly: it needs no JSON escaping, and
    ``json.dumps`` would scan and copy every ~87 KB chunk string once more.
    """
    if isinstance(frame, RespBody):
        return (
            f'{{"type":"RESP_BODY","lease_id":{_s(frame.lease_id)},"rid":{_s(frame.rid)},'
            f'"chunk_b64":"{_b64(frame.data)}","eof":false}}'
        )
    if isinstance(frame, ReqBody):
        return f'{{"type":"REQ_BODY","rid":{_s(frame.rid)},"chunk_b64":"{_b64(frame.data)}"}}'
    if isinstance(frame, RespHeaders):
        doc: dict[str, Any] = {
            "type": "RESP_HEADERS",
            "lease_id": frame.lease_id,
            "rid": frame.rid,
            "status": frame.status,
            "headers": frame.headers,
        }
    elif isinstance(frame, RespEnd):
        doc = {"type": "RESP_END", "lease_id": frame.lease_id, "rid": frame.rid}
    elif isinstance(frame, RespError):
        doc = {
            "type": "RESP_ERROR",
            "lease_id": frame.lease_id,
            "rid": frame.rid,
            "code": frame.code,
            "message": frame.message,
        }
    elif isinstance(frame, ReqHeaders):
        doc = {  # headers last, so truncated debug output shows the routing first
            "type": "REQ_HEADERS",
            "lease_id": frame.lease_id,
            "rid": frame.rid,
            "method": frame.method,
            "path": frame.path,
            "query": frame.query,
            "deadline_ms": frame.deadline_ms,
            "headers": frame.headers,
        }
    elif isinstance(frame, ReqEnd | Cancel):
        doc = {"type": "REQ_END" if isinstance(frame, ReqEnd) else "CANCEL", "rid": frame.rid}
    elif isinstance(frame, Attach):
        leases = [
            {"lease_id": t.lease_id, "local_target": {"host": t.host, "port": t.port}}
            for t in frame.leases
        ]
        doc = {
            "type": "ATTACH",
            "agent_id": frame.agent_id,
            "leases": leases,
            "capabilities": dict(frame.capabilities),
        }
    elif isinstance(frame, AttachAck):
        doc = {"type": "ATTACH_ACK", "agent_id": frame.agent_id, "leases": list(frame.leases)}
    else:  # pragma: no cover - exhaustive
        raise TypeError(f"not a frame: {frame!r}")
    return _dumps(doc)


def chunks(data: bytes, size: int = MAX_BODY_CHUNK) -> Iterable[bytes | memoryview]:
    """``data`` in pieces of at most ``size`` bytes (views, not copies, when longer)."""
    if len(data) <= size:
        if data:
            yield data
        return
    view = memoryview(data)
    for start in range(0, len(data), size):
        yield view[start : start + size]


# -- parsers ---------------------------------------------------------------------------------


def _object(message: str | bytes) -> dict[str, Any]:
    if not isinstance(message, str):
        raise FrameError("binary message (frames are JSON text)")
    try:
        doc = json.loads(message)
    except ValueError:
        raise FrameError("not JSON") from None
    except RecursionError:  # '[[[[...' nested past the interpreter's limit
        raise FrameError("JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise FrameError("not a JSON object")
    if not isinstance(doc.get("type"), str):
        raise FrameError("no string 'type'")
    return doc


def _id(doc: Mapping[str, Any], key: str) -> str | None:
    value = doc.get(key)
    return value if isinstance(value, str) and value else None


def _rid(doc: Mapping[str, Any]) -> str:
    rid = _id(doc, "rid")
    if rid is None:
        raise FrameError(f"{doc['type']} without a string rid")
    return rid


def _pairs(raw: Any, kind: str, rid: str, lease_id: str | None) -> Headers:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise FrameError(f"{kind} headers is not a list of [name, value] pairs", rid, lease_id)
    for item in raw:
        if not (
            isinstance(item, list | tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], str)
        ):
            raise FrameError(
                f"{kind} header {item!r:.80} is not a [name, value] pair", rid, lease_id
            )
    return tuple((name, value) for name, value in raw)


def _body(doc: Mapping[str, Any], rid: str, lease_id: str | None) -> bytes:
    text = doc.get("chunk_b64")
    if not isinstance(text, str):
        raise FrameError(f"{doc['type']} without a string chunk_b64", rid, lease_id)
    try:
        # strict_mode rejects what b64decode(validate=True) does, in one C pass.
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII text
        raise FrameError(f"{doc['type']} chunk_b64 is not valid base64", rid, lease_id) from None


def _target(item: Mapping[str, Any]) -> LeaseTarget:
    local = item.get("local_target")
    local = local if isinstance(local, dict) else {}
    host, port = local.get("host"), local.get("port")
    return LeaseTarget(
        item["lease_id"],
        host if isinstance(host, str) else "127.0.0.1",
        port if isinstance(port, int) and not isinstance(port, bool) else None,
    )


def parse_agent_frame(message: str | bytes) -> AgentFrame:
    """Read one agent → relay message (the relay's side). Raises :class:`FrameError`.

    Lenient where agents in the field differ: ``lease_id`` may be missing on RESP_* (the
    relay routes by ``rid``), RESP_BODY chunks may be of any size (the SDK's agent sends
    up to ~800 KB although it advertises 64 KiB; only the message limit bounds them),
    ``eof`` is ignored, RESP_ERROR without ``code``/``message`` reads as ``UNKNOWN``/"",
    ATTACH lease items without a string ``lease_id`` are skipped.
    """
    doc = _object(message)
    kind = doc["type"]
    if kind == "ATTACH":
        items = doc.get("leases", [])
        if not isinstance(items, list):
            raise FrameError("ATTACH leases is not a list")
        caps = doc.get("capabilities")
        agent_id = doc.get("agent_id")
        return Attach(
            agent_id=agent_id if isinstance(agent_id, str) else "",
            leases=tuple(
                _target(item)
                for item in items
                if isinstance(item, dict) and isinstance(item.get("lease_id"), str)
            ),
            capabilities=caps if isinstance(caps, dict) else {},
        )
    if kind not in ("RESP_HEADERS", "RESP_BODY", "RESP_END", "RESP_ERROR"):
        return Unknown(kind)
    rid = _rid(doc)
    lease_id = _id(doc, "lease_id") or ""
    if kind == "RESP_BODY":
        return RespBody(lease_id, rid, _body(doc, rid, lease_id))
    if kind == "RESP_HEADERS":
        status = doc.get("status")
        if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
            raise FrameError(f"RESP_HEADERS status {status!r:.40} is not an int in 200..599", rid)
        return RespHeaders(lease_id, rid, status, _pairs(doc.get("headers"), kind, rid, lease_id))
    if kind == "RESP_END":
        return RespEnd(lease_id, rid)
    code, text = doc.get("code"), doc.get("message")
    return RespError(
        lease_id,
        rid,
        code if isinstance(code, str) else "UNKNOWN",
        text if isinstance(text, str) else "",
    )


TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def parse_relay_frame(message: str | bytes) -> RelayFrame:
    """Read one relay → agent message (the agent's side). Raises :class:`FrameError`.

    A REQ_HEADERS without ``lease_id`` and ``rid`` cannot be answered, so its FrameError
    names neither (drop it); any other broken request frame names its ``rid`` (answer
    ``BAD_REQUEST_FRAME``). Lenient: a missing or null ``query``/``headers`` is empty, a
    leading ``?`` on ``query`` is dropped, a missing or unusable ``deadline_ms`` is
    :data:`DEFAULT_DEADLINE_MS`, REQ_BODY chunks may be of any size up to the message limit.
    """
    doc = _object(message)
    kind = doc["type"]
    if kind == "REQ_BODY":
        rid = _rid(doc)
        return ReqBody(rid, _body(doc, rid, None))
    if kind == "REQ_HEADERS":
        lease, req = _id(doc, "lease_id"), _id(doc, "rid")
        if lease is None or req is None:
            raise FrameError("REQ_HEADERS without lease_id and rid")
        lease_id, rid = lease, req
        method, path, query = doc.get("method"), doc.get("path"), doc.get("query") or ""
        if not isinstance(method, str) or not TOKEN_RE.fullmatch(method):
            raise FrameError(f"REQ_HEADERS method {method!r:.40} is not a token", rid, lease_id)
        if not isinstance(path, str) or not path.startswith("/"):
            raise FrameError("REQ_HEADERS path must be a string starting with '/'", rid, lease_id)
        if not isinstance(query, str):
            raise FrameError("REQ_HEADERS query is not a string", rid, lease_id)
        deadline = doc.get("deadline_ms")
        if isinstance(deadline, bool) or not isinstance(deadline, int | float) or deadline <= 0:
            deadline = DEFAULT_DEADLINE_MS
        return ReqHeaders(
            lease_id,
            rid,
            method,
            path,
            query.removeprefix("?"),
            _pairs(doc.get("headers"), kind, rid, lease_id),
            int(deadline),
        )
    if kind == "REQ_END":
        return ReqEnd(_rid(doc))
    if kind == "CANCEL":
        return Cancel(_rid(doc))
    if kind == "ATTACH_ACK":
        agent_id, leases = doc.get("agent_id"), doc.get("leases")
        return AttachAck(
            agent_id if isinstance(agent_id, str) else "",
            tuple(x for x in leases if isinstance(x, dict)) if isinstance(leases, list) else (),
        )
    return Unknown(kind)
