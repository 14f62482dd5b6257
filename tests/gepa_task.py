"""An offline task for local GEPA tests: the reward really depends on the system prompt.

* The task app (``task_config()``): "What is A * B?"; the rollout sends a baseline system
  prompt plus the question to ``policy.config.inference_url`` and scores the reply: 1.0 for
  exactly the product, 0.5 for the product with extra words, 0.0 otherwise. It keeps one
  pooled HTTP client per event loop.
* ``stand_in_model`` — a deterministic stand-in for an LLM (NOT a model): it multiplies
  exactly only when the system prompt says "step by step" (else rounds to tens) and answers
  with the bare number only when told "only the number".
* ``stand_in_reflection`` — a deterministic stand-in for the reflection LM: it reads gepa's
  reflection prompt (current instruction + feedback) and adds the one fix the feedback asks for.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from taskapp_notebook import TaskAppConfig

BASELINE = "You are a helpful assistant."
_clients: dict[int, Any] = {}


def problem(seed: int) -> tuple[int, int]:
    return 7 + (seed * 37) % 89, 3 + (seed * 53) % 97


def _client() -> Any:
    import httpx

    loop = asyncio.get_running_loop()
    client = _clients.get(id(loop))
    if client is None:
        client = _clients[id(loop)] = httpx.AsyncClient(trust_env=False, timeout=60)
    return client


def score(reply: str, expected: int) -> tuple[float, str]:
    if reply.strip() == str(expected):
        return 1.0, "correct"
    numbers = [int(n) for n in re.findall(r"-?\d+", reply)]
    if expected in numbers:
        return 0.5, "right number, but the reply has extra words: answer with only the number"
    return 0.0, f"wrong value: expected {expected}, got {numbers[-1] if numbers else None}"


def task_config(delay: float = 0.0) -> TaskAppConfig:
    async def rollout(request: Any) -> dict[str, Any]:
        if delay:
            await asyncio.sleep(delay)
        a, b = problem(int(request.env.seed or 0))
        config = request.policy.config
        messages = [{"role": "system", "content": BASELINE},
                    {"role": "user", "content": f"What is {a} * {b}?"}]
        reply = await _client().post(f"{config['inference_url']}/chat/completions",
                                     json={"model": config.get("model"), "messages": messages})
        reply.raise_for_status()
        text = reply.json()["choices"][0]["message"]["content"]
        reward, feedback = score(text, a * b)
        return {"reward_info": {"outcome_reward": reward,
                                "details": {"feedback": feedback, "expected": a * b}}}

    return TaskAppConfig(app_id="multiply", name="Multiply",
                         description="Multiply two numbers.", rollout=rollout)


def stand_in_model(body: dict[str, Any]) -> str:
    """A deterministic stand-in for an LLM (not a model)."""
    system = " ".join(m["content"] for m in body["messages"] if m["role"] == "system").lower()
    a, b = (int(n) for n in re.findall(r"\d+", body["messages"][-1]["content"])[:2])
    value = a * b if "step by step" in system else round(a * b, -1)
    return str(value) if "only the number" in system else f"The answer is {value}."


def stand_in_reflection(prompt: str) -> str:
    """A deterministic stand-in for the reflection LM."""
    current = prompt.split("```", 2)[1].strip()
    fixes = []
    if "wrong value" in prompt and "step by step" not in current:
        fixes.append("Work step by step.")
    elif "only the number" in prompt and "only the number" not in current:
        fixes.append("Reply with only the number.")
    return "```\n" + " ".join([current, *fixes]) + "\n```"
