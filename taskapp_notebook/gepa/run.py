"""A local GEPA run in the background: :class:`GepaRun`.

Threads (none of them the kernel's; no SIGINT handler is ever installed, so "Interrupt
kernel" interrupts cells and never touches a run)::

    caller / kernel thread   start_gepa() returns at once; `await run`; run.stop()
    taskapp-gepa-<name>      gepa's synchronous engine (evaluate, reflect, accept)
    the app's own loop       serves /rollout (the kernel's loop, or the app's thread), and
                             the run's I/O: the interceptor and the pooled rollout client
    taskapp-gepa-io-<name>   for a URL target only: a loop thread for the run's I/O

Stopping: ``stop()`` makes gepa end before its next iteration and cancels the rollouts in
flight; the unfinished iteration is discarded and everything accepted before is kept. The
same happens when the task app stops or is re-run during the run (see adapter.py).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from ..errors import scrub_secrets
from ..loops import LoopThread, running_loop
from ..progress import RunProgress
from .adapter import RunInterrupted, TaskAppAdapter
from .exceptions import DeadlockError, GepaRunError
from .interceptor import Interceptor
from .ledger import RunLedger, candidate_id
from .reflection import ReflectionGuard, reflection_usage
from .results import GepaResult, append_calls, candidate_records, usage_totals, write_result
from .run_options import ModelFunction, RunOptions, Upstream
from .target import AppTarget

if TYPE_CHECKING:
    from ..notebook.run_view import RunView
    from ..runner import InProcessTaskApp

logger = logging.getLogger(__name__)

_active: set[GepaRun] = set()
_atexit_registered = False


class _GepaLog:
    """gepa's logger protocol → our logger at DEBUG (gepa's own Logger swaps sys.stdout)."""

    def log(self, message: str, *args: Any, **kwargs: Any) -> None:
        logger.debug("gepa: %s", message)


class GepaRun:
    """Handle of a run started by :func:`~taskapp_notebook.gepa.start_gepa`.

    ``await run`` gives the :class:`GepaResult`; ``run.progress`` is the live
    :class:`~taskapp_notebook.progress.RunProgress`; ``run.stop()`` ends it early.
    Displaying the handle in a notebook shows the live run view.
    """

    def __init__(self, options: RunOptions, target: AppTarget,
                 upstream: Upstream | ModelFunction | None, reflection_lm: Any, *,
                 interceptor_host: str = "127.0.0.1",
                 resume_seed_scores: dict[int, float] | None = None) -> None:
        self.options = options
        self.name = options.name
        self.target = target
        self.reflection_lm = ReflectionGuard(reflection_lm)
        self.progress = RunProgress("local gepa", options.name,
                                    budget_total=options.max_metric_calls)
        self.interceptor = Interceptor(upstream)
        self._host = interceptor_host
        self._ledger = RunLedger(self.progress)
        self._resume_seed_scores = resume_seed_scores
        self._done: concurrent.futures.Future[GepaResult] = concurrent.futures.Future()
        self._stop_requested = threading.Event()
        self._stop_reason = "stopped by the user"
        self._adapter: TaskAppAdapter | None = None
        self._thread: threading.Thread | None = None
        self._view: RunView | None = None
        self._result: GepaResult | None = None
        self._after: list[GepaRun] = []
        self._calls_written = 0
        #: The notebook cell that started the run (re-running it replaces the run).
        self.cell_id: str | None = None

    # ------------------------------------------------------------------ public

    def __repr__(self) -> str:
        snap = self.progress.snapshot()
        best = "-" if snap.best_score is None else f"{snap.best_score:.3f}"
        return (f"<GepaRun {self.name!r} {snap.state} iteration={snap.iteration} "
                f"budget={snap.budget_used}/{snap.budget_total} best={best}>")

    @property
    def state(self) -> str:
        return self.progress.snapshot().state

    def done(self) -> bool:
        return self._done.done()

    def stop(self, *, cancel_inflight: bool = True, reason: str = "stopped by the user") -> None:
        """End the run: before gepa's next iteration; with ``cancel_inflight`` (default) at
        once, cancelling the rollouts in flight and discarding the unfinished iteration.
        Returns immediately; ``await run`` for the result (the best so far)."""
        if self._done.done():
            return
        self._stop_reason = reason
        self._stop_requested.set()
        self.progress.update(state="stopping", message="stopping: ending before the next "
                             "iteration" + ("; cancelling rollouts in flight"
                                            if cancel_inflight else ""))
        adapter = self._adapter
        if cancel_inflight and adapter is not None:
            adapter.interrupt(reason, kind="stopped")

    def __await__(self) -> Generator[Any, None, GepaResult]:
        # shield: cancelling the awaiting cell (Interrupt kernel) must not cancel the run
        return asyncio.shield(asyncio.wrap_future(self._done)).__await__()

    def result(self, timeout: float | None = None) -> GepaResult:
        """Wait for the result from synchronous code (never on the loop the app serves on)."""
        if not self._done.done():
            check_can_block(self.target, "GepaRun.result()")
        return self._done.result(timeout)

    def view(self) -> RunView | None:
        """The run's live view (a ``RunView``, built on first use; again if it was closed),
        or None without ipywidgets. Its Stop button calls :meth:`stop`."""
        if self._view is None or self._view.closed:
            try:  # lazily: the view needs ipywidgets
                from ..notebook.run_view import RunView
            except ImportError:
                return None
            self._view = RunView(self.progress, on_stop=self.stop)
        return self._view

    def _ipython_display_(self) -> None:
        """Show the live view with a display id (the output gets the final card when the
        run ends); views an earlier run of this cell showed are closed."""
        from ..notebook.run_outputs import show_run

        show_run(self.view(), repr(self))

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        view = self.view()
        if view is None:
            return {"text/plain": repr(self)}
        bundle: dict[str, Any] = view._repr_mimebundle_(include=include, exclude=exclude)
        return bundle

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, after: list[GepaRun] | None = None) -> GepaRun:
        """Start on a worker thread (once the runs in ``after`` have finished)."""
        self._after = list(after or [])
        global _atexit_registered
        if not _atexit_registered:  # a run still going at exit stops (rollouts cancelled)
            atexit.register(stop_all_runs)
            _atexit_registered = True
        app = self.target.app
        if app is not None:
            app.add_listener(self._on_app_change)
        self._thread = threading.Thread(target=self._main, name=f"taskapp-gepa-{self.name}",
                                        daemon=True)
        _active.add(self)
        self.progress.update(state="pending", message="starting")
        self._thread.start()
        return self

    def _on_app_change(self, app: InProcessTaskApp) -> None:
        if not app.is_running and self._adapter is not None and not self._done.done():
            self._adapter.interrupt(f"the task app {app.name!r} stopped during the run "
                                    "(stopped or re-run)", kind="unavailable")

    def _main(self) -> None:
        try:
            for previous in self._after:  # replaced runs free their run_dir and sockets first
                with contextlib.suppress(BaseException):
                    previous.wait_finished(timeout=60)
            result = self._execute()
        except GepaRunError as exc:
            self._finish("failed", str(exc), exc.result)
            self._done.set_exception(exc)
        except BaseException as exc:  # noqa: BLE001 - reported through the future
            message = self._without_secrets(f"{type(exc).__name__}: {exc}")
            partial = self._build_result("failed", message)
            self._finish("failed", message, partial)
            self._done.set_exception(GepaRunError(f"The GEPA run {self.name!r} failed: "
                                                  f"{message}", partial))
        else:
            self._done.set_result(result)
        finally:
            app = self.target.app
            if app is not None:
                app.remove_listener(self._on_app_change)
            _active.discard(self)

    def _execute(self) -> GepaResult:
        # The run's I/O (rollout client, interceptor) goes onto the in-process app's own loop
        # (no thread hop between the app and the interceptor); for a URL, onto a loop thread
        # of the run. Never blocked by the engine: that waits on its own thread.
        app_loop = self.target.app.loop if self.target.app is not None else None
        own = None if app_loop is not None and app_loop.is_running() else LoopThread(
            f"taskapp-gepa-io-{self.name}")
        loop = own.loop if own is not None else app_loop
        assert loop is not None
        adapter = TaskAppAdapter(options=self.options, target=self.target,
                                 interceptor=self.interceptor, loop=loop, ledger=self._ledger)
        adapter.resume_seed_scores = self._resume_seed_scores
        try:
            asyncio.run_coroutine_threadsafe(self._open(adapter), loop).result()
            self._adapter = adapter
            if self._stop_requested.is_set():
                adapter.interrupt(self._stop_reason, kind="stopped")
            outcome, message = self._optimize(adapter)
        finally:
            self._adapter = None
            with contextlib.suppress(Exception):  # a closed app loop took our sockets along
                asyncio.run_coroutine_threadsafe(self._close(adapter), loop).result(30)
            if own is not None:
                own.close()
            close = getattr(self.reflection_lm, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()
        if outcome == "failed":
            raise GepaRunError(message, self._build_result("failed", message))
        result = self._build_result(outcome, message)
        self._finish(outcome, message, result)
        return result

    async def _open(self, adapter: TaskAppAdapter) -> None:
        from ..health import check_once

        await self.interceptor.start(self._host, max_connections=self.options.concurrency * 2)
        await adapter.open()
        assert adapter.client is not None
        health = await check_once(adapter.client, self.target.url, self.target.headers, 30.0)
        if not health.ok:
            why = self.target.unavailable() or health.describe()
            raise GepaRunError(
                f"The task app at {self.target.url} is not healthy before the run ({why}): "
                "check that it is running and that the credentials are right.")

    async def _close(self, adapter: TaskAppAdapter) -> None:
        try:
            await adapter.close()
            if self._ledger.interrupted:  # rollouts cut short here still run in the app
                app = self.target.app
                await self.interceptor.drain(
                    None if app is None else lambda: app.stats.in_flight("/rollout") > 0)
        finally:
            await self.interceptor.stop()

    def _optimize(self, adapter: TaskAppAdapter) -> tuple[str, str]:
        from gepa.api import optimize as gepa_optimize
        from gepa.utils import ScoreThresholdStopper, TimeoutStopCondition

        options = self.options
        guard = self.reflection_lm
        ledger = self._ledger
        stoppers: list[Any] = [lambda state: self._stop_requested.is_set() or guard.exhausted
                               or ledger.broken is not None]
        if options.time_limit is not None:
            stoppers.append(TimeoutStopCondition(options.time_limit))
        if options.score_threshold is not None:
            stoppers.append(ScoreThresholdStopper(options.score_threshold))
        run_dir = options.run_dir
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                (run_dir / "gepa.stop").unlink()  # a stale stop file would end the run at once
        self.progress.update(state="running", message="starting the engine")
        try:
            engine_adapter: Any = adapter
            observers: list[Any] = [self._ledger]
            gepa_optimize(
                seed_candidate=dict(options.seed_candidate), trainset=list(options.train),
                valset=list(options.val), adapter=engine_adapter, reflection_lm=self.reflection_lm,
                max_metric_calls=options.max_metric_calls, stop_callbacks=stoppers,
                logger=_GepaLog(), run_dir=str(run_dir) if run_dir else None,
                callbacks=observers, display_progress_bar=False, seed=options.seed,
                raise_on_exception=True,
                reflection_minibatch_size=options.reflection_minibatch_size,
                **options.gepa_options)
        except RunInterrupted as stop:
            return "stopped", self._interrupted_message(stop)
        except Exception as exc:  # noqa: BLE001 - the run's failure, reported as such
            return "failed", self._without_secrets(f"The GEPA run {self.name!r} failed: "
                                         f"{type(exc).__name__}: {exc}")
        return self._why_ended()

    def _interrupted_message(self, stop: RunInterrupted) -> str:
        snap = self.progress.snapshot()
        where = (f"during iteration {snap.iteration}" if snap.iteration
                 else "before the seed was scored")
        kept = ("the best candidate so far is kept" if self._ledger.state is not None
                else "nothing was scored yet")
        reason = self._without_secrets(stop.reason)
        text = (f"Stopped {where}: {reason}. The unfinished iteration was "
                f"discarded (no failed rollout was scored); {kept}.")
        if stop.kind == "unavailable":
            text += (" Start the task app again and run with the same run_dir to resume."
                     if self.options.run_dir else
                     " Pass run_dir= next time to be able to resume.")
        return text

    def _why_ended(self) -> tuple[str, str]:
        snap = self.progress.snapshot()
        if self._ledger.broken is not None:
            return "failed", self._without_secrets(
                f"The GEPA run {self.name!r} stopped: {self._ledger.broken}. Nothing can be "
                "optimised while every rollout fails: check the task app (its logs, "
                "%taskapp logs) and the upstream model (URL, key, model name).")
        if self.reflection_lm.exhausted:
            return "failed", self._without_secrets(
                f"The GEPA run {self.name!r} failed: the reflection LM failed "
                f"{self.reflection_lm.failures} times in a row (last: "
                f"{self.reflection_lm.last_error}). Check its model name, URL and key.")
        if self._stop_requested.is_set():
            return "stopped", (f"Stopped after iteration {snap.iteration}: "
                               f"{self._stop_reason}.")
        options = self.options
        best = self._ledger.best_score()
        if options.score_threshold is not None and best is not None and (
                best >= options.score_threshold):
            return "succeeded", f"Score threshold {options.score_threshold:g} reached."
        if snap.budget_used >= options.max_metric_calls:
            return "succeeded", (f"Budget spent: {snap.budget_used} of "
                                 f"{options.max_metric_calls} metric calls.")
        return "succeeded", "Time limit reached." if options.time_limit else "Finished."

    # ------------------------------------------------------------------ results

    def _build_result(self, outcome: str, message: str) -> GepaResult:
        ledger, options = self._ledger, self.options
        state = ledger.state
        records = candidate_records(state, ledger.found_at)
        best_index = 0
        if state is not None:
            scores = list(state.program_full_scores_val_set)
            best_index = max(range(len(scores)), key=scores.__getitem__)
        calls = list(self.interceptor.call_records)
        if options.run_dir is not None:
            fresh, self._calls_written = calls[self._calls_written:], len(calls)
            try:
                calls = append_calls(options.run_dir, fresh)
            except OSError as exc:
                logger.warning("Could not write the model calls to %s: %s", options.run_dir, exc)
        snap = self.progress.snapshot()
        result = GepaResult(
            name=self.name, state=outcome, message=message,
            best_candidate=dict(state.program_candidates[best_index]) if state is not None
            else dict(options.seed_candidate),
            best_candidate_id=candidate_id(best_index) if state is not None else None,
            seed_candidate=dict(options.seed_candidate),
            seed_score=records[0]["score"] if records else None,
            best_score=records[best_index]["score"] if records else None,
            iterations=len(ledger.history), budget_used=snap.budget_used,
            rollouts=ledger.rollouts, rollout_errors=ledger.rollout_errors,
            elapsed_s=round(ledger.elapsed, 3), candidates=records,
            history=list(ledger.history), model_calls=calls,
            usage=usage_totals(calls, reflection_usage(self.reflection_lm)),
            run_dir=str(options.run_dir) if options.run_dir else None)
        if options.run_dir is not None:
            try:
                write_result(options.run_dir, result)
            except OSError as exc:
                logger.warning("Could not write the result to %s: %s", options.run_dir, exc)
        self._result = result
        return result

    def _finish(self, outcome: str, message: str, result: GepaResult | None) -> None:
        self._ledger.push_counts(final=True)
        extra: dict[str, Any] = {"model_calls": self.interceptor.calls}
        if self.options.run_dir is not None:  # (an empty value would show a bare label)
            extra = {"run_dir": str(self.options.run_dir), **extra}
        self.progress.update(state=outcome, message=message, extra=extra)
        if result is not None:
            logger.info("GEPA run %r %s: %s", self.name, outcome, message)

    def _without_secrets(self, text: str) -> str:
        upstream = self.interceptor.upstream
        keys = [upstream.api_key] if isinstance(upstream, Upstream) else []
        return scrub_secrets(text, [*self.target.secrets, *keys])

    def wait_finished(self, timeout: float | None = None) -> None:
        """Block until the run has ended, however it ended (never raises its error)."""
        with contextlib.suppress(BaseException):
            self._done.exception(timeout=timeout)

    def join_thread(self, timeout: float | None = None) -> None:
        """Wait for the run's worker thread (its clean-up included) to exit."""
        if self._thread is not None:
            self._thread.join(timeout)


def check_can_block(target: AppTarget, what: str) -> None:
    """Refuse a blocking wait on the thread whose running loop serves the task app."""
    here = running_loop()
    if here is not None and here is target.serving_loop():
        raise DeadlockError(
            f"{what} would block this thread's event loop, which serves the task app "
            f"{target.label!r}: every rollout would wait for it forever. In a notebook, start "
            "the run with `run = start_gepa(...)` and get the result with `result = await "
            "run` (the cell returns at once; the view updates while you work), or serve the "
            "app on its own thread (%%taskapp --serve-on thread / serve_on='thread').")


def active_runs() -> list[GepaRun]:
    """Runs of this process that have not finished."""
    return [run for run in list(_active) if not run.done()]


def stop_all_runs() -> None:
    """Stop every run of this process (cancelling rollouts in flight)."""
    for run in list(_active):
        run.stop()


def wait_all_runs(timeout: float = 30.0) -> None:
    """Wait for stopped runs to finish their clean-up (from a thread that may block)."""
    deadline = time.monotonic() + timeout
    for run in list(_active):
        run.join_thread(max(0.0, deadline - time.monotonic()))
