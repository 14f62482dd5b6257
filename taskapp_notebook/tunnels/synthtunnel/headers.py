"""SynthTunnel header rules (``docs/synthtunnel-protocol.md`` section 4), once for both ends.

The relay applies :func:`relay_request_headers` to a caller's request and
:func:`caller_response_headers` to the app's response; the agent applies
:func:`agent_request_headers` before calling the app. Shared rules: hop-by-hop headers
(the fixed set, ``proxy-*``, and any header a ``Connection`` header names, RFC 9110 §7.6.1)
never cross the tunnel; a pair that cannot be written on HTTP/1.1 (name not a token, CR/LF/NUL
in the value, an empty name) is dropped, never fatal to the request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from .protocol import TOKEN_RE

# -- header rules (section 4) ----------------------------------------------------------------

#: Hop-by-hop headers (``proxy-*`` too, and whatever a ``Connection`` header names).
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailers", "transfer-encoding", "upgrade"}
)
#: Caller headers the relay never forwards, besides hop-by-hop ones and an
#: ``authorization`` that carried the worker token.
RELAY_REQUEST_DROP = frozenset({"host", "content-length", "x-synthtunnel-worker-token"})
#: Headers the agent replaces with its own (auth for the app, and the ones it adds).
AGENT_SETS = frozenset(
    {
        "authorization",
        "x-api-key",
        "x-api-keys",
        "x-synthtunnel-lease-id",
        "x-synthtunnel-request-id",
        "x-forwarded-proto",
    }
)
#: App headers the caller never gets besides hop-by-hop ones: the relay frames the body.
RESPONSE_DROP = frozenset({"content-length"})

_BAD_VALUE_RE = re.compile(r"[\r\n\x00]")


def writable(name: str, value: str) -> bool:
    """True when ``name: value`` can be written on an HTTP/1.1 connection (a token name;
    no CR, LF or NUL in the value)."""
    return TOKEN_RE.fullmatch(name) is not None and _BAD_VALUE_RE.search(value) is None


def header_bytes(text: str) -> bytes:
    """A header name or value for the wire: Latin-1 (HTTP's historic charset), else UTF-8."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def hop_by_hop(pairs: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Lower-case names that are hop-by-hop in ``pairs``: the fixed set plus the names
    listed in its ``Connection`` header(s). ``proxy-*`` is matched by :func:`_keep`."""
    named = {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == "connection"
        for token in value.split(",")
    }
    return HOP_BY_HOP | named


def _keep(lowered: str, hop: frozenset[str], drop: frozenset[str]) -> bool:
    return lowered not in hop and lowered not in drop and not lowered.startswith("proxy-")


def relay_request_headers(
    pairs: Sequence[tuple[str, str]], *, worker_token_in_authorization: bool
) -> list[tuple[str, str]]:
    """A caller's headers as the relay forwards them in REQ_HEADERS (names lower-cased)."""
    hop = hop_by_hop(pairs)
    drop = RELAY_REQUEST_DROP | ({"authorization"} if worker_token_in_authorization else set())
    out = []
    for name, value in pairs:
        low = name.lower()
        if _keep(low, hop, drop) and writable(name, value):
            out.append((low, value))
    return out


def agent_request_headers(
    pairs: Sequence[tuple[str, str]], *, api_keys: Sequence[str], lease_id: str, rid: str
) -> list[tuple[str, str]]:
    """REQ_HEADERS ``headers`` as the agent sends them to the app: the relay's set dropped
    again (defence in depth), auth overwritten with the app's key(s), ours added."""
    hop = hop_by_hop(pairs)
    drop = RELAY_REQUEST_DROP | AGENT_SETS
    out = [(n, v) for n, v in pairs if _keep(n.lower(), hop, drop) and writable(n, v)]
    keys = [key for key in api_keys if key]
    if keys:
        out.append(("x-api-key", keys[0]))
        out.append(("authorization", f"Bearer {keys[0]}"))
        if len(keys) > 1:
            out.append(("x-api-keys", ",".join(keys)))
    out.append(("x-synthtunnel-lease-id", lease_id))
    out.append(("x-synthtunnel-request-id", rid))
    out.append(("x-forwarded-proto", "https"))
    return out


def caller_response_headers(pairs: Sequence[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """RESP_HEADERS ``headers`` as the relay returns them to the caller (ASGI form)."""
    hop = hop_by_hop(pairs)
    out = []
    for name, value in pairs:
        low = name.lower()
        if _keep(low, hop, RESPONSE_DROP) and writable(name, value):
            out.append((low.encode("latin-1"), header_bytes(value)))
    return out
