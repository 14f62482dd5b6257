"""synth-ai task-app files served by our runner answer exactly as under synth-ai's runner.

Each case serves one file twice, side by side, in the SDK's own venv
(``tests/scripts/sdk_serve.py``): once with synth-ai's in-process runner (0.9.11
``InProcessContainer`` / 0.7.3 ``InProcessTaskApp``) and once with ours
(``taskapp_notebook.InProcessContainer``). The same calls go to both — health, info,
task_info, rollouts (scored by a stand-in model server for the shipped templates), the 422s,
wrong and missing keys, done — and every status and JSON body must be equal, except that
the first 15 characters of the key which synth-ai 0.7 puts into its 400s are blanked in ours.
Files: the templates synth-ai ships (used from the venv as they are) and
``tests/sdk_files/*``.

The venvs come from ``scripts/sdk-venv 0.9`` / ``scripts/sdk-venv 0.7``; without them these
tests skip, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from fastapi import FastAPI
from support import free_port, port_is_free, serve

from taskapp_notebook.errors import scrub_secrets

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "scripts" / "sdk_serve.py"
FILES = ROOT / "tests" / "sdk_files"
VENVS = {"0.9": ROOT / ".venv-sdk", "0.7": ROOT / ".venv-sdk07"}
SITE = "lib/python{}.{}/site-packages/synth_ai/sdk".format(*sys.version_info[:2])
KEY = "sdk-files-test-key-1234567890"
WRONG = "not-the-key-0987654321"
#: What assertion messages mask (synth-ai 0.7 itself prints the first 15 characters).
SECRETS = [KEY, WRONG, KEY[:15], WRONG[:15]]


def python_of(generation: str) -> Path:
    """The SDK venv's python; skip without it (fail under CI=true)."""
    python = VENVS[generation] / "bin" / "python"
    if not python.exists():
        why = f"{python} is missing: run scripts/sdk-venv {generation}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why + " (CI=true: the SDK venvs are required)")
        pytest.skip(why)
    return python


def template(generation: str) -> Path:
    python_of(generation)  # skip (or fail under CI=true) without the venv
    name = (
        "container/_impl/container_template.py"
        if generation == "0.9"
        else "localapi/_impl/localapi_template.py"
    )
    path = VENVS[generation] / SITE / name
    if not path.exists():  # the venv's python may differ from ours
        found = sorted(VENVS[generation].glob(f"lib/python3*/site-packages/synth_ai/sdk/{name}"))
        assert found, f"synth-ai's template {name} is not in {VENVS[generation]}"
        path = found[0]
    return path


# -- a stand-in for the policy model the shipped templates call -----------------------------


def stand_in_model() -> FastAPI:
    """Stand-in for an OpenAI-compatible model: answers "Sample input N" with the template's
    expected "Sample output N" when N is even, and with something else when N is odd."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def complete(body: dict[str, Any]) -> dict[str, Any]:
        n = int(body["messages"][-1]["content"].rsplit(" ", 1)[-1])
        answer = f"Sample output {n}" if n % 2 == 0 else "no idea"
        return {"choices": [{"message": {"role": "assistant", "content": answer}}]}

    return app


# -- one runner in a subprocess ---------------------------------------------------------------


def read_line(stream: IO[str], timeout: float) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return stream.readline()


@dataclass
class Served:
    runner: str
    url: str
    started: dict[str, Any]
    proc: subprocess.Popen[str]
    stderr: Path
    closing: dict[str, Any] | None = None


@contextmanager
def served(
    runner: str, generation: str, file: Path, tmp: Path, env: dict[str, str]
) -> Iterator[Served]:
    port = free_port()
    base = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    for name in ("ENVIRONMENT_API_KEY", "ENVIRONMENT_API_KEY_ALIASES", "SYNTH_CONTAINER_AUTH_MODE"):
        base.pop(name, None)
    home = tmp / f"home-{runner}"
    home.mkdir(exist_ok=True)
    base.update(HOME=str(home), NO_PROXY="127.0.0.1,localhost", PYTHONUNBUFFERED="1", **env)
    stderr = tmp / f"{runner}-{generation}-{file.stem}.stderr"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [str(python_of(generation)), str(DRIVER), runner, str(file), str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=base, text=True,
        )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        line = read_line(proc.stdout, 90.0)
        assert line, f"{runner} runner did not start {file.name}: " + scrub_secrets(
            stderr.read_text(errors="replace")[-3000:], SECRETS
        )
        started = json.loads(line)
        one = Served(runner, started["url"], started, proc, stderr)
        yield one
        proc.stdin.close()
        assert proc.wait(30) == 0, scrub_secrets(stderr.read_text()[-3000:], SECRETS)
        one.closing = json.loads(proc.stdout.read().strip().splitlines()[-1])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        if not proc.stdin.closed:
            proc.stdin.close()
    assert port_is_free(port), f"the {runner} runner left port {port} bound"


# -- the calls ---------------------------------------------------------------------------------


def rollout_body(seed: int, model_url: str, **drop: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "trace_correlation_id": f"parity-{seed}",
        "env": {"env_name": "t", "seed": seed, "config": {}},
        "policy": {"policy_name": "p", "config": {"model": "m", "inference_url": model_url}},
    }
    for key in drop:
        del body[key]
    return body


def calls(model_url: str, extra: bool) -> list[tuple[str, str, str, dict[str, Any]]]:
    auth = {"X-API-Key": KEY}
    out: list[tuple[str, str, str, dict[str, Any]]] = [
        ("root", "GET", "/", {}),
        ("health", "GET", "/health", {"headers": auth}),
        ("health, bearer", "GET", "/health", {"headers": {"Authorization": f"Bearer {KEY}"}}),
        ("info", "GET", "/info", {"headers": auth}),
        ("taskset", "GET", "/task_info", {"headers": auth}),
        ("task_info seed=3", "GET", "/task_info", {"headers": auth, "params": {"seed": 3}}),
        ("task_info seeds=1,2", "GET", "/task_info",
         {"headers": auth, "params": [("seeds", 1), ("seeds", 2)]}),
        ("rollout seed 4", "POST", "/rollout",
         {"headers": auth, "json": rollout_body(4, model_url)}),
        ("rollout seed 5", "POST", "/rollout",
         {"headers": auth, "json": rollout_body(5, model_url)}),
        ("rollout without env", "POST", "/rollout",
         {"headers": auth, "json": rollout_body(1, model_url, env=True)}),
        ("rollout without policy", "POST", "/rollout",
         {"headers": auth, "json": rollout_body(1, model_url, policy=True)}),
        ("info, wrong key", "GET", "/info", {"headers": {"X-API-Key": WRONG}}),
        ("info, no key", "GET", "/info", {}),
        ("done", "POST", "/done", {"headers": auth}),
    ]
    if extra:
        candidate = {"candidate_id": "c1", "artifact_kind": "prompt"}
        out += [
            ("validate-candidate ok", "POST", "/validate-candidate",
             {"headers": auth, "json": {**candidate, "artifact_payload": "Q: {question}"}}),
            ("validate-candidate bad", "POST", "/validate-candidate",
             {"headers": auth, "json": {**candidate, "artifact_payload": "no placeholder"}}),
            ("validate-candidate 422", "POST", "/validate-candidate",
             {"headers": auth, "json": {"artifact_kind": "prompt"}}),
        ]
    return out


def answer(client: httpx.Client, url: str, method: str, path: str, kw: dict[str, Any]) -> Any:
    try:
        response = client.request(method, url + path, **kw)
    except httpx.TransportError as exc:  # an app that crashes mid-request: compare that too
        return None, type(exc).__name__
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return response.status_code, body


def blank_key_prefix(result: Any) -> Any:
    """synth-ai 0.7's error bodies carry the first 15 characters of the key; ours blank them
    (same length). The one place our answers differ from synth-ai's on purpose."""
    status, body = result
    if status is None or status < 400:
        return result
    return status, json.loads(json.dumps(body).replace(KEY[:15], "*" * 15))


@dataclass(frozen=True)
class Case:
    id: str
    generation: str
    file: str  # "template" or a file under tests/sdk_files
    sdk_env: tuple[tuple[str, str], ...] = ()
    our_env: tuple[tuple[str, str], ...] = ()
    extra_calls: bool = False


LOCAL = (("SYNTH_CONTAINER_AUTH_MODE", "optional_local"),)  # loopback: /info, /task_info, /rollout
OPEN = (("SYNTH_CONTAINER_AUTH_MODE", "disabled"),)  # every route, /validate-candidate too
ENV_KEY = (("ENVIRONMENT_API_KEY", KEY),)
CASES = [
    # 0.9 containers accept backend-signed tokens by default: every guarded call is a 401.
    Case("0.9 template, default auth", "0.9", "template"),
    Case("0.9 template, optional_local", "0.9", "template", LOCAL, LOCAL),
    Case("0.9 build_config", "0.9", "container_build_config.py", OPEN, OPEN, True),
    Case("0.9 registry", "0.9", "container_registry.py", LOCAL, LOCAL),
    # 0.7's runner never exports api_key=: it needs ENVIRONMENT_API_KEY; ours needs only api_key=.
    Case("0.7 template", "0.7", "template", ENV_KEY),
    Case("0.7 build_config", "0.7", "localapi_build_config.py", ENV_KEY),
    Case("0.7 create_app factory", "0.7", "localapi_factory.py", ENV_KEY),
    Case("0.7 registry", "0.7", "localapi_registry.py", ENV_KEY),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_same_answers_as_synth_ai_runner(case: Case, tmp_path: Path) -> None:
    file = template(case.generation) if case.file == "template" else FILES / case.file
    with ExitStack() as stack, httpx.Client(timeout=30.0, trust_env=False) as client:
        model = stack.enter_context(serve(stand_in_model()))
        common = {"TEST_APP_KEY": KEY}
        sdk = stack.enter_context(
            served("sdk", case.generation, file, tmp_path, {**common, **dict(case.sdk_env)})
        )
        ours = stack.enter_context(
            served("ours", case.generation, file, tmp_path, {**common, **dict(case.our_env)})
        )
        assert sdk.started["generation"] == ours.started["generation"] == case.generation
        results = [
            (name, answer(client, sdk.url, m, p, kw), answer(client, ours.url, m, p, kw))
            for name, m, p, kw in calls(f"{model}/v1", case.extra_calls)
        ]
        our_log = ours.stderr.read_text(errors="replace") + sdk.stderr.read_text(errors="replace")
    differ = [
        f"{name}:\n  synth-ai: {theirs!r}\n  ours:     {mine!r}"
        for name, theirs, mine in results
        if blank_key_prefix(theirs) != mine
    ]
    assert not differ, scrub_secrets("\n".join(differ), SECRETS)

    got = {name: mine for name, _, mine in results}
    theirs = {name: answer for name, answer, _ in results}
    if case.generation == "0.7":  # synth-ai 0.7 shows the key's first 15 characters ...
        assert KEY[:15] in json.dumps(theirs["info, wrong key"])
    assert KEY[:15] not in json.dumps(got)  # ... which our runner blanks
    assert got["root"][0] == 200 and got["health"][0] == 200
    assert got["rollout without env"][0] == got["rollout without policy"][0] in (401, 422)
    if got["info"][0] == 200:  # the call got through the app's auth: check real answers
        assert got["rollout without env"][1]["detail"][0]["loc"] == ["body", "env"]
        assert got["rollout without policy"][1]["detail"][0]["loc"] == ["body", "policy"]
        assert got["info, wrong key"][0] in (400, 401, 200)  # 200: 0.9 without token auth
        assert got["rollout seed 4"][0] == got["rollout seed 5"][0] == 200
        rewards = [got[f"rollout seed {s}"][1]["reward_info"]["outcome_reward"] for s in (4, 5)]
        if case.file in ("template", "container_build_config.py", "localapi_build_config.py"):
            assert rewards == [1.0, 0.0]
    else:
        assert case.id == "0.9 template, default auth"
        assert got["info"] == got["info, no key"] and got["info"][0] == 401
        assert got["info"][1]["detail"]["error"]["code"] == "auth_missing"
    if case.extra_calls:
        assert got["validate-candidate ok"][0] == 200
        assert got["validate-candidate ok"][1]["status"] == "valid"
        assert got["validate-candidate bad"][1]["errors"][0]["code"] == "missing_placeholder"
        assert got["validate-candidate 422"][0] == 422

    # Like synth-ai 0.9's runner, ours hands the key to the app in ENVIRONMENT_API_KEY;
    # unlike it, ours puts the variable back when the app stops.
    assert ours.started["key_exported"] is True
    assert ours.closing == {"stopped": True, "env_restored": True}
    assert KEY not in our_log.replace(KEY[:15], "")  # synth-ai 0.7 itself prints 15 chars


def test_sdk_runner_07_needs_the_environment_ours_does_not(tmp_path: Path) -> None:
    """synth-ai 0.7's runner does not hand api_key= to the app: the app mints and persists a
    key of its own, the runner takes the 400 on /health for "up", and every call is refused.
    Ours hands api_key= to the same, unchanged file."""
    file = FILES / "localapi_build_config.py"
    env = {"TEST_APP_KEY": KEY}
    with httpx.Client(timeout=30.0, trust_env=False) as client:
        with served("ours", "0.7", file, tmp_path, env) as ours:
            assert client.get(f"{ours.url}/info", headers={"X-API-Key": KEY}).status_code == 200
            wrong = client.get(f"{ours.url}/info", headers={"X-API-Key": WRONG})
            assert wrong.status_code == 400  # synth-ai 0.7's own answer to a wrong key
        with served("sdk", "0.7", file, tmp_path, env) as sdk:
            refused = client.get(f"{sdk.url}/info", headers={"X-API-Key": KEY})
    assert refused.status_code == 400, "synth-ai 0.7's runner now hands api_key= over too"
    assert (tmp_path / "home-sdk" / ".synth-ai").exists()  # where it persisted the minted key
    assert not (tmp_path / "home-ours" / ".synth-ai").exists()


def test_two_sdk_apps_with_different_keys_in_one_process(tmp_path: Path) -> None:
    """ENVIRONMENT_API_KEY is one per process: the first synth-ai 0.7 app's key is exported;
    the second app's requests are checked against its own key by our wrapper. Each app
    accepts exactly its own key, before and after the other stops; the variable (and the
    DEV_ copy synth-ai 0.7 makes) is put back when the last one stops."""
    key_a, key_b = "key-a-" + "a" * 24, "key-b-" + "b" * 24
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HOME=str(tmp_path), KEY_A=key_a, KEY_B=key_b, ENVIRONMENT_API_KEY="before-1234")
    proc = subprocess.run(
        [str(python_of("0.7")), str(ROOT / "tests" / "scripts" / "sdk_two_keys.py"),
         str(FILES / "localapi_build_config.py"), str(FILES / "localapi_factory.py")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, scrub_secrets(proc.stderr[-3000:], [key_a, key_b])
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    ok_wrong = [200, 400]  # its own key, then the other app's (400: synth-ai 0.7's answer)
    assert facts == {
        "a_alone": ok_wrong,
        "env_is_a_while_both_run": True,
        "a_with_a_b": ok_wrong,
        "b_with_a_b": ok_wrong,
        "b_bearer_b_a": ok_wrong,
        "b_after_a_stopped": ok_wrong,
        "env_is_a_after_a_stopped": True,
        "env_restored": True,
        "dev_key_left": False,
        "same_key_b_after_a_stopped": 200,
        "same_key_env_kept": True,
        "same_key_env_restored": True,
    }


@pytest.mark.parametrize("generation", ["0.9", "0.7"])
def test_unregistered_app_id_is_explained(generation: str, tmp_path: Path) -> None:
    """A file whose APP_ID no synth-ai registry knows: synth-ai's runner fails with a bare
    KeyError from its registry; ours says what it looked for, in order."""
    module = "synth_ai.sdk.container.apps" if generation == "0.9" else "synth_ai.sdk.localapi.apps"
    file = tmp_path / "unregistered.py"
    file.write_text(f"import {module}\n\nAPP_ID = 'nobody-registered-this'\n")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HOME=str(tmp_path), TEST_APP_KEY=KEY)
    results = {
        runner: subprocess.run(
            [str(python_of(generation)), str(DRIVER), runner, str(file), str(free_port())],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=60,
        )
        for runner in ("sdk", "ours")
    }
    assert results["sdk"].returncode == 1
    assert results["sdk"].stderr.strip().splitlines()[-1].startswith("KeyError:")
    ours = results["ours"]
    assert ours.returncode == 1 and KEY not in ours.stderr
    last = ours.stderr.strip().splitlines()[-1]
    assert last.startswith("TaskAppLoadError:") and "defines no task app" in last
    assert "`build_config()`" in last and "register_container / register_task_app" in last
