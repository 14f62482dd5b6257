"""What a run did, as it happens: gepa's callbacks and the adapter's rollout counts become a
:class:`~taskapp_notebook.progress.RunProgress` (what the live view shows) and a history of
one record per iteration (what the result and ``run_dir`` keep).

gepa calls the ``on_*`` methods on the optimiser's thread; exceptions in them are logged
by gepa and never reach the run. Everything here is persisted through the adapter's
``get_adapter_state`` / ``set_adapter_state``, so a resumed run continues its history.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from ..progress import CandidateSummary, RunProgress

logger = logging.getLogger(__name__)

#: Seconds between two progress pushes caused by single rollouts.
_PUSH_EVERY = 0.25
#: Rollouts per second are counted over this many recent seconds.
_RATE_WINDOW = 5.0


def candidate_id(index: int) -> str:
    """The id a candidate shows under: ``c0`` is the seed."""
    return f"c{index}"


class RunLedger:
    """Counters, candidate summaries and per-iteration history of one run."""

    def __init__(self, progress: RunProgress) -> None:
        self.progress = progress
        self.state: Any = None  # gepa's GEPAState, once the seed is scored
        self.history: list[dict[str, Any]] = []
        self.rollouts = 0
        self.rollout_errors = 0
        self.found_at: dict[int, int] = {0: 0}
        self.interrupted = False
        self.first_error: str | None = None
        #: Set when every rollout of the seed's evaluation failed: nothing to optimise.
        self.broken: str | None = None
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._rollouts_at_start = 0
        self._elapsed_before = 0.0
        self._last_push = 0.0
        self._iteration: dict[str, Any] = {}
        self._samples: deque[tuple[float, int]] = deque([(self._started, 0)])

    # ------------------------------------------------------------------ adapter side

    def rollout_done(self, *, error: str | None = None) -> None:
        with self._lock:
            self.rollouts += 1
            if error is not None:
                self.rollout_errors += 1
                if self.first_error is None:
                    self.first_error = error
            due = time.monotonic() - self._last_push >= _PUSH_EVERY
        if due:
            self.push_counts()

    def push_counts(self, *, final: bool = False) -> None:
        """Counts into the progress; the rate is over the last ``_RATE_WINDOW`` seconds
        while running (it drops while gepa reflects) and over the whole run at the end."""
        with self._lock:
            now = self._last_push = time.monotonic()
            self._samples.append((now, self.rollouts))
            while len(self._samples) > 2 and now - self._samples[1][0] >= _RATE_WINDOW:
                self._samples.popleft()
            since, before = self._samples[0]
            if final or now - since <= 0:
                since, before = self._started, self._rollouts_at_start
            done = self.rollouts - before
            rate = done / (now - since) if now > since and done else None
            rollouts, errors = self.rollouts, self.rollout_errors
        self.progress.update(rollouts=rollouts, rollout_errors=errors,
                             rollouts_per_second=round(rate, 2) if rate else None)

    @property
    def elapsed(self) -> float:
        return self._elapsed_before + time.monotonic() - self._started

    def export(self) -> dict[str, Any]:
        """The ledger as plain data (stored in gepa's state for resume)."""
        with self._lock:
            return {"history": list(self.history), "rollouts": self.rollouts,
                    "rollout_errors": self.rollout_errors, "elapsed": self.elapsed,
                    "found_at": dict(self.found_at)}

    def restore(self, data: dict[str, Any]) -> None:
        with self._lock:
            self.history = list(data.get("history", []))
            self.rollouts = int(data.get("rollouts", 0))
            self.rollout_errors = int(data.get("rollout_errors", 0))
            self._rollouts_at_start = self.rollouts
            self._samples = deque([(self._started, self.rollouts)])
            self._elapsed_before = float(data.get("elapsed", 0.0))
            self.found_at = {int(k): int(v) for k, v in data.get("found_at", {}).items()}
        points = [(int(r["iteration"]), float(r["best_score"])) for r in self.history
                  if r.get("best_score") is not None]
        self.progress.update(score_history=tuple(points), rollouts=self.rollouts,
                             rollout_errors=self.rollout_errors)

    # ------------------------------------------------------------------ state → view

    def sync(self, state: Any) -> None:
        """Candidates, scores and the Pareto front from gepa's state into the progress."""
        self.state = state
        scores = list(state.program_full_scores_val_set)
        front = set().union(*state.program_at_pareto_front_valset.values()) if (
            state.program_at_pareto_front_valset) else set()
        for index, candidate in enumerate(state.program_candidates):
            parents = tuple(candidate_id(p) for p in state.parent_program_for_candidate[index]
                            if p is not None)
            self.progress.upsert_candidate(CandidateSummary(
                id=candidate_id(index), score=scores[index], parents=parents,
                on_front=index in front, iteration=self.found_at.get(index, 0),
                components=dict(candidate)))
        best = max(range(len(scores)), key=scores.__getitem__)
        self.progress.update(seed_score=scores[0], best_score=scores[best],
                             best_candidate_id=candidate_id(best),
                             budget_used=int(state.total_num_evals))

    def best_score(self) -> float | None:
        if self.state is None:
            return None
        return float(max(self.state.program_full_scores_val_set))

    # ------------------------------------------------------------------ gepa callbacks

    def on_optimization_start(self, event: dict[str, Any]) -> None:
        self.progress.update(state="running", message=(
            f"scoring the seed on {event['valset_size']} validation example(s)"))

    def on_valset_evaluated(self, event: dict[str, Any]) -> None:
        index, iteration = int(event["candidate_idx"]), int(event["iteration"])
        self.found_at.setdefault(index, iteration)
        if iteration == 0 and not self.history:
            if self.rollouts and self.rollout_errors == self.rollouts:
                self.broken = (f"every rollout of the seed's evaluation failed (first: "
                               f"{self.first_error})")
            score = float(event["average_score"])
            self.progress.add_score_point(0, score)
            self.progress.update(seed_score=score, best_score=score,
                                 best_candidate_id=candidate_id(0))
            self.progress.upsert_candidate(CandidateSummary(
                id=candidate_id(0), score=score, on_front=True,
                components=dict(event["candidate"])))

    def on_iteration_start(self, event: dict[str, Any]) -> None:
        state = event["state"]
        iteration = int(event["iteration"])
        if self.state is None:
            self.sync(state)
        self.state = state
        self._iteration = {"iteration": iteration, "started": time.monotonic(),
                           "rollouts_before": self.rollouts}
        self.progress.update(iteration=iteration, message=f"iteration {iteration}")

    def on_candidate_selected(self, event: dict[str, Any]) -> None:
        self._iteration["parent_id"] = candidate_id(int(event["candidate_idx"]))

    def on_evaluation_end(self, event: dict[str, Any]) -> None:
        # the first evaluation of an iteration is the parent's, on the minibatch
        if event.get("candidate_idx") is not None and "subsample_before" not in self._iteration:
            self._iteration["subsample_before"] = float(sum(event["scores"]))

    def on_evaluation_skipped(self, event: dict[str, Any]) -> None:
        self._iteration["outcome"] = f"skipped ({event.get('reason', '')})"

    def on_candidate_accepted(self, event: dict[str, Any]) -> None:
        self._iteration.update(outcome="accepted",
                               new_candidate_id=candidate_id(int(event["new_candidate_idx"])),
                               subsample_after=float(event["new_score"]))

    def on_candidate_rejected(self, event: dict[str, Any]) -> None:
        self._iteration.update(outcome="rejected", subsample_before=float(event["old_score"]),
                               subsample_after=float(event["new_score"]))

    def on_pareto_front_updated(self, event: dict[str, Any]) -> None:
        if self.state is not None:
            self.sync(self.state)

    def on_budget_updated(self, event: dict[str, Any]) -> None:
        self.progress.update(budget_used=int(event["metric_calls_used"]))

    def on_iteration_end(self, event: dict[str, Any]) -> None:
        if self.interrupted:
            return  # the unfinished iteration is discarded, never recorded
        state = event["state"]
        self.sync(state)
        iteration = int(event["iteration"])
        info = self._iteration
        best = self.best_score()
        record = {
            "iteration": iteration,
            "parent_id": info.get("parent_id"),
            "outcome": info.get("outcome", "no proposal"),
            "new_candidate_id": info.get("new_candidate_id"),
            "subsample_before": info.get("subsample_before"),
            "subsample_after": info.get("subsample_after"),
            "best_score": best,
            "candidates": len(state.program_candidates),
            "budget_used": int(state.total_num_evals),
            "rollouts": self.rollouts,
            "rollout_errors": self.rollout_errors,
            "seconds": round(time.monotonic() - info.get("started", time.monotonic()), 3),
        }
        with self._lock:
            self.history.append(record)
        if best is not None:
            self.progress.add_score_point(iteration, best)
        self.push_counts()
        self.progress.update(message=f"iteration {iteration}: {record['outcome']}")

    def on_optimization_end(self, event: dict[str, Any]) -> None:
        self.sync(event["final_state"])

    def on_error(self, event: dict[str, Any]) -> None:
        exc = event.get("exception")
        self.progress.update(message=f"iteration {event['iteration']}: "
                                     f"{type(exc).__name__}: {str(exc)[:200]}")
