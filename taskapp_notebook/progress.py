"""The observable state of an optimisation run: local GEPA or a hosted job.

One model, several producers and one view: a local GEPA run (``taskapp_notebook.gepa``)
and a hosted job followed over SSE (``taskapp_notebook.jobs``) both write into a
:class:`RunProgress`; the run view in the notebook renders its :class:`ProgressSnapshot`.
Producers call :meth:`RunProgress.update` and friends from any thread; subscribers get an
immutable snapshot after each change (views throttle their own redraws). Nothing here
imports a heavy library.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

logger = logging.getLogger(__name__)

RunState = Literal[
    "pending", "running", "stopping", "paused", "succeeded", "failed", "cancelled", "stopped"
]
#: States after which nothing more happens.
FINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "stopped"})


@dataclass(frozen=True)
class CandidateSummary:
    """One candidate prompt as the view shows it."""

    id: str
    #: Mean score on the validation set (None until evaluated).
    score: float | None = None
    parents: tuple[str, ...] = ()
    on_front: bool = False
    #: Iteration that proposed it (0 for the seed).
    iteration: int = 0
    #: Prompt text per named component (e.g. ``{"system_prompt": "..."}``).
    components: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ProgressSnapshot:
    """An immutable picture of a run at one moment."""

    #: What kind of run: ``"local gepa"``, ``"hosted gepa"``, ``"hosted eval"``.
    kind: str
    name: str
    state: RunState = "pending"
    #: Last noteworthy line (an event, the stop reason, an error with secrets masked).
    message: str = ""
    iteration: int = 0
    #: Metric calls (rollouts) spent and allowed; total None when unbounded or unknown.
    budget_used: int = 0
    budget_total: int | None = None
    rollouts: int = 0
    rollout_errors: int = 0
    rollouts_per_second: float | None = None
    seed_score: float | None = None
    best_score: float | None = None
    best_candidate_id: str | None = None
    #: ``(iteration, best score so far)`` points, in order: the view's line plot.
    score_history: tuple[tuple[int, float], ...] = ()
    candidates: tuple[CandidateSummary, ...] = ()
    started_at: float | None = None
    finished_at: float | None = None
    #: Free-form extras a producer wants shown (e.g. ``{"job_id": ...}``); no secrets.
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def elapsed(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.finished_at or time.time()) - self.started_at

    def candidate(self, candidate_id: str | None) -> CandidateSummary | None:
        for candidate in self.candidates:
            if candidate.id == candidate_id:
                return candidate
        return None

    @property
    def seed(self) -> CandidateSummary | None:
        return self.candidates[0] if self.candidates else None

    @property
    def best(self) -> CandidateSummary | None:
        return self.candidate(self.best_candidate_id)


Subscriber = Callable[[ProgressSnapshot], None]


class RunProgress:
    """Thread-safe holder of a run's :class:`ProgressSnapshot`, with subscribers.

    Subscribers are called synchronously on the producer's thread after each change; an
    exception in one is logged and never reaches the producer.
    """

    def __init__(self, kind: str, name: str, *, budget_total: int | None = None) -> None:
        self._lock = threading.Lock()
        self._snapshot = ProgressSnapshot(kind=kind, name=name, budget_total=budget_total)
        self._subscribers: list[Subscriber] = []

    def __repr__(self) -> str:
        snap = self._snapshot
        return f"<RunProgress {snap.kind} {snap.name!r} {snap.state} iteration={snap.iteration}>"

    def snapshot(self) -> ProgressSnapshot:
        return self._snapshot

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber(snapshot)`` after every change; returns the unsubscribe function."""
        with self._lock:
            self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            with self._lock:
                if subscriber in self._subscribers:
                    self._subscribers.remove(subscriber)

        return unsubscribe

    def update(self, **changes: Any) -> ProgressSnapshot:
        """Replace fields of the snapshot; sets ``started_at``/``finished_at`` on state changes."""
        with self._lock:
            snap = self._snapshot
            state = changes.get("state")
            if state == "running" and snap.started_at is None and "started_at" not in changes:
                changes["started_at"] = time.time()
            if state in FINAL_STATES and "finished_at" not in changes:
                changes["finished_at"] = time.time()
            self._snapshot = snap = replace(snap, **changes)
        self._notify(snap)
        return snap

    def upsert_candidate(self, candidate: CandidateSummary) -> ProgressSnapshot:
        """Add ``candidate``, or replace the one with its id (keeping the order)."""
        with self._lock:
            snap = self._snapshot
            candidates = list(snap.candidates)
            for index, existing in enumerate(candidates):
                if existing.id == candidate.id:
                    candidates[index] = candidate
                    break
            else:
                candidates.append(candidate)
            self._snapshot = snap = replace(snap, candidates=tuple(candidates))
        self._notify(snap)
        return snap

    def add_score_point(self, iteration: int, best_score: float) -> ProgressSnapshot:
        """Append ``(iteration, best_score)`` to the history (one point per iteration)."""
        with self._lock:
            snap = self._snapshot
            history = [p for p in snap.score_history if p[0] != iteration]
            history.append((iteration, best_score))
            history.sort(key=lambda point: point[0])
            self._snapshot = snap = replace(snap, score_history=tuple(history))
        self._notify(snap)
        return snap

    def _notify(self, snap: ProgressSnapshot) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            try:
                subscriber(snap)
            except Exception:  # a broken view must never break the run
                logger.exception("run progress subscriber %r failed", subscriber)
