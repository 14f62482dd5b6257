"""Local GEPA benchmark: rollouts per second through our adapter vs a bare pooled client,
and what the interceptor adds per model call.

Everything runs on loopback in this process: the task app (``serve_on="thread"``), a
stand-in model server (not an LLM: a fixed reply with usage), ``taskapp-relay`` for the
SynthTunnel rows. The floor, measured in the same run, is one pooled ``httpx.AsyncClient``
posting the same ``/rollout`` bodies at the same concurrency. The adapter rows call
``TaskAppAdapter.batch_evaluate`` from a blocked thread, as gepa's engine does, with the
rollout client and the interceptor on the app's loop, as a run arranges them.

    python bench/gepa.py [--rollouts 300] [--repeats 3] [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's folder comes first on sys.path, and this file would shadow
# the gepa package it measures.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
_clients: dict[int, Any] = {}


def bench_config() -> Any:
    """A task app whose rollout makes one model call when ``policy.config.call_model``."""
    import httpx

    from taskapp_notebook import TaskAppConfig

    async def rollout(request: Any) -> dict[str, Any]:
        config = request.policy.config
        if config.get("call_model"):
            loop = asyncio.get_running_loop()
            client = _clients.get(id(loop))
            if client is None:
                client = _clients[id(loop)] = httpx.AsyncClient(trust_env=False, timeout=60)
            reply = await client.post(f"{config['inference_url']}/chat/completions", json={
                "model": "m", "messages": [{"role": "system", "content": "baseline"},
                                           {"role": "user", "content": "2 * 3?"}]})
            reply.raise_for_status()
        return {"reward_info": {"outcome_reward": 1.0}}

    return TaskAppConfig(app_id="bench", name="bench", description="bench", rollout=rollout)


def model_app() -> Any:
    """A stand-in model server (not an LLM): a fixed reply with usage, at once on
    ``/v1``, after 20 ms on ``/slow/v1`` (closer to a real model's latency)."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"healthy": True}

    @app.post("/slow/v1/chat/completions")
    async def slow() -> dict[str, Any]:
        await asyncio.sleep(0.02)
        return await chat()

    @app.post("/v1/chat/completions")
    async def chat() -> dict[str, Any]:
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "6"}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}

    return app


async def floor_rate(url: str, headers: dict[str, str], n: int, concurrency: int,
                     inference_url: str | None) -> float:
    """Rollouts/s of a bare pooled client posting /rollout, ``concurrency`` in flight."""
    import json

    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sent = {**headers, "Content-Type": "application/json"}
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=60) as client:
        async def one(i: int) -> None:
            config: dict[str, Any] = {"model": "m", "inference_url": inference_url or ""}
            if inference_url:
                config["call_model"] = True
            body = {"trace_correlation_id": f"f{i}", "env": {"seed": i, "config": {}},
                    "policy": {"config": config}}
            async with sem:
                response = await client.post(f"{url}/rollout", content=json.dumps(body).encode(),
                                             headers=sent)
                response.raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - t0)


class AdapterRig:
    """Our adapter, interceptor and I/O loop, without gepa's engine around them."""

    def __init__(self, target: Any, concurrency: int, model_url: str, call_model: bool) -> None:
        from taskapp_notebook.gepa.adapter import TaskAppAdapter
        from taskapp_notebook.gepa.interceptor import Interceptor
        from taskapp_notebook.gepa.ledger import RunLedger
        from taskapp_notebook.gepa.run_options import Upstream, build_options
        from taskapp_notebook.progress import RunProgress

        self.options = build_options(
            name="bench", seed_candidate="prompt", train=[0], val=None, max_metric_calls=1,
            time_limit=None, score_threshold=None, concurrency=concurrency, run_dir=None,
            seed=0, deliver_components=False, has_upstream=True, model="m",
            policy_config={"call_model": True} if call_model else {}, env_name=None,
            rollout_timeout=60.0, reflection_minibatch_size=1, gepa_options=None)
        self.loop = target.app.loop  # as a run does for an in-process app
        self.interceptor = Interceptor(Upstream(model_url))
        self.adapter = TaskAppAdapter(options=self.options, target=target,
                                      interceptor=self.interceptor, loop=self.loop,
                                      ledger=RunLedger(RunProgress("bench", "bench")))
        self.submit(self.interceptor.start(max_connections=concurrency * 2))
        self.submit(self.adapter.open())

    def submit(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def rate(self, n: int) -> float:
        from taskapp_notebook.gepa.run_options import TaskExample

        batch = [TaskExample("train", i, seed=i) for i in range(n)]
        t0 = time.perf_counter()
        (result,) = self.adapter.batch_evaluate([({"system_prompt": "prompt"}, batch)])
        elapsed = time.perf_counter() - t0
        assert sum(result.scores) == n, result.outputs[:2]
        return n / elapsed

    def close(self) -> None:
        self.submit(self.adapter.close())
        self.submit(self.interceptor.stop())


async def call_latencies(url: str, n: int) -> list[float]:
    import httpx

    body = {"model": "m", "messages": [{"role": "system", "content": "baseline"},
                                       {"role": "user", "content": "2 * 3?"}]}
    out = []
    async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
        for _ in range(n):
            t0 = time.perf_counter()
            (await client.post(f"{url}/chat/completions", json=body)).raise_for_status()
            out.append(time.perf_counter() - t0)
    return out[5:]  # warm-up


def measure(rollouts: int, repeats: int) -> str:
    from taskapp_notebook import InProcessTaskApp
    from taskapp_notebook.gepa.target import resolve_target
    from taskapp_notebook.relay import RelayServer

    relay = RelayServer(api_keys=["bench-relay"]).start_in_thread()
    os.environ["SYNTH_BACKEND_URL"], os.environ["SYNTH_API_KEY"] = relay.url, "bench-relay"
    model = InProcessTaskApp(app=model_app(), tunnel_mode="local", serve_on="thread",
                             port=18701, name="stand-in-model").start()
    model_url = model.local_url + "/v1"
    app = InProcessTaskApp(config=bench_config(), tunnel_mode="synthtunnel", serve_on="thread",
                           port=18700, name="bench").start()
    rows: list[str] = []
    try:
        paths = {"local URL": resolve_target(app, api_key=None, worker_token=None,
                                             through_tunnel=False),
                 "SynthTunnel": resolve_target(app, api_key=None, worker_token=None,
                                               through_tunnel=True)}
        kinds = {"no model call": None, "one model call": model_url,
                 "one 20 ms model call": model.local_url + "/slow/v1"}
        for what, url in kinds.items():
            for label, target in paths.items():
                for concurrency in (8, 32):
                    call_model = url is not None
                    rig = AdapterRig(target, concurrency, url or model_url, call_model)
                    floors, ours = [], []
                    try:
                        for _ in range(repeats):
                            floors.append(asyncio.run(floor_rate(
                                target.url, target.headers, rollouts, concurrency, url)))
                            ours.append(rig.rate(rollouts))
                    finally:
                        rig.close()
                    floor, adapter = statistics.median(floors), statistics.median(ours)
                    rows.append(f"| {label} | {what} | {concurrency} | {floor:.0f} | "
                                f"{adapter:.0f} | {adapter / floor:.2f}× |")
        overhead = measure_interceptor(model_url, repeats)
    finally:
        app.stop()
        model.stop()
        relay.stop_in_thread()
    head = (f"Loopback, one process, the 2-core shared development machine. Medians of "
            f"{repeats} runs of {rollouts} rollouts. Floor: one pooled `httpx.AsyncClient` "
            "posting the same `/rollout` bodies at the same concurrency (with a model call, "
            "the floor's app calls the stand-in model directly; ours goes through the "
            "interceptor).\n\n"
            "| path | rollout | in flight | floor rollouts/s | our adapter rollouts/s | ratio |\n"
            "|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows) + "\n\n" + overhead


def measure_interceptor(model_url: str, repeats: int) -> str:
    """The app's model call straight to the model vs through the interceptor, both from the
    loop the interceptor serves on (a run puts it on the in-process app's loop)."""
    from taskapp_notebook.gepa.interceptor import Interceptor
    from taskapp_notebook.gepa.run_options import Upstream

    async def one_run() -> dict[str, float]:
        http = Interceptor(Upstream(model_url))
        function = Interceptor(lambda body: "6")  # a stand-in function: no outgoing request
        urls = {"direct": model_url}
        for label, interceptor in (("http", http), ("function", function)):
            await interceptor.start()
            urls[label] = interceptor.inference_url(
                interceptor.register({"system_prompt": "c"}), "")
        try:
            return {label: statistics.median(await call_latencies(url, 205))
                    for label, url in urls.items()}
        finally:
            await http.stop()
            await function.stop()

    runs = [asyncio.run(one_run()) for _ in range(repeats)]
    direct, through, served = (statistics.median(r[k] for r in runs)
                               for k in ("direct", "http", "function"))
    return ("Interceptor, sequential chat-completion calls made from the interceptor's own "
            "loop, as the in-process app's rollouts do; the stand-in model server on its own "
            f"thread (median of 200 calls, median of {repeats} runs):\n\n"
            "| path | per call |\n|---|---|\n"
            f"| straight to the stand-in model server (baseline) | {direct * 1000:.2f} ms |\n"
            f"| through the interceptor to that server (swap, forward, record) | "
            f"{through * 1000:.2f} ms (+{(through - direct) * 1000:.2f} ms) |\n"
            f"| the interceptor answering from a stand-in function (no forward) | "
            f"{served * 1000:.2f} ms |")


def write_docs(text: str) -> None:
    path = ROOT / "docs" / "performance.md"
    start, end = "<!-- bench:gepa:start -->", "<!-- bench:gepa:end -->"
    content = path.read_text() if path.exists() else "# Performance\n"
    if start not in content:
        content += f"\n## Local GEPA (`bench/gepa.py`)\n\n{start}\n{end}\n"
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rollouts", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    text = measure(args.rollouts, args.repeats)
    print(text)
    if args.write_docs:
        write_docs(text)


if __name__ == "__main__":
    main()
