"""Cloudflare tunnels through a ``cloudflared`` child process: quick and named.

Both backends run cloudflared as a :class:`~.process.ManagedProcess` (own session, so
"Interrupt kernel" does not kill it; parent-death signal on Linux, so a killed kernel leaves
no orphan; last log lines kept and attached to every :class:`TunnelError`).

Binary: ``CLOUDFLARED_PATH`` or ``TASKAPP_CLOUDFLARED`` (a path or a name on PATH), else
``cloudflared`` on PATH. It is never downloaded. ``TASKAPP_CLOUDFLARED_TIMEOUT`` (seconds,
default 30) bounds the wait for the tunnel to connect.

Once connected, the status follows cloudflared's edge connections while it runs: its log
lines (a connection registered / lost, per ``connIndex``) and its metrics server's
``/ready`` (polled every ``ready_interval`` seconds) move it CONNECTED → RECONNECTING when
no connection is left, → DOWN after ``down_after`` seconds without one, and back to
CONNECTED when one registers again. See :func:`parse_connection_line`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import httpx

from ..errors import TunnelError, mask_secret
from ..ports import pick_free_port
from .base import TunnelContext, TunnelState
from .process import SubprocessTunnel

logger = logging.getLogger(__name__)

__all__ = [
    "ConnectionEvent",
    "NamedTunnel",
    "QuickTunnel",
    "find_cloudflared",
    "parse_connection_line",
]

BINARY_ENV_VARS = ("CLOUDFLARED_PATH", "TASKAPP_CLOUDFLARED")
TIMEOUT_ENV_VAR = "TASKAPP_CLOUDFLARED_TIMEOUT"
DEFAULT_BACKEND_URL = "https://api.usesynth.ai"
#: Where installers put cloudflared when a notebook's PATH is shorter than the shell's.
_EXTRA_DIRS = ("/usr/local/bin", "/opt/homebrew/bin", "/usr/bin", "~/.local/bin", "~/bin")

INSTALL_HINT = (
    "Install it with your package manager (macOS: `brew install cloudflared`; Debian/Ubuntu "
    "and RHEL: Cloudflare's package repository at https://pkg.cloudflare.com; Windows: "
    "`winget install --id Cloudflare.cloudflared`) or from "
    "https://developers.cloudflare.com/cloudflare-one/connections/connect-networks/downloads/"
    ", or point CLOUDFLARED_PATH at an existing binary. tunnel_mode='synthtunnel' needs no "
    "binary."
)

QUICK_URL_RE = re.compile(r"https://[a-z0-9-]+\.trycloudflare\.com")
CONNECTED_LINE = "Registered tunnel connection"
_RATE_LIMITED = ("429 too many requests", "failed to unmarshal quick tunnel", 'status_code="429')
_OUTAGE = ("failed to request quick tunnel",)
_BAD_TOKEN = ("token is not valid", "invalid token", "unauthorized", "tunnel not found")

# cloudflared's edge-connection log lines. It logs with zerolog: by default one console line
# "<time> <LVL> <message> key=value ..." (with --log-format json the same fields as JSON), and
# every line below carries the connection's ``connIndex`` field. Message texts from the
# cloudflare/cloudflared source:
#   connection/observer.go    logConnected       INF "Registered tunnel connection" connIndex=N
#                                                 connection=<uuid> event=0 ip=.. location=..
#                                                 protocol=quic
#   connection/rpc.go (older releases)           INF "Connection <uuid> registered" connIndex=N
#   connection/control.go     waitForUnregister  INF "Unregistered tunnel connection" connIndex=N
#   connection/http2.go       Serve              INF "Lost connection with the edge" connIndex=N
#   supervisor/tunnel.go      ServeTunnel        ERR "Serve tunnel error" error=".." connIndex=N
#                             Serve              INF "Retrying connection in up to 2s"
#                                                 connIndex=N (older: "... in up to 2s seconds")
#                             serveTunnel        ERR "Unable to establish connection with
#                                                 Cloudflare edge" connIndex=N
#   supervisor/supervisor.go  Run                ERR "Connection terminated" error=".." connIndex=N
# "failed to connect to the edge" is not in cloudflared's source as far as we could find (it is
# how people describe the failure); it is matched as a fallback and carries no connIndex.
# A lost-line without a connIndex counts as losing every connection we know of.
_REGISTERED_RE = re.compile(
    r"Registered tunnel connection|\bConnection [0-9a-fA-F-]{8,} registered"
)
_LOST_PHRASES = (
    "unregistered tunnel connection",
    "connection terminated",
    "lost connection with the edge",
    "serve tunnel error",
    "retrying connection in up to",
    "unable to establish connection with cloudflare edge",
    "failed to connect to the edge",
)
_CONN_INDEX_RE = re.compile(r"\bconnIndex(?:=|\"?\s*:\s*\"?)(\d+)")
#: Seconds between polls of the metrics server's /ready while the tunnel is open.
DEFAULT_READY_INTERVAL = 5.0


class ConnectionEvent(NamedTuple):
    """What one cloudflared log line says about an edge connection."""

    kind: Literal["registered", "lost"]
    #: The line's ``connIndex``, or None when it carries none.
    conn_index: int | None


def parse_connection_line(line: str) -> ConnectionEvent | None:
    """The edge-connection event in one cloudflared log line, or None (see the table above)."""
    low = line.lower()
    m = _CONN_INDEX_RE.search(line)
    index = int(m.group(1)) if m else None
    # "Unregistered tunnel connection" contains "registered tunnel connection": lost first.
    if any(phrase in low for phrase in _LOST_PHRASES):
        return ConnectionEvent("lost", index)
    if _REGISTERED_RE.search(line):
        return ConnectionEvent("registered", index)
    return None


def find_cloudflared(explicit: str | None = None) -> str:
    """Return the path of the cloudflared binary, or raise TunnelError saying how to get it."""
    candidates = [("binary", explicit)] + [(v, os.environ.get(v)) for v in BINARY_ENV_VARS]
    for source, value in candidates:
        if not value:
            continue
        path = shutil.which(os.path.expanduser(value))
        if path is None:
            raise TunnelError(
                f"{source} is {value!r}, which is not an executable file or a command on "
                f"PATH. Fix or unset it. {INSTALL_HINT}"
            )
        return path
    found = shutil.which("cloudflared")
    if found is None:
        extra = os.pathsep.join(os.path.expanduser(d) for d in _EXTRA_DIRS)
        found = shutil.which("cloudflared", path=extra)
    if found is None:
        raise TunnelError(
            "cloudflared was not found on PATH (nor via CLOUDFLARED_PATH / "
            f"TASKAPP_CLOUDFLARED); Cloudflare tunnels need it. {INSTALL_HINT}"
        )
    return found


def _child_env(**extra: str) -> dict[str, str]:
    """Our environment minus secrets cloudflared must not inherit, plus ``extra``."""
    drop = {"TUNNEL_TOKEN", "CLOUDFLARE_TUNNEL_TOKEN", "SYNTH_API_KEY"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def _timeout_from_env(default: float) -> float:
    raw = os.environ.get(TIMEOUT_ENV_VAR)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise TunnelError(f"{TIMEOUT_ENV_VAR}={raw!r} is not a positive number of seconds.")
    return value


class _CloudflaredTunnel(SubprocessTunnel):
    """What both cloudflared backends share: binary, metrics server, connection signals."""

    process_name = "cloudflared"

    def __init__(
        self,
        *,
        binary: str | None = None,
        timeout: float | None = None,
        stop_timeout: float = 5.0,
        down_after: float | None = None,
        ready_interval: float = DEFAULT_READY_INTERVAL,
    ) -> None:
        super().__init__(timeout=timeout, stop_timeout=stop_timeout, down_after=down_after)
        self.binary = binary
        #: Seconds between /ready polls once open; 0 disables polling (log lines only).
        self.ready_interval = ready_interval
        self._metrics: str | None = None
        self._log_url: str | None = None
        self._registered = False
        self._preflighted = False
        self._http: httpx.AsyncClient | None = None
        self._live: set[int] = set()  # connIndex values with a registered connection
        self._live_lock = threading.Lock()
        self._last_log_signal = 0.0  # monotonic time of the last connection log line (loop)
        self._ready_task: asyncio.Task[None] | None = None

    @property
    def live_connections(self) -> frozenset[int]:
        """The ``connIndex`` values cloudflared's log says are registered now."""
        with self._live_lock:
            return frozenset(self._live)

    def preflight(self, ctx: TunnelContext) -> None:
        """Raise TunnelError before the server starts if cloudflared cannot run here."""
        self._ctx = ctx
        self.binary = find_cloudflared(self.binary)
        if self.timeout is None:
            self.timeout = _timeout_from_env(30.0)
        self._preflighted = True

    def _begin(self, ctx: TunnelContext) -> str:
        """Preflight if the runner did not; refuse a second open. Returns the binary."""
        if self.process is not None or self._closed:
            raise TunnelError(f"This {self.mode} tunnel was already opened; create a new one.")
        if not self._preflighted:
            self.preflight(ctx)
        self._ctx = ctx
        assert self.binary is not None
        return self.binary

    def _on_line(self, line: str) -> None:  # reader thread
        event = parse_connection_line(line)
        if event is not None:
            with self._live_lock:
                if event.kind == "registered":
                    if event.conn_index is not None:
                        self._live.add(event.conn_index)
                elif event.conn_index is not None:
                    self._live.discard(event.conn_index)
                else:
                    self._live.clear()
                left = len(self._live)
            if event.kind == "registered":
                self._registered = True
            # In order, on the loop's thread, with the count as of this line.
            self._in_loop(lambda: self._on_connection_line(event, left, line))
        if self._log_url is None and (m := QUICK_URL_RE.search(line)):
            self._log_url = m.group(0)
        super()._on_line(line)

    def _on_connection_line(self, event: ConnectionEvent, left: int, line: str) -> None:  # loop
        self._last_log_signal = time.monotonic()
        if event.kind == "registered":
            self._link_restored(line)
        elif left == 0:
            self._link_lost(line)

    def _on_ready_count(self, count: int, code: int) -> None:  # loop
        """A /ready answer. Log lines are fresher (cloudflared logs before its connection
        tracker hears of a change), so /ready only decides when no line came for a poll
        interval: it catches losses and returns the log did not show."""
        if time.monotonic() - self._last_log_signal < self.ready_interval:
            return
        if count == 0 and self.status.state is TunnelState.CONNECTED:
            self._link_lost(
                f"cloudflared's metrics server answers /ready with HTTP {code}: "
                "readyConnections=0 (no edge connection)"
            )
        elif count > 0 and self.status.state in (TunnelState.RECONNECTING, TunnelState.DOWN):
            self._link_restored(f"cloudflared's /ready reports {count} edge connection(s)")

    async def _watch_ready(self, address: str) -> None:
        """Poll ``/ready`` every ``ready_interval`` s while the tunnel is open."""
        url = f"http://{address}/ready"
        async with httpx.AsyncClient(trust_env=False, timeout=2.0) as http:
            while True:
                await asyncio.sleep(self.ready_interval)
                if not self._tracking():
                    return
                try:
                    r = await http.get(url)
                except httpx.HTTPError:
                    continue  # a busy or restarting metrics server says nothing
                if r.status_code == 404:
                    logger.debug("cloudflared has no /ready; following its log lines only")
                    return
                if r.status_code not in (200, 503) or not self._tracking():
                    continue
                try:
                    count = int(r.json()["readyConnections"])
                except (ValueError, KeyError, TypeError, json.JSONDecodeError):
                    count = 1 if r.status_code == 200 else 0
                self._on_ready_count(count, r.status_code)

    def _start_watching(self) -> None:  # loop, right after open succeeded
        if self._metrics is not None and self.ready_interval > 0 and self._tracking():
            self._ready_task = asyncio.get_running_loop().create_task(
                self._watch_ready(self._metrics), name=f"cloudflared-ready-{self.mode}"
            )

    async def close(self) -> None:
        """Stop the /ready poller and the child (see :meth:`SubprocessTunnel.close`)."""
        task = self._ready_task
        await super().close()
        with contextlib.suppress(RuntimeError):  # no running loop
            if task is not None and task.get_loop() is asyncio.get_running_loop():
                await asyncio.wait([task], timeout=1.0)  # let it close its HTTP client

    def _stop_watching(self) -> None:
        super()._stop_watching()
        task, self._ready_task = self._ready_task, None
        if task is not None and not task.done():
            self._cancel_on_loop(task.get_loop(), task.cancel)

    async def _probe(self) -> tuple[str | None, bool]:
        """(public URL, edge connection ready?) from the metrics server, else the log."""
        url, ready = self._log_url, self._registered
        if self._metrics is None or self._http is None:
            return url, ready
        with contextlib.suppress(httpx.HTTPError, ValueError, AttributeError):
            r = await self._http.get(f"http://{self._metrics}/quicktunnel")
            if r.status_code == 200 and (host := r.json().get("hostname")):
                url = f"https://{host}"
        with contextlib.suppress(httpx.HTTPError):
            r = await self._http.get(f"http://{self._metrics}/ready")
            ready = ready or r.status_code == 200
        return url, ready

    def _not_ready(self, url: str | None, ready: bool, timeout: float) -> str:
        missing = [] if url else ["no public hostname (none from /quicktunnel or the log)"]
        if not ready:
            missing.append(f"no edge connection (/ready never 200, no {CONNECTED_LINE!r} line)")
        return (
            f"cloudflared did not connect within {timeout:g}s: {'; '.join(missing)}. It was "
            "stopped. Check this machine's outbound network (cloudflared needs UDP 7844 or TCP "
            f"443 to Cloudflare's edge), or raise {TIMEOUT_ENV_VAR}."
        )

    async def _run(
        self, ctx: TunnelContext, argv: list[str], env: Mapping[str, str], secrets: list[str]
    ) -> str:
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=2.0) as self._http:
                url = await self._start_and_wait(ctx, argv, env, secrets, INSTALL_HINT)
        finally:
            self._http = None
        self._start_watching()
        logger.info("Cloudflare %s tunnel connected: %s", self.mode, url)
        ctx.on_event(f"Cloudflare {self.mode} tunnel connected: {url}")
        return url


class QuickTunnel(_CloudflaredTunnel):
    """An anonymous ``https://<random>.trycloudflare.com`` tunnel (mode ``"quick"``).

    Runs ``cloudflared tunnel --no-autoupdate --config /dev/null --url <local> --metrics
    127.0.0.1:<free port>`` and takes the hostname from the metrics server's
    ``/quicktunnel`` (log-line regex as fallback) and readiness from ``/ready``. While it
    runs, its connection log lines and ``/ready`` (every ``ready_interval`` s, 0 = off) keep
    the status live: RECONNECTING with no edge connection, DOWN after ``down_after`` s
    (default 60), CONNECTED again when one registers.
    """

    mode = "quick"
    fatal_phrases = _RATE_LIMITED + _OUTAGE

    async def open(self, ctx: TunnelContext) -> str:
        """Start cloudflared and return the trycloudflare.com URL once connected."""
        binary = self._begin(ctx)
        self._metrics = f"127.0.0.1:{pick_free_port()}"
        argv = [binary, "tunnel", "--no-autoupdate", "--config", os.devnull]
        argv += ["--url", ctx.local_url, "--metrics", self._metrics]
        return await self._run(ctx, argv, _child_env(), secrets=[])

    def _explain(self, line: str) -> str:
        low = line.lower()
        if any(p in low for p in _RATE_LIMITED):
            return (
                "Cloudflare is rate-limiting quick tunnels from this network (HTTP 429 / "
                "'failed to unmarshal quick Tunnel'). Wait a few minutes and retry, or use "
                "tunnel_mode='synthtunnel' or 'named'."
            )
        if any(p in low for p in _OUTAGE):
            return (
                "cloudflared could not request a quick tunnel from api.trycloudflare.com "
                "('failed to request quick Tunnel'): this machine has no route/DNS to it or "
                "trycloudflare.com is having an outage. Check the network and retry, or use "
                "another tunnel_mode."
            )
        return super()._explain(line)


class NamedTunnel(_CloudflaredTunnel):
    """A named (managed) Cloudflare tunnel on a stable hostname (mode ``"named"``).

    Token and hostname come, in this order, from:

    * ``NamedTunnel(token=..., url=...)``, or env ``CLOUDFLARE_TUNNEL_TOKEN`` plus
      ``CLOUDFLARE_TUNNEL_URL`` (public URL or hostname): a tunnel you made yourself whose
      ingress already points at the app's local URL;
    * the Synth backend (``SYNTH_BACKEND_URL``, default ``https://api.usesynth.ai``;
      ``Authorization: Bearer $SYNTH_API_KEY``): ``GET /api/v1/tunnels/`` picks the tunnel
      for this local port, else ``POST /api/v1/tunnels/`` creates one; with
      ``force_new_tunnel`` ``POST /api/v1/tunnels/rotate`` replaces the org's tunnel.

    cloudflared gets the token through env ``TUNNEL_TOKEN``, never argv (so other users
    cannot see it in ``ps``), and is connected at its first ``Registered tunnel
    connection`` line (or metrics ``/ready``). Tokens appear only masked in logs and errors;
    "invalid token", "unauthorized" and "tunnel not found" from cloudflared are fatal.
    """

    mode = "named"
    fatal_phrases = _BAD_TOKEN

    def __init__(
        self,
        *,
        token: str | None = None,
        url: str | None = None,
        synth_api_key: str | None = None,
        backend_url: str | None = None,
        backend_timeout: float = 180.0,
        binary: str | None = None,
        timeout: float | None = None,
        stop_timeout: float = 5.0,
        down_after: float | None = None,
        ready_interval: float = DEFAULT_READY_INTERVAL,
    ) -> None:
        super().__init__(
            binary=binary,
            timeout=timeout,
            stop_timeout=stop_timeout,
            down_after=down_after,
            ready_interval=ready_interval,
        )
        self._token = token or os.environ.get("CLOUDFLARE_TUNNEL_TOKEN") or None
        self._given_url = url or os.environ.get("CLOUDFLARE_TUNNEL_URL") or None
        self._synth_key = synth_api_key or os.environ.get("SYNTH_API_KEY") or None
        self.backend_url = (
            backend_url or os.environ.get("SYNTH_BACKEND_URL") or DEFAULT_BACKEND_URL
        ).rstrip("/")
        self.backend_timeout = backend_timeout
        self._token_source = "CLOUDFLARE_TUNNEL_TOKEN"

    def preflight(self, ctx: TunnelContext) -> None:
        """Check the binary and that a token source is configured."""
        super().preflight(ctx)
        if bool(self._token) != bool(self._given_url):
            have, lack = (
                ("CLOUDFLARE_TUNNEL_TOKEN", "CLOUDFLARE_TUNNEL_URL")
                if self._token
                else ("CLOUDFLARE_TUNNEL_URL", "CLOUDFLARE_TUNNEL_TOKEN")
            )
            raise TunnelError(
                f"A named tunnel given directly needs both a token and its public URL: {have} "
                f"is set but {lack} is not (or pass token= and url=)."
            )
        if not self._token and not self._synth_key:
            raise TunnelError(
                "tunnel_mode='named' needs a tunnel token: set SYNTH_API_KEY (the Synth backend "
                "hands one out) or CLOUDFLARE_TUNNEL_TOKEN and CLOUDFLARE_TUNNEL_URL for your "
                "own Cloudflare tunnel."
            )

    async def open(self, ctx: TunnelContext) -> str:
        """Get a token (given or from the backend), run cloudflared, return the URL."""
        binary = self._begin(ctx)
        if self._token and self._given_url:
            token, url = self._token, _as_url(self._given_url)
        else:
            token, url = await self._from_backend(ctx)
            self._token_source = f"the Synth backend ({self.backend_url})"
        self._metrics = f"127.0.0.1:{pick_free_port()}"
        argv = [binary, "tunnel", "--no-autoupdate", "--config", os.devnull]
        argv += ["--metrics", self._metrics, "run"]
        self._log_url = url  # the URL is known up front; only the connection is awaited
        return await self._run(ctx, argv, _child_env(TUNNEL_TOKEN=token), secrets=[token])

    def _explain(self, line: str) -> str:
        return (
            f"Cloudflare rejected the named tunnel token from {self._token_source} "
            f"({mask_secret(self._token)}): {line.strip()!r}. It is invalid, revoked or for a "
            "deleted tunnel: pass force_new_tunnel=True to get a fresh one from the Synth "
            "backend, or set a current CLOUDFLARE_TUNNEL_TOKEN."
        )

    async def _from_backend(self, ctx: TunnelContext) -> tuple[str, str]:
        """(token, url) from ``/api/v1/tunnels/``: rotate, reuse for this port, or create."""
        assert self._synth_key is not None
        key = self._synth_key
        headers = {"Authorization": f"Bearer {key}", "X-API-Key": key}
        body: dict[str, Any] = {"local_port": ctx.local_port, "local_host": "127.0.0.1"}
        base = f"{self.backend_url}/api/v1/tunnels"
        async with httpx.AsyncClient(
            headers=headers, timeout=self.backend_timeout, follow_redirects=True
        ) as client:
            if ctx.force_new_tunnel:
                body["reason"] = "force_new_tunnel"
                data = await self._call(client, "POST", f"{base}/rotate", body)
            else:
                listed = await self._call(client, "GET", f"{base}/", None)
                items = listed.get("tunnels", []) if isinstance(listed, dict) else listed
                items = items if isinstance(items, list) else []
                data = next((t for t in items if _usable(t, ctx.local_port)), None)
                if data is None:
                    body["subdomain"] = f"task-app-{ctx.local_port}"
                    data = await self._call(client, "POST", f"{base}/", body)
        if not isinstance(data, dict) or not data.get("tunnel_token") or not data.get("hostname"):
            raise self._error(
                f"The Synth backend at {self.backend_url} answered without a tunnel_token and "
                "hostname. Retry with force_new_tunnel=True, or use tunnel_mode='quick'."
            )
        self._token = str(data["tunnel_token"])
        logger.info("Using managed tunnel %s from the Synth backend", data["hostname"])
        return self._token, _as_url(str(data["hostname"]))

    async def _call(
        self, client: httpx.AsyncClient, method: str, url: str, body: dict[str, Any] | None
    ) -> Any:
        key = mask_secret(self._synth_key)
        try:
            r = await client.request(method, url, json=body)
        except httpx.TimeoutException as exc:
            raise self._error(
                f"The Synth backend did not answer {method} {url} within "
                f"{self.backend_timeout:g}s (it waits for DNS when creating tunnels). Retry."
            ) from exc
        except httpx.HTTPError as exc:
            raise self._error(
                f"Could not reach the Synth backend for {method} {url}: {exc}. Check "
                "SYNTH_BACKEND_URL and the network."
            ) from exc
        if method == "GET" and r.status_code == 404:
            return []
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except (ValueError, AttributeError):
                detail = r.text
            hint = (
                f"Check SYNTH_API_KEY ({key})."
                if r.status_code in (401, 403)
                else "Retry, pass force_new_tunnel=True to replace the org's tunnel, or use "
                "tunnel_mode='quick'."
            )
            raise self._error(
                f"The Synth backend answered {r.status_code} to {method} {url}: "
                f"{str(detail)[:300]!r}. {hint}"
            )
        try:
            return r.json()
        except ValueError as exc:
            raise self._error(f"The Synth backend sent non-JSON for {method} {url}.") from exc


def _usable(item: Any, local_port: int) -> bool:
    """A listed backend tunnel with a token and hostname that routes to ``local_port``."""
    return (
        isinstance(item, dict)
        and bool(item.get("tunnel_token"))
        and bool(item.get("hostname"))
        and item.get("local_port") == local_port
    )


def _as_url(host_or_url: str) -> str:
    value = host_or_url.strip().rstrip("/")
    return value if value.startswith(("http://", "https://")) else f"https://{value}"
