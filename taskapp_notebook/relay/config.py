"""Relay settings: limits, timers and the state file, validated once.

Every limit is documented in ``docs/relay.md`` (safe defaults for a relay on the internet).
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike

from ..tunnels.synthtunnel.protocol import MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class RelayConfig:
    """Limits and timers of a relay. Every value is in seconds or bytes."""

    #: Concurrent requests per lease; more get 429 (also capped by the agent's own value).
    max_inflight: int = 128
    #: Largest response body the relay streams to a caller; past it the response is cut.
    max_response_bytes: int = 200 * 1024 * 1024
    #: Response bytes buffered for one slow caller before its request is cancelled.
    max_buffered_bytes: int = 32 * 1024 * 1024
    #: Lease lifetime when the POST asks for none, and the cap on what it may ask for.
    default_ttl: float = 3600.0
    max_ttl: float = 24 * 3600.0
    #: Deadline of one proxied request (sent to the agent as ``deadline_ms``); then 504.
    request_timeout: float = 600.0
    #: Time an agent has to send ATTACH after its WebSocket opens.
    attach_timeout: float = 10.0
    #: WebSocket pings to attached agents (only after ATTACH_ACK); None disables them.
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    #: Largest WebSocket message accepted from an agent.
    max_message_bytes: int = MAX_MESSAGE_BYTES
    #: How often expired leases are swept (their agents detached).
    sweep_interval: float = 0.5
    #: Idle time after which the relay closes a caller's keep-alive connection. Longer than
    #: common clients keep idle connections (httpx 5 s, aiohttp 15 s): a server that closes
    #: first races the client's next request on that connection, which is then lost.
    keep_alive_timeout: float = 20.0
    #: A lease whose agent has been gone (or never came) this long ends early as
    #: ``lease_expired``; None keeps such leases for their whole TTL.
    agent_grace: float | None = 300.0
    #: Live leases one API key may hold at once; more get 429 ``lease_quota_exceeded``.
    max_leases_per_key: int = 100
    #: Largest ``metadata`` of one lease, as JSON bytes; larger gets 413.
    max_metadata_bytes: int = 64 * 1024
    #: Time a connection may take to send complete request headers, counted from its
    #: opening or from the first byte of its next request (slowloris); then it is closed.
    header_timeout: float = 15.0
    #: Open connections (callers and agents) at most; None = derived from the fd limit.
    #: At the cap, idle connections and ones still sending headers are closed oldest first.
    max_connections: int | None = None
    #: On stop, time requests still under way get to finish (the port is already closed and
    #: proxied requests already failed) before they are cancelled and answered 503.
    stop_grace: float = 5.0
    #: SQLite file that keeps leases across restarts; None keeps them in memory only.
    state_path: str | PathLike[str] | None = None

    def __post_init__(self) -> None:
        if self.state_path is not None and not (
            isinstance(self.state_path, str | PathLike) and str(self.state_path).strip()
        ):
            raise ValueError(
                f"RelayConfig.state_path must be a file path or None, got {self.state_path!r}."
            )
        grace = self.stop_grace
        if isinstance(grace, bool) or not isinstance(grace, int | float) or not (
            0 <= grace < float("inf")
        ):
            raise ValueError(
                f"RelayConfig.stop_grace must be a finite number of seconds >= 0, got {grace!r}."
            )
        positive = {
            "max_inflight": self.max_inflight,
            "max_response_bytes": self.max_response_bytes,
            "max_buffered_bytes": self.max_buffered_bytes,
            "default_ttl": self.default_ttl,
            "max_ttl": self.max_ttl,
            "request_timeout": self.request_timeout,
            "attach_timeout": self.attach_timeout,
            "max_message_bytes": self.max_message_bytes,
            "sweep_interval": self.sweep_interval,
            "keep_alive_timeout": self.keep_alive_timeout,
            "max_leases_per_key": self.max_leases_per_key,
            "max_metadata_bytes": self.max_metadata_bytes,
            "header_timeout": self.header_timeout,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"RelayConfig.{name} must be > 0, got {value!r}.")
        for name, opt in (
            ("ping_interval", self.ping_interval),
            ("ping_timeout", self.ping_timeout),
            ("agent_grace", self.agent_grace),
            ("max_connections", self.max_connections),
        ):
            if opt is not None and not opt > 0:
                raise ValueError(f"RelayConfig.{name} must be > 0 or None, got {opt!r}.")
        if self.default_ttl > self.max_ttl:
            raise ValueError(
                f"RelayConfig.default_ttl ({self.default_ttl!r}) exceeds max_ttl "
                f"({self.max_ttl!r}); raise max_ttl or lower default_ttl."
            )
