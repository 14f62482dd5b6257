"""Submit a hosted job with the real synth-ai SDK (0.9.11) and follow it to the end.

Runs under ``.venv-sdk/bin/python`` (made by ``scripts/sdk-venv``), never under our venv;
``tests/test_jobs_sdk_oracle.py`` points it and our client at one loopback capture server
and compares the requests. One JSON argument::

    {"mode": "gepa_toml" | "gepa_dict" | "eval", "backend_url", "api_key", "container_url",
     "worker_token", "config_path" | "config_dict", "overrides", "system_name"}

GEPA takes the SDK's ``run_in_process_job`` path step by step (``sdk/container/_impl/
in_process_runner.py``): ``resolve_backend_api_base``, the ``task_url`` /
``prompt_learning.container_url`` overrides, ``PromptLearningJob.from_config`` with the worker
token, ``_skip_health_check = True``, ``submit()``, ``stream_until_complete()``. Only the two
0.9.11 bugs of that function are stepped around (``InProcessContainer`` gets unknown
keyword arguments; a sync stream inside its own loop); the HTTP is the SDK's own. Eval uses
``PolicyOptimizationOfflineJob.create(kind="eval")`` then ``status()``. Prints one JSON line
with the job id and final status.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def gepa(args: dict[str, Any]) -> dict[str, Any]:
    from synth_ai.sdk.container._impl.in_process_runner import (
        merge_dot_overrides,
        resolve_backend_api_base,
    )
    from synth_ai.sdk.optimization.internal.prompt_learning import PromptLearningJob

    backend_api_base = resolve_backend_api_base(args["backend_url"])
    url = args["container_url"]
    overrides = merge_dot_overrides(
        args.get("overrides") or {}, {"task_url": url, "prompt_learning.container_url": url}
    )
    if args["mode"] == "gepa_toml":
        job = PromptLearningJob.from_config(
            Path(args["config_path"]), backend_url=backend_api_base, api_key=args["api_key"],
            container_worker_token=args["worker_token"], overrides=overrides,
        )
    else:
        job = PromptLearningJob.from_dict(
            args["config_dict"], backend_url=backend_api_base, api_key=args["api_key"],
            container_worker_token=args["worker_token"], overrides=overrides,
        )
    job._skip_health_check = True
    job_id = job.submit()
    result = job.stream_until_complete(timeout=60.0, interval=0.2)
    status = getattr(result.status, "value", result.status)
    return {"job_id": job_id, "status": str(status), "best_reward": result.best_reward}


def evaluate(args: dict[str, Any]) -> dict[str, Any]:
    from synth_ai.sdk.optimization.policy.v1 import PolicyOptimizationOfflineJob

    config = {**args["config_dict"], "container_url": args["container_url"]}
    job = PolicyOptimizationOfflineJob.create(
        kind="eval", system_name=args["system_name"], config=config,
        container_worker_token=args["worker_token"], backend_url=args["backend_url"],
        api_key=args["api_key"],
    )
    return {"job_id": job.job_id, "status": job.status().get("status")}


def main() -> int:
    args = json.loads(sys.argv[1])
    out = evaluate(args) if args["mode"] == "eval" else gepa(args)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
