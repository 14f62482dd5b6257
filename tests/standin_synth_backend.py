"""A stand-in for Synth's job backend (not Synth's code), following docs/hosted-jobs-wire.md.

It accepts ``POST /api/v1/offline/jobs`` in synth-ai 0.9's shape (and refuses what the real
backend refuses), then runs the job the way the real backend does: it calls the task app's
``/rollout`` at the job's ``container_url`` — through the SynthTunnel relay when that is what
the URL is, with the worker token — and hands the app an ``inference_url`` of its own (an
OpenAI-compatible interceptor that answers with the candidate's instruction, so the reward
depends on the candidate). It publishes events over SSE (``…/events/stream``, honouring
``Last-Event-ID``) and for polling (``…/events?since_seq=``), serves the status, and cancels
on ``PATCH {"state": "cancelled"}``.

Knobs a test sets: ``behaviour`` ("run", "fail", "stuck"; "hold": the job scores the baseline
and one candidate, then stays running until cancelled), ``step_delay`` (seconds before each
step, so the events arrive one by one), ``refuse_cancel`` (the cancel answers HTTP 503),
``create_delay`` (seconds the create's answer takes after the job exists),
``drop_stream_after`` (abort the first SSE connection after N events), ``sse`` (False: no
stream, 404), ``silent_stream`` (the stream stays open but sends only keep-alives),
``container_api_key`` (the key Synth resolves server-side for an app it reaches directly,
without a SynthTunnel agent to add it: the real backend holds the user's uploaded
ENVIRONMENT_API_KEY).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

GEPA_ENVELOPE = {"kind", "technique", "config_mode", "system", "config", "metadata", "auto_start"}
IMPROVEMENT = " Think step by step."


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Job:
    id: str
    kind: str
    body: dict[str, Any]
    worker_token: str | None
    backend_url: str
    events: list[dict[str, Any]] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    candidates: dict[str, str] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def emit(self, kind: str, message: str = "", **data: Any) -> None:
        seq = len(self.events) + 1
        self.events.append({"type": kind, "seq": seq, "job_id": self.id,
                            "message": message or kind, "data": data})
        self.changed.set()
        self.changed = asyncio.Event()


def _find_key(value: Any, names: tuple[str, ...]) -> bool:
    if isinstance(value, dict):
        return any(str(k).lower() in names or _find_key(v, names) for k, v in value.items())
    if isinstance(value, list):
        return any(_find_key(v, names) for v in value)
    return False


class StandInSynthBackend:
    """Stand-in for Synth's offline job API (see the module docstring)."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.behaviour = "run"
        self.drop_stream_after: int | None = None
        self.sse = True
        self.container_api_key: str | None = None
        self.silent_stream = False
        self.step_delay = 0.0
        self.refuse_cancel = False
        self.create_delay = 0.0
        self.requests: list[Recorded] = []
        self.stream_connections: list[dict[str, str | None]] = []
        self.rollouts: list[dict[str, Any]] = []
        self.intercepted: list[dict[str, Any]] = []
        self.cancels: list[dict[str, Any]] = []
        self.jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self.app = FastAPI()
        self.app.post("/api/v1/offline/jobs")(self.create)
        self.app.get("/api/v1/offline/jobs/{job_id}")(self.get_status)
        self.app.patch("/api/v1/offline/jobs/{job_id}")(self.patch)
        self.app.get("/api/v1/offline/jobs/{job_id}/events")(self.list_events)
        self.app.get("/api/v1/offline/jobs/{job_id}/events/stream")(self.stream)
        self.app.post("/api/interceptor/v1/{job_id}/{candidate_id}/chat/completions")(
            self.intercept
        )

    # ------------------------------------------------------------------ HTTP

    async def _record(self, request: Request) -> Recorded | JSONResponse:
        raw = await request.body()
        body = json.loads(raw) if raw else None
        record = Recorded(request.method, request.url.path, dict(request.headers), body)
        self.requests.append(record)
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return JSONResponse({"detail": "invalid API key"}, status_code=401)
        return record

    async def create(self, request: Request) -> Any:
        record = await self._record(request)
        if isinstance(record, JSONResponse):
            return record
        body = record.body if isinstance(record.body, dict) else {}
        if "algorithm" in body or "config_body" in body:
            return JSONResponse({"detail": "Top-level 'algorithm' is no longer supported; "
                                 "use top-level 'kind'."}, status_code=422)
        if _find_key(body.get("config"), ("container_api_key", "container_api_keys")):
            return JSONResponse({"detail": "container_api_key is server-resolved only"},
                                status_code=422)
        kind = body.get("kind")
        if kind == "gepa_offline":
            if set(body) != GEPA_ENVELOPE:
                return JSONResponse({"detail": f"unexpected keys {sorted(body)}"},
                                    status_code=422)
            section = body["config"]["prompt_learning"]
            if section.get("initial_prompt") is not None:
                return JSONResponse({"detail": "initial_prompt is not supported"},
                                    status_code=422)
            token = record.headers.get("x-synthtunnel-worker-token")
        elif kind == "eval":
            token = body.get("container_worker_token")
        else:
            return JSONResponse({"detail": f"unknown kind {kind!r}"}, status_code=422)
        job = Job(id=f"job_{next(self._ids)}", kind=kind, body=body, worker_token=token,
                  backend_url=str(request.base_url).rstrip("/"))
        job.status = {"job_id": job.id, "status": "queued"}
        self.jobs[job.id] = job
        job.task = asyncio.create_task(self._run(job))
        await asyncio.sleep(self.create_delay)
        return {"job_id": job.id, "id": job.id, "status": "queued"}

    async def get_status(self, job_id: str, request: Request) -> Any:
        record = await self._record(request)
        if isinstance(record, JSONResponse):
            return record
        job = self.jobs.get(job_id)
        return job.status if job else JSONResponse({"detail": "no such job"}, status_code=404)

    async def patch(self, job_id: str, request: Request) -> Any:
        record = await self._record(request)
        if isinstance(record, JSONResponse):
            return record
        job = self.jobs[job_id]
        self.cancels.append({"job_id": job_id, "body": record.body})
        if self.refuse_cancel:
            return JSONResponse({"detail": "cancel unavailable"}, status_code=503)
        if isinstance(record.body, dict) and record.body.get("state") == "cancelled":
            if job.task is not None and not job.task.done():
                job.task.cancel()
                job.status.update(status="cancelled")
                job.emit("job.cancelled", "cancelled by the client")
        return job.status

    async def list_events(self, job_id: str, request: Request, since_seq: int = 0,
                          limit: int = 500) -> Any:
        record = await self._record(request)
        if isinstance(record, JSONResponse):
            return record
        events = [e for e in self.jobs[job_id].events if e["seq"] > since_seq][:limit]
        return {"events": events, "next_seq": events[-1]["seq"] if events else since_seq}

    async def stream(self, job_id: str, request: Request) -> Any:
        record = await self._record(request)
        if isinstance(record, JSONResponse):
            return record
        if not self.sse:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        last = request.headers.get("last-event-id")
        self.stream_connections.append({"last_event_id": last,
                                         "accept": request.headers.get("accept")})
        first = len(self.stream_connections) == 1
        return StreamingResponse(self._frames(self.jobs[job_id], int(last or 0), first),
                                 media_type="text/event-stream")

    async def _frames(self, job: Job, after: int, first: bool) -> AsyncIterator[str]:
        sent = 0
        index = after
        while True:
            while index < len(job.events) and not self.silent_stream:
                event = job.events[index]
                index += 1
                yield f"id: {event['seq']}\nevent: message\ndata: {json.dumps(event)}\n\n"
                sent += 1
                if event["type"].endswith(("job.completed", "job.failed", "job.cancelled")):
                    return
                if first and self.drop_stream_after is not None and \
                        sent >= self.drop_stream_after:
                    raise ConnectionAbortedError("stand-in drops the stream")
            changed = job.changed
            try:
                await asyncio.wait_for(changed.wait(), 5.0)
            except TimeoutError:
                yield ": keep-alive\n\n"

    async def intercept(self, job_id: str, candidate_id: str, request: Request) -> Any:
        body = await request.json()
        self.intercepted.append({"job_id": job_id, "candidate_id": candidate_id, "body": body})
        instruction = self.jobs[job_id].candidates[candidate_id]
        return {"id": "chatcmpl-standin", "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant",
                                                     "content": instruction}}]}

    # ------------------------------------------------------------------ running a job

    async def _run(self, job: Job) -> None:
        job.status["status"] = "running"
        algo = "gepa" if job.kind == "gepa_offline" else None
        prefix = f"learning.policy.{algo}" if algo else "eval.policy"
        job.emit(f"{prefix}.job.started", "job started")
        try:
            if self.behaviour == "stuck":
                await asyncio.Event().wait()
            if job.kind == "eval":
                await self._run_eval(job)
            else:
                await self._run_gepa(job, prefix)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed rollout fails the job, as on the real backend
            job.status.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            job.emit(f"{prefix}.job.failed", f"job failed: {exc}")

    async def _rollouts(self, job: Job, config: dict[str, Any], cid: str,
                        seeds: list[int]) -> float:
        url = config["container_url"].rstrip("/") + "/rollout"
        policy = dict(config.get("policy") or {})
        policy["inference_url"] = f"{job.backend_url}/api/interceptor/v1/{job.id}/{cid}"
        headers = {"X-SynthTunnel-Worker-Token": job.worker_token or ""}
        if self.container_api_key:
            headers["X-API-Key"] = self.container_api_key
        rewards = []
        async with httpx.AsyncClient(timeout=30.0, trust_env=False) as client:
            for seed in seeds:
                response = await client.post(url, headers=headers, json={
                    "trace_correlation_id": f"{job.id}-{cid}-{seed}",
                    "env": {"seed": seed, "env_name": config.get("env_name")},
                    "policy": {"policy_name": cid, "config": policy},
                })
                self.rollouts.append({"job_id": job.id, "candidate": cid, "seed": seed,
                                      "status": response.status_code})
                if response.status_code != 200:
                    raise RuntimeError(f"rollout HTTP {response.status_code}: "
                                       f"{response.text[:200]}")
                rewards.append(float(response.json()["reward_info"]["outcome_reward"]))
        return sum(rewards) / len(rewards)

    async def _run_gepa(self, job: Job, prefix: str) -> None:
        section = job.body["config"]["prompt_learning"]
        gepa = section["gepa"]
        pools = section["task_data"]["train_pools"]
        seeds = [*pools.get("reflection_seeds", []), *pools.get("pareto_seeds", [])]
        stages = gepa["initial_candidate"]["stages"]
        seed_text = stages[0]["instruction"]
        config = {"container_url": section["container_url"], "policy": section.get("policy"),
                  "env_name": gepa["env_name"]}
        job.candidates = {"baseline": seed_text, "cand_1": seed_text + IMPROVEMENT}
        total = 2 * len(seeds)
        await asyncio.sleep(self.step_delay)
        baseline = await self._rollouts(job, config, "baseline", seeds)
        job.emit(f"{prefix}.baseline", "baseline evaluated", reward=baseline,
                 rollouts_completed=len(seeds), rollouts_total=total,
                 prompt={"stages": stages})
        if self.behaviour == "fail":
            raise RuntimeError(f"proposer crashed while reading job {job.body!r} "
                               f"(worker token {job.worker_token})")
        best_stages = [{**stages[0], "instruction": job.candidates["cand_1"]}]
        await asyncio.sleep(self.step_delay)
        reward = await self._rollouts(job, config, "cand_1", seeds)
        job.emit(f"{prefix}.candidate.evaluated", "candidate evaluated", candidate_id="cand_1",
                 reward=reward, parent_id="baseline", generation=1,
                 prompt={"stages": best_stages})
        best = max(reward, baseline)
        if reward > baseline:
            job.emit(f"{prefix}.candidate.new_best", "new best", candidate_id="cand_1",
                     reward=reward, generation=1)
        if self.behaviour == "hold":
            await asyncio.Event().wait()  # running until cancelled
        await asyncio.sleep(self.step_delay)
        job.emit(f"{prefix}.job.progress", "progress", rollouts_completed=total,
                 rollouts_total=total, best_reward=best, baseline_reward=baseline)
        job.status.update(status="succeeded", best_reward=best, baseline_reward=baseline,
                          best_candidate={"stages": best_stages if reward > baseline
                                          else stages},
                          candidates_evaluated=2, generations_completed=1)
        job.emit(f"{prefix}.job.completed", "job completed", status="succeeded",
                 best_reward=best)

    async def _run_eval(self, job: Job) -> None:
        config = job.body["config"]
        job.candidates = {"eval": "Answer the question."}
        seeds = list(config.get("seeds") or [0])
        mean = await self._rollouts(job, config, "eval", seeds)
        job.emit("eval.policy.job.progress", "progress", rollouts_completed=len(seeds),
                 rollouts_total=len(seeds))
        job.status.update(status="succeeded", mean_reward=mean, best_reward=mean,
                          seeds_evaluated=len(seeds))
        job.emit("eval.policy.job.completed", "eval completed", status="succeeded")
