"""``TaskAppView``: a live ipywidgets status panel for one InProcessTaskApp.

The view observes the app (``add_listener``) and its :class:`~taskapp_notebook.monitor.
HealthMonitor` (ticks, also from the monitor's watchdog thread while a cell blocks the
kernel loop) and re-renders by assigning ``HTML.value`` — which reaches the frontend from
threads and tasks (docs/kernel-facts.md #8). It never owns the app: Start / Stop / Restart call
``app.start()`` / ``app.stop()``, and their errors land in the panel's error line.

Displayed, it offers the widget view plus ``text/html`` and ``text/plain`` fallbacks, so a
saved notebook or a frontend without widgets still shows a readable summary. Every fact it
shows comes from :mod:`.presenter` (formatted and masked there); this module only lays them
out and wires the buttons.
"""

from __future__ import annotations

import html
import logging
import re
import threading
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
import traitlets

from ..monitor import HealthMonitor, monitor_for
from ..runner import AppState
from .presenter import AppFacts, error_text, format_uptime, log_lines, plural, present

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
# JupyterLab's theme variables, so the panel reads well in light and dark themes; the
# fallbacks are for frontends without them (and are what the light theme resolves to)
_LABEL = "var(--jp-ui-font-color2, #666)"
_LINK = "var(--jp-content-link-color, #1565c0)"
_ERROR = "var(--jp-error-color1, #c62828)"
_BORDER = "var(--jp-border-color2, #ccc)"
_THEME_VARIABLE = re.compile(r"var\(--[\w-]+, ([^)]+)\)")
_TRANSITIONS = (AppState.STARTING, AppState.STOPPING)
#: The old names of the presenter's formatters, for views built on this one's look.
_duration = format_uptime
_count = plural
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
                                             tooltip="Stop, then start the task app on its port")
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

    def facts(self) -> AppFacts:
        """What the panel shows now (from the one presenter)."""
        return present(self.app, action=self.action)

    def summary_text(self) -> str:
        """A plain-text summary (for frontends without widgets)."""
        return self.facts().text()

    def summary_html(self) -> str:
        """A static HTML card (no buttons) for saved notebooks."""
        facts = self.facts()
        card = (
            f'<div class="taskapp-view" style="border:1px solid {_BORDER};padding:4px 8px">'
            f"{self._header_html(facts)}{self._info_html(facts, static=True)}"
            f"{self._log_html()}</div>"
        )
        # plain colours: HTML sanitizers (JupyterLab's for untrusted output, nbviewer,
        # GitHub) drop a style that uses var(), and their pages don't define the variables
        return _THEME_VARIABLE.sub(r"\1", card)

    # ------------------------------------------------------------------ life

    def refresh(self) -> None:
        """Re-render every part from the app's current state (safe from any thread)."""
        with self._lock:
            app = self.app
            facts = self.facts()
            self.status = facts.status
            transition = bool(self.action) or app.state in _TRANSITIONS
            _set(self.start_button, "disabled",
                 transition or app.state is AppState.RUNNING)
            _set(self.stop_button, "disabled",
                 transition or app.state is not AppState.RUNNING)
            _set(self.restart_button, "disabled",
                 transition or app.state not in (AppState.RUNNING, AppState.FAILED))
            _set(self.header, "value", self._header_html(facts, live=True))
            _set(self.info, "value", self._info_html(facts))
            _set(self.error_line, "value", self._error_html())
            _set(self.log, "value", self._log_html())

    def log_lines(self) -> list[str]:
        """The lines the log pane shows: lifecycle events and requests, oldest first."""
        return log_lines(self.app, self.max_lines)

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

    def retire(self) -> None:
        """Close this view and its health monitor: its app was replaced (a re-run)."""
        monitor = self.monitor
        try:
            self.close()
            if monitor is not None:
                monitor.close()
        except Exception:  # noqa: BLE001 - cosmetic; never block the new start
            logger.debug("Closing the replaced view failed", exc_info=True)

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
            if action == "stop":
                self.app.stop()
            elif action == "start":
                self.app.start()
            else:
                self.app.restart()  # the runner's restart: same port, same key
        except Exception as exc:  # noqa: BLE001 - shown in the panel, never lost
            self.error = f"{action.capitalize()} failed: {error_text(self.app, exc)}"
            logger.info("TaskAppView %s of %r failed", action, self.app.name, exc_info=True)
        finally:
            self.action = ""
            self.refresh()

    # ------------------------------------------------------------------ rendering

    def _header_html(self, facts: AppFacts, *, live: bool = False) -> str:
        """Name, badge and detail; ``live`` (the widget's header) adds the "disconnected"
        badge that only shows once ipywidgets marks the view disconnected."""
        status = facts.status
        color = _COLORS.get(status, "#616161")
        # the badge says the status; the text beside it adds the detail
        detail = facts.detail
        if detail.startswith(status):
            detail = detail[len(status):].lstrip(" —")
        return (
            (_DISCONNECTED_STYLE if live else "")
            + f'<div class="taskapp-header"><b>{_esc(self.app.name)}</b> '
            f'<span class="taskapp-badge" data-status="{_esc(status)}" '
            f'style="background:{color};color:white;border-radius:8px;padding:1px 8px">'
            f"{_esc(status)}</span>{_DISCONNECTED_BADGE if live else ''} "
            f'<span class="taskapp-describe">{_esc(detail)}</span></div>'
        )

    def _info_html(self, facts: AppFacts, *, static: bool = False) -> str:
        """The detail rows; ``static`` (a saved notebook's card) leaves out the Copy button,
        whose script a notebook viewer would strip."""
        cells = []
        for label, value in facts.rows():
            if label == "public URL" and facts.url:
                url = _esc(facts.url)
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
                shown = _esc(value)
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


def _set(widget: Any, name: str, value: Any) -> None:
    if getattr(widget, name) != value:
        setattr(widget, name, value)


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)
