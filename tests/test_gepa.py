"""Local GEPA through the real path: a real task app (uvicorn), the run's interceptor
(uvicorn), an HTTP stand-in model (uvicorn), gepa's engine on a worker thread. The model
and the reflection LM are deterministic stand-ins (tests/gepa_task.py), named as such."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from gepa_task import BASELINE, stand_in_model, stand_in_reflection, task_config
from support import free_port, serve, wait_for

from taskapp_notebook import InProcessTaskApp, InvalidParameterError
from taskapp_notebook.gepa import (
    DeadlockError,
    GepaNotInstalledError,
    GepaRunError,
    Interceptor,
    Upstream,
    apply_candidate,
    optimize,
    start_gepa,
)

UPSTREAM_KEY = "sk-upstream-secret-0123456789"


class StandInServer:
    """An OpenAI-compatible HTTP stand-in model (not an LLM) that records what it got."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.app = FastAPI()

        @self.app.post("/v1/chat/completions")
        async def chat(request: Request) -> dict[str, Any]:
            body = await request.json()
            self.bodies.append(body)
            self.auth.append(request.headers.get("authorization"))
            text = stand_in_model(body)
            return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                    "model": body.get("model"),
                    "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}}


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[StandInServer, str]]:
    stand_in = StandInServer()
    with serve(stand_in.app) as url:
        yield stand_in, url + "/v1"


@pytest.fixture
def app() -> Iterator[InProcessTaskApp]:
    task_app = InProcessTaskApp(config=task_config(), tunnel_mode="local", serve_on="thread",
                                port=free_port(), api_key="task-app-key-abcdef")
    task_app.start()
    yield task_app
    task_app.stop()


def gepa_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("taskapp-gepa")]


def common(**overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(seed_candidate=BASELINE, train=list(range(6)),
                                  val=list(range(6)), reflection_lm=stand_in_reflection,
                                  upstream=stand_in_model, max_metric_calls=60)
    kwargs.update(overrides)
    return kwargs


# ------------------------------------------------------------------ the interceptor

def test_swap_rule() -> None:
    candidate = {"system_prompt": "NEW"}
    sent = [{"role": "system", "content": "old"}, {"role": "user", "content": "q"}]
    assert apply_candidate(sent, candidate) == [{"role": "system", "content": "NEW"},
                                                {"role": "user", "content": "q"}]
    assert sent[0]["content"] == "old"  # the app's list is not changed
    assert apply_candidate([{"role": "user", "content": "q"}], candidate)[0] == {
        "role": "system", "content": "NEW"}
    dev = apply_candidate([{"role": "developer", "content": "x"},
                           {"role": "system", "content": "y"}], candidate)
    assert [m["content"] for m in dev] == ["NEW", "y"]  # only the first instruction message
    assert apply_candidate(sent, {"other": "z"}) == sent


async def test_interceptor_swaps_forwards_and_records(
        upstream: tuple[StandInServer, str]) -> None:
    stand_in, base = upstream
    interceptor = Interceptor(Upstream(base, api_key=UPSTREAM_KEY, model="stand-in-1"))
    url = await interceptor.start()
    try:
        cid = interceptor.register({"system_prompt": "Work step by step. Reply with only the "
                                                     "number."})
        before = len(stand_in.bodies)
        async with httpx.AsyncClient(trust_env=False) as client:
            reply = await client.post(interceptor.inference_url(cid, "r1") + "/chat/completions",
                                      json={"model": "app-model", "messages": [
                                          {"role": "system", "content": BASELINE},
                                          {"role": "user", "content": "What is 12 * 3?"}]})
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"] == "36"
            got = stand_in.bodies[before]
            assert got["model"] == "stand-in-1"  # the upstream's model wins
            assert got["messages"][0]["content"].startswith("Work step by step")
            assert stand_in.auth[before] == f"Bearer {UPSTREAM_KEY}"
            (call,) = interceptor.take_calls("r1")
            assert call.reply == "36" and call.usage["total_tokens"] == 13
            assert call.candidate_id == cid and call.latency_ms > 0
            assert interceptor.take_calls("r1") == []
            # the /v1 spelling works too; unknown ids and streams are refused clearly
            ok = await client.post(f"{url}/{interceptor.run_id}/{cid}/r2/v1/chat/completions",
                                   json={"messages": [{"role": "user", "content": "1 * 2"}]})
            assert ok.status_code == 200
            unknown = await client.post(f"{url}/{interceptor.run_id}/nope/r3/chat/completions",
                                        json={"messages": []})
            assert unknown.status_code == 404 and "nope" in unknown.text
            wrong_run = await client.post(f"{url}/other/{cid}/r3/chat/completions", json={})
            assert wrong_run.status_code == 404
            stream = await client.post(interceptor.inference_url(cid, "r4") + "/chat/completions",
                                       json={"messages": [], "stream": True})
            assert stream.status_code == 400 and "stream" in stream.text
            bad = await client.post(interceptor.inference_url(cid, "r5") + "/chat/completions",
                                    content=b"{not json")
            assert bad.status_code == 400
        records = json.dumps(interceptor.call_records)
        assert UPSTREAM_KEY not in records and "step by step" not in records  # no texts
        assert {"prompt_tokens", "latency_ms", "candidate_id"} <= set(
            interceptor.call_records[0])
    finally:
        await interceptor.stop()
    async with httpx.AsyncClient(trust_env=False) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(url + "/health")


async def test_unreachable_upstream_is_a_502_without_the_key() -> None:
    interceptor = Interceptor(Upstream(f"http://{UPSTREAM_KEY}@127.0.0.1:9/v1",
                                       api_key=UPSTREAM_KEY))
    await interceptor.start()
    try:
        cid = interceptor.register({"system_prompt": "x"})
        async with httpx.AsyncClient(trust_env=False) as client:
            reply = await client.post(interceptor.inference_url(cid, "r1") + "/chat/completions",
                                      json={"messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 502
        assert "upstream failed" in reply.text and UPSTREAM_KEY not in reply.text
    finally:
        await interceptor.stop()


# ------------------------------------------------------------------ whole runs

async def test_run_improves_the_prompt_over_http_upstream(
        app: InProcessTaskApp, upstream: tuple[StandInServer, str], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _, base = upstream
    sigint = signal.getsignal(signal.SIGINT)
    run = start_gepa(app, **common(upstream=Upstream(base, api_key=UPSTREAM_KEY),
                                   run_dir=tmp_path / "run", score_threshold=1.0))
    assert not run.done()  # returned at once
    result = await run
    assert signal.getsignal(signal.SIGINT) is sigint  # never replaced (gepa's SignalStopper)
    assert result.state == "succeeded" and "threshold" in result.message
    assert result.seed_score is not None and result.best_score == 1.0
    assert result.best_score > result.seed_score
    assert "step by step" in (result.best_prompt or "")
    assert result.best_prompt and "only the number" in result.best_prompt
    # results are flat records; usage comes from the upstream's real usage fields
    assert result.history and all(isinstance(r, dict) for r in result.history)
    assert [c["id"] for c in result.candidates][0] == "c0"
    assert result.usage["model_calls"] == result.rollouts
    assert result.usage["prompt_tokens"] == 11 * result.rollouts
    assert not result.usage["usage_estimated"]
    snap = run.progress.snapshot()
    assert snap.state == "succeeded" and snap.best_score == 1.0
    assert snap.score_history[0] == (0, result.seed_score)
    assert snap.best is not None and snap.best.components["system_prompt"] == result.best_prompt
    assert snap.best.on_front and snap.best.parents and snap.best.iteration >= 1
    assert snap.seed is not None and snap.seed.id == "c0" and snap.seed.parents == ()
    assert snap.budget_used == result.budget_used and snap.budget_total == 60
    assert snap.rollouts == result.rollouts and snap.rollouts_per_second
    assert [p[0] for p in snap.score_history] == list(range(len(result.history) + 1))
    # the run folder: JSON, no secret anywhere (files, logs, reprs)
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"result.json", "best_candidate.json", "model_calls.jsonl"} <= files
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["best_score"] == 1.0 and saved["best_prompt"] == result.best_prompt
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert UPSTREAM_KEY.encode() not in data and app.api_key.encode() not in data
    for text in (caplog.text, repr(run), repr(result), repr(run.interceptor)):
        assert UPSTREAM_KEY not in text and app.api_key not in text
    assert wait_for(lambda: not gepa_threads(), timeout=10), gepa_threads()


async def test_stop_cancels_in_flight_and_keeps_the_best() -> None:
    task_app = InProcessTaskApp(config=task_config(delay=0.05), tunnel_mode="local",
                                serve_on="thread", port=free_port())
    await task_app.astart()
    try:
        run = start_gepa(task_app, **common(max_metric_calls=10_000, concurrency=2,
                                            val=list(range(4)), train=list(range(12))))
        await asyncio.to_thread(wait_for, lambda: run.progress.snapshot().iteration >= 2, 60)
        run.stop()
        result = await run
        assert result.state == "stopped"
        assert result.seed_score is not None and result.best_score is not None
        assert result.best_score >= result.seed_score
        assert "discarded" in result.message
        # the unfinished iteration left no record
        assert [r["iteration"] for r in result.history] == list(
            range(1, len(result.history) + 1))
        assert run.progress.snapshot().state == "stopped"
        assert await asyncio.to_thread(wait_for, lambda: not gepa_threads(), 10)
    finally:
        await task_app.astop()


async def test_app_stopping_mid_run_never_scores_failed_rollouts() -> None:
    task_app = InProcessTaskApp(config=task_config(delay=0.05), tunnel_mode="local",
                                serve_on="thread", port=free_port())
    await task_app.astart()
    run = start_gepa(task_app, **common(max_metric_calls=10_000, concurrency=2,
                                        val=list(range(4)), train=list(range(12))))
    await asyncio.to_thread(wait_for, lambda: run.progress.snapshot().iteration >= 1, 60)
    await task_app.astop()
    result = await run
    assert result.state == "stopped"
    assert "stopped during the run" in result.message and "no failed rollout" in result.message
    assert result.rollout_errors == 0
    assert all(r["rollout_errors"] == 0 for r in result.history)


async def test_resume_continues_in_the_same_run_dir(app: InProcessTaskApp,
                                                    tmp_path: Path) -> None:
    folder = tmp_path / "resume"
    first = await start_gepa(app, **common(max_metric_calls=12, run_dir=folder))
    assert first.budget_used >= 12 and first.iterations >= 1
    second = start_gepa(app, **common(max_metric_calls=first.budget_used + 30, run_dir=folder,
                                      score_threshold=1.0))
    result = await second
    # continued: history and budget carry on, the seed was not rolled out again
    assert result.history[: len(first.history)] == first.history
    assert result.budget_used > first.budget_used
    assert result.seed_score == first.seed_score
    # every rollout of the second session was budgeted: the seed's validation set was not
    # rolled out again (gepa alone would re-run it, unbudgeted, before loading its state)
    assert result.rollouts - first.rollouts == result.budget_used - first.budget_used
    assert len(result.model_calls) == result.rollouts  # calls of both sessions in the file
    with pytest.raises(InvalidParameterError, match="another seed"):
        start_gepa(app, **common(seed_candidate="different", run_dir=folder))


async def test_url_target_with_key_and_deadlock_guard(app: InProcessTaskApp) -> None:
    result = await start_gepa(app.local_url, api_key=app.api_key,
                              **common(max_metric_calls=6, val=[1, 2], train=[1, 2]))
    assert result.rollouts >= 2 and result.rollout_errors == 0
    bad_key = start_gepa(app.local_url, api_key="wrong-key-999999", **common())
    with pytest.raises(GepaRunError, match="not healthy"):
        await bad_key
    assert bad_key.progress.snapshot().state == "failed"
    assert await asyncio.to_thread(wait_for, lambda: not gepa_threads(), 10)
    interceptor_url = bad_key.interceptor.url
    assert interceptor_url is not None
    with pytest.raises(httpx.ConnectError):  # its interceptor is gone too
        httpx.get(interceptor_url + "/health", trust_env=False)
    # an app served on *this* loop: waiting synchronously here would deadlock
    here = InProcessTaskApp(config=task_config(), tunnel_mode="local", serve_on="loop",
                            port=free_port())
    await here.astart()
    try:
        with pytest.raises(DeadlockError, match="await run"):
            optimize(here, **common())
        with pytest.raises(DeadlockError):
            optimize(here.local_url, api_key=here.api_key, **common())
        run = start_gepa(here, **common(max_metric_calls=6, val=[1], train=[1]))
        with pytest.raises(DeadlockError):
            run.result()
        assert (await run).rollouts >= 1  # the awaited run works on the same loop
    finally:
        await here.astop()


def test_sync_optimize_with_a_thread_app(app: InProcessTaskApp) -> None:
    result = optimize(app, **common(max_metric_calls=6, val=[1, 2], train=[1, 2]))
    assert result.state == "succeeded" and result.budget_used >= 2


@pytest.mark.parametrize(("change", "match"), [
    ({"seed_candidate": ""}, "empty string"),
    ({"seed_candidate": {"planner": "x"}}, "would reach neither"),
    ({"seed_candidate": {"system_prompt": 3}}, "non-empty string"),
    ({"train": []}, "train is empty"),
    ({"train": "abc"}, "list of task seeds"),
    ({"val": [1.5]}, r"val\[0\]"),
    ({"max_metric_calls": 0}, "positive int"),
    ({"max_metric_calls": 3}, "less than the 6 rollouts"),
    ({"concurrency": -1}, "concurrency"),
    ({"time_limit": -5}, "time_limit"),
    ({"upstream": None}, "Pass upstream="),
    ({"upstream": "ftp://x"}, "http"),
    ({"reflection_lm": 42}, "reflection_lm must be"),
    ({"reflection_lm": "openai/gpt-4.1"}, "litellm"),
    ({"gepa_options": {"adapter": 1}}, "may not set"),
    ({"api_key": "k"}, "URL targets"),
])
def test_bad_input_is_refused_before_anything_starts(
        app: InProcessTaskApp, change: dict[str, Any], match: str) -> None:
    before = gepa_threads()
    with pytest.raises(InvalidParameterError, match=match):
        start_gepa(app, **common(**change))
    assert gepa_threads() == before


def test_bad_targets() -> None:
    with pytest.raises(InvalidParameterError, match="needs credentials"):
        start_gepa("http://127.0.0.1:1", **common())
    with pytest.raises(InvalidParameterError, match="InProcessTaskApp or the task app's URL"):
        start_gepa(object(), **common())
    stopped = InProcessTaskApp(config=task_config(), tunnel_mode="local")
    with pytest.raises(InvalidParameterError, match="start it first"):
        start_gepa(stopped, **common())


def test_without_gepa_one_clear_error() -> None:
    code = ("import sys; sys.modules['gepa'] = None\n"
            "import taskapp_notebook.gepa as g\n"
            "try:\n    g.start_gepa('http://x', seed_candidate='p', train=[1], "
            "reflection_lm=str, max_metric_calls=1)\n"
            "except g.GepaNotInstalledError as e:\n    print('ERR', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'taskapp-notebook[gepa]'" in proc.stdout
    assert issubclass(GepaNotInstalledError, ImportError)


def test_import_stays_cheap() -> None:
    code = ("import sys, json, taskapp_notebook.gepa; print(json.dumps([m for m in "
            "('gepa', 'httpx', 'fastapi', 'uvicorn', 'IPython') if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


# ------------------------------------------------------------------ more paths

REFLECTION_KEY = "sk-reflection-secret-987654321"


@pytest.fixture(scope="module")
def reflection_server() -> Iterator[str]:
    """An OpenAI-compatible stand-in reflection model (stand_in_reflection behind HTTP)."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        from fastapi.responses import JSONResponse

        if request.headers.get("authorization") != f"Bearer {REFLECTION_KEY}":
            return JSONResponse({"error": {"message": "invalid api key"}}, status_code=401)
        body = await request.json()
        text = stand_in_reflection(body["messages"][-1]["content"])
        return {"choices": [{"message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}

    with serve(app) as url:
        yield url + "/v1"


async def test_chat_completions_reflection_lm(app: InProcessTaskApp,
                                              reflection_server: str) -> None:
    from taskapp_notebook.gepa import ChatCompletionsLM

    lm = ChatCompletionsLM("reflector", base_url=reflection_server, api_key=REFLECTION_KEY)
    assert REFLECTION_KEY not in repr(lm)
    result = await start_gepa(app, **common(reflection_lm=lm, score_threshold=1.0))
    assert result.best_score == 1.0 and result.best_score > (result.seed_score or 0)
    calls = result.usage["reflection_calls"]
    assert calls >= 1 and result.usage["reflection_tokens_in"] == 100 * calls
    wrong = ChatCompletionsLM("reflector", base_url=reflection_server, api_key="sk-wrong-0000000")
    with pytest.raises(GepaRunError, match="HTTP 401") as failed:
        await start_gepa(app, **common(reflection_lm=wrong))
    assert "sk-wrong-0000000" not in str(failed.value)
    assert failed.value.result is not None and failed.value.result.seed_score is not None


async def test_components_delivered_to_an_app_that_builds_its_prompts() -> None:
    from taskapp_notebook import TaskAppConfig

    seen: list[dict[str, str]] = []

    def rollout(request: Any) -> dict[str, Any]:
        components = request.policy.config["prompt_components"]
        seen.append(components)
        words = len(components["planner"].split()) + len(components["style"].split())
        return {"reward_info": {"outcome_reward": min(1.0, words / 10),
                                "details": {"feedback": "longer instructions score higher"}}}

    def reflect(prompt: str) -> str:
        current = prompt.split("```", 2)[1].strip()
        return f"```\n{current} and be more thorough\n```"

    task_app = InProcessTaskApp(config=TaskAppConfig(app_id="c", name="c", description="c",
                                                     rollout=rollout),
                                tunnel_mode="local", serve_on="thread", port=free_port())
    await task_app.astart()
    try:
        result = await start_gepa(task_app, seed_candidate={"planner": "plan", "style": "terse"},
                                  train=[1, 2, 3], val=[1, 2], reflection_lm=reflect,
                                  deliver_components=True, max_metric_calls=30)
    finally:
        await task_app.astop()
    assert seen[0] == {"planner": "plan", "style": "terse"}
    assert result.best_score is not None and result.seed_score is not None
    assert result.best_score > result.seed_score
    assert result.best_prompt is None and set(result.best_candidate) == {"planner", "style"}
    assert "component:planner" in result.candidates[0]


async def test_synthtunnel_url_with_worker_token_and_time_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from taskapp_notebook.relay import RelayServer

    relay = RelayServer(api_keys=["relay-key"], port=free_port()).start_in_thread()
    monkeypatch.setenv("SYNTH_BACKEND_URL", relay.url)
    monkeypatch.setenv("SYNTH_API_KEY", "relay-key")
    task_app = InProcessTaskApp(config=task_config(delay=0.02), serve_on="thread",
                                port=free_port())
    try:
        await task_app.astart()
        assert task_app.url and task_app.url.startswith(relay.url)
        token = task_app.task_app_worker_token
        assert token
        run = start_gepa(task_app.url, worker_token=token, time_limit=1.0,
                         **common(max_metric_calls=100_000))
        result = await run
        assert result.state == "succeeded" and result.message == "Time limit reached."
        assert result.rollouts > 6 and result.rollout_errors == 0
        assert token not in repr(run) and token not in json.dumps(result.summary())
    finally:
        await task_app.astop()
        relay.stop_in_thread()


async def test_stop_after_the_current_iteration() -> None:
    task_app = InProcessTaskApp(config=task_config(delay=0.02), tunnel_mode="local",
                                serve_on="thread", port=free_port())
    await task_app.astart()
    try:
        run = start_gepa(task_app, **common(max_metric_calls=10_000, concurrency=2,
                                            val=list(range(4)), train=list(range(12))))
        await asyncio.to_thread(wait_for, lambda: run.progress.snapshot().iteration >= 1, 60)
        run.stop(cancel_inflight=False)
        result = await run
        assert result.state == "stopped" and "stopped by the user" in result.message
        # the iteration under way was finished and recorded, none was started after it
        assert result.history and result.message.startswith(
            f"Stopped after iteration {result.history[-1]['iteration']}")
        assert result.rollout_errors == 0
    finally:
        await task_app.astop()


def test_gepa_exports_resolve() -> None:
    import taskapp_notebook.gepa as package

    assert package.__all__ == sorted(package.__all__)
    for name in package.__all__:
        assert getattr(package, name).__module__.startswith("taskapp_notebook.gepa"), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        package.nope  # noqa: B018


async def test_a_run_whose_every_rollout_fails_stops_with_the_reason(
        app: InProcessTaskApp) -> None:
    # the upstream is down: the interceptor answers 502, the app's rollout raises (HTTP 500)
    down = Upstream(f"http://127.0.0.1:{free_port()}/v1", api_key=UPSTREAM_KEY)
    with pytest.raises(GepaRunError, match="every rollout of the seed's evaluation failed") as err:
        await start_gepa(app, **common(upstream=down))
    assert "HTTP 500" in str(err.value) and UPSTREAM_KEY not in str(err.value)
    partial = err.value.result
    assert partial is not None and partial.budget_used == 6  # the seed's validation only
    assert partial.rollout_errors == 6 and partial.iterations == 0
    with pytest.raises(InvalidParameterError, match="part before /chat/completions"):
        Upstream("https://api.openai.com/v1/chat/completions")
