"""run_in_process_job against a fake job backend (a stand-in for Synth's remote service).

The fake backend is a real FastAPI app on a real uvicorn server on 127.0.0.1. Like the real
service it reads the task app's URL and key from the submitted job and calls the task app's
/task_info and /rollout over HTTP, then reports a status the client polls.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from support import free_port, serve

from taskapp_notebook.contract import TaskAppConfig, create_task_app
from taskapp_notebook.errors import InvalidParameterError, mask_secret
from taskapp_notebook.jobs import (
    JobError,
    JobTimeoutError,
    merge_dot_overrides,
    resolve_backend_url,
    run_in_process_job,
    run_in_process_job_sync,
    submit_and_poll_job,
)
from taskapp_notebook.models import RewardInfo, RolloutRequest, RolloutResponse

SYNTH_KEY = "synth-test-key-42"
APP_KEY = "task-app-key-7"


class FakeJobBackend:
    """Accepts prompt-learning and eval jobs and runs them against the task app."""

    def __init__(self) -> None:
        self.submissions: list[dict[str, Any]] = []
        self.jobs: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self.app = FastAPI()
        for kind, root in (
            ("prompt_learning", "/api/prompt-learning/online/jobs"),
            ("eval", "/api/eval/jobs"),
        ):
            self.app.add_api_route(root, self._creator(kind), methods=["POST"])
            self.app.add_api_route(root + "/{job_id}", self._status, methods=["GET"])

    def _creator(self, kind: str) -> Any:
        async def create(request: Request) -> Any:
            if request.headers.get("authorization") != f"Bearer {SYNTH_KEY}":
                return JSONResponse({"detail": "invalid Synth API key"}, status_code=403)
            body = await request.json()
            self.submissions.append({"kind": kind, "headers": dict(request.headers), "body": body})
            job = body["config_body"]["prompt_learning"] if kind == "prompt_learning" else body
            job_id = f"{kind}-{next(self._ids)}"
            self.jobs[job_id] = {"job_id": job_id, "status": "running"}
            task = asyncio.create_task(self._run(job_id, job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return {"job_id": job_id}

        return create

    async def _status(self, job_id: str, request: Request) -> Any:
        if request.headers.get("authorization") != f"Bearer {SYNTH_KEY}":
            return JSONResponse({"detail": "invalid Synth API key"}, status_code=403)
        return self.jobs[job_id]

    async def _run(self, job_id: str, job: dict[str, Any]) -> None:
        behaviour = job.get("fake_behaviour", "run")
        if behaviour == "stuck":
            return
        if behaviour == "fail":
            self.jobs[job_id].update(status="failed", error="told to fail")
            return
        headers = {"X-API-Key": job.get("task_app_api_key", "")}
        seeds = list(job.get("seeds", [0, 1]))
        try:
            async with httpx.AsyncClient(base_url=job["task_app_url"], headers=headers) as app:
                info = await app.get("/task_info", params={"seeds": seeds})
                info.raise_for_status()
                rewards = []
                for i, seed in enumerate(seeds):
                    id_key = "trace_correlation_id" if i % 2 == 0 else "run_id"
                    rollout = await app.post(
                        "/rollout",
                        json={id_key: f"{job_id}-{seed}", "env": {"seed": seed}, "policy": {}},
                    )
                    rollout.raise_for_status()
                    data = rollout.json()
                    assert data[id_key] == f"{job_id}-{seed}"
                    rewards.append(data["reward_info"]["outcome_reward"])
        except Exception as exc:
            self.jobs[job_id].update(status="failed", error=f"{type(exc).__name__}: {exc}")
            return
        self.jobs[job_id].update(
            status="succeeded",
            best_score=sum(rewards) / len(rewards),
            instances=len(info.json()),
        )


@pytest.fixture
def backend() -> Iterator[tuple[FakeJobBackend, str]]:
    fake = FakeJobBackend()
    with serve(fake.app) as url:
        yield fake, url


def task_config() -> TaskAppConfig:
    def rollout(request: RolloutRequest, fastapi_request: Request) -> RolloutResponse:
        return RolloutResponse(
            trace_correlation_id=request.trace_correlation_id,
            reward_info=RewardInfo(outcome_reward=(request.env.seed or 0) / 10),
        )

    def instances(seeds: list[int]) -> list[dict[str, Any]]:
        return [{"task": {"id": "jobs-demo", "name": "Jobs demo"}} for _ in seeds]

    return TaskAppConfig(
        app_id="jobs-demo",
        name="Jobs demo",
        description="task app for job tests",
        provide_task_instances=instances,
        rollout=rollout,
    )


@pytest.fixture
def task_app_url() -> Iterator[str]:
    with serve(create_task_app(task_config(), api_keys=[APP_KEY])) as url:
        yield url


# --- submit_and_poll_job: the HTTP half, against a task app we serve ourselves ----------------


async def test_prompt_learning_job_end_to_end(
    backend: tuple[FakeJobBackend, str], task_app_url: str, tmp_path: Path
) -> None:
    fake, backend_url = backend
    config_path = tmp_path / "gepa.toml"
    config_path.write_text('[prompt_learning]\nalgorithm = "gepa"\nseeds = [1, 2, 3]\n')
    seen: list[dict[str, Any]] = []
    result = await submit_and_poll_job(
        task_app_url=task_app_url,
        task_app_api_key=APP_KEY,
        task_app_worker_token="worker-token-1",
        config_path=config_path,
        overrides={"prompt_learning.gepa.budget": 7},
        backend_url=backend_url + "/api/",
        api_key=SYNTH_KEY,
        poll_interval=0.05,
        timeout=60,
        on_status=seen.append,
    )
    assert result.succeeded and result.status["status"] == "succeeded"
    assert result.status["best_score"] == pytest.approx(0.2)
    assert result.status["instances"] == 3
    assert result.job_id == "prompt_learning-1"
    assert result.backend_url == backend_url
    assert result.task_app_worker_token == "worker-token-1"
    assert "worker-token-1" not in repr(result)
    assert seen and seen[-1]["status"] == "succeeded"

    (submission,) = fake.submissions
    body = submission["body"]
    assert submission["headers"]["x-synthtunnel-worker-token"] == "worker-token-1"
    assert body["algorithm"] == "gepa"
    assert body["metadata"] == {"worker_token": "worker-token-1"}
    section = body["config_body"]["prompt_learning"]
    assert section["task_app_url"] == task_app_url
    assert section["task_app_api_key"] == APP_KEY
    assert section["gepa"] == {"budget": 7}


async def test_eval_job_and_no_poll(
    backend: tuple[FakeJobBackend, str], task_app_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, backend_url = backend
    monkeypatch.setenv("SYNTH_API_KEY", SYNTH_KEY)
    monkeypatch.setenv("SYNTH_BACKEND_URL", backend_url)
    result = await submit_and_poll_job(
        job_type="eval",
        task_app_url=task_app_url,
        task_app_api_key=APP_KEY,
        config_dict={"env_name": "demo", "seeds": [4]},
        poll_interval=0.05,
        timeout=60,
    )
    assert result.succeeded and result.status["best_score"] == pytest.approx(0.4)
    body = fake.submissions[0]["body"]
    assert body["task_app_url"] == task_app_url and body["env_name"] == "demo"
    assert "x-synthtunnel-worker-token" not in fake.submissions[0]["headers"]

    submitted = await submit_and_poll_job(
        job_type="eval",
        task_app_url=task_app_url,
        task_app_api_key=APP_KEY,
        config_dict={"fake_behaviour": "stuck"},
        poll=False,
    )
    assert submitted.status == {"status": "submitted", "job_id": submitted.job_id}


async def test_failed_job_is_returned_not_raised(
    backend: tuple[FakeJobBackend, str], task_app_url: str
) -> None:
    _, backend_url = backend
    result = await submit_and_poll_job(
        task_app_url=task_app_url,
        config_dict={"prompt_learning": {"fake_behaviour": "fail"}},
        backend_url=backend_url,
        api_key=SYNTH_KEY,
        poll_interval=0.05,
    )
    assert not result.succeeded and result.status["status"] == "failed"


async def test_wrong_task_app_key_fails_the_job(
    backend: tuple[FakeJobBackend, str], task_app_url: str
) -> None:
    _, backend_url = backend
    result = await submit_and_poll_job(
        task_app_url=task_app_url,
        task_app_api_key="not-the-key",
        config_dict={"prompt_learning": {}},
        backend_url=backend_url,
        api_key=SYNTH_KEY,
        poll_interval=0.05,
    )
    assert result.status["status"] == "failed" and "401" in result.status["error"]


async def test_backend_rejection_and_timeout(
    backend: tuple[FakeJobBackend, str], task_app_url: str
) -> None:
    _, backend_url = backend
    with pytest.raises(JobError, match="HTTP 403") as rejected:
        await submit_and_poll_job(
            task_app_url=task_app_url,
            config_dict={},
            backend_url=backend_url,
            api_key="wrong-synth-key",
        )
    assert "wrong-synth-key" not in str(rejected.value)

    with pytest.raises(JobTimeoutError, match="did not finish within 0.3 s") as timed_out:
        await submit_and_poll_job(
            task_app_url=task_app_url,
            config_dict={"prompt_learning": {"fake_behaviour": "stuck"}},
            backend_url=backend_url,
            api_key=SYNTH_KEY,
            poll_interval=0.05,
            timeout=0.3,
        )
    assert isinstance(timed_out.value, TimeoutError)


async def test_argument_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SYNTH_API_KEY", raising=False)
    with pytest.raises(InvalidParameterError, match="SYNTH_API_KEY"):
        await submit_and_poll_job(task_app_url="http://127.0.0.1:1", config_dict={})
    with pytest.raises(InvalidParameterError, match="job_type must be one of"):
        await submit_and_poll_job(job_type="rl", task_app_url="http://x", config_dict={})
    with pytest.raises(InvalidParameterError, match="exactly one of config_path"):
        await submit_and_poll_job(task_app_url="http://x", api_key="k")
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        await submit_and_poll_job(
            task_app_url="http://x", api_key="k", config_path=tmp_path / "missing.toml"
        )
    broken = tmp_path / "broken.toml"
    broken.write_text("[prompt_learning\n")
    with pytest.raises(InvalidParameterError, match="is not valid"):
        await submit_and_poll_job(task_app_url="http://x", api_key="k", config_path=broken)


def test_overrides_and_backend_url(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"prompt_learning": {"gepa": {"budget": 1, "pop": 4}}, "keep": True}
    merged = merge_dot_overrides(base, {"prompt_learning.gepa.budget": 9, "new.deep.key": "v"})
    assert merged == {
        "prompt_learning": {"gepa": {"budget": 9, "pop": 4}},
        "keep": True,
        "new": {"deep": {"key": "v"}},
    }
    assert base["prompt_learning"]["gepa"]["budget"] == 1  # input untouched
    monkeypatch.delenv("SYNTH_BACKEND_URL", raising=False)
    assert resolve_backend_url() == "https://api.usesynth.ai"
    monkeypatch.setenv("SYNTH_BACKEND_URL", "http://localhost:8000/api/")
    assert resolve_backend_url() == "http://localhost:8000"
    assert resolve_backend_url("https://example.test") == "https://example.test"


# --- run_in_process_job: the runner serves the app, the job runs against it -------------------


async def test_run_in_process_job_with_config(backend: tuple[FakeJobBackend, str]) -> None:
    fake, backend_url = backend
    result = await run_in_process_job(
        config=task_config(),
        config_dict={"prompt_learning": {"seeds": [5, 6]}},
        backend_url=backend_url,
        api_key=SYNTH_KEY,
        task_app_api_key=APP_KEY,
        port=free_port(),
        poll_interval=0.05,
        timeout=60,
    )
    assert result.succeeded, result.status
    assert result.status["best_score"] == pytest.approx(0.55)
    assert result.task_app_url.startswith("http://127.0.0.1:")
    section = fake.submissions[0]["body"]["config_body"]["prompt_learning"]
    assert section["task_app_api_key"] == APP_KEY
    assert section["task_app_url"] == result.task_app_url
    with pytest.raises(httpx.ConnectError):  # the app was stopped on the way out
        httpx.get(result.task_app_url + "/")


async def test_run_in_process_job_with_task_app_path(
    backend: tuple[FakeJobBackend, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, backend_url = backend
    monkeypatch.setenv("ENVIRONMENT_API_KEY", "env-app-key")
    path = tmp_path / "job_app.py"
    path.write_text(
        "from taskapp_notebook.contract import TaskAppConfig\n"
        "from taskapp_notebook.models import RolloutResponse, RewardInfo\n"
        "def rollout(request, fastapi_request):\n"
        "    return RolloutResponse(reward_info=RewardInfo(outcome_reward=1.0))\n"
        "def instances(seeds):\n"
        "    return [{'task': {'id': 'f', 'name': 'F'}} for _ in seeds]\n"
        "config = TaskAppConfig(app_id='from-file', name='F', description='',\n"
        "    provide_task_instances=instances, rollout=rollout)\n"
    )
    result = await run_in_process_job(
        task_app_path=path,
        config_dict={"prompt_learning": {"seeds": [0]}},
        backend_url=backend_url,
        api_key=SYNTH_KEY,
        port=free_port(),
        poll_interval=0.05,
        timeout=60,
    )
    assert result.succeeded, result.status
    assert result.status["best_score"] == 1.0
    section = fake.submissions[0]["body"]["config_body"]["prompt_learning"]
    assert section["task_app_api_key"] == "env-app-key"


def test_sync_wrapper(backend: tuple[FakeJobBackend, str]) -> None:
    _, backend_url = backend
    result = run_in_process_job_sync(
        config=task_config(),
        config_dict={"prompt_learning": {"seeds": [2]}},
        backend_url=backend_url,
        api_key=SYNTH_KEY,
        task_app_api_key=APP_KEY,
        port=free_port(),
        poll_interval=0.05,
        timeout=60,
    )
    assert result.succeeded and result.status["best_score"] == pytest.approx(0.2)


async def test_sync_wrapper_refuses_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="await run_in_process_job"):
        run_in_process_job_sync(config=task_config(), config_dict={})


async def test_backend_errors_that_echo_the_request_never_show_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # FastAPI's own 422 echoes the offending input; a backend may echo the whole body.
    echo = FastAPI()

    @echo.post("/api/prompt-learning/online/jobs")
    async def reject(request: Request) -> Response:
        return Response(await request.body(), status_code=422, media_type="application/json")

    monkeypatch.delenv("SYNTH_API_KEY", raising=False)
    worker, app_key, synth = "worker-token-abcdef123456", "app-key-abcdef123456", "synth-key-9876"
    with serve(echo) as base:
        with pytest.raises(JobError) as info:
            await submit_and_poll_job(
                task_app_url="http://127.0.0.1:9/", task_app_api_key=app_key,
                task_app_worker_token=worker, config_dict={"prompt_learning": {}},
                backend_url=base, api_key=synth,
            )
    message = str(info.value)
    assert "HTTP 422" in message
    for secret in (worker, app_key):
        assert secret not in message
        assert mask_secret(secret) in message  # it was there, masked


async def test_secret_at_the_error_length_cut_is_still_masked() -> None:
    worker = "wt_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6"
    reject = FastAPI()

    @reject.post("/api/prompt-learning/online/jobs")
    async def refuse() -> Response:  # the token straddles the old 500-character cut
        return Response("x" * 470 + worker + "y" * 600, status_code=422)

    with serve(reject) as base:
        with pytest.raises(JobError) as info:
            await submit_and_poll_job(
                task_app_url="http://127.0.0.1:9/", task_app_worker_token=worker,
                config_dict={"prompt_learning": {}}, backend_url=base, api_key="synth-key-1",
            )
    message = str(info.value)
    assert worker[:12] not in message and mask_secret(worker) in message
    assert info.value.__context__ is None  # the unscrubbed original is not reachable
