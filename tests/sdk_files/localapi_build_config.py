"""A synth-ai 0.7 task app whose ``build_config()`` returns a ``LocalAPIConfig``.

No ``app``: both runners build it with synth-ai's ``create_task_app``. Its auth reads
``ENVIRONMENT_API_KEY`` on every request. Rollouts are scored without a model.
"""

from synth_ai.sdk.localapi import LocalAPIConfig
from synth_ai.sdk.localapi._impl.contracts import (
    RolloutMetrics,
    RolloutRequest,
    RolloutResponse,
    TaskInfo,
)
from synth_ai.sdk.localapi._impl.server import ProxyConfig

APP_ID = "parity07"


def instances(seeds):
    for seed in seeds:
        yield TaskInfo(
            task={"id": APP_ID, "name": "Parity"},
            dataset={"id": APP_ID, "split": "train", "index": seed},
            inference={},
            limits={"max_turns": 1},
        )


def rollout(request: RolloutRequest, fastapi_request) -> RolloutResponse:
    seed = request.env.seed or 0
    return RolloutResponse(
        trace_correlation_id=request.trace_correlation_id,
        reward_info=RolloutMetrics(outcome_reward=1.0 if seed % 2 == 0 else 0.0),
    )


def build_config() -> LocalAPIConfig:
    return LocalAPIConfig(
        app_id=APP_ID,
        name="Parity (0.7 build_config)",
        description="Reward 1 for even seeds.",
        provide_taskset_description=lambda: {"splits": ["train"]},
        provide_task_instances=instances,
        rollout=rollout,
        dataset_registry=None,
        proxy=ProxyConfig(),
        routers=(),
        middleware=(),
        app_state={},
        require_api_key=True,
        ensure_localapi_auth=True,
        expose_debug_env=False,
        cors_origins=None,
        startup_hooks=(),
        shutdown_hooks=(),
    )
