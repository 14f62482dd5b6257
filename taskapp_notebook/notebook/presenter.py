"""One presenter: every fact about an app that a view shows, formatted in one place.

The widget (live panel, static HTML card, text), ``%taskapp list``, ``%taskapp status`` and
``%taskapp logs`` all render from :func:`present` and :func:`log_lines`; none of them
formats an uptime, a health figure, a status line or an error on its own. Secrets are
masked here with :func:`taskapp_notebook.errors.scrub_secrets` (the one masking function),
so every view is masked by construction.

The facts come from the app (``InProcessTaskApp``: state, URLs, stats, events) and its
:class:`~taskapp_notebook.monitor.HealthMonitor` (live status, loop lag, health checks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import describe_error, mask_secret, scrub_secrets
from ..monitor import HealthMonitor, monitor_for
from ..runner import AppState
from ..tunnels.base import TunnelState

if TYPE_CHECKING:
    from ..runner import InProcessTaskApp

#: The badge for an app without a live monitor, by lifecycle state.
_STATE_STATUS = {
    AppState.STARTING: "starting",
    AppState.RUNNING: "running",
    AppState.STOPPING: "stopped",
    AppState.STOPPED: "stopped",
    AppState.FAILED: "failed",
}
#: What the detail line says while a button action is in progress.
ACTION_TEXT = {"start": "starting…", "stop": "stopping…", "restart": "restarting…"}
NONE = "—"


@dataclass(frozen=True)
class AppFacts:
    """What every view shows about one app, formatted and masked."""

    name: str
    #: The badge: one of ``monitor.STATUSES``.
    status: str
    #: One line for people: ``"running — health HTTP 200 in 1.2 ms"``, ``"kernel busy (4.1 s)
    #: — use --serve-on thread ..."``, ``"failed — HealthCheckError: ..."``.
    detail: str
    state: str
    url: str | None
    port: int
    tunnel_mode: str
    tunnel: str
    local: str
    health: str
    uptime: str
    requests: str
    api_key: str
    worker_token: str | None

    def rows(self) -> list[tuple[str, str]]:
        """The labelled rows of the widget, the HTML card and the text summary."""
        rows = [
            ("public URL", self.url or NONE),
            ("tunnel", self.tunnel),
            ("local", self.local),
            ("health", self.health),
            ("uptime", self.uptime),
            ("requests", self.requests),
            ("api key", self.api_key),
        ]
        if self.worker_token:
            rows.append(("worker token", self.worker_token))
        return rows

    def text(self) -> str:
        """The plain-text summary (frontends without widgets, ``%taskapp status``)."""
        return "\n".join([f"{self.name}: {self.detail}",
                          *(f"  {label}: {value}" for label, value in self.rows())])


def present(app: InProcessTaskApp, *, action: str = "") -> AppFacts:
    """The facts of ``app`` now (``action``: a widget button's action in progress)."""
    monitor = monitor_for(app)
    status = status_of(app, monitor)
    return AppFacts(
        name=app.name,
        status=status,
        detail=scrub_secrets(_detail(app, monitor, status, action), app.secrets()),
        state=str(app.state),
        url=app.url,
        port=app.port,
        tunnel_mode=app.tunnel_mode,
        tunnel=scrub_secrets(_tunnel(app), app.secrets()),
        local=f"{app.local_url} (port {app.port}, serve_on "
              f"{app.serve_on or app.serve_on_requested})",
        health=_health(app, monitor),
        uptime=format_uptime(app.uptime),
        requests=f"{plural(app.stats.count, 'request')} · {plural(app.stats.errors, 'error')}",
        api_key=mask_secret(app.api_key),
        worker_token=mask_secret(app.task_app_worker_token) if app.task_app_worker_token
        else None,
    )


def status_of(app: InProcessTaskApp, monitor: HealthMonitor | None = None) -> str:
    """The badge: the live monitor's status, else the app's lifecycle state."""
    monitor = monitor if monitor is not None else monitor_for(app)
    if monitor is not None and not monitor.closed:
        return monitor.status
    return _STATE_STATUS[app.state]


def format_uptime(seconds: float | None) -> str:
    """``'0.4s'``, ``'42s'``, ``'3m 05s'``, ``'2h 07m 10s'``; ``'—'`` for None."""
    if seconds is None:
        return NONE
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s" if total else f"{seconds:.1f}s"


def error_text(app: InProcessTaskApp, exc: BaseException) -> str:
    """An error as views show it: ``'Type: first line'`` (the rest is in the app's log),
    secrets masked."""
    return scrub_secrets(describe_error(exc), app.secrets())


def log_lines(app: InProcessTaskApp, limit: int) -> list[str]:
    """The last ``limit`` lines of lifecycle events and requests, oldest first, masked."""
    lines = list(app.timed_events)
    lines += [(record.at, record.line()) for record in list(app.stats.recent)]
    lines.sort(key=lambda item: item[0])
    secrets = app.secrets()
    return [scrub_secrets(line, secrets) for _, line in lines[-limit:]]


def _detail(app: InProcessTaskApp, monitor: HealthMonitor | None, status: str,
            action: str) -> str:
    if action:
        return ACTION_TEXT.get(action, action)
    if app.state is AppState.STOPPING:
        return "stopping…"
    if status == "failed":
        return f"failed — {app.error}" if app.error else "failed"
    if monitor is None or monitor.closed:
        return status
    tunnel_status = app.tunnel.status if app.tunnel is not None else None
    if status == "kernel busy":
        lag = monitor.lag_seconds
        if app.serve_on == "thread":
            return f"kernel busy ({lag:.1f} s) — a request handler is blocking the server's thread"
        return f"kernel busy ({lag:.1f} s) — use --serve-on thread for blocking work"
    if status == "reconnecting" and tunnel_status is not None:
        text = f"reconnecting — tunnel {tunnel_status.state}"
        return text + (f": {tunnel_status.last_error}" if tunnel_status.last_error else "")
    if status == "unhealthy":
        if tunnel_status is not None and tunnel_status.state is TunnelState.DOWN:
            return f"unhealthy — tunnel down: {tunnel_status.last_error or 'no detail'}"
        last = monitor.last.describe() if monitor.last else "no answer"
        return f"unhealthy — GET /health: {last} ({monitor.failures} failed in a row)"
    if status == "running" and monitor.last is not None and monitor.last.ok:
        return f"running — health {monitor.last.describe()} in {monitor.last.seconds * 1000:.1f} ms"
    return status


def _tunnel(app: InProcessTaskApp) -> str:
    text = app.tunnel_mode
    tunnel = app.tunnel
    if tunnel is not None and app.state is AppState.RUNNING:
        text += f" ({tunnel.status.state})"
        if tunnel.status.last_error:
            text += f" — last error: {tunnel.status.last_error}"
    return text


def _health(app: InProcessTaskApp, monitor: HealthMonitor | None) -> str:
    health = monitor.last if monitor is not None and monitor.last else app.health
    if health is None or app.state is not AppState.RUNNING:
        return NONE
    ago = max(0.0, time.time() - health.at)
    return f"{health.describe()} · {health.seconds * 1000:.1f} ms · {format_uptime(ago)} ago"


def plural(n: int, noun: str) -> str:
    """``'1 request'``, ``'3 requests'``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
