"""What ``%taskapp list`` / ``status`` / ``logs`` display: HTML with a plain-text fallback.

Every value comes from :mod:`.presenter` (the widget renders from it too), so a status,
an uptime or a health figure reads the same in the table, the status view, the log and
the widget; secrets are already masked there.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .presenter import log_lines, present

if TYPE_CHECKING:
    from ..runner import InProcessTaskApp

COLUMNS = ("name", "state", "URL", "port", "tunnel", "health", "uptime", "requests")


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
            facts = present(app)
            rows.append((facts.name, facts.status, facts.url or "-", str(facts.port),
                         facts.tunnel, facts.health, facts.uptime, facts.requests))
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
    """``%taskapp status``: one app in detail, as the widget's text summary shows it."""

    def __init__(self, app: InProcessTaskApp) -> None:
        facts = present(app)
        self.title = f"{facts.name}: {facts.detail}"
        self.items = [("state", facts.state), *facts.rows()]

    def text(self) -> str:
        width = max(len(key) for key, _ in self.items)
        return "\n".join([self.title, *(f"  {key.ljust(width)}  {value}"
                                        for key, value in self.items)])

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
            for k, v in self.items
        )
        return (f"<p><b>{html.escape(self.title)}</b></p>"
                f'<table class="taskapp-status">{rows}</table>')

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text())

    def __repr__(self) -> str:
        return self.text()


def log_text(app: InProcessTaskApp, lines: int) -> str:
    """``%taskapp logs``: the last ``lines`` events and requests, oldest first (the widget's
    log pane shows the same lines)."""
    shown = log_lines(app, lines)
    total = len(app.events) + len(app.stats.recent)
    header = f"== {app.name}: last {len(shown)} of {total} lines (events and requests) =="
    return "\n".join([header, *(shown or ["(none)"])])
