"""A synth-ai 0.7 task app built by a ``create_app()`` factory (synth-ai's factory names)."""

from synth_ai.sdk.localapi import LocalAPIConfig, create_local_api

APP_ID = "factory07"


def create_app():
    return create_local_api(
        LocalAPIConfig(
            app_id=APP_ID,
            name="Factory",
            description="Built by create_app().",
            provide_taskset_description=lambda: {"splits": ["train"]},
            provide_task_instances=lambda seeds: [
                {"task": {"id": APP_ID, "name": "Factory"}, "dataset": {"id": APP_ID},
             "inference": {}, "limits": {}}
                for _ in seeds
            ],
            rollout=lambda request, fastapi_request: {
                "trace_correlation_id": request.trace_correlation_id,
                "reward_info": {"outcome_reward": 0.25},
            },
        )
    )
