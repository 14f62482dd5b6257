"""The SynthTunnel codec and header rules (``taskapp_notebook.tunnels.synthtunnel``).

The codec is also exercised end to end against independent counterparts written from the
spec (``tests/relay_agent.py``'s agent, ``tests/test_synthtunnel_agent.py``'s relay) and the
SDK's compiled agent (``tests/test_sdk_interop.py``), so it is never tested only against
itself. Here: every frame type round-trips, body frames equal ``json.dumps``, and each side's
leniency and the shared rules (binary messages, deep nesting, header rules) hold.
"""

from __future__ import annotations

import base64
import json
import os

import pytest

from taskapp_notebook.tunnels.synthtunnel.codec import (
    TextFrame,
    chunks,
    encode,
    encode_body,
    parse_agent_frame,
    parse_relay_frame,
)
from taskapp_notebook.tunnels.synthtunnel.headers import (
    agent_request_headers,
    caller_response_headers,
    relay_request_headers,
)
from taskapp_notebook.tunnels.synthtunnel.protocol import (
    MAX_BODY_CHUNK,
    Attach,
    AttachAck,
    Cancel,
    FrameError,
    LeaseTarget,
    ReqBody,
    ReqEnd,
    ReqHeaders,
    RespBody,
    RespEnd,
    RespError,
    RespHeaders,
    Unknown,
    binary_agreed,
)


def text_of(message: object) -> str:
    """The JSON text of an encoded body frame (``TextFrame``: UTF-8 bytes, sent as text)."""
    assert isinstance(message, TextFrame), message
    return message.data.decode("utf-8")


ODD = 'odd "id" \\ é\n'

AGENT_FRAMES = [
    Attach(
        "client-0123",
        (LeaseTarget("lease_1", "127.0.0.1", 8114),),
        {"max_body_chunk_bytes": 65536, "max_inflight": 128, "streaming": True},
    ),
    RespHeaders("lease_1", "rid_1", 201, (("content-type", "text/plain"), ("x-a", "é"))),
    RespBody("lease_1", "rid_1", os.urandom(MAX_BODY_CHUNK)),
    RespBody(ODD, ODD, b"x"),
    RespEnd("lease_1", "rid_1"),
    RespError("lease_1", "rid_1", "LOCAL_CONNECT_FAILED", "refused"),
]
RELAY_FRAMES = [
    AttachAck("client-0123", ({"lease_id": "lease_1", "expires_at": "2026-11-27T18:00:00Z"},)),
    ReqHeaders("lease_1", "rid_1", "POST", "/a b/ü", "x=1&y=%20", (("x-a", "1"),), 5000),
    ReqBody("rid_1", os.urandom(1000)),
    ReqBody(ODD, b""),
    ReqEnd("rid_1"),
    Cancel("rid_1"),
]


@pytest.mark.parametrize("frame", AGENT_FRAMES, ids=lambda f: type(f).__name__)
def test_agent_frames_round_trip(frame: object) -> None:
    assert parse_agent_frame(encode(frame)) == frame  # type: ignore[arg-type]


@pytest.mark.parametrize("frame", RELAY_FRAMES, ids=lambda f: type(f).__name__)
def test_relay_frames_round_trip(frame: object) -> None:
    assert parse_relay_frame(encode(frame)) == frame  # type: ignore[arg-type]


def test_each_parser_reads_only_its_direction() -> None:
    for frame in AGENT_FRAMES:
        assert isinstance(parse_relay_frame(encode(frame)), Unknown)
    for frame in RELAY_FRAMES:
        assert isinstance(parse_agent_frame(encode(frame)), Unknown)


def test_body_frames_equal_json_dumps_of_the_spec_fields() -> None:
    data = os.urandom(200_000)
    pieces = list(chunks(data))
    assert [len(p) for p in pieces] == [65536, 65536, 65536, 3392] and list(chunks(b"")) == []
    for piece in [*pieces, b"x", b""]:
        b64 = base64.b64encode(piece).decode()
        for lease_id, rid in (("lease_1", "rid_1"), (ODD, "rïd")):
            expected = {
                "type": "RESP_BODY",
                "lease_id": lease_id,
                "rid": rid,
                "chunk_b64": b64,
                "eof": False,
            }
            assert encode(RespBody(lease_id, rid, piece)) == json.dumps(
                expected, separators=(",", ":")
            )
            body_frame = encode_body(RespBody(lease_id, rid, piece), binary=False)
            assert text_of(body_frame) == json.dumps(expected, separators=(",", ":"))
            expected = {"type": "REQ_BODY", "rid": rid, "chunk_b64": b64}
            assert encode(ReqBody(rid, piece)) == json.dumps(expected, separators=(",", ":"))
            body_frame = encode_body(ReqBody(rid, piece), binary=False)
            assert text_of(body_frame) == json.dumps(expected, separators=(",", ":"))


@pytest.mark.parametrize("bad", ["QQ=", "QQ==QQ==", "QU JD", "QUJD\n", "é", "=QQ=", "QQ===", 7])
def test_invalid_base64_names_its_request(bad: object) -> None:
    msg = json.dumps({"type": "RESP_BODY", "lease_id": "l", "rid": "r", "chunk_b64": bad})
    with pytest.raises(FrameError) as err:
        parse_agent_frame(msg)
    assert err.value.rid == "r"
    with pytest.raises(FrameError) as err:
        parse_relay_frame(json.dumps({"type": "REQ_BODY", "rid": "r2", "chunk_b64": bad}))
    assert err.value.rid == "r2"


@pytest.mark.parametrize("parse", [parse_agent_frame, parse_relay_frame])
def test_both_parsers_refuse_what_is_no_frame(parse: object) -> None:
    valid = encode(RespEnd("l", "r")) if parse is parse_agent_frame else encode(ReqEnd("r"))
    cases = {
        valid.encode(): "binary message",  # the same frame as a binary message: not a frame
        "[" * 100_000 + "]" * 100_000: "nested too deeply",
        '{"type": "X", "a": ' + "[" * 100_000 + "]" * 100_000 + "}": "nested too deeply",
        "not json": "not JSON",
        "[1]": "not a JSON object",
        '{"no": "type"}': "no string 'type'",
    }
    for message, reason in cases.items():
        with pytest.raises(FrameError, match=reason):
            parse(message)  # type: ignore[operator]


def test_relay_side_leniency_toward_agents_in_the_field() -> None:
    # The SDK's agent: chunks far above 64 KiB, lease_id optional, eof ignored.
    big = os.urandom(800_000)
    frame = {"type": "RESP_BODY", "rid": "r", "chunk_b64": base64.b64encode(big).decode()}
    assert parse_agent_frame(json.dumps({**frame, "eof": True})) == RespBody("", "r", big)
    assert parse_agent_frame('{"type":"RESP_ERROR","rid":"r"}') == RespError("", "r", "UNKNOWN")
    attach = parse_agent_frame('{"type":"ATTACH","leases":[{"lease_id":"a"},{"x":1},"b"]}')
    assert attach == Attach("", (LeaseTarget("a"),), {})
    with pytest.raises(FrameError) as err:
        parse_agent_frame('{"type":"RESP_HEADERS","rid":"r","status":"OK"}')
    assert err.value.rid == "r"


def test_agent_side_leniency_and_what_it_answers() -> None:
    frame = {"type": "REQ_HEADERS", "lease_id": "l", "rid": "r", "method": "GET", "path": "/"}
    assert parse_relay_frame(json.dumps({**frame, "query": "?a=1", "headers": None})) == (
        ReqHeaders("l", "r", "GET", "/", "a=1", (), 600_000)
    )
    assert parse_relay_frame(json.dumps({**frame, "deadline_ms": True})).deadline_ms == 600_000
    # Without lease_id/rid nobody can be answered: the FrameError names no request (drop it).
    with pytest.raises(FrameError) as err:
        parse_relay_frame(json.dumps({**frame, "lease_id": None}))
    assert err.value.rid is None
    # Otherwise it names the request, to be answered with BAD_REQUEST_FRAME.
    for bad in ({"method": "G T"}, {"path": "x"}, {"headers": {"a": "b"}}, {"query": 1}):
        with pytest.raises(FrameError) as err:
            parse_relay_frame(json.dumps({**frame, **bad}))
        assert (err.value.rid, err.value.lease_id) == ("r", "l")


# -- header rules: the drift between the two ends, resolved once ---------------------------


def test_headers_named_by_connection_are_dropped_by_every_rule() -> None:
    pairs = [
        ("Connection", "keep-alive, X-Secret"),
        ("x-secret", "1"),
        ("Keep-Alive", "5"),
        ("Proxy-Authorization", "p"),
        ("X-Kept", "k"),
    ]
    assert relay_request_headers(pairs, worker_token_in_authorization=False) == [("x-kept", "k")]
    sent = agent_request_headers(pairs, api_keys=[], lease_id="l", rid="r")
    assert [n for n, _ in sent] == [
        "X-Kept",
        "x-synthtunnel-lease-id",
        "x-synthtunnel-request-id",
        "x-forwarded-proto",
    ]
    assert caller_response_headers(pairs) == [(b"x-kept", b"k")]


def test_unwritable_header_pairs_are_dropped_by_every_rule() -> None:
    pairs = [("", "empty name"), ("a b", "space"), ("x-crlf", "a\r\nb: c"), ("x-ok", "é")]
    assert relay_request_headers(pairs, worker_token_in_authorization=False) == [("x-ok", "é")]
    sent = agent_request_headers(pairs, api_keys=["k"], lease_id="l", rid="r")
    assert sent[0] == ("x-ok", "é") and not any(n in ("", "a b", "x-crlf") for n, _ in sent)
    assert caller_response_headers(pairs) == [(b"x-ok", "é".encode("latin-1"))]


def test_agent_overwrites_auth_and_its_own_headers() -> None:
    pairs = [
        ("Authorization", "Bearer caller"),
        ("X-API-Key", "spoof"),
        ("x-synthtunnel-request-id", "spoof"),
        ("X-Forwarded-Proto", "http"),
        ("Host", "evil"),
        ("Content-Length", "99"),
    ]
    sent = agent_request_headers(pairs, api_keys=["k1", "k2"], lease_id="l", rid="r")
    assert sent == [
        ("x-api-key", "k1"),
        ("authorization", "Bearer k1"),
        ("x-api-keys", "k1,k2"),
        ("x-synthtunnel-lease-id", "l"),
        ("x-synthtunnel-request-id", "r"),
        ("x-forwarded-proto", "https"),
    ]
    relayed = relay_request_headers(pairs, worker_token_in_authorization=True)
    assert [n for n, _ in relayed] == ["x-api-key", "x-synthtunnel-request-id", "x-forwarded-proto"]


def test_binary_body_frames_round_trip_only_when_agreed() -> None:
    data = os.urandom(70_000)
    req, resp = ReqBody("rid_1", data), RespBody("", "rïd", data)
    req_msg, resp_msg = encode_body(req, binary=True), encode_body(resp, binary=True)
    assert isinstance(req_msg, bytes) and req_msg[:2] == bytes([1, 5])
    assert parse_relay_frame(req_msg, binary=True) == req
    assert parse_agent_frame(resp_msg, binary=True) == resp
    assert text_of(encode_body(req, binary=False)) == encode(req)  # not agreed: JSON text
    long_rid = ReqBody("r" * 300, b"x")  # a rid past one length byte: JSON text
    assert text_of(encode_body(long_rid, binary=True)) == encode(long_rid)
    for message, parse in ((req_msg, parse_agent_frame), (resp_msg, parse_relay_frame)):
        with pytest.raises(FrameError, match="not an agreed body frame"):
            parse(message, binary=True)  # type: ignore[operator]
        with pytest.raises(FrameError, match="binary message"):
            parse(message)  # type: ignore[operator]
    for bad in (b"", b"\x01", b"\x01\x09abc", b"\x01\x00body", b"\x01\x02\xff\xfe"):
        with pytest.raises(FrameError):
            parse_relay_frame(bad, binary=True)


def test_attach_ack_carries_the_agreement() -> None:
    ack = AttachAck("a", (), {"binary_bodies": 1})
    parsed = parse_relay_frame(encode(ack))
    assert parsed == ack and isinstance(parsed, AttachAck) and binary_agreed(parsed.capabilities)
    assert not binary_agreed(AttachAck("a").capabilities)
    assert "capabilities" not in json.loads(encode(AttachAck("a")))  # the spec's ACK, as it was
