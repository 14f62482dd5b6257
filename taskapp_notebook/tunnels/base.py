"""The interface every tunnel backend implements, and the name → backend table.

A backend is created per :class:`~taskapp_notebook.InProcessTaskApp` start, opened once on
the instance's event loop (the kernel's loop or the server thread's loop) after the local
server is healthy, and closed once on stop. Backends are imported lazily from
``BACKENDS`` so ``import taskapp_notebook`` imports neither websockets nor subprocess code.
"""

from __future__ import annotations

import enum
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..errors import InvalidParameterError

#: Canonical tunnel modes, in the seed's order.
TUNNEL_MODES: tuple[str, ...] = ("synthtunnel", "quick", "named", "local", "preconfigured")

#: Accepted spellings (case-insensitive) of ``tunnel_mode`` / ``tunnel_backend``.
ALIASES: dict[str, str] = {
    "synthtunnel": "synthtunnel",
    "synth_tunnel": "synthtunnel",
    "synth-tunnel": "synthtunnel",
    "quick": "quick",
    "cloudflare_quick": "quick",
    "cloudflare-quick": "quick",
    "named": "named",
    "managed": "named",
    "cloudflare_managed": "named",
    "cloudflare-managed": "named",
    "local": "local",
    "localhost": "local",
    "preconfigured": "preconfigured",
}

#: mode → "module:Class", imported on first use.
BACKENDS: dict[str, str] = {
    "synthtunnel": "taskapp_notebook.tunnels.synthtunnel.tunnel:SynthTunnel",
    "quick": "taskapp_notebook.tunnels.cloudflare:QuickTunnel",
    "named": "taskapp_notebook.tunnels.cloudflare:NamedTunnel",
    "local": "taskapp_notebook.tunnels.local:LocalTunnel",
    "preconfigured": "taskapp_notebook.tunnels.local:PreconfiguredTunnel",
}


class TunnelState(enum.StrEnum):
    """Connection state a backend reports for the widget and ``%taskapp list``."""

    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    DOWN = "down"
    CLOSED = "closed"


@dataclass
class TunnelStatus:
    """A backend's live status. Mutated by the backend, read by observers."""

    state: TunnelState = TunnelState.IDLE
    last_error: str | None = None
    since: float = field(default_factory=time.time)

    def set(self, state: TunnelState, error: str | None = None) -> None:
        """Move to ``state`` (recording ``error`` when given)."""
        if state is not self.state:
            self.since = time.time()
        self.state = state
        if error is not None:
            self.last_error = error


@dataclass(frozen=True)
class TunnelContext:
    """What a backend needs to know about the local app it exposes."""

    local_host: str
    local_port: int
    #: The app's own key. SynthTunnel injects it into forwarded requests.
    api_key: str
    force_new_tunnel: bool = False
    preconfigured_url: str | None = None
    preconfigured_auth_header: str | None = None
    preconfigured_auth_token: str | None = None
    #: Called with one human-readable line for notable events (reconnects, URL changes,
    #: subprocess errors). The runner feeds these to its log and the widget's log pane.
    on_event: Callable[[str], None] = lambda line: None

    @property
    def local_url(self) -> str:
        host = "127.0.0.1" if self.local_host in ("0.0.0.0", "localhost") else self.local_host
        return f"http://{host}:{self.local_port}"


@runtime_checkable
class Tunnel(Protocol):
    """One tunnel backend instance (opened once, closed once)."""

    #: Canonical mode name, one of TUNNEL_MODES.
    mode: str
    #: Public URL once open, else None.
    url: str | None
    #: SynthTunnel's worker token (callers must send it); None for other backends.
    worker_token: str | None
    status: TunnelStatus

    def preflight(self, ctx: TunnelContext) -> None:
        """Raise TunnelError *before the server starts* if this backend cannot work here
        (missing SYNTH_API_KEY, missing cloudflared binary, missing URL, ...)."""
        ...

    async def open(self, ctx: TunnelContext) -> str:
        """Open the tunnel and return its public URL. Raise TunnelError on failure,
        having released everything it acquired."""
        ...

    async def close(self) -> None:
        """Release everything (subprocess, WebSocket, lease). Idempotent; never raises."""
        ...

    def verification_headers(self) -> dict[str, str]:
        """Headers a caller of ``url`` needs (used for ``GET {url}/health`` verification)."""
        ...


def canonical_mode(name: str) -> str:
    """Map any accepted spelling of a tunnel mode/backend to its canonical name."""
    key = str(getattr(name, "value", name)).strip().lower()
    try:
        return ALIASES[key]
    except KeyError:
        raise InvalidParameterError(
            f"Unknown tunnel mode {name!r}. Use one of {', '.join(TUNNEL_MODES)} "
            f"(aliases: {', '.join(sorted(set(ALIASES) - set(TUNNEL_MODES)))})."
        ) from None


def create_tunnel(mode: str) -> Tunnel:
    """Instantiate the backend for ``mode`` (any accepted spelling)."""
    module_name, _, class_name = BACKENDS[canonical_mode(mode)].partition(":")
    module = importlib.import_module(module_name)
    tunnel: Tunnel = getattr(module, class_name)()
    return tunnel
