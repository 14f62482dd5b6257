"""The two backends that open nothing: ``local`` and ``preconfigured``."""

from __future__ import annotations

from ..errors import TunnelError
from ..health import auth_headers
from .base import TunnelContext, TunnelState, TunnelStatus


class LocalTunnel:
    """No tunnel: the loopback URL is the URL."""

    mode = "local"

    def __init__(self) -> None:
        self.url: str | None = None
        self.worker_token: str | None = None
        self.status = TunnelStatus()
        self._api_key = ""

    def preflight(self, ctx: TunnelContext) -> None:
        return None

    async def open(self, ctx: TunnelContext) -> str:
        self._api_key = ctx.api_key
        self.url = ctx.local_url
        self.status.set(TunnelState.CONNECTED)
        return self.url

    async def close(self) -> None:
        self.status.set(TunnelState.CLOSED)

    def verification_headers(self) -> dict[str, str]:
        return auth_headers(self._api_key)


class PreconfiguredTunnel(LocalTunnel):
    """A URL the user already routes to the local port (their own proxy or tunnel)."""

    mode = "preconfigured"

    def __init__(self) -> None:
        super().__init__()
        self._headers: dict[str, str] = {}

    def preflight(self, ctx: TunnelContext) -> None:
        if not ctx.preconfigured_url:
            raise TunnelError(
                "tunnel_mode='preconfigured' needs preconfigured_url= (the public URL that "
                "already routes to this app)."
            )

    async def open(self, ctx: TunnelContext) -> str:
        self.preflight(ctx)
        assert ctx.preconfigured_url is not None
        self._headers = auth_headers(ctx.api_key)
        if ctx.preconfigured_auth_header and ctx.preconfigured_auth_token:
            self._headers[ctx.preconfigured_auth_header] = ctx.preconfigured_auth_token
        self.url = ctx.preconfigured_url.rstrip("/")
        self.status.set(TunnelState.CONNECTED)
        return self.url

    def verification_headers(self) -> dict[str, str]:
        return dict(self._headers)
