"""The interceptor: an OpenAI-compatible ``/chat/completions`` endpoint in this process.

A local GEPA run gives each rollout ``policy.config.inference_url =
{interceptor}/{run_id}/{candidate_id}/{rollout_id}``, the way hosted GEPA points rollouts
at Synth's interceptor (``.../{trial_id}/{correlation_id}``). The task app sends its own
baseline messages there (appending ``/chat/completions``, or ``/v1/chat/completions``);
the interceptor swaps the candidate in, forwards the call to the upstream model with one
pooled client, and records messages, reply, token usage and latency for the reflective
dataset and the cost. So one task app serves hosted and local GEPA unchanged.

The swap rule (one rule, documented in the README):

* component ``system_prompt`` replaces the content of the first ``system`` (or
  ``developer``) message; when the app sent none, it is inserted as the first message;
* every other message (the task's user turns, tool results...) is left as the app sent it;
* other components are not put into messages: apps that build prompts themselves receive
  every component in ``policy.config["prompt_components"]`` (``deliver_components=True``).

``stream=true`` is refused (400): the run needs the whole reply and its usage.
The upstream key is sent only to the upstream; it never appears in a record, a log line
or an error body.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import scrub_secrets
from .run_options import SYSTEM_COMPONENT, ModelFunction, Upstream

if TYPE_CHECKING:
    import httpx

    from ..server import ServerHandle
    from ..stats import Receive, Scope, Send

logger = logging.getLogger(__name__)

#: Seconds the interceptor keeps an idle client connection open (see start()).
_KEEP_ALIVE = 3600
_SUFFIXES = (("chat", "completions"), ("v1", "chat", "completions"))


@dataclass
class ModelCall:
    """One model call through the interceptor."""

    candidate_id: str
    rollout_id: str
    model: str
    messages: list[dict[str, Any]]
    reply: str | None
    status: int
    latency_ms: float
    usage: dict[str, int] = field(default_factory=dict)
    #: True when the usage is an estimate (a stand-in function reports none).
    usage_estimated: bool = False
    error: str | None = None
    at: float = field(default_factory=time.time)

    def record(self) -> dict[str, Any]:
        """A flat, JSON-able row without message texts (the per-call usage table)."""
        return {
            "at": round(self.at, 3), "candidate_id": self.candidate_id,
            "rollout_id": self.rollout_id, "model": self.model, "status": self.status,
            "latency_ms": round(self.latency_ms, 3),
            "prompt_tokens": self.usage.get("prompt_tokens", 0),
            "completion_tokens": self.usage.get("completion_tokens", 0),
            "total_tokens": self.usage.get("total_tokens", 0),
            "usage_estimated": self.usage_estimated, "error": self.error,
        }


def candidate_key(candidate: Mapping[str, str]) -> str:
    """A short stable id for a candidate's content (the ``{candidate}`` URL segment)."""
    text = json.dumps(dict(candidate), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def apply_candidate(messages: Sequence[Mapping[str, Any]],
                    candidate: Mapping[str, str]) -> list[dict[str, Any]]:
    """The app's messages with the candidate swapped in (see the module docstring)."""
    out = [dict(m) for m in messages]
    prompt = candidate.get(SYSTEM_COMPONENT)
    if prompt is None:
        return out
    for message in out:
        if message.get("role") in ("system", "developer"):
            message["content"] = prompt
            return out
    return [{"role": "system", "content": prompt}, *out]


def _estimate_tokens(value: Any) -> int:
    return max(1, len(str(value)) // 4)


class Interceptor:
    """The endpoint of one run, served by uvicorn on the run's own event loop."""

    def __init__(self, upstream: Upstream | ModelFunction | None, *, run_id: str | None = None,
                 keep_calls: int = 100_000) -> None:
        self.upstream = upstream
        self.run_id = run_id or secrets.token_urlsafe(9)
        self.url: str | None = None
        self._candidates: dict[str, dict[str, str]] = {}
        self._by_rollout: dict[str, list[ModelCall]] = {}
        self._lock = threading.Lock()
        #: Every call's usage row, oldest first (bounded by ``keep_calls``).
        self.call_records: list[dict[str, Any]] = []
        self._keep = keep_calls
        self.calls = 0
        self.errors = 0
        self._client: httpx.AsyncClient | None = None
        self._server: ServerHandle | None = None
        self._in_flight = 0
        self._last_call = 0.0
        self._secrets: list[str | None] = []
        if isinstance(upstream, Upstream):
            self._secrets = [upstream.api_key, *upstream.headers.values()]

    def __repr__(self) -> str:
        return f"<Interceptor {self.url or 'not started'} run={self.run_id} calls={self.calls}>"

    # ------------------------------------------------------------------ run side

    def register(self, candidate: Mapping[str, str]) -> str:
        """Make ``candidate`` reachable; returns its id (stable for equal content)."""
        key = candidate_key(candidate)
        with self._lock:
            self._candidates.setdefault(key, dict(candidate))
        return key

    def inference_url(self, candidate_id: str, rollout_id: str) -> str:
        assert self.url is not None, "start() the interceptor first"
        return f"{self.url}/{self.run_id}/{candidate_id}/{rollout_id}"

    def take_calls(self, rollout_id: str) -> list[ModelCall]:
        """The calls recorded for ``rollout_id`` (removed from the interceptor)."""
        with self._lock:
            return self._by_rollout.pop(rollout_id, [])

    async def start(self, host: str = "127.0.0.1", *, max_connections: int = 64) -> str:
        """Serve on ``host`` (a free port) on the running loop; returns the base URL."""
        import httpx

        from ..ports import bind_listener
        from ..server import ServerHandle
        from ..stats import InstrumentedApp, RequestStats

        if isinstance(self.upstream, Upstream):
            limits = httpx.Limits(max_connections=max_connections,
                                  max_keepalive_connections=max_connections)
            self._client = httpx.AsyncClient(trust_env=False, limits=limits,
                                             timeout=self.upstream.timeout)
        sock = bind_listener(host, 0)
        self._server = ServerHandle(InstrumentedApp(self, RequestStats()), sock)
        # Never close an idle keep-alive connection first: an app's pooled client may pick it
        # at that very moment (a ReadError in the app's rollout). Clients expire them sooner.
        self._server.server.config.timeout_keep_alive = _KEEP_ALIVE
        await self._server.start()
        shown = "127.0.0.1" if host in ("0.0.0.0", "localhost") else host
        self.url = f"http://{shown}:{self._server.port}"
        logger.debug("Interceptor of run %s at %s", self.run_id, self.url)
        return self.url

    async def drain(self, app_busy: Callable[[], bool] | None = None, *, quiet: float = 1.0,
                    limit: float = 10.0) -> None:
        """Wait (at most ``limit`` s) until no call is in flight, none came for ``quiet`` s
        and ``app_busy()`` (the app still serves rollouts) is false. After a stop cancelled
        rollouts on the run's side, the app's handlers of those rollouts still run: served
        until they are done, they end quietly instead of failing (and logging a traceback
        in the notebook) on a closed port. ``quiet`` covers a rollout request still on its way
        to the app when the stop came (not yet counted by ``app_busy``): 0.3 s proved too
        short on a loaded 2-core machine."""
        import asyncio

        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and (
                self._in_flight or time.monotonic() - self._last_call < quiet
                or (app_busy is not None and app_busy())):
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Close the listener and the upstream client. Idempotent."""
        server, self._server = self._server, None
        client, self._client = self._client, None
        try:
            if server is not None:
                await server.stop()
        finally:
            if client is not None:
                await client.aclose()

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"]
                if kind == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif kind == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        parts = [p for p in scope["path"].split("/") if p]
        if parts == ["health"]:
            await _respond(send, 200, {"healthy": True, "service": "taskapp-gepa-interceptor"})
            return
        route = self._route(parts)
        if route is None:
            await _respond(send, 404, _error(
                "not_found", "Unknown interceptor path. Send POST "
                "{inference_url}/chat/completions with the inference_url the rollout got."))
            return
        if scope["method"] != "POST":
            await _respond(send, 405, _error("method_not_allowed", "Use POST."))
            return
        candidate_id, rollout_id = route
        with self._lock:
            candidate = self._candidates.get(candidate_id)
        if candidate is None:
            await _respond(send, 404, _error(
                "unknown_candidate", f"No candidate {candidate_id!r} in this run."))
            return
        raw = b""
        more = True
        while more:
            message = await receive()
            raw += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            body = json.loads(raw)
            messages = body["messages"]
            if not isinstance(messages, list):
                raise TypeError("messages must be a list")
        except (ValueError, KeyError, TypeError) as exc:
            await _respond(send, 400, _error(
                "invalid_request", f"Expected a chat-completions JSON body with a 'messages' "
                f"list ({type(exc).__name__}: {exc})."))
            return
        if body.get("stream"):
            await _respond(send, 400, _error(
                "stream_unsupported", "The interceptor needs whole replies: send stream=false."))
            return
        body["messages"] = apply_candidate(messages, candidate)
        self._in_flight += 1
        self._last_call = time.monotonic()
        try:
            status, payload, call = await self._forward(body, candidate_id, rollout_id)
            self._record(call)
            await _respond(send, status, payload)
        finally:
            self._in_flight -= 1
            self._last_call = time.monotonic()

    def _route(self, parts: list[str]) -> tuple[str, str] | None:
        if len(parts) < 3 or parts[0] != self.run_id:
            return None
        for suffix in _SUFFIXES:
            if tuple(parts[-len(suffix):]) == suffix:
                middle = parts[1:-len(suffix)]
                if len(middle) == 1:
                    return middle[0], ""
                if len(middle) == 2:
                    return middle[0], middle[1]
        return None

    async def _forward(self, body: dict[str, Any], candidate_id: str,
                       rollout_id: str) -> tuple[int, Any, ModelCall]:
        upstream = self.upstream
        if isinstance(upstream, Upstream) and upstream.model:
            body["model"] = upstream.model
        model = str(body.get("model") or "")
        call = ModelCall(candidate_id, rollout_id, model, body["messages"], None, 502, 0.0)
        started = time.perf_counter()
        try:
            if upstream is None:
                call.status, call.error = 502, "no upstream model configured for this run"
                return 502, _error("no_upstream", call.error), call
            if isinstance(upstream, Upstream):
                status, payload = await self._post_upstream(upstream, body)
            else:
                status, payload = 200, await self._call_function(upstream, body, model)
                call.usage_estimated = True
        except Exception as exc:  # noqa: BLE001 - reported to the app as a 502
            text = scrub_secrets(f"{type(exc).__name__}: {exc}", self._secrets)
            call.status, call.error = 502, f"upstream failed: {text}"
            call.latency_ms = (time.perf_counter() - started) * 1000
            return 502, _error("upstream_error", call.error), call
        call.latency_ms = (time.perf_counter() - started) * 1000
        call.status = status
        if isinstance(payload, Mapping):
            usage = payload.get("usage")
            if isinstance(usage, Mapping):
                call.usage = {k: int(v) for k, v in usage.items()
                              if isinstance(v, int | float) and not isinstance(v, bool)}
            call.reply = _reply_text(payload)
        if status >= 400:
            call.error = scrub_secrets(json.dumps(payload)[:500], self._secrets)
        return status, payload, call

    async def _post_upstream(self, upstream: Upstream, body: dict[str, Any]) -> tuple[int, Any]:
        assert self._client is not None
        headers = {"Content-Type": "application/json", **upstream.headers}
        if upstream.api_key:
            headers["Authorization"] = f"Bearer {upstream.api_key}"
        response = await self._client.post(f"{upstream.base_url}/chat/completions",
                                           content=json.dumps(body).encode(), headers=headers)
        try:
            payload = response.json()
        except ValueError:
            payload = _error("upstream_not_json",
                             f"upstream answered HTTP {response.status_code} without JSON")
        return response.status_code, payload

    async def _call_function(self, fn: ModelFunction, body: dict[str, Any],
                             model: str) -> dict[str, Any]:
        result = fn(body)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, Mapping):
            return dict(result)
        text = str(result)
        prompt = _estimate_tokens(body["messages"])
        completion = _estimate_tokens(text)
        return {
            "id": f"chatcmpl-{secrets.token_hex(6)}", "object": "chat.completion",
            "created": int(time.time()), "model": model or "stand-in",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
        }

    def _record(self, call: ModelCall) -> None:
        with self._lock:
            self.calls += 1
            if call.status >= 400:
                self.errors += 1
            if call.rollout_id:
                self._by_rollout.setdefault(call.rollout_id, []).append(call)
            self.call_records.append(call.record())
            if len(self.call_records) > self._keep:
                del self.call_records[: len(self.call_records) - self._keep]


def _reply_text(payload: Mapping[str, Any]) -> str | None:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else json.dumps(content)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"type": code, "code": code, "message": message}}


async def _respond(send: Send, status: int, payload: Any) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
