"""What ``%taskapp list`` / ``status`` / ``logs`` display: HTML with a plain-text fallback.

Everything shown comes from ``InProcessTaskApp.snapshot()`` (secrets already masked), the
app's event log and request stats, and — when the monitor module exists — its live status.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..runner import InProcessTaskApp

logger = logging.getLogger(__name__)

COLUMNS = ("name", "state", "URL", "port", "tunnel", "health", "uptime", "requests")


def monitor_of(app: InProcessTaskApp) -> Any | None:
    """The app's HealthMonitor if the monitor module exists and one is attached."""
    try:
        from ..monitor import monitor_for
    except ImportError:
        return None
    try:
        return monitor_for(app)
    except Exception:  # noqa: BLE001 - observing must never fail the magic
        logger.debug("monitor_for(%r) failed", app, exc_info=True)
        return None


def health_text(app: InProcessTaskApp) -> str:
    """The live monitor status, else the start-time health check, else '-'."""
    monitor = monitor_of(app)
    if monitor is not None:
        return str(monitor.status)
    if app.health is not None and app.is_running:
        return app.health.describe()
    return "-"


def format_duration(seconds: float | None) -> str:
    """``'42s'``, ``'3m05s'``, ``'2h07m'``; ``'-'`` for None."""
    if seconds is None:
        return "-"
    total = int(seconds)
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    return f"{total // 3600}h{total % 3600 // 60:02d}m"


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return (f'<table class="taskapp-table"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


class AppTable:
    """The ``%taskapp list`` table."""

    def __init__(self, rows: Sequence[Sequence[str]]) -> None:
        self.rows = [tuple(row) for row in rows]

    @classmethod
    def from_apps(cls, apps: Sequence[InProcessTaskApp]) -> AppTable:
        rows = []
        for app in apps:
            snap = app.snapshot()
            rows.append((
                str(snap["name"]),
                str(snap["state"]),
                str(snap["url"] or "-"),
                str(snap["port"]),
                str(snap["tunnel_mode"]),
                health_text(app),
                format_duration(snap["uptime"]),
                str(snap["requests"]),
            ))
        return cls(rows)

    def text(self) -> str:
        if not self.rows:
            return "No task apps are running."
        return _text_table(COLUMNS, self.rows)

    def _repr_html_(self) -> str:
        if not self.rows:
            return "<p>No task apps are running.</p>"
        return _html_table(COLUMNS, self.rows)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text())

    def __repr__(self) -> str:
        return self.text()


class StatusView:
    """``%taskapp status``: one app's snapshot (secrets masked) and live health."""

    def __init__(self, app: InProcessTaskApp) -> None:
        snap = app.snapshot()
        snap["uptime"] = format_duration(snap["uptime"])
        monitor = monitor_of(app)
        if monitor is not None:
            snap["monitor"] = _describe(monitor)
        self.items = [(key, "-" if value is None else str(value)) for key, value in snap.items()]

    def text(self) -> str:
        width = max(len(key) for key, _ in self.items)
        return "\n".join(f"{key.ljust(width)}  {value}" for key, value in self.items)

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
            for k, v in self.items
        )
        return f'<table class="taskapp-status">{rows}</table>'

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text())

    def __repr__(self) -> str:
        return self.text()


def _describe(monitor: Any) -> str:
    try:
        return str(monitor.describe())
    except Exception:  # noqa: BLE001
        return str(getattr(monitor, "status", "?"))


def log_text(app: InProcessTaskApp, lines: int) -> str:
    """The app's recent events and requests, newest last."""
    events = list(app.events)[-lines:]
    requests = list(app.stats.recent)
    shown = requests[-lines:]
    parts = [f"== {app.name}: events (last {len(events)} of {len(app.events)}) =="]
    parts.extend(events or ["(none)"])
    parts.append(f"== {app.name}: requests (last {len(shown)} of {app.stats.count}) ==")
    parts.extend(record.line() for record in shown)
    if not shown:
        parts.append("(none)")
    return "\n".join(parts)
