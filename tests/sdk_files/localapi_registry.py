"""A synth-ai 0.7 task app found only through synth-ai's registry (``APP_ID``)."""

from synth_ai.sdk.localapi import LocalAPIConfig
from synth_ai.sdk.localapi.apps import TaskAppEntry, register_task_app

APP_ID = "registered07"


def _config() -> LocalAPIConfig:
    return LocalAPIConfig(
        app_id=APP_ID,
        name="Registered",
        description="Found through register_task_app.",
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


register_task_app(
    entry=TaskAppEntry(app_id=APP_ID, description="registry fallback", config_factory=_config)
)
