"""A synth-ai 0.9 container found only through synth-ai's registry (``APP_ID``)."""

from synth_ai.sdk.container import ContainerConfig
from synth_ai.sdk.container.apps import ContainerEntry, register_container

APP_ID = "registered09"


def _config() -> ContainerConfig:
    return ContainerConfig(
        app_id=APP_ID,
        name="Registered",
        description="Found through register_container.",
        provide_taskset_description=lambda: {"splits": ["only"]},
        provide_task_instances=lambda seeds: [
            {"task": {"id": APP_ID, "name": "Registered"}, "dataset": {"id": APP_ID},
             "inference": {}, "limits": {}}
            for _ in seeds
        ],
        rollout=lambda request, fastapi_request: {
            "trace_correlation_id": request.trace_correlation_id,
            "reward_info": {"outcome_reward": 0.5},
        },
    )


register_container(
    entry=ContainerEntry(app_id=APP_ID, description="registry fallback", config_factory=_config)
)
