"""``HostedJob``: the handle a hosted job returns at once, while it runs in the background.

The job runs as a task on the caller's event loop (in a notebook: the kernel's loop, next to
the task app), so the cell returns immediately and the app keeps serving. ``await job`` gives
the :class:`InProcessJobResult`; ``job.cancel()`` cancels the job on the backend and stops
the app; ``job.progress`` is the live :class:`~taskapp_notebook.progress.RunProgress`; a cell
that ends with ``job`` shows the run view (with a Cancel button).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..loops import running_loop
from ..progress import RunProgress
from .events import SUCCESS_STATUSES, candidate_components

if TYPE_CHECKING:
    from ..notebook.run_view import RunView
    from ..runner import InProcessTaskApp

__all__ = ["HostedJob", "InProcessJobResult"]

logger = logging.getLogger(__name__)

Runner = Callable[["HostedJob"], Coroutine[Any, Any, "InProcessJobResult"]]


@dataclass
class InProcessJobResult:
    """How a hosted job ended: its final status document (secrets masked) and where it ran."""

    job_id: str
    status: dict[str, Any]
    task_app_url: str
    backend_url: str
    kind: str = "gepa_offline"
    #: How it was followed: SSE connections, resumed ones (Last-Event-ID), polls.
    follow_stats: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def state(self) -> str:
        return str(self.status.get("status", "")).lower()

    @property
    def succeeded(self) -> bool:
        """True when the job's final status is a success status."""
        return self.state in SUCCESS_STATUSES

    @property
    def best_reward(self) -> float | None:
        value = self.status.get("best_reward", self.status.get("best_score"))
        return float(value) if isinstance(value, int | float) else None

    @property
    def baseline_reward(self) -> float | None:
        value = self.status.get("baseline_reward")
        return float(value) if isinstance(value, int | float) else None

    @property
    def best_candidate(self) -> Any:
        """The best candidate as the backend returned it (None for eval jobs)."""
        return self.status.get("best_candidate")

    @property
    def best_prompt(self) -> dict[str, str]:
        """The best candidate's prompt text per stage (``{}`` when there is none)."""
        return candidate_components(self.best_candidate)

    @property
    def error(self) -> str | None:
        error = self.status.get("error")
        return None if error in (None, "") else str(error)


class HostedJob:
    """A hosted job running in the background. Await it for the result."""

    def __init__(self, runner: Runner, progress: RunProgress) -> None:
        self.progress = progress
        self.job_id: str | None = None
        self.task_app: InProcessTaskApp | None = None
        #: The result once the job has ended (None before; ``await job`` waits for it).
        self.result: InProcessJobResult | None = None
        self._runner = runner
        self._task: asyncio.Task[InProcessJobResult] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cancel_reason: str | None = None
        self._cancel_outcome = "cancelled"
        #: The app URL the job was created with (set by the runner).
        self.submitted_url: str | None = None
        self._url_warned = False
        self._view: RunView | None = None
        loop = running_loop()
        if loop is not None:
            self._start(loop)

    def __repr__(self) -> str:
        snap = self.progress.snapshot()
        best = "" if snap.best_score is None else f" best={snap.best_score:g}"
        return (f"<HostedJob {snap.kind} {self.job_id or snap.name!r} {snap.state}{best} "
                f"rollouts={snap.rollouts}>")

    # ----------------------------------------------------------------- awaiting

    def __await__(self) -> Generator[Any, None, InProcessJobResult]:
        return self.wait().__await__()

    async def wait(self) -> InProcessJobResult:
        """Run (if not running yet) and wait for the result. Cancelling the waiter cancels
        the job (on the backend too) and stops the app."""
        if self._task is None:
            if self._cancel_reason is not None:  # cancelled before it ever started
                return self.cancelled_result()
            self._start(asyncio.get_running_loop())
        assert self._task is not None
        return await self._task

    def done(self) -> bool:
        return self._task is not None and self._task.done()

    def cancel(self, reason: str = "cancelled by the user") -> None:
        """Cancel the job on the backend and stop the app; never blocks (safe from a button).
        ``await job`` then returns the result with status ``cancelled``."""
        self._end(reason, "cancelled")

    def _end(self, reason: str, outcome: str) -> None:
        if self._cancel_reason is not None:
            return  # already ending: a second click or a late app event changes nothing
        self._cancel_reason, self._cancel_outcome = reason, outcome
        task, loop = self._task, self._loop
        if task is None or loop is None:
            self.progress.update(state=outcome, message=reason)
            return
        if task.done():
            return
        self.progress.update(state="stopping", message=f"cancelling: {reason}")
        if running_loop() is loop:
            task.cancel()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)

    @property
    def cancel_reason(self) -> str | None:
        """Why the job was ended early from this side (None: it was not)."""
        return self._cancel_reason

    @property
    def cancel_outcome(self) -> str:
        """The status an early end gets: ``cancelled``, or ``failed`` when the app was lost."""
        return self._cancel_outcome

    def cancelled_result(self) -> InProcessJobResult:
        """The result of a job ended before it was followed to its end."""
        return InProcessJobResult(job_id=self.job_id or "", task_app_url="", backend_url="",
                                  status={"job_id": self.job_id, "status": self._cancel_outcome,
                                          "error": self._cancel_reason})

    # ----------------------------------------------------------------- display

    def display(self) -> Any:
        """Show the run view and return it."""
        from IPython.display import display

        display(self)  # type: ignore[no-untyped-call]
        return self._view

    def view(self) -> RunView | None:
        """The job's live view (a ``RunView``, built on first use; again if it was closed),
        or None without ipywidgets. Its Cancel button calls :meth:`cancel`."""
        if self._view is None or self._view.closed:
            try:  # lazily: the view needs ipywidgets
                from ..notebook.run_view import RunView
            except ImportError:
                return None
            self._view = RunView(self.progress, on_stop=self.cancel, stop_label="Cancel")
        return self._view

    def _ipython_display_(self) -> None:
        """Show the live view with a display id (the output gets the final card when the
        job ends); views an earlier run of this cell showed are closed."""
        from ..notebook.run_outputs import show_run

        show_run(self.view(), repr(self))

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        view = self.view()
        if view is None:
            return {"text/plain": repr(self)}
        return view._repr_mimebundle_(**kwargs)

    # ----------------------------------------------------------------- internals

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._task = loop.create_task(self._guarded(), name="taskapp-hosted-job")
        self._task.add_done_callback(self._finished)

    async def _guarded(self) -> InProcessJobResult:
        """The runner; a cancel() before the job was followed still gives a result."""
        try:
            return await self._runner(self)
        except asyncio.CancelledError:
            reason = self._cancel_reason
            task = asyncio.current_task()
            if reason is None or task is None:
                raise
            task.uncancel()
            self.progress.update(state=self._cancel_outcome, message=reason)
            return self.cancelled_result()

    def _finished(self, task: asyncio.Task[InProcessJobResult]) -> None:
        if task.cancelled():
            if not self.progress.snapshot().is_final:
                self.progress.update(state="cancelled", message=self._cancel_reason or
                                     "cancelled")
            return
        error = task.exception()
        if error is None:
            self.result = task.result()
        elif not self.progress.snapshot().is_final:
            first_line = (str(error) or type(error).__name__).splitlines()[0]
            self.progress.update(state="failed", message=first_line[:300])

    def on_app_change(self, app: InProcessTaskApp) -> None:
        """Listener on the task app: an app stopped from elsewhere (``%taskapp stop``,
        ``stop_all``, kernel shutdown) ends the job; the job is cancelled on the backend."""
        if str(app.state) in ("stopping", "stopped", "failed") and not self.done():
            self._end(f"the task app stopped ({app.state}) before the job ended", "failed")
        elif self.submitted_url and app.url and app.url != self.submitted_url \
                and not self._url_warned:
            # A relay without in-place lease renewal gave the tunnel a new URL; the job
            # keeps calling the one it was created with. Say so where the user looks.
            self._url_warned = True
            logger.warning("The task app's tunnel URL changed while job %s runs; the backend "
                           "still calls the URL the job was created with", self.job_id)
            self.progress.update(message="warning: the tunnel URL changed during the job; "
                                 "the backend may no longer reach the app")
