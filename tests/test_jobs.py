"""Hosted jobs end to end: our client, a real relay and agent, a stand-in Synth backend.

The stand-in (``tests/standin_synth_backend.py``) follows docs/hosted-jobs-wire.md: it takes
the create request, calls the task app's ``/rollout`` through the real relay
(``RelayServer``) and our agent (``InProcessTaskApp(tunnel_mode="synthtunnel")``) with the
worker token and an ``inference_url`` of its own, streams events over SSE and finishes.
Every server is a real uvicorn server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from standin_synth_backend import IMPROVEMENT, StandInSynthBackend
from support import free_port, port_is_free, serve, wait_for

from taskapp_notebook import registry
from taskapp_notebook.errors import InvalidParameterError, mask_secret
from taskapp_notebook.jobs import (
    HostedJob,
    JobConfigError,
    JobError,
    JobTimeoutError,
    merge_dot_overrides,
    resolve_backend_url,
    run_in_process_job,
    run_in_process_job_sync,
    submit_and_poll_job,
)
from taskapp_notebook.jobs.events import JobEventFeed
from taskapp_notebook.models import RewardInfo, RolloutRequest, RolloutResponse, TaskAppConfig
from taskapp_notebook.progress import CandidateSummary, RunProgress
from taskapp_notebook.relay import RelayServer

KEY = "synth-standin-key-0123456789"
APP_KEY = "task-app-key-abcdef0123456789"
SEED_PROMPT = "Answer the arithmetic question."

GEPA = {
    "prompt_learning": {
        "algorithm": "gepa",
        "policy": {"provider": "openai", "model": "gpt-4.1-nano",
                   "inference_mode": "synth_hosted", "temperature": 0.0},
        "task_data": {"split": "train",
                      "train_pools": {"reflection_seeds": [0, 1], "pareto_seeds": [2]},
                      "validation_seeds": [3]},
        "gepa": {"env_name": "arithmetic", "termination_conditions": {"total_rollouts": 6},
                 "rollout": {"budget": 6, "max_concurrent": 2}},
    }
}


@dataclass
class World:
    relay: RelayServer
    backend: StandInSynthBackend
    backend_url: str
    seen_by_app: list[dict[str, str]]


def task_config(seen: list[dict[str, str]]) -> TaskAppConfig:
    """A task app whose reward depends on what the policy (the interceptor) answers."""

    async def rollout(request: RolloutRequest, fastapi_request: Request) -> RolloutResponse:
        seen.append(dict(fastapi_request.headers))
        url = str(request.policy.config["inference_url"]).rstrip("/") + "/chat/completions"
        async with httpx.AsyncClient(trust_env=False) as client:
            reply = await client.post(url, json={
                "model": request.policy.config.get("model"),
                "messages": [{"role": "system", "content": SEED_PROMPT},
                             {"role": "user", "content": f"seed {request.env.seed}"}],
            })
        text = reply.json()["choices"][0]["message"]["content"]
        reward = 1.0 if "step by step" in text else 0.25
        return RolloutResponse(trace_correlation_id=request.trace_correlation_id,
                               reward_info=RewardInfo(outcome_reward=reward))

    return TaskAppConfig(app_id="arithmetic", name="Arithmetic", description="hosted test",
                         rollout=rollout)


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    backend = StandInSynthBackend(KEY)
    with RelayServer(api_keys=[KEY]) as relay, serve(backend.app) as url:
        monkeypatch.setenv("SYNTH_BACKEND_URL", relay.url)  # leases: the relay
        monkeypatch.setenv("SYNTH_API_KEY", KEY)
        for name in ("SYNTH_RUST_BACKEND_URL", "SYNTH_RUST_BACKEND_URL_OVERRIDE",
                     "RUST_BACKEND_URL"):
            monkeypatch.delenv(name, raising=False)
        yield World(relay, backend, url, [])


def start(world: World, **kwargs: Any) -> HostedJob:
    options: dict[str, Any] = dict(
        config=task_config(world.seen_by_app), config_dict=GEPA, seed_prompt=SEED_PROMPT,
        backend_url=world.backend_url, tunnel_mode="synthtunnel", task_app_api_key=APP_KEY,
        port=free_port(), poll_interval=0.05, timeout=60,
    )
    options.update(kwargs)
    return run_in_process_job(**options)


def relay_health(world: World) -> dict[str, Any]:
    health: dict[str, Any] = httpx.get(world.relay.url + "/health", trust_env=False).json()
    return health


def assert_everything_stopped(world: World, job: HostedJob) -> None:
    assert job.task_app is not None
    assert str(job.task_app.state) == "stopped"
    assert port_is_free(job.task_app.port)
    assert job.task_app not in registry.running()
    assert wait_for(lambda: relay_health(world)["leases"] == 0, 10)


async def test_hosted_gepa_through_the_relay_with_a_dropped_stream(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    world.backend.drop_stream_after = 2
    job = start(world)
    assert isinstance(job, HostedJob) and not job.done()  # returned at once
    assert job.progress.snapshot().budget_total == 6
    result = await job

    assert result.succeeded, result.status
    assert result.baseline_reward == 0.25 and result.best_reward == 1.0
    assert result.best_prompt == {"main": SEED_PROMPT + IMPROVEMENT}
    assert result.task_app_url.startswith(world.relay.url + "/s/rt_")

    # The create request: 0.9.x envelope, header-only worker token, no secret in the body.
    (create,) = [r for r in world.backend.requests if r.method == "POST"]
    assert create.path == "/api/v1/offline/jobs"
    assert set(create.body) == {"kind", "technique", "config_mode", "system", "config",
                                "metadata", "auto_start"}
    assert create.body["kind"] == "gepa_offline"
    assert create.body["metadata"] == {"backend_base_url": world.backend_url + "/api"}
    section = create.body["config"]["prompt_learning"]
    assert section["container_url"] == result.task_app_url
    assert section["gepa"]["initial_candidate"] == {
        "stages": [{"stage_id": "main", "instruction": SEED_PROMPT}]}
    token = create.headers["x-synthtunnel-worker-token"]
    assert token and token not in json.dumps(create.body)
    assert APP_KEY not in json.dumps(create.body) and KEY not in json.dumps(create.body)
    others = [r for r in world.backend.requests if r is not create]
    assert others and all("x-synthtunnel-worker-token" not in r.headers for r in others)
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in world.backend.requests)

    # The backend reached the app through the relay and our agent, with the worker token.
    assert len(world.backend.rollouts) == 6 and {r["status"] for r in world.backend.rollouts} \
        == {200}
    assert all(h.get("x-synthtunnel-lease-id") and h.get("x-forwarded-proto") == "https"
               for h in world.seen_by_app)
    assert all(h.get("x-api-key") == APP_KEY and token not in json.dumps(h)
               for h in world.seen_by_app)
    assert {i["candidate_id"] for i in world.backend.intercepted} == {"baseline", "cand_1"}

    # The stream was dropped after 2 events and resumed with Last-Event-ID: 2.
    connections = world.backend.stream_connections
    assert connections[0] == {"last_event_id": None, "accept": "text/event-stream"}
    assert connections[1]["last_event_id"] == "2"
    assert result.follow_stats["resumed"] >= 1

    snap = job.progress.snapshot()
    assert snap.kind == "hosted gepa" and snap.state == "succeeded"
    assert snap.seed_score == 0.25 and snap.best_score == 1.0
    assert snap.best_candidate_id == "cand_1" and snap.rollouts == 6
    assert [c.id for c in snap.candidates] == ["baseline", "cand_1"]
    assert snap.best is not None and snap.best.components == {"main": SEED_PROMPT + IMPROVEMENT}
    assert snap.extra["job_id"] == result.job_id and job.result is result
    assert_everything_stopped(world, job)

    # No secret in full anywhere: logs (every level, library loggers too), reprs, progress.
    shown = "\n".join(r.getMessage() for r in caplog.records)
    shown += repr(job) + repr(result) + repr(job.progress.snapshot())
    for secret in (token, APP_KEY, KEY):
        assert secret not in shown


async def test_cancel_cancels_on_the_backend_and_stops_the_app(world: World) -> None:
    world.backend.behaviour = "stuck"
    job = start(world)
    await asyncio.to_thread(wait_for, lambda: job.job_id is not None
                            and job.progress.snapshot().state == "running")
    job.cancel()
    job.cancel("a second click")  # changes nothing
    result = await job
    assert result.state == "cancelled" and not result.succeeded
    assert result.error == "cancelled by the user"
    assert world.backend.cancels == [{"job_id": job.job_id, "body": {"state": "cancelled"}}]
    assert job.progress.snapshot().state == "cancelled"
    assert_everything_stopped(world, job)


async def test_a_cancel_while_the_create_is_answered_cancels_on_the_backend(
        world: World) -> None:
    world.backend.behaviour = "stuck"
    world.backend.create_delay = 0.5
    job = start(world)
    await asyncio.to_thread(wait_for, lambda: bool(world.backend.jobs))
    assert job.job_id is None  # the backend made the job; its answer is on its way
    job.cancel()
    result = await job
    (job_id,) = world.backend.jobs
    assert result.state == "cancelled" and job.job_id == job_id
    assert world.backend.cancels == [{"job_id": job_id, "body": {"state": "cancelled"}}]
    assert_everything_stopped(world, job)


async def test_a_cancel_the_backend_refuses_is_said(world: World) -> None:
    world.backend.behaviour = "stuck"
    world.backend.refuse_cancel = True
    job = start(world)
    await asyncio.to_thread(wait_for, lambda: job.job_id is not None
                            and job.progress.snapshot().state == "running")
    job.cancel()
    result = await job
    assert result.state == "cancelled" and len(world.backend.cancels) == 1
    assert result.error is not None and result.error.startswith("cancelled by the user; ")
    assert "did not confirm the cancel" in result.error and "HTTP 503" in result.error
    assert f"job {job.job_id} may still be running there" in result.error
    assert job.progress.snapshot().message == result.error  # what the view shows
    assert_everything_stopped(world, job)


async def test_a_failed_job_comes_back_with_secrets_masked(world: World) -> None:
    world.backend.behaviour = "fail"
    events: list[dict[str, Any]] = []
    job = start(world, on_event=events.append)
    result = await job
    assert result.state == "failed" and result.error is not None
    token = world.backend.jobs[result.job_id].worker_token
    assert token and token not in result.error and mask_secret(token) in result.error
    failed = events[-1]
    assert failed["type"] == "learning.policy.gepa.job.failed"
    assert token not in json.dumps(failed) and mask_secret(token) in failed["message"]
    snap = job.progress.snapshot()
    assert snap.state == "failed" and token not in snap.message
    assert token not in json.dumps(result.status)
    assert_everything_stopped(world, job)


async def test_timeout_cancels_the_job_and_stops_the_app(world: World) -> None:
    world.backend.behaviour = "stuck"
    job = start(world, timeout=1.0)
    with pytest.raises(JobTimeoutError, match="did not end within 1 s"):
        await job
    assert [c["body"] for c in world.backend.cancels] == [{"state": "cancelled"}]
    assert job.progress.snapshot().state == "failed"
    assert_everything_stopped(world, job)


async def test_interrupting_the_waiter_cancels_the_job(world: World) -> None:
    world.backend.behaviour = "stuck"
    job = start(world)
    waiter = asyncio.ensure_future(job.wait())
    await asyncio.to_thread(wait_for, lambda: job.job_id is not None)
    waiter.cancel()  # what an interrupted `await job` does
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.to_thread(wait_for, job.done)
    assert [c["job_id"] for c in world.backend.cancels] == [job.job_id]
    assert_everything_stopped(world, job)


async def test_an_app_stopped_elsewhere_ends_the_job(world: World) -> None:
    world.backend.behaviour = "stuck"
    job = start(world)
    await asyncio.to_thread(wait_for, lambda: job.job_id is not None)
    assert job.task_app is not None
    await job.task_app.astop()  # as %taskapp stop / stop_all / kernel shutdown would
    result = await job
    assert result.state == "failed" and "task app stopped" in (result.error or "")
    assert [c["job_id"] for c in world.backend.cancels] == [job.job_id]
    assert_everything_stopped(world, job)


async def test_no_event_stream_falls_back_to_polling(world: World) -> None:
    world.backend.sse = False
    result = await start(world)
    assert result.succeeded and result.best_reward == 1.0
    assert result.follow_stats["polls"] >= 1
    assert any(r.path.endswith("/events") for r in world.backend.requests)


async def test_a_silent_stream_does_not_hide_the_end(world: World) -> None:
    world.backend.silent_stream = True  # open, but no event ever arrives on it
    result = await start(world)
    assert result.succeeded and result.best_reward == 1.0
    assert result.follow_stats["streams"] == 1 and result.follow_stats["polls"] == 0
    assert len([r for r in world.backend.requests if r.path.endswith("/job_1")]) >= 2


async def test_eval_job(world: World) -> None:
    job = start(world, job_type="eval", config_dict={
        "env_name": "arithmetic", "seeds": [0, 1],
        "policy": {"provider": "openai", "model": "gpt-4.1-nano"}}, seed_prompt=None,
        system_name="my-eval")
    result = await job
    assert result.succeeded and result.kind == "eval"
    (create,) = [r for r in world.backend.requests if r.method == "POST"]
    body = create.body
    assert body["kind"] == "eval" and body["system"] == {"name": "my-eval", "reuse": True}
    assert body["config"]["container_url"] == result.task_app_url
    assert body["prompt_opt_version"] == "v1" and body["container_worker_token"]
    assert "x-synthtunnel-worker-token" not in create.headers  # that client's transport
    assert job.progress.snapshot().kind == "hosted eval"
    assert_everything_stopped(world, job)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"api_key": None}, InvalidParameterError, "SYNTH_API_KEY"),
        ({"tunnel_mode": "quick"}, InvalidParameterError, "Use tunnel_mode='synthtunnel'"),
        ({"tunnel_mode": "preconfigured", "preconfigured_url": "https://x.trycloudflare.com"},
         InvalidParameterError, "Cloudflare"),
        ({"overrides": {"prompt_learning.initial_prompt": "hi"}}, JobConfigError,
         "initial_candidate"),
        ({"config_dict": {"algorithm": "gepa", "config_body": {}}}, JobConfigError,
         "Top-level 'algorithm'"),
        ({"overrides": {"prompt_learning.gepa.container_api_key": "k"}}, JobConfigError,
         "gepa.container_api_key"),
        ({"overrides": {"prompt_learning.gepa.rollout_budget": 4}}, JobConfigError,
         "gepa.rollout.budget"),
        ({"job_type": "rl"}, InvalidParameterError, "job_type must be one of"),
    ],
)
def test_refused_before_anything_starts(
    kwargs: dict[str, Any], error: type[Exception], match: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if "api_key" in kwargs:
        monkeypatch.delenv("SYNTH_API_KEY", raising=False)
    else:
        monkeypatch.setenv("SYNTH_API_KEY", KEY)
    options: dict[str, Any] = dict(config=task_config([]), config_dict=GEPA,
                                   backend_url="https://api.usesynth.ai")
    options.update(kwargs)
    before = set(registry.running())
    with pytest.raises(error, match=match):
        run_in_process_job(**options)
    assert set(registry.running()) == before


def test_sync_wrapper_with_a_local_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = StandInSynthBackend(KEY)
    backend.container_api_key = APP_KEY  # resolved server-side: we never send it
    seen: list[dict[str, str]] = []
    events: list[dict[str, Any]] = []
    statuses: list[dict[str, Any]] = []
    monkeypatch.setenv("SYNTH_API_KEY", KEY)
    with serve(backend.app) as url:
        result = run_in_process_job_sync(
            config=task_config(seen), config_dict=GEPA, seed_prompt=SEED_PROMPT,
            backend_url=url, port=free_port(), poll_interval=0.05, timeout=60,
            task_app_api_key=APP_KEY, on_event=events.append, on_status=statuses.append,
        )
    assert result.succeeded and result.best_reward == 1.0
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "learning.policy.gepa.job.completed"
    assert statuses and statuses[-1]["status"] == "succeeded"
    # A backend on this machine: no tunnel (as synth-ai does), the app's loopback URL.
    assert result.task_app_url.startswith("http://127.0.0.1:")
    assert "x-synthtunnel-worker-token" not in backend.requests[0].headers
    assert APP_KEY not in json.dumps(backend.requests[0].body)


async def test_sync_wrapper_refuses_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="await job"):
        run_in_process_job_sync(config=task_config([]), config_dict=GEPA)


def test_overrides_and_backend_url(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"prompt_learning": {"gepa": {"budget": 1, "pop": 4}}, "keep": True}
    merged = merge_dot_overrides(base, {"prompt_learning.gepa.budget": 9, "new.deep.key": "v"})
    assert merged == {"prompt_learning": {"gepa": {"budget": 9, "pop": 4}}, "keep": True,
                      "new": {"deep": {"key": "v"}}}
    assert base["prompt_learning"]["gepa"]["budget"] == 1  # input untouched
    monkeypatch.delenv("SYNTH_BACKEND_URL", raising=False)
    assert resolve_backend_url() == "https://api.usesynth.ai"
    monkeypatch.setenv("SYNTH_BACKEND_URL", "http://localhost:8000/api/")
    assert resolve_backend_url() == "http://localhost:8000"


async def test_the_handle_displays_the_run_view(world: World) -> None:
    job = start(world)
    bundle = job._repr_mimebundle_(include=None, exclude=None)
    assert {"application/vnd.jupyter.widget-view+json", "text/html"} <= set(bundle)
    assert bundle["text/plain"].startswith("hosted gepa · ")
    view = job.view()
    assert view is not None and view is job.view()  # built once, lazily
    assert view.on_stop == job.cancel and view.stop_button.description == "Cancel"
    result = await job
    assert result.succeeded
    view.close()
    assert job.view() is not view  # a closed view is rebuilt when shown again


def test_cancel_before_it_ever_started(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNTH_API_KEY", KEY)
    job = run_in_process_job(config=task_config([]), config_dict=GEPA, seed_prompt="s",
                             backend_url="http://127.0.0.1:9", port=free_port())
    job.cancel()  # no loop here: nothing runs until awaited, and now nothing will
    result = asyncio.run(job.wait())
    assert result.state == "cancelled" and result.error == "cancelled by the user"
    assert job.task_app is None and not registry.running()


async def test_a_refused_create_is_a_clear_error_and_the_app_stops(world: World) -> None:
    job = start(world, api_key="sk-not-the-standin-key-42")
    with pytest.raises(JobError, match="HTTP 401") as info:
        await job
    assert "sk-not-the-standin-key-42" not in str(info.value)
    assert job.progress.snapshot().state == "failed"
    assert_everything_stopped(world, job)


async def test_backend_errors_that_echo_the_request_never_show_secrets() -> None:
    # An eval create carries the worker token in its body (synth-ai's transport for eval);
    # a backend that echoes the request (FastAPI's 422 does) must not reveal it.
    echo = FastAPI()

    @echo.post("/api/v1/offline/jobs")
    async def reject(request: Request) -> Response:
        return Response(await request.body(), status_code=422, media_type="application/json")

    worker, synth = "wt_abcdef1234567890abcdef", "sk_synth_9876543210"
    with serve(echo) as url:
        with pytest.raises(JobError) as info:
            await submit_and_poll_job(
                job_type="eval", task_app_url="http://127.0.0.1:9/s/rt_x",
                task_app_worker_token=worker, config_dict={"env_name": "e", "seeds": [0]},
                backend_url=url, api_key=synth,
            )
    message = str(info.value)
    assert "HTTP 422" in message and worker not in message
    assert mask_secret(worker) in message  # it was there, masked
    assert info.value.__context__ is None  # the unscrubbed original is not reachable


async def test_a_changed_tunnel_url_is_reported(world: World) -> None:
    # Synth's relay has no in-place renewal: at 80 % of the lease TTL our tunnel moves to a
    # new lease and URL, while the job keeps the URL it was created with. The job says so.
    world.backend.behaviour = "stuck"
    job = start(world)
    await asyncio.to_thread(wait_for, lambda: job.job_id is not None)
    app = job.task_app
    assert app is not None and app.url == job.submitted_url
    app.url = app.url + "-renewed"  # what the tunnel's URL-change event sets
    job.on_app_change(app)  # the listener the tunnel event calls
    assert "tunnel URL changed" in job.progress.snapshot().message
    job.cancel()
    assert (await job).state == "cancelled"


def test_the_event_feed_keeps_what_a_new_best_event_leaves_out() -> None:
    progress = RunProgress("hosted gepa", "feed")
    feed = JobEventFeed(progress, lambda text: text)
    prefix = "learning.policy.gepa"
    seed = {"stages": [{"stage_id": "main", "instruction": "Seed."}]}
    better = {"stages": [{"stage_id": "main", "instruction": "Seed. Think."}]}
    feed.event({"seq": 1, "type": f"{prefix}.baseline",
                "data": {"reward": 0.25, "prompt": seed}})
    feed.event({"seq": 2, "type": f"{prefix}.candidate.evaluated",
                "data": {"candidate_id": "c1", "reward": 1.0, "parent_id": "baseline",
                         "generation": 1, "prompt": better}})
    feed.event({"seq": 3, "type": f"{prefix}.candidate.new_best",
                "data": {"candidate_id": "c1", "reward": 1.0, "generation": 1}})
    snap = progress.snapshot()
    assert snap.candidate("c1") == CandidateSummary(
        "c1", score=1.0, parents=("baseline",), iteration=1,
        components={"main": "Seed. Think."})
    assert snap.candidate("baseline") == CandidateSummary(
        "baseline", score=0.25, components={"main": "Seed."})
    # the plot starts at the baseline; the seed is not the "best" candidate by default
    assert snap.score_history == ((0, 0.25), (1, 1.0)) and snap.best_candidate_id == "c1"
    assert (snap.seed_score, snap.best_score) == (0.25, 1.0)
