"""The result of a local GEPA run, and the JSON files it leaves in ``run_dir``.

Files (no secrets: prompts, scores, ids, token counts)::

    run_dir/result.json          candidates, scores, parents, front, history, usage totals
    run_dir/best_candidate.json  the best candidate's components
    run_dir/model_calls.jsonl    one line per model call: candidate, rollout, tokens, latency
    run_dir/gepa_state.bin ...   gepa's own checkpoint (what resuming reads)
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .ledger import candidate_id

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
BEST_FILE = "best_candidate.json"
CALLS_FILE = "model_calls.jsonl"


@dataclass(frozen=True)
class GepaResult:
    """What a run found. ``history``, ``candidates`` and ``model_calls`` are lists of flat
    dicts: ``pandas.DataFrame(result.history)`` works, pandas is not needed."""

    name: str
    #: ``succeeded`` (a stop condition was met), ``stopped`` or ``failed``.
    state: str
    message: str
    best_candidate: dict[str, str]
    best_candidate_id: str | None
    seed_candidate: dict[str, str]
    seed_score: float | None
    best_score: float | None
    iterations: int
    budget_used: int
    rollouts: int
    rollout_errors: int
    elapsed_s: float
    candidates: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    model_calls: list[dict[str, Any]] = field(default_factory=list, repr=False)
    usage: dict[str, Any] = field(default_factory=dict)
    run_dir: str | None = None

    @property
    def best_prompt(self) -> str | None:
        """The best candidate's ``system_prompt`` (None for other component names)."""
        return self.best_candidate.get("system_prompt")

    @property
    def improvement(self) -> float | None:
        if self.seed_score is None or self.best_score is None:
            return None
        return self.best_score - self.seed_score

    def summary(self) -> dict[str, Any]:
        """Everything but the per-call rows, JSON-able."""
        data = asdict(self)
        data.pop("model_calls")
        data["best_prompt"] = self.best_prompt
        return data

    def __repr__(self) -> str:
        def fmt(score: float | None) -> str:
            return "-" if score is None else f"{score:.3f}"

        return (f"GepaResult({self.name!r}, {self.state}, seed {fmt(self.seed_score)} → best "
                f"{fmt(self.best_score)} ({self.best_candidate_id}), {len(self.candidates)} "
                f"candidates, {self.iterations} iterations, {self.rollouts} rollouts)")


def candidate_records(state: Any, found_at: dict[int, int]) -> list[dict[str, Any]]:
    """One flat record per candidate of gepa's state."""
    if state is None:
        return []
    scores = list(state.program_full_scores_val_set)
    front = set().union(*state.program_at_pareto_front_valset.values()) if (
        state.program_at_pareto_front_valset) else set()
    records = []
    for index, candidate in enumerate(state.program_candidates):
        parents = [candidate_id(p) for p in state.parent_program_for_candidate[index]
                   if p is not None]
        records.append({
            "id": candidate_id(index), "score": scores[index],
            "parents": ",".join(parents), "on_front": index in front,
            "iteration": found_at.get(index, 0),
            "budget_at_discovery": state.num_metric_calls_by_discovery[index],
            **{f"component:{k}": v for k, v in candidate.items()},
        })
    return records


def usage_totals(calls: list[dict[str, Any]], reflection: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_calls": len(calls),
        "model_call_errors": sum(1 for c in calls if c.get("status", 200) >= 400),
        "prompt_tokens": sum(int(c.get("prompt_tokens", 0)) for c in calls),
        "completion_tokens": sum(int(c.get("completion_tokens", 0)) for c in calls),
        "total_tokens": sum(int(c.get("total_tokens", 0)) for c in calls),
        "usage_estimated": any(c.get("usage_estimated") for c in calls),
        **reflection,
    }


def append_calls(run_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append this session's call rows; return every row of the run (earlier sessions too)."""
    path = run_dir / CALLS_FILE
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_result(run_dir: Path, result: GepaResult) -> None:
    """``result.json`` and ``best_candidate.json``, written atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_json(run_dir / RESULT_FILE, result.summary())
    _atomic_json(run_dir / BEST_FILE, {"id": result.best_candidate_id,
                                       "score": result.best_score,
                                       "components": result.best_candidate})


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)
