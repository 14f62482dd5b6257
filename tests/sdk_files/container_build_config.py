"""A synth-ai 0.9 container whose ``build_config()`` returns a ``ContainerConfig``.

No ``app``: both runners build it with synth-ai's ``create_container``. Every config field
is set; rollouts are scored without a model (reward = seed parity) so answers are exact.
"""

from synth_ai.sdk.container import ContainerConfig
from synth_ai.sdk.container._impl.contracts import (
    RolloutMetrics,
    RolloutRequest,
    RolloutResponse,
    TaskInfo,
)
from synth_ai.sdk.container._impl.server import ProxyConfig

APP_ID = "parity09"


def describe() -> dict:
    return {"splits": ["train", "test"], "sizes": {"train": 8, "test": 4}}


def instances(seeds: list[int]) -> list[TaskInfo]:
    return [
        TaskInfo(
            task={"id": APP_ID, "name": "Parity"},
            dataset={"id": APP_ID, "split": "train", "index": seed},
            inference={},
            limits={"max_turns": 1},
            task_metadata={"question": f"is {seed} even?"},
        )
        for seed in seeds
    ]


async def rollout(request: RolloutRequest, fastapi_request) -> RolloutResponse:
    seed = request.env.seed or 0
    return RolloutResponse(
        trace_correlation_id=request.trace_correlation_id,
        reward_info=RolloutMetrics(outcome_reward=1.0 if seed % 2 == 0 else 0.0),
    )


def validate(request, fastapi_request) -> dict:
    ok = isinstance(request.artifact_payload, str) and "{question}" in request.artifact_payload
    issues = [] if ok else [{"code": "missing_placeholder", "message": "needs {question}"}]
    return {"status": "valid" if ok else "invalid", "errors": issues}


def build_config() -> ContainerConfig:
    return ContainerConfig(
        app_id=APP_ID,
        name="Parity (0.9 build_config)",
        description="Reward 1 for even seeds.",
        provide_taskset_description=describe,
        provide_task_instances=instances,
        rollout=rollout,
        validate_candidate=validate,
        dataset_registry=None,
        proxy=ProxyConfig(),
        routers=(),
        middleware=(),
        app_state={"answer": 42},
        require_api_key=True,
        ensure_container_auth=True,
        expose_debug_env=True,
        cors_origins=["*"],
        startup_hooks=(),
        shutdown_hooks=(),
    )
