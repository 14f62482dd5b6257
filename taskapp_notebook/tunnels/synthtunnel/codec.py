"""The SynthTunnel codec (``docs/synthtunnel-protocol.md`` section 3): one encoder, one parser
per direction, stdlib only and without I/O. Frame types, constants and the binary-bodies
extension are described in :mod:`.protocol`.
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .protocol import (
    DEFAULT_DEADLINE_MS,
    MAX_BODY_CHUNK,
    TOKEN_RE,
    AgentFrame,
    Attach,
    AttachAck,
    Cancel,
    Frame,
    FrameError,
    Headers,
    LeaseTarget,
    RelayFrame,
    ReqBody,
    ReqEnd,
    ReqHeaders,
    RespBody,
    RespEnd,
    RespError,
    RespHeaders,
    Unknown,
)

_REQ_BODY_KIND, _RESP_BODY_KIND = 1, 2

# -- encoder ---------------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z0-9_.:\-]*")


def _s(text: str) -> str:
    """``text`` as a JSON string (ids are plain, so usually without ``json.dumps``)."""
    return f'"{text}"' if _PLAIN.fullmatch(text) else json.dumps(text)


def _b64(data: bytes | memoryview) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"))


class TextFrame:
    """A JSON text frame already encoded as UTF-8 bytes: sent as a *text* message
    (``batching.send_frames``), without the str round trip of a 87 KB base64 string."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def encode_body(frame: ReqBody | RespBody, *, binary: bool) -> bytes | TextFrame:
    """A body frame as a binary message when ``binary`` was agreed (and its rid fits one
    length byte), else as JSON text, equal to :func:`encode`'s, built as bytes."""
    if binary:
        rid = frame.rid.encode("utf-8")
        if len(rid) <= 255:
            kind = _REQ_BODY_KIND if isinstance(frame, ReqBody) else _RESP_BODY_KIND
            return b"".join((bytes((kind, len(rid))), rid, frame.data))
    b64 = binascii.b2a_base64(frame.data, newline=False)
    rid_json = _s(frame.rid).encode("utf-8")
    if isinstance(frame, ReqBody):
        parts: tuple[bytes, ...] = (
            b'{"type":"REQ_BODY","rid":',
            rid_json,
            b',"chunk_b64":"',
            b64,
            b'"}',
        )
    else:
        lease_json = _s(frame.lease_id).encode("utf-8")
        parts = (
            b'{"type":"RESP_BODY","lease_id":',
            lease_json,
            b',"rid":',
            rid_json,
            b',"chunk_b64":"',
            b64,
            b'","eof":false}',
        )
    return TextFrame(b"".join(parts))


def _binary_body(message: bytes, kind: int) -> tuple[str, memoryview]:
    """(rid, body) of a binary body frame of ``kind``; FrameError otherwise."""
    if len(message) < 2 or message[0] != kind or len(message) < 2 + message[1]:
        raise FrameError("binary message that is not an agreed body frame")
    end = 2 + message[1]
    try:
        rid = message[2:end].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("binary body frame with a rid that is not UTF-8") from None
    if not rid:
        raise FrameError("binary body frame without a rid")
    return rid, memoryview(message)[end:]  # a view: the body is not copied here


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
        if frame.capabilities:
            doc["capabilities"] = dict(frame.capabilities)
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


def parse_agent_frame(message: str | bytes, *, binary: bool = False) -> AgentFrame:
    """Read one agent → relay message (the relay's side). Raises :class:`FrameError`.

    ``binary``: binary body frames were agreed on this connection (a binary message is then
    a RESP_BODY; else it is malformed).

    Lenient where agents in the field differ: ``lease_id`` may be missing on RESP_* (the
    relay routes by ``rid``), RESP_BODY chunks may be of any size (the SDK's agent sends
    up to ~800 KB although it advertises 64 KiB; only the message limit bounds them),
    ``eof`` is ignored, RESP_ERROR without ``code``/``message`` reads as ``UNKNOWN``/"",
    ATTACH lease items without a string ``lease_id`` are skipped.
    """
    if binary and isinstance(message, bytes):
        return RespBody("", *_binary_body(message, _RESP_BODY_KIND))
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


def parse_relay_frame(message: str | bytes, *, binary: bool = False) -> RelayFrame:
    """Read one relay → agent message (the agent's side). Raises :class:`FrameError`.

    ``binary``: binary body frames were agreed (a binary message is then a REQ_BODY).

    A REQ_HEADERS without ``lease_id`` and ``rid`` cannot be answered, so its FrameError
    names neither (drop it); any other broken request frame names its ``rid`` (answer
    ``BAD_REQUEST_FRAME``). Lenient: a missing or null ``query``/``headers`` is empty, a
    leading ``?`` on ``query`` is dropped, a missing or unusable ``deadline_ms`` is
    :data:`DEFAULT_DEADLINE_MS`, REQ_BODY chunks may be of any size up to the message limit.
    """
    if binary and isinstance(message, bytes):
        return ReqBody(*_binary_body(message, _REQ_BODY_KIND))
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
        agent_id, leases, caps = doc.get("agent_id"), doc.get("leases"), doc.get("capabilities")
        return AttachAck(
            agent_id if isinstance(agent_id, str) else "",
            tuple(x for x in leases if isinstance(x, dict)) if isinstance(leases, list) else (),
            caps if isinstance(caps, dict) else {},
        )
    return Unknown(kind)
