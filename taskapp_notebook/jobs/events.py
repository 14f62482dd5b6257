"""Job events and statuses -> :class:`~taskapp_notebook.progress.RunProgress`.

Event types follow synth-ai 0.9.11 (``core/streaming/streamer.py`` terminal sets,
``sdk/optimization/internal/progress/events.py`` categories): ``<activity>.<target>.
<algorithm?>.<entity>.<action>``, e.g. ``learning.policy.gepa.candidate.evaluated``. Numbers
live in the event's ``data``. Everything shown goes through ``scrub`` first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..progress import CandidateSummary, RunProgress

__all__ = [
    "FAILURE_EVENTS",
    "SUCCESS_EVENTS",
    "SUCCESS_STATUSES",
    "TERMINAL_STATUSES",
    "JobEventFeed",
    "candidate_components",
    "final_state",
    "map_strings",
]

SUCCESS_EVENTS = frozenset({
    "learning.policy.gepa.job.completed", "learning.policy.mipro.job.completed",
    "eval.policy.job.completed", "job.completed",
})
FAILURE_EVENTS = frozenset({
    "learning.policy.gepa.job.failed", "learning.policy.mipro.job.failed",
    "eval.policy.job.failed", "job.failed",
})
CANCEL_EVENTS = frozenset({"job.cancelled", "job.canceled", "learning.policy.gepa.job.cancelled",
                           "eval.policy.job.cancelled"})
SUCCESS_STATUSES = frozenset({"succeeded", "completed", "success"})
TERMINAL_STATUSES = SUCCESS_STATUSES | {"failed", "error", "errored", "cancelled", "canceled",
                                        "paused"}


#: Where an event's data carries the candidate's prompt.
_PROMPT_KEYS = ("candidate", "prompt", "best_candidate", "initial_candidate", "stages")


def final_state(status: str) -> str:
    """A backend status word -> a :data:`~taskapp_notebook.progress.RunState`."""
    word = status.lower()
    if word in SUCCESS_STATUSES:
        return "succeeded"
    if word in ("cancelled", "canceled"):
        return "cancelled"
    if word == "paused":
        return "paused"
    return "failed"


def terminal_status_of(event: Mapping[str, Any]) -> str | None:
    """``succeeded`` / ``failed`` / ``cancelled`` for a terminal event, else None."""
    kind = str(event.get("type", "")).lower()
    if kind in SUCCESS_EVENTS:
        return "succeeded"
    if kind in CANCEL_EVENTS:
        return "cancelled"
    if kind in FAILURE_EVENTS:
        return "failed"
    data = event.get("data")
    status = str(data.get("status", "")).lower() if isinstance(data, Mapping) else ""
    if status in TERMINAL_STATUSES and kind.endswith(".job.completed"):
        return final_state(status)
    return None


def candidate_components(value: Any) -> dict[str, str]:
    """Prompt text per stage from a candidate as the backend gives it (best effort)."""
    if isinstance(value, str):
        return {"prompt": value}
    if not isinstance(value, Mapping):
        return {}
    for key in ("candidate", "prompt", "best_candidate", "initial_candidate"):
        if isinstance(value.get(key), Mapping | str):
            found = candidate_components(value[key])
            if found:
                return found
    stages = value.get("stages")
    if isinstance(stages, list):
        out: dict[str, str] = {}
        for index, stage in enumerate(stages):
            if not isinstance(stage, Mapping):
                continue
            name = str(stage.get("stage_id") or stage.get("id") or stage.get("name") or index)
            text = stage.get("instruction")
            if not isinstance(text, str) and isinstance(stage.get("messages"), list):
                text = "\n".join(
                    str(m.get("pattern") or m.get("content") or "")
                    for m in stage["messages"] if isinstance(m, Mapping)
                )
            if isinstance(text, str):
                out[name] = text
        return out
    return {str(k): v for k, v in value.items() if isinstance(v, str) and k != "id"}


def map_strings(value: Any, function: Callable[[str], str]) -> Any:
    """``value`` (JSON-like) with ``function`` applied to every string in it."""
    if isinstance(value, str):
        return function(value)
    if isinstance(value, dict):
        return {k: map_strings(v, function) for k, v in value.items()}
    if isinstance(value, list):
        return [map_strings(v, function) for v in value]
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class JobEventFeed:
    """Writes job events and statuses into a :class:`RunProgress`."""

    def __init__(self, progress: RunProgress, scrub: Callable[[str], str]) -> None:
        self.progress = progress
        self._scrub = scrub
        #: ``scrub`` applied to a whole document (what user callbacks get).
        self.scrub_document: Callable[[Any], Any] = lambda doc: map_strings(doc, scrub)
        self.last_seq = 0
        self.events_seen = 0

    def event(self, event: Mapping[str, Any]) -> bool:
        """Apply one event; False when its ``seq`` was seen already (a replay)."""
        seq = event.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            if seq <= self.last_seq:
                return False
            self.last_seq = seq
        self.events_seen += 1
        kind = str(event.get("type", ""))
        data = event.get("data") if isinstance(event.get("data"), Mapping) else {}
        assert isinstance(data, Mapping)
        message = str(event.get("message") or kind)
        changes: dict[str, Any] = {"message": self._scrub(message)}
        snap = self.progress.snapshot()
        if snap.state == "pending" and terminal_status_of(event) is None:
            changes["state"] = "running"
        if kind.endswith(".baseline") or ".baseline." in kind:
            reward = _number(data.get("reward", data.get("accuracy")))
            if reward is not None:
                changes["seed_score"] = reward
                self._candidate("baseline", reward, data, iteration=0)
                if snap.best_score is None:  # the plot starts at the seed, as a local run's
                    changes["best_score"] = reward
                    self.progress.add_score_point(0, reward)
        elif any(p in kind for p in (".candidate.evaluated", ".candidate.new_best",
                                     ".candidate_scored", ".proposal.scored")):
            cid = str(data.get("candidate_id") or data.get("id") or f"c{self.events_seen}")
            reward = _number(data.get("reward", data.get("accuracy", data.get("score"))))
            generation = data.get("generation")
            iteration = generation if isinstance(generation, int) else snap.iteration
            self._candidate(cid, reward, data, iteration=iteration)
            if reward is not None and (snap.best_score is None or reward >= snap.best_score):
                changes.update(best_score=reward, best_candidate_id=cid)
                self.progress.add_score_point(iteration, reward)
            if isinstance(generation, int):
                changes["iteration"] = max(snap.iteration, generation)
        elif ".generation." in kind and isinstance(data.get("generation"), int):
            changes["iteration"] = max(snap.iteration, int(data["generation"]))
        self._numbers(data, changes)
        if kind.endswith(".job.started"):
            changes["state"] = "running"
        self.progress.update(**changes)
        return True

    def status(self, status: Mapping[str, Any]) -> None:
        """Apply a status document (polled, or the final one)."""
        changes: dict[str, Any] = {}
        self._numbers(status, changes)
        word = str(status.get("status") or status.get("state") or "").lower()
        if word in ("running", "in_progress", "started") and \
                self.progress.snapshot().state == "pending":
            changes["state"] = "running"
        best = status.get("best_candidate")
        if best is not None:
            components = candidate_components(best)
            snap = self.progress.snapshot()
            cid = snap.best_candidate_id or "best"
            current = snap.candidate(cid)
            score = _number(status.get("best_reward"))
            if score is None and current is not None:
                score = current.score
            self.progress.upsert_candidate(CandidateSummary(
                id=cid, score=score,
                parents=current.parents if current else (), on_front=True,
                iteration=current.iteration if current else snap.iteration,
                components={k: self._scrub(v) for k, v in components.items()},
            ))
            changes["best_candidate_id"] = cid
        if changes:
            self.progress.update(**changes)

    def _numbers(self, data: Mapping[str, Any], changes: dict[str, Any]) -> None:
        best = _number(data.get("best_reward", data.get("best_score")))
        if best is not None:
            changes["best_score"] = best
        baseline = _number(data.get("baseline_reward"))
        if baseline is not None:
            changes["seed_score"] = baseline
        done = data.get("rollouts_completed")
        if isinstance(done, int):
            changes["rollouts"] = done
            changes["budget_used"] = done
        total = data.get("rollouts_total")
        if isinstance(total, int):
            changes["budget_total"] = total
        generations = data.get("generations_completed")
        if isinstance(generations, int):
            changes["iteration"] = generations

    def _candidate(
        self, cid: str, reward: float | None, data: Mapping[str, Any], *, iteration: int
    ) -> None:
        """Add or update a candidate; what an event leaves out (a ``new_best`` event carries
        no prompt and no parent) is kept from the earlier events about it."""
        current = self.progress.snapshot().candidate(cid)
        parent = data.get("parent_id")
        carried = {key: data[key] for key in _PROMPT_KEYS if key in data}
        components = {k: self._scrub(v) for k, v in candidate_components(carried).items()} \
            if carried else {}
        self.progress.upsert_candidate(CandidateSummary(
            id=cid, score=reward if reward is not None or current is None else current.score,
            parents=(str(parent),) if parent else (current.parents if current else ()),
            on_front=bool(data.get("is_pareto", current.on_front if current else False)),
            iteration=iteration,
            components=components or (dict(current.components) if current else {}),
        ))
