"""Offline demo: a task app in this process, reached through a real SynthTunnel relay.

``python -m taskapp_notebook.demo`` (what ``scripts/demo`` runs) needs no keys and no network:

1. starts ``taskapp-relay`` in-process on 127.0.0.1 and points ``SYNTH_BACKEND_URL`` /
   ``SYNTH_API_KEY`` at it (for this process only);
2. starts a *stand-in policy* — a deterministic arithmetic "model" behind an
   OpenAI-style ``/v1/chat/completions`` route (no LLM, clearly not one) — as an
   ``InProcessTaskApp`` with ``tunnel_mode="local"``;
3. starts the **arithmetic task app** (``build_config()`` below) with the default
   ``tunnel_mode="synthtunnel"``: lease, WebSocket agent, public URL, worker token;
4. acts as the eval job would: calls ``/health``, ``/task_info`` and ``/rollout`` through the
   public URL with the worker token, for two candidate system prompts, and prints the
   mean reward of each;
5. stops everything and shows that the port is free and the lease is gone.

``build_config()`` is also a complete task app for ``task_app_path=`` or ``%taskapp start``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import re
import ssl
import statistics
import time
from typing import Any

from .models import TaskAppConfig
from .ports import is_port_free

BASELINE_PROMPT = "You are a helpful assistant. Answer with a number."
IMPROVED_PROMPT = "Work step by step, then give only the exact integer result."


def problem(seed: int) -> tuple[int, int]:
    """The two factors of task ``seed`` (deterministic)."""
    return 7 + (seed * 37) % 89, 3 + (seed * 53) % 97


def build_config() -> TaskAppConfig:
    """The arithmetic task app: multiply two numbers; reward 1.0 for the exact product."""

    def describe() -> dict[str, Any]:
        return {"id": "arithmetic", "name": "Arithmetic", "splits": ["train"], "size": 1000}

    def instances(seeds: list[int]) -> list[dict[str, Any]]:
        return [
            {
                "task": {"id": "arithmetic", "name": "Arithmetic"},
                "dataset": {"id": "arithmetic", "split": "train", "seed": seed},
                "inference": {},
                "limits": {"max_turns": 1},
                "task_metadata": {"question": "What is {} * {}?".format(*problem(seed))},
            }
            for seed in seeds
        ]

    async def rollout(request: Any, fastapi_request: Any = None) -> dict[str, Any]:
        import httpx

        seed = int(request.env.seed or 0)
        a, b = problem(seed)
        config = request.policy.config
        inference_url = str(config.get("inference_url", "")).rstrip("/")
        if not inference_url:
            raise ValueError("policy.config.inference_url is required")
        messages = [
            {"role": "system", "content": config.get("system_prompt", BASELINE_PROMPT)},
            {"role": "user", "content": f"What is {a} * {b}?"},
        ]
        async with httpx.AsyncClient(trust_env=False, timeout=30, verify=_tls()) as client:
            reply = await client.post(
                f"{inference_url}/chat/completions",
                json={"model": config.get("model", "stand-in"), "messages": messages},
            )
            reply.raise_for_status()
        text = reply.json()["choices"][0]["message"]["content"]
        numbers = re.findall(r"-?\d+", text)
        answer = int(numbers[-1]) if numbers else None
        return {
            "reward_info": {
                "outcome_reward": 1.0 if answer == a * b else 0.0,
                "details": {"expected": a * b, "answer": answer},
            },
            "success_status": "success",
        }

    return TaskAppConfig(
        app_id="arithmetic",
        name="Arithmetic",
        description="Multiply two numbers; reward 1.0 for the exact product.",
        provide_taskset_description=describe,
        provide_task_instances=instances,
        rollout=rollout,
    )


@functools.cache
def _tls() -> ssl.SSLContext:
    """Build the TLS context once (each new one costs ~20 ms)."""
    return ssl.create_default_context()


def stand_in_policy() -> Any:
    """A deterministic arithmetic "model" (NOT an LLM) behind an OpenAI-style route.

    It multiplies exactly when the system prompt asks it to work step by step, and rounds
    to the nearest ten otherwise — enough to show two prompts scoring differently.
    """
    from fastapi import FastAPI

    app = FastAPI(title="stand-in policy (no LLM)")

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"healthy": True}

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> dict[str, Any]:
        system = " ".join(m["content"] for m in body["messages"] if m["role"] == "system")
        a, b = (int(n) for n in re.findall(r"\d+", body["messages"][-1]["content"])[:2])
        careful = "step by step" in system.lower()
        answer = a * b if careful else round(a * b, -1)
        return {"choices": [{"message": {"role": "assistant", "content": str(answer)}}]}

    return app


async def run_demo(rollouts: int = 10) -> dict[str, float]:
    """Run the whole demo on loopback; returns the mean reward per prompt."""
    import httpx

    from .relay import RelayServer
    from .runner import InProcessTaskApp

    say("starting taskapp-relay (a SynthTunnel-compatible relay) on 127.0.0.1")
    async with RelayServer() as relay:
        os.environ["SYNTH_BACKEND_URL"] = relay.url
        os.environ["SYNTH_API_KEY"] = relay.api_key
        say(f"relay at {relay.url}; SYNTH_BACKEND_URL points at it")
        policy = InProcessTaskApp(app=stand_in_policy(), tunnel_mode="local", port=8115,
                                  serve_on="thread", name="stand-in-policy")
        task = InProcessTaskApp(config=build_config(), port=8114, name="arithmetic")
        async with policy, task:
            say(f"task app {task.name!r}: local {task.local_url}, public {task.url}")
            say(f"worker token {task.snapshot()['task_app_worker_token']} (masked)")
            headers = {"Authorization": f"Bearer {task.task_app_worker_token}"}
            async with httpx.AsyncClient(base_url=task.url or "", headers=headers,
                                         trust_env=False, timeout=60) as job:
                health = await job.get("/health")
                say(f"GET /health through the tunnel -> {health.status_code} {health.json()}")
                info = await job.get("/task_info", params={"seed": 0})
                question = info.json()["task_metadata"]["question"]
                say(f"GET /task_info?seed=0 -> {question!r}")
                results = {}
                for label, prompt in (("baseline", BASELINE_PROMPT),
                                      ("improved", IMPROVED_PROMPT)):
                    started = time.perf_counter()
                    rewards = await asyncio.gather(*(
                        rollout(job, seed, prompt, policy.local_url) for seed in range(rollouts)
                    ))
                    results[label] = statistics.mean(rewards)
                    say(f"{rollouts} rollouts with the {label} prompt: mean reward "
                        f"{results[label]:.2f} ({(time.perf_counter() - started) * 1000:.0f} ms)")
            lease = getattr(task.tunnel, "lease", None)
            lease_id = getattr(lease, "lease_id", "")
            stats = task.stats.snapshot()
            say(f"the task app served {stats['requests']} requests, {stats['errors']} errors, "
                f"mean {stats['mean_ms']} ms")
            port = task.port
        async with httpx.AsyncClient(trust_env=False) as client:
            gone = await client.get(
                f"{relay.url}/api/v1/synthtunnel/leases/{lease_id}",
                headers={"Authorization": f"Bearer {relay.api_key}"},
            )
        say(f"stopped: port {port} free: {is_port_free(port)}; lease on the relay: "
            f"HTTP {gone.status_code} ({'deleted' if gone.status_code in (404, 410) else 'LEFT'})")
    return results


async def rollout(job: Any, seed: int, prompt: str, inference_url: str) -> float:
    body = {
        "trace_correlation_id": f"demo-{seed}",
        "env": {"env_name": "arithmetic", "seed": seed, "config": {}},
        "policy": {"policy_name": "demo", "config": {
            "model": "stand-in", "inference_url": f"{inference_url}/v1", "system_prompt": prompt,
        }},
    }
    response = await job.post("/rollout", json=body)
    response.raise_for_status()
    return float(response.json()["reward_info"]["outcome_reward"])


def say(line: str) -> None:
    print(f"[demo] {line}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Offline taskapp_notebook demo.")
    parser.add_argument("--rollouts", type=int, default=10)
    args = parser.parse_args()
    results = asyncio.run(run_demo(args.rollouts))
    best = max(results, key=lambda k: results[k])
    say(f"done: the {best!r} prompt wins ({results[best]:.2f}).")


if __name__ == "__main__":
    main()
