"""``TaskAppView``: a live ipywidgets status panel for one InProcessTaskApp.

The view observes the app (``add_listener``) and its :class:`~taskapp_notebook.monitor.
HealthMonitor` (ticks, also from the monitor's watchdog thread while a cell blocks the
kernel loop) and re-renders by assigning ``HTML.value`` — which reaches the frontend from
threads and tasks (kernel-facts.md #8). It never owns the app: Start / Stop / Restart call
``app.start()`` / ``app.stop()``, and their errors land in the panel's error line.

Displayed, it offers the widget view plus ``text/html`` and ``text/plain`` fallbacks, so a
saved notebook or a frontend without widgets still shows a readable summary. Secrets are
masked everywhere (``redact``).
"""

from __future__ import annotations

import html
import logging
import re
import threading
import time
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
import traitlets

from ..errors import mask_secret
from ..monitor import HealthMonitor, monitor_for, redact
from ..runner import AppState

if TYPE_CHECKING:
    from ..runner import InProcessTaskApp

logger = logging.getLogger(__name__)

_COLORS = {
    "starting": "#ef6c00",
    "running": "#2e7d32",
    "kernel busy": "#b26a00",
    "unhealthy": "#c62828",
    "reconnecting": "#ef6c00",
    "stopped": "#616161",
    "failed": "#c62828",
}
_STATE_STATUS = {
    AppState.STARTING: "starting",
    AppState.RUNNING: "running",
    AppState.STOPPING: "stopped",
    AppState.STOPPED: "stopped",
    AppState.FAILED: "failed",
}
# JupyterLab's theme variables, so the panel reads well in light and dark themes; the
# fallbacks are for frontends without them (and are what the light theme resolves to)
_LABEL = "var(--jp-ui-font-color2, #666)"
_LINK = "var(--jp-content-link-color, #1565c0)"
_ERROR = "var(--jp-error-color1, #c62828)"
_BORDER = "var(--jp-border-color2, #ccc)"
_THEME_VARIABLE = re.compile(r"var\(--[\w-]+, ([^)]+)\)")
_TRANSITIONS = (AppState.STARTING, AppState.STOPPING)
_ACTION_TEXT = {"start": "starting…", "stop": "stopping…", "restart": "restarting…"}
#: Once the kernel is gone the view can't be told anything; ipywidgets then marks its views
#: with ``jupyter-widgets-disconnected``. This rule makes the badge say so instead of showing
#: the last state it was sent (e.g. "running" after a kernel restart).
_DISCONNECTED_STYLE = (
    "<style>"
    ".jupyter-widgets-disconnected .taskapp-badge,"
    ".jupyter-widgets-disconnected .taskapp-describe{display:none!important}"
    ".jupyter-widgets-disconnected .taskapp-gone{display:inline!important}"
    "</style>"
)
_DISCONNECTED_BADGE = (
    '<span class="taskapp-gone" style="display:none;background:#616161;color:white;'
    'border-radius:8px;padding:1px 8px">disconnected (kernel gone)</span>'
)


class TaskAppView(traitlets.HasTraits):
    """Status panel of ``app``: badge, URL, health, counts, buttons, recent log lines."""

    #: Badge value, one of ``monitor.STATUSES``.
    status = traitlets.Unicode("stopped")
    #: The button action in progress ("start", "stop", "restart") or "".
    action = traitlets.Unicode("")
    #: The last button error, or "".
    error = traitlets.Unicode("")
    #: How many lines the log pane keeps.
    max_lines = traitlets.Int(40)

    def __init__(
        self,
        app: InProcessTaskApp,
        *,
        max_lines: int = 40,
        interval: float | None = None,
        monitor: bool = True,
    ) -> None:
        super().__init__(max_lines=max_lines)
        self.app = app
        self._lock = threading.RLock()
        self._secrets: set[str] = set()
        self._watch_health = monitor
        self._interval = interval
        self.monitor: HealthMonitor | None = None
        self.header = widgets.HTML()
        self.info = widgets.HTML()
        self.start_button = widgets.Button(description="Start", icon="play",
                                           tooltip="Start the task app")
        self.stop_button = widgets.Button(description="Stop", icon="stop",
                                          tooltip="Stop the task app")
        self.restart_button = widgets.Button(description="Restart", icon="refresh",
                                             tooltip="Stop, then start the task app")
        for button, action in ((self.start_button, "start"), (self.stop_button, "stop"),
                               (self.restart_button, "restart")):
            button.on_click(self._handler(action))
            button.add_class(f"taskapp-{action}")
        self.error_line = widgets.HTML()
        self.log = widgets.HTML()
        self.widget = widgets.VBox(
            [
                self.header,
                self.info,
                widgets.HBox([self.start_button, self.stop_button, self.restart_button]),
                self.error_line,
                self.log,
            ],
            layout=widgets.Layout(border=f"1px solid {_BORDER}", padding="4px 8px", width="auto"),
        )
        self.widget.add_class("taskapp-view")
        app.add_listener(self._on_app_change)
        self._ensure_monitor()
        self.refresh()

    # ------------------------------------------------------------------ display

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None,
                          **kwargs: Any) -> dict[str, Any]:
        self.refresh()
        bundle: dict[str, Any] = dict(self.widget._repr_mimebundle_(**kwargs) or {})
        bundle["text/plain"] = self.summary_text()
        bundle["text/html"] = self.summary_html()
        return bundle

    def _repr_html_(self) -> str:
        return self.summary_html()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text("TaskAppView(...)" if cycle else self.summary_text())

    def summary_text(self) -> str:
        """A plain-text summary (for frontends without widgets)."""
        app = self.app
        rows = [f"{app.name}: {self._describe()}"]
        rows += [f"  {label}: {value}" for label, value in self._rows()]
        return self._redact("\n".join(rows))

    def summary_html(self) -> str:
        """A static HTML card (no buttons) for saved notebooks."""
        card = (
            f'<div class="taskapp-view" style="border:1px solid {_BORDER};padding:4px 8px">'
            f"{self._header_html()}{self._info_html(static=True)}{self._log_html()}</div>"
        )
        # plain colours: HTML sanitizers (JupyterLab's for untrusted output, nbviewer,
        # GitHub) drop a style that uses var(), and their pages don't define the variables
        return _THEME_VARIABLE.sub(r"\1", card)

    # ------------------------------------------------------------------ life

    def refresh(self) -> None:
        """Re-render every part from the app's current state (safe from any thread)."""
        with self._lock:
            app = self.app
            for secret in (app.api_key, app.task_app_worker_token):
                if secret:
                    self._secrets.add(secret)
            self.status = self._status()
            transition = bool(self.action) or app.state in _TRANSITIONS
            _set(self.start_button, "disabled",
                 transition or app.state is AppState.RUNNING)
            _set(self.stop_button, "disabled",
                 transition or app.state is not AppState.RUNNING)
            _set(self.restart_button, "disabled",
                 transition or app.state not in (AppState.RUNNING, AppState.FAILED))
            _set(self.header, "value", self._header_html(live=True))
            _set(self.info, "value", self._info_html())
            _set(self.error_line, "value", self._error_html())
            _set(self.log, "value", self._log_html())

    def log_lines(self) -> list[str]:
        """The lines the log pane shows: lifecycle events and requests, oldest first."""
        app = self.app
        lines = list(app.timed_events)
        lines += [(record.at, record.line()) for record in list(app.stats.recent)]
        lines.sort(key=lambda item: item[0])
        return [self._redact(line) for _, line in lines[-self.max_lines:]]

    def close(self) -> None:
        """Stop observing and close the widgets (the app and its monitor keep running)."""
        self.app.remove_listener(self._on_app_change)
        if self.monitor is not None:
            self.monitor.remove_listener(self._on_monitor_tick)
        for child in (self.header, self.info, self.start_button, self.stop_button,
                      self.restart_button, self.error_line, self.log):
            child.close()
        for box in self.widget.children:
            box.close()
        self.widget.close()

    # ------------------------------------------------------------------ observers

    def _on_app_change(self, app: InProcessTaskApp) -> None:
        if app.state is AppState.RUNNING:
            self._ensure_monitor()
        self.refresh()

    def _on_monitor_tick(self, monitor: HealthMonitor) -> None:
        self.refresh()

    def _ensure_monitor(self) -> None:
        if not self._watch_health:
            return
        current = monitor_for(self.app)
        if current is None:
            current = HealthMonitor.attach(self.app, self._interval)
        if current is not self.monitor:
            if self.monitor is not None:
                self.monitor.remove_listener(self._on_monitor_tick)
            self.monitor = current
            current.add_listener(self._on_monitor_tick)

    # ------------------------------------------------------------------ buttons

    def _handler(self, action: str) -> Any:
        def on_click(_button: Any) -> None:
            self.run_action(action)

        return on_click

    def run_action(self, action: str) -> None:
        """Do what a button does: ``"start"``, ``"stop"`` or ``"restart"``."""
        if action not in ("start", "stop", "restart"):
            raise ValueError(f"action must be 'start', 'stop' or 'restart', got {action!r}.")
        with self._lock:
            if self.action:
                return
            self.action = action
            self.error = ""
        self.refresh()
        try:
            if action in ("stop", "restart"):
                self.app.stop()
            if action in ("start", "restart"):
                self.app.start()
        except Exception as exc:  # noqa: BLE001 - shown in the panel, never lost
            self.error = self._redact(f"{action.capitalize()} failed: {_describe(exc)}")
            logger.info("TaskAppView %s of %r failed", action, self.app.name, exc_info=True)
        finally:
            self.action = ""
            self.refresh()

    # ------------------------------------------------------------------ rendering

    def _status(self) -> str:
        if self.monitor is not None and not self.monitor.closed:
            return self.monitor.status
        return _STATE_STATUS[self.app.state]

    def _describe(self) -> str:
        app = self.app
        if self.action:
            return _ACTION_TEXT.get(self.action, self.action)
        if app.state is AppState.STOPPING:
            return "stopping…"
        if self.monitor is not None and not self.monitor.closed:
            return self.monitor.describe()
        if app.state is AppState.FAILED and app.error:
            return f"failed — {app.error}"
        return self._status()

    def _rows(self) -> list[tuple[str, str]]:
        app = self.app
        monitor = self.monitor
        tunnel = app.tunnel
        tunnel_text = app.tunnel_mode
        if tunnel is not None and app.state is AppState.RUNNING:
            tunnel_text += f" ({tunnel.status.state})"
            if tunnel.status.last_error:
                tunnel_text += f" — last error: {tunnel.status.last_error}"
        health = monitor.last if monitor is not None and monitor.last else app.health
        health_text = "—"
        if health is not None and app.state is AppState.RUNNING:
            ago = max(0.0, time.time() - health.at)
            health_text = (f"{health.describe()} · {health.seconds * 1000:.1f} ms · "
                           f"{_duration(ago)} ago")
        uptime = app.uptime
        requests = f"{_count(app.stats.count, 'request')} · {_count(app.stats.errors, 'error')}"
        rows = [
            ("public URL", app.url or "—"),
            ("tunnel", tunnel_text),
            ("local", f"{app.local_url} (port {app.port}, serve_on "
                      f"{app.serve_on or app.serve_on_requested})"),
            ("health", health_text),
            ("uptime", _duration(uptime) if uptime is not None else "—"),
            ("requests", requests),
            ("api key", mask_secret(app.api_key)),
        ]
        if app.task_app_worker_token:
            rows.append(("worker token", mask_secret(app.task_app_worker_token)))
        return rows

    def _header_html(self, *, live: bool = False) -> str:
        """Name, badge and detail; ``live`` (the widget's header) adds the "disconnected"
        badge that only shows once ipywidgets marks the view disconnected."""
        status = self._status()
        color = _COLORS.get(status, "#616161")
        # the badge says the status; the text beside it adds the detail
        detail = self._describe()
        if detail.startswith(status):
            detail = detail[len(status):].lstrip(" —")
        return (
            (_DISCONNECTED_STYLE if live else "")
            + f'<div class="taskapp-header"><b>{_esc(self.app.name)}</b> '
            f'<span class="taskapp-badge" data-status="{_esc(status)}" '
            f'style="background:{color};color:white;border-radius:8px;padding:1px 8px">'
            f"{_esc(status)}</span>{_DISCONNECTED_BADGE if live else ''} "
            f'<span class="taskapp-describe">{_esc(self._redact(detail))}</span></div>'
        )

    def _info_html(self, *, static: bool = False) -> str:
        """The detail rows; ``static`` (a saved notebook's card) leaves out the Copy button,
        whose script a notebook viewer would strip."""
        cells = []
        for label, value in self._rows():
            if label == "public URL" and self.app.url:
                url = _esc(self.app.url)
                shown = (
                    f'<a class="taskapp-url" href="{url}" target="_blank" rel="noopener" '
                    f'style="color:{_LINK};text-decoration:underline">{url}</a>'
                )
                if not static:
                    shown += (
                        f' <button class="taskapp-copy" data-url="{url}" title="Copy the URL" '
                        'onclick="navigator.clipboard.writeText(this.dataset.url)">Copy</button>'
                    )
            else:
                shown = _esc(self._redact(value))
            cells.append(
                f'<tr><td style="padding:0 8px 0 0;color:{_LABEL};text-align:left">'
                f'{_esc(label)}</td><td style="padding:0;text-align:left">{shown}</td></tr>'
            )
        table = '<table class="taskapp-info" style="border-collapse:collapse">'
        return f"{table}{''.join(cells)}</table>"

    def _error_html(self) -> str:
        if not self.error:
            return ""
        text = _esc(self.error).replace("\n", "<br>")
        return f'<div class="taskapp-error" style="color:{_ERROR}">{text}</div>'

    def _log_html(self) -> str:
        lines = self.log_lines()
        body = _esc("\n".join(lines)) if lines else "(no events yet)"
        return (
            '<pre class="taskapp-log" style="max-height:12em;overflow:auto;margin:4px 0;'
            f'font-size:11px;line-height:1.3">{body}</pre>'
        )

    def _redact(self, text: str) -> str:
        text = redact(self.app, text)
        for secret in self._secrets:
            if len(secret) >= 6 and secret in text:
                text = text.replace(secret, mask_secret(secret))
        return text


def _set(widget: Any, name: str, value: Any) -> None:
    if getattr(widget, name) != value:
        setattr(widget, name, value)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


def _duration(seconds: float) -> str:
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s" if total else f"{seconds:.1f}s"


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
