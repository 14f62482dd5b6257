"""``RunView``: the live notebook view of an optimisation run (local GEPA or a hosted job).

It observes a :class:`~taskapp_notebook.progress.RunProgress` and never owns the run: the
Stop / Cancel button calls the producer's ``on_stop``. Producers update the progress from
any thread; the view only stores the latest snapshot there and redraws on a short-lived
timer thread at most :attr:`RunView.min_interval` apart (the final state is drawn at once,
on the producer's thread), by assigning ``HTML.value``, which reaches the frontend from
threads while the kernel is idle (``tests/test_run_view_kernel.py`` shows it in a real
kernel). While the run is under way a tick each second keeps the elapsed time current. A
render error is logged and shown, never raised into the producer.

Displayed, it shows the widget plus a ``text/html`` card and ``text/plain``. IPython
displays it with a display id; when the run ends the output is updated once, so a saved
notebook (or any frontend without widgets) shows the final figures and plot.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from ..progress import ProgressSnapshot, RunProgress
from .run_render import (
    candidates_html,
    diff_html,
    header_html,
    message_html,
    plot_html,
    render_run_html,
    render_run_text,
    stats_html,
)
from .run_style import BORDER

__all__ = ["RunView", "render_run_html", "render_run_text"]

logger = logging.getLogger(__name__)

#: Once the kernel is gone ipywidgets marks the view ``jupyter-widgets-disconnected``; the
#: badge then says so instead of the last state it was sent.
_DISCONNECTED = (
    "<style>.jupyter-widgets-disconnected .taskapp-run-badge{display:none!important}"
    ".jupyter-widgets-disconnected .taskapp-gone{display:inline!important}</style>"
    '<span class="taskapp-gone" style="display:none;background:#616161;color:#ffffff;'
    'border-radius:8px;padding:1px 8px;font-size:12px">disconnected (kernel gone)</span>'
)


class RunView:
    """Live view of ``progress``; ``on_stop`` (if given) is what the Stop button calls.

    ``on_stop`` runs on a thread of its own, so a slow stop never blocks the kernel; if it
    returns an awaitable, that is awaited on the event loop the view was created on (the
    kernel's), or on a fresh loop when there was none. ``stop_label`` names the button
    (``"Cancel"`` for a hosted job).
    """

    #: Least time between two redraws, in seconds (a tick also refreshes elapsed time).
    min_interval = 0.2
    tick_interval = 1.0

    def __init__(self, progress: RunProgress, *, on_stop: Callable[[], object] | None = None,
                 stop_label: str = "Stop") -> None:
        self.progress = progress
        self.on_stop = on_stop
        self.stop_label = stop_label
        #: The stop button was clicked (the run may still be finishing its iteration).
        self.stop_requested = False
        #: The last stop or render error, shown in red under the run's message.
        self.error = ""
        #: How many redraws happened (for tests and benchmarks).
        self.renders = 0
        self._lock = threading.Lock()
        self._render_lock = threading.RLock()  # one redraw at a time, in order
        self._closed = False
        self._pending: ProgressSnapshot | None = None
        self._timer: threading.Timer | None = None
        self._generation = 0
        self._ticking = False  # the scheduled redraw is only a tick of the elapsed time
        self._redrawing = False
        self._last_render = 0.0
        self._final_published = False
        self._handles: list[Any] = []
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

        self.header = widgets.HTML()
        self.stop_button = widgets.Button(description=stop_label, icon="stop",
                                          tooltip=f"{stop_label} the run")
        self.stop_button.add_class("taskapp-run-stop")
        self.stop_button.on_click(lambda _button: self.stop())
        self.stats = widgets.HTML()
        self.plot = widgets.HTML()
        self.candidates = widgets.HTML()
        self.diff = widgets.HTML()
        self.message = widgets.HTML()
        top = widgets.HBox([self.header, self.stop_button],
                           layout=widgets.Layout(justify_content="space-between",
                                                 align_items="center"))
        middle = widgets.HBox([self.plot, self.candidates],
                              layout=widgets.Layout(flex_flow="row wrap",
                                                    grid_gap="8px 28px"))
        self.widget = widgets.VBox(
            [top, self.stats, middle, self.diff, self.message],
            layout=widgets.Layout(border=f"1px solid {BORDER}", padding="6px 12px",
                                  width="auto"),
        )
        self.widget.add_class("taskapp-run-view")
        self._boxes = (top, middle)
        self._render()
        self._unsubscribe = progress.subscribe(self._on_progress)

    def __repr__(self) -> str:
        return f"<RunView of {self.progress!r}>"

    # ------------------------------------------------------------------ display

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None,
                          **kwargs: Any) -> dict[str, Any]:
        snap = self.progress.snapshot()
        bundle: dict[str, Any] = dict(self.widget._repr_mimebundle_(**kwargs) or {})
        bundle["text/plain"] = render_run_text(snap, state=self._state(snap))
        bundle["text/html"] = render_run_html(snap, state=self._state(snap), error=self.error)
        return bundle

    def _ipython_display_(self) -> None:
        """Display with a display id, so the output can be updated to the final card."""
        from IPython import display as ipython_display

        display: Callable[..., Any] = ipython_display.display
        shown_final = self.progress.snapshot().is_final
        handle = display(self._repr_mimebundle_(), raw=True, display_id=True)
        if handle is None:
            return
        with self._lock:
            self._handles.append(handle)
        if not shown_final and self.progress.snapshot().is_final:
            # the run ended while this output was being sent: a redraw may have published
            # the final card before this handle was known
            with contextlib.suppress(Exception):
                handle.update(self._repr_mimebundle_(), raw=True)
        if shown_final or self.progress.snapshot().is_final:
            self._final_published = True

    def _repr_html_(self) -> str:
        snap = self.progress.snapshot()
        return render_run_html(snap, state=self._state(snap), error=self.error)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        snap = self.progress.snapshot()
        p.text("RunView(...)" if cycle else render_run_text(snap, state=self._state(snap)))

    # ------------------------------------------------------------------ life

    def refresh(self) -> None:
        """Redraw now from the current snapshot (safe from any thread)."""
        self._render()

    def close(self) -> None:
        """Stop observing the run and close the widgets (the run itself goes on)."""
        with self._lock:
            self._closed = True
            timer, self._timer = self._timer, None
        self._unsubscribe()
        if timer is not None:
            timer.cancel()
        for child in (self.header, self.stop_button, self.stats, self.plot, self.candidates,
                      self.diff, self.message, *self._boxes, self.widget):
            for part in (getattr(child, "layout", None), getattr(child, "style", None)):
                if isinstance(part, widgets.Widget):
                    part.close()
            child.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        """What the button does: call ``on_stop`` once, on a thread of its own."""
        with self._lock:
            snap = self.progress.snapshot()
            if self.on_stop is None or self.stop_requested or snap.is_final or self._closed:
                return
            self.stop_requested = True
            self.error = ""
        self._render()
        threading.Thread(target=self._call_on_stop, name="taskapp-run-view-stop",
                         daemon=True).start()

    def _call_on_stop(self) -> None:
        assert self.on_stop is not None
        try:
            result = self.on_stop()
            if inspect.isawaitable(result):
                self._wait(result)
        except Exception as exc:  # noqa: BLE001 - shown in the view, never lost
            logger.warning("%s of run %r failed", self.stop_label, self.progress.snapshot().name,
                           exc_info=True)
            with self._lock:
                self.stop_requested = False
                self.error = f"{self.stop_label} failed: {type(exc).__name__}: {exc}"
            self._render()

    def _wait(self, awaitable: Any) -> None:
        async def wrapped() -> object:
            return await awaitable

        loop = self._loop
        if loop is not None and loop.is_running() and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(wrapped(), loop).result()
        else:
            asyncio.run(wrapped())

    # ------------------------------------------------------------------ redraws

    def _on_progress(self, snap: ProgressSnapshot) -> None:
        """Subscriber (producer's thread): keep the snapshot, schedule a redraw. O(1) —
        except for the final state, drawn at once on the producer's thread, so the output
        has its final card before the producer hands out the run's result (a cell that
        awaits the run, e.g. under nbclient, gets the update before it ends)."""
        with self._lock:
            if self._closed:
                return
            if snap.is_final:
                self._pending = None
                self._generation += 1  # a scheduled redraw has nothing left to do
                timer, self._timer = self._timer, None
                if timer is not None:
                    timer.cancel()
        if snap.is_final:
            self._render()
            return
        with self._lock:
            if self._closed:
                return
            self._pending = snap
            if self._timer is not None and (self._redrawing or not self._ticking):
                return  # the scheduled or running redraw picks this snapshot up
            delay = max(0.0, self._last_render + self.min_interval - time.monotonic())
            self._schedule(delay, tick=False)

    def _schedule(self, delay: float, *, tick: bool) -> None:
        """Replace the scheduled redraw (caller holds the lock)."""
        if self._timer is not None:
            self._timer.cancel()
        self._generation += 1
        timer = threading.Timer(delay, self._redraw, args=(self._generation,))
        timer.name = "taskapp-run-view-redraw"
        timer.daemon = True
        self._timer, self._ticking = timer, tick
        timer.start()

    def _redraw(self, generation: int) -> None:
        with self._lock:
            if self._closed or generation != self._generation:
                return  # closed, or superseded by a sooner redraw
            self._redrawing = True
            snap, self._pending = self._pending, None
        current = self.progress.snapshot()
        try:
            if snap is None:  # a tick: only the elapsed time moved
                with self._render_lock:
                    self._render_header(current)
            else:
                self._render()
        finally:
            with self._lock:
                self._redrawing = False
                self._last_render = time.monotonic()
                self._timer = None
                if not self._closed:
                    if self._pending is not None:
                        self._schedule(self.min_interval, tick=False)
                    elif current.started_at is not None and not current.is_final:
                        self._schedule(self.tick_interval, tick=True)

    def _state(self, snap: ProgressSnapshot) -> str:
        if self.stop_requested and not snap.is_final:
            return "stopping"
        return snap.state

    def _render_header(self, snap: ProgressSnapshot) -> None:
        try:
            _set(self.header, "value", _live(_DISCONNECTED + header_html(snap, self._state(snap))))
        except Exception:  # a view bug must never break the run
            logger.exception("RunView header render failed")

    def _render(self) -> None:
        """Draw the newest snapshot; errors are logged and shown, never raised."""
        with self._render_lock:
            if not self._closed:
                self._draw(self.progress.snapshot())

    def _draw(self, snap: ProgressSnapshot) -> None:
        try:
            state = self._state(snap)
            self._render_header(snap)
            _set(self.stats, "value", _live(stats_html(snap, state)))
            _set(self.plot, "value", _live(plot_html(snap, fallback=False)))
            _set(self.candidates, "value", _live(candidates_html(snap)))
            _set(self.diff, "value", _live(diff_html(snap)))
            _set(self.message, "value", _live(message_html(snap, self.error)))
            stoppable = self.on_stop is not None and not snap.is_final
            _set(self.stop_button, "disabled", not stoppable or self.stop_requested)
            label = "stopping…" if self.stop_requested and not snap.is_final else self.stop_label
            _set(self.stop_button, "description", label)
            self.renders += 1
        except Exception as exc:  # a view bug must never break the run
            logger.exception("RunView render failed")
            self.error = f"view error: {type(exc).__name__}: {exc}"
            return
        if snap.is_final:
            self._publish_final()

    def _publish_final(self) -> None:
        """Update the displayed outputs once, so a saved notebook keeps the final card."""
        with self._lock:
            if self._final_published or not self._handles:
                return
            self._final_published = True
            handles = list(self._handles)
        bundle = self._repr_mimebundle_()
        for handle in handles:
            try:
                # In an empty context ipykernel sends it as a reply to the request it runs
                # now (a producer's asyncio task keeps the context of the cell that started
                # it, and a client like nbclient only reads the outputs of the running cell).
                contextvars.Context().run(handle.update, bundle, raw=True)
            except Exception:  # noqa: BLE001 - no kernel (plain Python): nothing to update
                logger.debug("display update of the final run card failed", exc_info=True)


def _live(markup: str) -> str:
    """A section for an ``HTML`` widget: its own line height (ipywidgets sets one for
    single-line labels) and the card's font size."""
    if not markup:
        return ""
    return f'<div style="line-height:1.4;font-size:13px">{markup}</div>'


def _set(widget: Any, name: str, value: Any) -> None:
    if getattr(widget, name) != value:
        setattr(widget, name, value)
