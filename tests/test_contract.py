"""The task-app contract over real HTTP: a uvicorn server on 127.0.0.1 and an httpx client."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from support import serve

from taskapp_notebook.auth import allowed_keys_from_env
from taskapp_notebook.contract import TaskAppConfig, create_task_app
from taskapp_notebook.errors import InvalidParameterError
from taskapp_notebook.models import RewardInfo, RolloutRequest, RolloutResponse, TaskInfo

KEY = "k-test-0123456789"
AUTH = {"X-API-Key": KEY}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENVIRONMENT_API_KEY", raising=False)
    monkeypatch.delenv("ENVIRONMENT_API_KEY_ALIASES", raising=False)


async def async_rollout(request: RolloutRequest, fastapi_request: Request) -> RolloutResponse:
    seed = request.env.seed or 0
    return RolloutResponse(
        trace_correlation_id=request.trace_correlation_id,
        reward_info=RewardInfo(outcome_reward=seed / 10, details={"extra": request.model_extra}),
    )


def sync_rollout(request: RolloutRequest, fastapi_request: Request) -> RolloutResponse:
    return RolloutResponse(
        trace_correlation_id=request.trace_correlation_id,
        reward_info=RewardInfo(outcome_reward=1.0),
        status_detail=f"{threading.current_thread().name}|{request.run_id}",
    )


def make_config(**overrides: Any) -> TaskAppConfig:
    def instances(seeds: list[int]) -> Iterator[dict[str, Any]]:
        for seed in seeds:
            yield {"task": {"id": "demo", "name": "Demo"}, "task_metadata": {"seed": seed}}

    values: dict[str, Any] = {
        "app_id": "demo",
        "name": "Demo",
        "description": "a demo task app",
        "provide_taskset_description": lambda: {"splits": ["train"], "sizes": {"train": 10}},
        "provide_task_instances": instances,
        "rollout": async_rollout,
    }
    values.update(overrides)
    return TaskAppConfig(**values)


@contextmanager
def client_for(config: TaskAppConfig, **kwargs: Any) -> Iterator[httpx.Client]:
    with serve(create_task_app(config, **kwargs)) as url, httpx.Client(base_url=url) as client:
        yield client


# --- routes ----------------------------------------------------------------------------------


def test_public_root_and_authenticated_routes() -> None:
    app = create_task_app(make_config(), api_keys=[KEY])
    assert app.state.taskapp_contract is True
    with serve(app) as url, httpx.Client(base_url=url) as client:
        assert client.get("/").json() == {"status": "ok", "service": "demo"}
        assert client.head("/").status_code == 200
        health = client.get("/health", headers=AUTH)
        assert health.status_code == 200 and health.json()["healthy"] is True
        info = client.get("/info", headers=AUTH).json()
        assert info["service"]["task"]["id"] == "demo"
        assert info["service"]["task"]["description"] == "a demo task app"
        assert set(info) >= {"service", "dataset", "inference", "limits"}
        assert client.post("/done", headers=AUTH).json() == {"ok": True, "service": "demo"}
        for path in ("/health", "/info", "/task_info"):
            assert client.get(path).status_code == 401
        assert client.post("/done").status_code == 401


def test_task_info_seed_semantics() -> None:
    with client_for(make_config(), api_keys=[KEY]) as client:
        taskset = client.get("/task_info", headers=AUTH).json()
        assert taskset == {"taskset": {"splits": ["train"], "sizes": {"train": 10}}}

        one = client.get("/task_info", params={"seed": 3}, headers=AUTH).json()
        assert isinstance(one, dict) and one["task_metadata"] == {"seed": 3}
        assert one["task"]["id"] == "demo"

        for params in (
            [("seeds", "1"), ("seeds", "2")],
            [("seed", "1"), ("seeds", "2")],
            [("seeds", "1,2")],
        ):
            many = client.get("/task_info", params=params, headers=AUTH).json()
            assert [item["task_metadata"]["seed"] for item in many] == [1, 2], params

        bad = client.get("/task_info", params={"seed": "abc"}, headers=AUTH)
        assert bad.status_code == 422
        assert "'abc'" in bad.json()["detail"]["error"]["message"]


def test_task_info_defaults_and_missing_provider() -> None:
    config = make_config(provide_taskset_description=None, provide_task_instances=None)
    with client_for(config, api_keys=[KEY]) as client:
        taskset = client.get("/task_info", headers=AUTH).json()["taskset"]
        assert taskset == {"id": "demo", "name": "Demo", "description": "a demo task app"}
        missing = client.get("/task_info", params={"seed": 1}, headers=AUTH)
        assert missing.status_code == 501
        assert "provide_task_instances" in missing.json()["detail"]["error"]["message"]


def test_async_taskset_and_instance_callbacks() -> None:
    async def describe() -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"id": "async-set"}

    async def instances(seeds: list[int]) -> list[TaskInfo]:
        return [TaskInfo.model_validate({"task": {"id": f"t{s}", "name": "T"}}) for s in seeds]

    config = make_config(provide_taskset_description=describe, provide_task_instances=instances)
    with client_for(config, api_keys=[KEY]) as client:
        assert client.get("/task_info", headers=AUTH).json() == {"taskset": {"id": "async-set"}}
        many = client.get("/task_info", params={"seeds": "7,8"}, headers=AUTH).json()
        assert [item["task"]["id"] for item in many] == ["t7", "t8"]


# --- rollouts --------------------------------------------------------------------------------

#: The smallest env and policy a rollout request may carry (both are required).
EP: dict[str, Any] = {"env": {}, "policy": {}}


def test_rollout_round_trip_trace_correlation_id_async_callback() -> None:
    body = {"trace_correlation_id": "tc-1", "env": {"seed": 5}, "policy": {}, "new_key": 1}
    with client_for(make_config(), api_keys=[KEY]) as client:
        response = client.post("/rollout", json=body, headers=AUTH)
    assert response.status_code == 200
    data = response.json()
    assert data["trace_correlation_id"] == "tc-1"
    assert "run_id" not in data
    assert data["reward_info"]["outcome_reward"] == 0.5
    assert data["reward_info"]["outcome_objectives"] == {"reward": 0.5}
    assert data["reward_info"]["details"]["extra"] == {"new_key": 1}


def test_rollout_round_trip_run_id_sync_callback() -> None:
    body = {"run_id": "legacy-7", "env": {"seed": 1}, "policy": {"config": {"model": "m"}}}
    with client_for(make_config(rollout=sync_rollout), api_keys=[KEY]) as client:
        response = client.post("/rollout", json=body, headers=AUTH)
    data = response.json()
    assert response.status_code == 200
    assert data["run_id"] == "legacy-7"
    assert "trace_correlation_id" not in data
    thread_name, run_id = data["status_detail"].split("|")
    assert run_id == "legacy-7"
    assert thread_name != "test-uvicorn"  # the sync callback ran in the thread pool


def test_rollout_with_both_ids_echoes_both() -> None:
    body = {"trace_correlation_id": "tc-2", "run_id": "r-2", **EP}
    with client_for(make_config(), api_keys=[KEY]) as client:
        data = client.post("/rollout", json=body, headers=AUTH).json()
    assert data["trace_correlation_id"] == "tc-2" and data["run_id"] == "r-2"


def test_rollout_without_any_id_is_rejected() -> None:
    with client_for(make_config(), api_keys=[KEY]) as client:
        response = client.post("/rollout", json={"env": {}, "policy": {}}, headers=AUTH)
    assert response.status_code == 422
    assert "trace_correlation_id" in response.text and "run_id" in response.text


@pytest.mark.parametrize("missing", ["env", "policy"])
def test_rollout_without_env_or_policy_is_a_422_naming_the_field(missing: str) -> None:
    called: list[RolloutRequest] = []
    config = make_config(rollout=lambda request, fastapi_request: called.append(request))
    body = {"trace_correlation_id": "x", **EP}
    del body[missing]
    with client_for(config, api_keys=[KEY]) as client:
        response = client.post("/rollout", json=body, headers=AUTH)
        wrong_type = client.post(
            "/rollout", json={**body, missing: "not-an-object"}, headers=AUTH
        )
    assert response.status_code == 422
    assert [e["loc"] for e in response.json()["detail"]] == [["body", missing]]
    assert response.json()["detail"][0]["type"] == "missing"
    assert wrong_type.status_code == 422 and not called


def test_rollout_mapping_result_single_arg_callback_and_metrics_alias() -> None:
    def rollout(request: RolloutRequest) -> dict[str, Any]:
        return {"metrics": {"outcome_reward": 0.25}, "custom": "kept"}

    with client_for(make_config(rollout=rollout), api_keys=[KEY]) as client:
        data = client.post("/rollout", json={"run_id": "r-3", **EP}, headers=AUTH).json()
    assert data["run_id"] == "r-3"
    assert data["reward_info"]["outcome_reward"] == 0.25
    assert data["custom"] == "kept"


def test_rollout_errors_are_json() -> None:
    def broken(request: RolloutRequest, fastapi_request: Request) -> Any:
        raise KeyError("no-such-sample")

    with client_for(make_config(rollout=broken), api_keys=[KEY]) as client:
        response = client.post("/rollout", json={"trace_correlation_id": "x", **EP}, headers=AUTH)
    assert response.status_code == 500
    error = response.json()["detail"]["error"]
    assert error["code"] == "rollout_failed" and "no-such-sample" in error["message"]

    with client_for(make_config(rollout=lambda r, f: 42), api_keys=[KEY]) as client:
        response = client.post("/rollout", json={"trace_correlation_id": "x", **EP}, headers=AUTH)
    assert response.status_code == 500
    assert "returned int" in response.json()["detail"]["error"]["message"]

    with client_for(make_config(rollout=None), api_keys=[KEY]) as client:
        response = client.post("/rollout", json={"trace_correlation_id": "x", **EP}, headers=AUTH)
    assert response.status_code == 501


def test_sync_rollout_does_not_block_the_event_loop() -> None:
    entered, release = threading.Event(), threading.Event()
    loop_threads: list[int] = []

    async def record_loop_thread() -> None:
        loop_threads.append(threading.get_ident())

    def blocking_rollout(request: RolloutRequest, fastapi_request: Request) -> RolloutResponse:
        entered.set()
        released = release.wait(30)
        return RolloutResponse(
            trace_correlation_id=request.trace_correlation_id,
            reward_info=RewardInfo(outcome_reward=1.0 if released else 0.0),
            status_detail=str(threading.get_ident()),
        )

    config = make_config(rollout=blocking_rollout, startup_hooks=[record_loop_thread])
    results: list[httpx.Response] = []
    with client_for(config, api_keys=[KEY]) as client:
        worker = threading.Thread(
            target=lambda: results.append(
                client.post("/rollout", json={"trace_correlation_id": "b", **EP}, headers=AUTH)
            )
        )
        worker.start()
        assert entered.wait(15), "the rollout callback never started"
        # The callback is still blocked; the loop must still answer other requests.
        health = client.get("/health", headers=AUTH, timeout=15)
        assert health.status_code == 200
        release.set()
        worker.join(15)
    data = results[0].json()
    assert data["reward_info"]["outcome_reward"] == 1.0
    assert int(data["status_detail"]) != loop_threads[0]


# --- configuration: middleware, hooks, routers, state, CORS ----------------------------------


class TagMiddleware:
    """Adds ``x-tag: <value>`` to every response."""

    def __init__(self, app: ASGIApp, value: str = "plain") -> None:
        self.app, self.value = app, value

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-tag-" + self.value.encode(), b"yes"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, tagged)


def test_middleware_is_applied_in_every_form() -> None:
    config = make_config(
        middleware=[
            Middleware(TagMiddleware, value="object"),
            (TagMiddleware, {"value": "pair"}),
            TagMiddleware,
        ]
    )
    with client_for(config, api_keys=[KEY]) as client:
        for response in (client.get("/"), client.get("/health")):  # 200 and 401 alike
            assert response.headers["x-tag-object"] == "yes"
            assert response.headers["x-tag-pair"] == "yes"
            assert response.headers["x-tag-plain"] == "yes"


def test_bad_middleware_item_is_rejected() -> None:
    with pytest.raises(InvalidParameterError, match="middleware"):
        create_task_app(make_config(middleware=[42]))


def test_hooks_state_routers_and_cors() -> None:
    events: list[str] = []
    router = APIRouter()

    @router.get("/extra")
    async def extra(request: Request) -> dict[str, Any]:
        return {"answer": request.app.state.answer}

    def on_start(app: FastAPI) -> None:
        events.append(f"start:{app.state.answer}")

    async def on_stop() -> None:
        events.append("stop")

    config = make_config(
        app_state={"answer": 42},
        routers=[router],
        startup_hooks=[on_start],
        shutdown_hooks=[on_stop],
        cors_origins=["http://notebook.test"],
    )
    with client_for(config, api_keys=[KEY]) as client:
        assert events == ["start:42"]
        assert client.get("/extra").json() == {"answer": 42}
        preflight = client.options(
            "/rollout",
            headers={
                "Origin": "http://notebook.test",
                "Access-Control-Request-Method": "POST",
            },
        )
        assert preflight.headers["access-control-allow-origin"] == "http://notebook.test"
    assert events == ["start:42", "stop"]


def test_config_validation() -> None:
    with pytest.raises(InvalidParameterError, match="app_id"):
        TaskAppConfig(app_id="", name="n", description="d")
    with pytest.raises(InvalidParameterError, match="rollout"):
        TaskAppConfig(app_id="a", name="n", description="d", rollout="not callable")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="TaskAppConfig"):
        create_task_app({"app_id": "a"})  # type: ignore[arg-type]
    legacy = TaskAppConfig(app_id="a", name="n", description="d", describe_taskset=dict)
    assert legacy.provide_taskset_description is dict


# --- auth ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": KEY},
        {"X-API-Keys": f"wrong-one, {KEY}"},
        {"Authorization": f"Bearer {KEY}"},
        {"authorization": f"bearer {KEY}"},
    ],
    ids=["x-api-key", "x-api-keys", "bearer", "bearer-lowercase"],
)
def test_auth_accepts_each_header_form(headers: dict[str, str]) -> None:
    with client_for(make_config(), api_keys=[KEY]) as client:
        assert client.get("/health", headers=headers).status_code == 200


def test_wrong_key_gets_401_without_echoing_it(caplog: pytest.LogCaptureFixture) -> None:
    wrong = "sk-WRONG-secret-value-987"
    caplog.set_level(logging.DEBUG)
    with client_for(make_config(), api_keys=[KEY]) as client:
        response = client.get(
            "/health", headers={"X-API-Key": wrong, "Authorization": f"Bearer {wrong}"}
        )
        missing = client.get("/health")
    assert response.status_code == 401
    assert wrong not in response.text and KEY not in response.text
    error = response.json()["detail"]["error"]
    assert error["headers_seen"] == ["x-api-key", "authorization (Bearer)"]
    assert response.headers["www-authenticate"] == "Bearer"
    assert missing.status_code == 401
    assert missing.json()["detail"]["error"]["headers_seen"] == []
    with client_for(make_config(), api_keys=[KEY]) as client:
        bare = client.get("/health", headers={"Authorization": "baresecretword"})
        basic = client.get("/health", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert bare.status_code == 401 and "baresecretword" not in bare.text
    assert bare.json()["detail"]["error"]["headers_seen"] == [
        "authorization (scheme unrecognised, not Bearer)"
    ]
    assert basic.json()["detail"]["error"]["headers_seen"] == [
        "authorization (scheme 'basic', not Bearer)"
    ]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "Rejected GET /health" in logged
    assert wrong not in logged and KEY not in logged


def test_no_key_configured_is_503() -> None:
    with client_for(make_config()) as client:
        response = client.get("/health", headers=AUTH)
    assert response.status_code == 503
    message = response.json()["detail"]["error"]["message"]
    assert "ENVIRONMENT_API_KEY" in message and "none is configured" in message
    assert KEY not in response.text


def test_env_key_and_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENVIRONMENT_API_KEY", "env-primary")
    monkeypatch.setenv("ENVIRONMENT_API_KEY_ALIASES", " alias-1 , ,alias-2")
    assert allowed_keys_from_env() == ("env-primary", "alias-1", "alias-2")
    assert allowed_keys_from_env({"ENVIRONMENT_API_KEY_ALIASES": "x"}) == ("x",)
    with client_for(make_config()) as client:
        for key in ("env-primary", "alias-1", "alias-2"):
            assert client.get("/health", headers={"X-API-Key": key}).status_code == 200
        assert client.get("/health", headers={"X-API-Key": "alias-3"}).status_code == 401


def test_key_lookup_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENVIRONMENT_API_KEY", "from-env")

    def status(client: httpx.Client, key: str) -> int:
        return client.get("/health", headers={"X-API-Key": key}).status_code

    explicit = create_task_app(make_config(), api_keys=["from-args"])
    explicit.state.taskapp_api_keys = ("from-state",)
    with serve(explicit) as url, httpx.Client(base_url=url) as client:
        assert [status(client, k) for k in ("from-args", "from-state", "from-env")] == [
            200,
            401,
            401,
        ]

    runner_set = create_task_app(make_config())
    with serve(runner_set) as url, httpx.Client(base_url=url) as client:
        assert status(client, "from-env") == 200
        runner_set.state.taskapp_api_keys = ("from-state",)  # looked up per request
        assert [status(client, k) for k in ("from-state", "from-env")] == [200, 401]
        runner_set.state.taskapp_api_keys = ()
        assert status(client, "from-env") == 200


def test_require_api_key_false_serves_without_keys() -> None:
    with client_for(make_config(require_api_key=False)) as client:
        assert client.get("/health").status_code == 200
        response = client.post("/rollout", json={"trace_correlation_id": "open", **EP})
        assert response.json()["trace_correlation_id"] == "open"
