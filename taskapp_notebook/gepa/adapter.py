"""The gepa adapter: a candidate is scored by ``POST /rollout`` calls to the task app.

gepa's engine is synchronous and runs on the run's worker thread. Each ``evaluate`` /
``batch_evaluate`` call hands its rollouts to the run's I/O loop (the in-process app's own
loop, or a loop thread of the run for a URL target) and waits for them on the worker
thread, so the loop is never blocked; rollouts run ``concurrency`` at a time through one
pooled HTTP client.

What counts as a score (the rule that keeps failed rollouts out of the results):

* the app answered ``/rollout`` with a reward → that reward;
* the app answered with an error for this example (HTTP 500, 422, a bad body) or took
  longer than ``rollout_timeout`` → 0.0, counted in ``rollout_errors`` and described in
  the reflective dataset (gepa's convention for a failing example);
* the app cannot be reached at all (connection refused, the in-process app stopped or was
  re-run, 401/403, 404, 410, 502-504 from a tunnel) → no score: the batch is cancelled, the
  unfinished iteration is discarded and the run stops with a message saying why.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import scrub_secrets
from .interceptor import Interceptor, ModelCall
from .ledger import RunLedger
from .run_options import RunOptions, TaskExample
from .target import AppTarget

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

#: Statuses that mean "the app is not there", never "this example failed".
_UNREACHABLE = frozenset({401, 403, 404, 410, 502, 503, 504})
#: Tries of one rollout whose connection fails (a tunnel hiccup) before the app counts as gone.
_ATTEMPTS = 3


class RunInterrupted(BaseException):  # noqa: N818 - a control-flow signal like CancelledError
    """Raised out of gepa's engine to end a run now (a BaseException, so gepa's
    ``except Exception`` cannot turn it into a scored failure)."""

    def __init__(self, reason: str, *, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        #: ``"stopped"`` (the user asked) or ``"unavailable"`` (the app went away).
        self.kind = kind


class AppUnavailable(Exception):  # noqa: N818
    """The task app cannot be reached; raised inside the loop, turned into RunInterrupted."""


class TaskAppAdapter:
    """gepa ``GEPAAdapter`` for a task app (see the module docstring)."""

    propose_new_texts = None

    def __init__(self, *, options: RunOptions, target: AppTarget, interceptor: Interceptor,
                 loop: asyncio.AbstractEventLoop, ledger: RunLedger) -> None:
        self.options = options
        self.target = target
        self.interceptor = interceptor
        self.loop = loop
        self.ledger = ledger
        self.client: httpx.AsyncClient | None = None
        self._ids = itertools.count(1)
        self._inflight: set[concurrent.futures.Future[Any]] = set()
        self._lock = threading.Lock()
        self._interrupt: RunInterrupted | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._headers: dict[str, str] = {}
        #: Seed scores by validation index, reused once when a run resumes (gepa would
        #: otherwise re-run the seed's whole validation set before loading its state).
        self.resume_seed_scores: dict[int, float] | None = None

    async def open(self) -> None:
        """Create the pooled client on the run loop (call there)."""
        import httpx

        size = self.options.concurrency
        # idle connections expire before uvicorn's 5 s keep-alive closes them on the server
        # side, so a rollout never picks a connection the server is closing
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size,
                              keepalive_expiry=2.0)
        self.client = httpx.AsyncClient(trust_env=False, limits=limits,
                                        timeout=self.options.rollout_timeout)
        self._semaphore = asyncio.Semaphore(size)
        self._headers = {**self.target.headers, "Content-Type": "application/json"}

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()

    # ------------------------------------------------------------------ stopping

    def interrupt(self, reason: str, *, kind: str) -> None:
        """End the run now: cancel every in-flight rollout (from any thread)."""
        with self._lock:
            if self._interrupt is None:
                self._interrupt = RunInterrupted(reason, kind=kind)
                self.ledger.interrupted = True
            futures = list(self._inflight)
        for future in futures:
            future.cancel()

    # ------------------------------------------------------------------ gepa API

    def evaluate(self, batch: list[TaskExample], candidate: dict[str, str],
                 capture_traces: bool = False) -> Any:
        from gepa.core.adapter import EvaluationBatch

        seeded = self.resume_seed_scores
        if (seeded is not None and not capture_traces
                and candidate == self.options.seed_candidate
                and all(ex.split == "val" and ex.index in seeded for ex in batch)):
            self.resume_seed_scores = None
            scores = [seeded[ex.index] for ex in batch]
            outputs = [{"example": ex.describe(), "reward": s, "resumed": True}
                       for ex, s in zip(batch, scores, strict=True)]
            return EvaluationBatch(outputs=outputs, scores=scores, num_metric_calls=0)
        return self._run([(candidate, batch)], capture_traces)[0]

    def batch_evaluate(self, items: list[tuple[dict[str, str], list[TaskExample]]]) -> list[Any]:
        return self._run(items, True)

    def make_reflective_dataset(self, candidate: dict[str, str], eval_batch: Any,
                                components_to_update: list[str]) -> dict[str, list[Any]]:
        records = [_reflection_record(trajectory, score) for trajectory, score in
                   zip(eval_batch.trajectories or [], eval_batch.scores, strict=False)]
        return {component: records for component in components_to_update}

    def get_adapter_state(self) -> dict[str, Any]:
        return {"taskapp_notebook": self.ledger.export()}

    def set_adapter_state(self, state: dict[str, Any]) -> None:
        data = state.get("taskapp_notebook")
        if isinstance(data, dict):
            self.ledger.restore(data)

    # ------------------------------------------------------------------ dispatch

    def _run(self, items: Sequence[tuple[dict[str, str], list[TaskExample]]],
             capture: bool) -> list[Any]:
        with self._lock:
            if self._interrupt is not None:
                raise self._interrupt
            future = asyncio.run_coroutine_threadsafe(self._evaluate_all(items, capture),
                                                      self.loop)
            self._inflight.add(future)
        try:
            result: list[Any] = future.result()
            return result
        except (concurrent.futures.CancelledError, AppUnavailable) as exc:
            if isinstance(exc, AppUnavailable):
                self.interrupt(str(exc), kind="unavailable")
            assert self._interrupt is not None
            raise self._interrupt from None
        finally:
            with self._lock:
                self._inflight.discard(future)
            self.ledger.push_counts()

    async def _evaluate_all(self, items: Sequence[tuple[dict[str, str], list[TaskExample]]],
                            capture: bool) -> list[Any]:
        from gepa.core.adapter import EvaluationBatch

        jobs: list[asyncio.Task[tuple[dict[str, Any], float, list[ModelCall]]]] = []
        shape: list[int] = []
        for candidate, batch in items:
            cid = self.interceptor.register(candidate)
            shape.append(len(batch))
            jobs.extend(asyncio.ensure_future(self._rollout(cid, candidate, example))
                        for example in batch)
        try:
            done, pending = await asyncio.wait(jobs, return_when=asyncio.FIRST_EXCEPTION)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        except asyncio.CancelledError:
            for task in jobs:
                task.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            raise
        results = [task.result() for task in jobs]
        out: list[Any] = []
        start = 0
        for size in shape:
            chunk = results[start:start + size]
            start += size
            outputs = [r[0] for r in chunk]
            objectives: list[Any] = [r[0].get("objectives") for r in chunk]
            names = sorted({name for o in objectives if o for name in o})
            if names:  # a failed rollout scores 0 on every objective too
                objectives = [o or dict.fromkeys(names, 0.0) for o in objectives]
            out.append(EvaluationBatch(
                outputs=outputs, scores=[r[1] for r in chunk],
                trajectories=[{**r[0], "calls": r[2]} for r in chunk] if capture else None,
                objective_scores=objectives if all(objectives) else None))
        return out

    async def _rollout(self, cid: str, candidate: dict[str, str],
                       example: TaskExample) -> tuple[dict[str, Any], float, list[ModelCall]]:
        import httpx

        assert self.client is not None and self._semaphore is not None
        async with self._semaphore:
            why = self.target.unavailable()
            if why:
                raise AppUnavailable(why)
            rid = f"r{next(self._ids)}"
            output: dict[str, Any] = {"example": example.describe(), "rollout_id": rid}
            content = json.dumps(self._request(cid, rid, candidate, example)).encode()
            for attempt in range(_ATTEMPTS):
                try:
                    response = await self.client.post(f"{self.target.url}/rollout",
                                                      headers=self._headers, content=content)
                    break
                except httpx.TimeoutException:
                    return self._failed(output, f"the rollout took longer than "
                                        f"{self.options.rollout_timeout:g} s", rid)
                except httpx.TransportError as exc:
                    # a dropped connection (a tunnel hiccup) is retried; a gone app is not
                    self.interceptor.take_calls(rid)
                    why = self.target.unavailable()
                    if why is None and attempt + 1 < _ATTEMPTS:
                        await asyncio.sleep(0.2 * (attempt + 1))
                        continue
                    raise AppUnavailable(why or f"cannot reach the task app at "
                                         f"{self.target.url}: {type(exc).__name__}: {exc}"
                                         ) from None
                except BaseException:
                    self.interceptor.take_calls(rid)
                    raise
            status = response.status_code
            if status in _UNREACHABLE:
                why = self.target.unavailable()
                self.interceptor.take_calls(rid)
                raise AppUnavailable(why or f"the task app at {self.target.url} answered HTTP "
                                     f"{status} on /rollout: {self._text(response)}")
            if status >= 400:
                return self._failed(output, f"HTTP {status}: {self._text(response)}", rid)
            try:
                body = response.json()
                info = body.get("reward_info") or body.get("metrics") or {}
                reward = float(info["outcome_reward"])
            except (ValueError, KeyError, TypeError, AttributeError):
                return self._failed(output, "the /rollout response has no "
                                    f"reward_info.outcome_reward: {self._text(response)}", rid)
            output.update(reward=reward, details=info.get("details") or {},
                          status_detail=body.get("status_detail"))
            objectives = info.get("outcome_objectives")
            if isinstance(objectives, dict) and objectives:
                output["objectives"] = {str(k): float(v) for k, v in objectives.items()}
            self.ledger.rollout_done()
            return output, reward, self.interceptor.take_calls(rid)

    def _request(self, cid: str, rid: str, candidate: dict[str, str],
                 example: TaskExample) -> dict[str, Any]:
        config: dict[str, Any] = {
            **self.options.policy_config,
            "model": self.options.model,
            "provider": "openai",
            "inference_url": self.interceptor.inference_url(cid, rid),
        }
        if self.options.deliver_components:
            config["prompt_components"] = dict(candidate)
        env: dict[str, Any] = {"config": dict(example.config)}
        if example.seed is not None:
            env["seed"] = example.seed
        if self.options.env_name:
            env["env_name"] = self.options.env_name
        return {"trace_correlation_id": f"{self.interceptor.run_id}-{rid}", "env": env,
                "policy": {"policy_name": "taskapp-notebook-gepa", "config": config},
                "on_done": "reset", "safety": {"max_time_s": self.options.rollout_timeout}}

    def _failed(self, output: dict[str, Any], error: str,
                rid: str) -> tuple[dict[str, Any], float, list[ModelCall]]:
        output.update(reward=0.0, error=error)
        self.ledger.rollout_done(error=error)
        return output, 0.0, self.interceptor.take_calls(rid)

    def _text(self, response: httpx.Response) -> str:
        return scrub_secrets(response.text[:300], self.target.secrets)


def _reflection_record(trajectory: dict[str, Any], score: float) -> dict[str, Any]:
    """One ``{"Inputs", "Generated Outputs", "Feedback"}`` row from a rollout's record."""
    calls: list[ModelCall] = trajectory.get("calls") or []
    if calls:
        turns = [m for m in calls[0].messages if m.get("role") not in ("system", "developer")]
        inputs: Any = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in turns)
        replies = [c.reply or f"(no reply: {c.error})" for c in calls]
        outputs: Any = replies[0] if len(replies) == 1 else replies
    else:
        inputs = trajectory.get("example")
        outputs = "(the app made no model call through the interceptor)"
    details = trajectory.get("details") or {}
    feedback = [f"Score: {score:g}."]
    if isinstance(details, dict) and isinstance(details.get("feedback"), str):
        feedback.append(details["feedback"])
    elif details:
        feedback.append("Details: " + json.dumps(details, default=str)[:1000])
    for key in ("status_detail", "error"):
        if trajectory.get(key):
            feedback.append(f"{key.replace('_', ' ').capitalize()}: {trajectory[key]}")
    return {"Inputs": inputs, "Generated Outputs": outputs, "Feedback": " ".join(feedback)}
