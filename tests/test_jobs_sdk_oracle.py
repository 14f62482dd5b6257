"""Conformance: our hosted-job client and synth-ai 0.9.11's own send the same requests.

The oracle is the real SDK in its own venv (``.venv-sdk``, made by ``scripts/sdk-venv``):
``tests/scripts/sdk_submit_job.py`` submits and follows a job with the SDK's job clients
(``PromptLearningJob`` as its ``run_in_process_job`` drives it; ``PolicyOptimizationOffline
Job`` for eval), and ``submit_and_poll_job`` does the same from our package, both against
one loopback capture server. The requests must agree: method and path of each, the create
body (envelope and config) and the headers that mean something.

Differences ignored, each for a reason:

* ``user-agent``, ``host``, ``content-length``, ``accept-encoding``, ``connection``: the
  HTTP libraries' own (Rust reqwest vs httpx), no meaning to the backend.
* The SDK's ``from_dict`` (not its ``run_in_process_job``, which uses ``from_config``)
  also copies the train seeds to ``prompt_learning.train_seeds`` / ``evaluation_seeds``,
  names its own ``from_config`` path leaves out ("do not shadow seeds into deprecated
  top-level aliases"); we send the ``from_config`` shape for both inputs.
* Eval: synth-ai's eval client only polls ``GET …/offline/jobs/{id}`` after the create; we
  follow the event stream as for GEPA (same job family) and read the same status path. So
  for eval the create is compared in full, and the SDK's status path must be among ours.
* The SDK needs ``SYNTH_CONTAINER_AUTH_PRIVATE_KEY`` and ``ENVIRONMENT_API_KEY`` in its
  environment before it submits a GEPA job for a SynthTunnel URL (client-side checks; neither
  reaches the wire). Our agent adds the app's key locally, so we need neither.

In CI (``CI=true``) a missing ``.venv-sdk`` fails these tests instead of skipping them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from support import serve

from taskapp_notebook.jobs import resolve_job_host, submit_and_poll_job

ROOT = Path(__file__).resolve().parent.parent
SDK_PYTHON = ROOT / ".venv-sdk" / "bin" / "python"
DRIVER = ROOT / "tests" / "scripts" / "sdk_submit_job.py"
KEY = "sk_oracle_0123456789abcdef"
WORKER = "wt_oracle_fedcba9876543210"
NOISE_HEADERS = {"user-agent", "host", "content-length", "accept-encoding", "connection"}

GEPA_TOML = """\
[prompt_learning]
algorithm = "gepa"
container_url = "http://placeholder.invalid"

[prompt_learning.policy]
provider = "openai"
model = "gpt-4.1-nano"
inference_mode = "synth_hosted"
temperature = 0.0

[prompt_learning.task_data]
split = "train"
validation_seeds = [4, 5]

[prompt_learning.task_data.train_pools]
reflection_seeds = [0, 1]
pareto_seeds = [2, 3]

[prompt_learning.gepa]
env_name = "my-env"

[prompt_learning.gepa.initial_candidate]
stages = [{ stage_id = "main", instruction = "Answer the question." }]

[prompt_learning.gepa.termination_conditions]
total_rollouts = 8

[prompt_learning.gepa.population]
initial_size = 2
num_generations = 1
children_per_generation = 1

[prompt_learning.gepa.rollout]
budget = 8
max_concurrent = 2

[prompt_learning.gepa.evaluation]
seeds = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
val_seeds = [4]

[prompt_learning.gepa.archive]
size = 8
pareto_set_size = 10

[prompt_learning.gepa.mutation]
rate = 0.5
"""

MIPRO_TOML = """\
[prompt_learning]
algorithm = "mipro"
container_url = "http://placeholder.invalid"
online_train_seeds = [3, 4, 5]

[prompt_learning.policy]
provider = "openai"
model = "gpt-4.1-nano"

[prompt_learning.mipro]
env_name = "my-env"
bootstrap_train_seeds = [0, 1, 2]
test_pool = [6, 7]
"""
CONFIGS = {"gepa": GEPA_TOML, "mipro": MIPRO_TOML}


def _sdk_missing() -> str | None:
    if SDK_PYTHON.exists():
        return None
    reason = "synth-ai 0.9.11 oracle venv missing: run scripts/sdk-venv"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI must run the oracle)")
    return reason


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


class CaptureBackend:
    """Records every request; answers like the job backend would for a job that ends."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.app = FastAPI()
        self.app.add_api_route("/{path:path}", self.handle,
                               methods=["GET", "POST", "PATCH", "DELETE"])

    async def handle(self, path: str, request: Request) -> Any:
        raw = await request.body()
        self.seen.append(Seen(request.method, "/" + path, dict(request.query_params),
                              dict(request.headers), json.loads(raw) if raw else None))
        if request.method == "POST":
            return {"job_id": "job_oracle", "id": "job_oracle", "status": "queued"}
        if path.endswith("/events/stream"):
            return StreamingResponse(self._events(), media_type="text/event-stream")
        if path.endswith("/events"):
            return {"events": [], "next_seq": 0}
        return {"job_id": "job_oracle", "status": "succeeded", "best_reward": 0.75,
                "baseline_reward": 0.5, "best_candidate": {"stages": []}}

    async def _events(self) -> Any:
        for seq, kind in enumerate(("learning.policy.gepa.job.started",
                                    "learning.policy.gepa.job.completed"), 1):
            event = {"type": kind, "seq": seq, "job_id": "job_oracle", "message": kind,
                     "data": {"status": "succeeded"} if seq == 2 else {}}
            yield f"data: {json.dumps(event)}\n\n"


@pytest.fixture
def capture() -> Iterator[tuple[CaptureBackend, str]]:
    backend = CaptureBackend()
    with serve(backend.app) as url:
        yield backend, url


def run_sdk(args: dict[str, Any], env_extra: dict[str, str]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SYNTH_", "RUST_", "LOCAL_RUST", "DEV_RUST", "PROD_RUST"))
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(env_extra, NO_PROXY="127.0.0.1,localhost", HOME=env.get("HOME", "/tmp"))
    proc = subprocess.run([str(SDK_PYTHON), str(DRIVER), json.dumps(args)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def meaningful(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k not in NOISE_HEADERS}


def requests_by_kind(seen: list[Seen]) -> dict[str, list[Seen]]:
    kinds: dict[str, list[Seen]] = {"create": [], "stream": [], "status": [], "other": []}
    for s in seen:
        if s.method == "POST" and s.path.endswith("/offline/jobs"):
            kinds["create"].append(s)
        elif s.path.endswith("/events/stream"):
            kinds["stream"].append(s)
        elif s.method == "GET" and s.path.endswith("/job_oracle"):
            kinds["status"].append(s)
        else:
            kinds["other"].append(s)
    return kinds


def compare(sdk: list[Seen], ours: list[Seen], *, follow: bool = True) -> None:
    a, b = requests_by_kind(sdk), requests_by_kind(ours)
    (sdk_create,), (our_create,) = a["create"], b["create"]
    assert our_create.path == sdk_create.path and our_create.query == sdk_create.query == {}
    assert our_create.body == sdk_create.body, json.dumps(
        {"sdk": sdk_create.body, "ours": our_create.body}, indent=1, sort_keys=True)
    assert meaningful(our_create.headers) == meaningful(sdk_create.headers)
    if not follow:
        return
    assert a["stream"] and b["stream"]
    assert b["stream"][0].path == a["stream"][0].path
    assert b["stream"][0].query == a["stream"][0].query == {}
    assert meaningful(b["stream"][0].headers) == meaningful(a["stream"][0].headers)
    assert a["status"] and b["status"]
    assert {s.path for s in b["status"]} == {s.path for s in a["status"]}
    assert all(s.query == {} for s in a["status"] + b["status"])
    assert all(meaningful(s.headers) == {"authorization": f"Bearer {KEY}",
                                         **({"accept": s.headers["accept"]}
                                            if "accept" in s.headers else {})}
               for s in a["status"] + b["status"])
    assert not a["other"] and not b["other"], (a["other"], b["other"])


SDK_ENV = {
    "SYNTH_CONTAINER_AUTH_PRIVATE_KEY": "b3JhY2xlLXNpZ25pbmcta2V5LTAxMjM0NTY3ODlhYmNkZWY=",
    "ENVIRONMENT_API_KEY": "env-oracle-key",
}


@pytest.mark.parametrize("algorithm", ["gepa", "mipro"])
@pytest.mark.parametrize("source", ["toml", "dict"])
async def test_prompt_learning_create_and_follow_match_the_sdk(
    algorithm: str, source: str, capture: tuple[CaptureBackend, str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reason = _sdk_missing()
    if reason:
        pytest.skip(reason)
    backend, url = capture
    container_url = "http://127.0.0.1:9/s/rt_oracle"  # a SynthTunnel URL shape
    config_path = tmp_path / f"{algorithm}.toml"
    config_path.write_text(CONFIGS[algorithm])
    config_dict = tomllib.loads(CONFIGS[algorithm])
    overrides = ({"prompt_learning.gepa.rollout.budget": 6} if algorithm == "gepa"
                 else {"prompt_learning.mipro.test_pool": [8]})
    args = {"mode": f"gepa_{source}", "backend_url": url, "api_key": KEY,
            "container_url": container_url, "worker_token": WORKER,
            "config_path": str(config_path), "config_dict": config_dict,
            "overrides": overrides}
    # Both clients create on the "Rust backend" host; point it at the capture server.
    sdk = run_sdk(args, {**SDK_ENV, "SYNTH_RUST_BACKEND_URL": url})
    assert sdk == {"job_id": "job_oracle", "status": "succeeded", "best_reward": 0.75}
    sdk_seen, backend.seen = backend.seen, []

    monkeypatch.setenv("SYNTH_RUST_BACKEND_URL", url)
    result = await submit_and_poll_job(
        task_app_url=container_url, task_app_worker_token=WORKER, api_key=KEY,
        backend_url=url, overrides=overrides, poll_interval=0.2, timeout=60,
        **({"config_path": config_path} if source == "toml" else {"config_dict": config_dict}),
    )
    assert result.succeeded and result.best_reward == 0.75 and result.baseline_reward == 0.5
    ours = backend.seen
    if source == "dict" and algorithm == "gepa":  # from_dict shadows seeds (module docstring)
        body = requests_by_kind(sdk_seen)["create"][0].body["config"]["prompt_learning"]
        assert body.pop("train_seeds") == body.pop("evaluation_seeds") == [
            0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    compare(sdk_seen, ours)
    create = requests_by_kind(ours)["create"][0]
    assert create.headers["x-synthtunnel-worker-token"] == WORKER
    assert WORKER not in json.dumps(create.body)


async def test_eval_create_matches_the_sdk(capture: tuple[CaptureBackend, str]) -> None:
    reason = _sdk_missing()
    if reason:
        pytest.skip(reason)
    backend, url = capture
    config = {"env_name": "my-env", "seeds": [0, 1, 2],
              "policy": {"provider": "openai", "model": "gpt-4.1-nano"}}
    args = {"mode": "eval", "backend_url": url, "api_key": KEY, "worker_token": WORKER,
            "container_url": "http://127.0.0.1:9/s/rt_oracle", "config_dict": config,
            "system_name": "my-eval"}
    assert run_sdk(args, {})["job_id"] == "job_oracle"
    sdk_seen, backend.seen = backend.seen, []
    await submit_and_poll_job(
        job_type="eval", task_app_url=args["container_url"], task_app_worker_token=WORKER,
        api_key=KEY, backend_url=url, config_dict=config, system_name="my-eval",
        poll_interval=0.2, timeout=60,
    )
    compare(sdk_seen, backend.seen, follow=False)
    status_paths = {s.path for s in requests_by_kind(sdk_seen)["status"]}
    assert status_paths == {"/api/v1/offline/jobs/job_oracle"}
    assert status_paths <= {s.path for s in requests_by_kind(backend.seen)["status"]}


HOSTS = [
    ({}, "https://api.usesynth.ai"),
    ({}, "https://api-dev.usesynth.ai/api"),
    ({}, "http://api.usesynth.ai:8443"),
    ({}, "http://127.0.0.1:8000"),
    ({}, "http://localhost:8003/api"),
    ({"SYNTH_RUST_BACKEND_URL_OVERRIDE": "http://rust.example:1234/api"},
     "https://api.usesynth.ai"),
    ({"RUST_BACKEND_URL": "http://rust.example:9/api/v1"}, "https://my.backend"),
    ({"SYNTH_RUST_BACKEND_URL": "http://a.example"}, "http://127.0.0.1:8001"),
]


def test_job_host_resolution_matches_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    reason = _sdk_missing()
    if reason:
        pytest.skip(reason)
    code = (
        "import json, os, sys\n"
        "from synth_ai.sdk.optimization.internal.prompt_learning import "
        "_resolve_rust_backend_api_base as f\n"
        "out = []\n"
        "for env, url in json.loads(sys.argv[1]):\n"
        "    saved = dict(os.environ); os.environ.update(env)\n"
        "    out.append(f(url)); os.environ.clear(); os.environ.update(saved)\n"
        "print(json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if "RUST" not in k}
    proc = subprocess.run([str(SDK_PYTHON), "-c", code, json.dumps(HOSTS)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = json.loads(proc.stdout)
    for name in [k for k in os.environ if "RUST" in k]:
        monkeypatch.delenv(name)
    ours = []
    for extra, url in HOSTS:
        with monkeypatch.context() as m:
            for k, v in extra.items():
                m.setenv(k, v)
            ours.append(resolve_job_host(url))
    assert ours == expected
    # Where the SDK falls back to its local default (http://localhost:8080), we keep the
    # backend the user named: a deliberate difference.
    assert resolve_job_host("https://my.backend") == "https://my.backend"


def test_a_missing_oracle_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "SDK_PYTHON", ROOT / "no-such-venv" / "python")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the oracle"):
        _sdk_missing()
    monkeypatch.setenv("CI", "")
    assert "scripts/sdk-venv" in (_sdk_missing() or "")
