"""The reflection LM: a gepa model string, any ``prompt -> str`` callable, or
:class:`ChatCompletionsLM` — a small client for any OpenAI-compatible endpoint, so a real
reflection model needs no litellm."""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import mask_secret, scrub_secrets
from .exceptions import GepaError, GepaParameterError
from .run_options import check_http_url

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)


class ChatCompletionsLM:
    """``lm(prompt) -> text`` over ``POST {base_url}/chat/completions`` (one pooled client).

    ``api_key`` defaults to ``OPENAI_API_KEY``. Token usage is summed in ``total_tokens_in``
    / ``total_tokens_out`` (gepa reads them); ``total_cost`` stays 0 (prices vary by
    provider). Called on the run's worker thread, never on the kernel's loop.
    """

    def __init__(self, model: str, *, base_url: str = "https://api.openai.com/v1",
                 api_key: str | None = None, temperature: float | None = None,
                 max_tokens: int | None = None, timeout: float = 300.0,
                 headers: Mapping[str, str] | None = None) -> None:
        if not isinstance(model, str) or not model:
            raise GepaParameterError(f"ChatCompletionsLM needs a model name; got {model!r}.")
        self.model = model
        self.base_url = check_http_url(base_url, "ChatCompletionsLM base_url").rstrip("/")
        self._api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._headers = dict(headers or {})
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.calls = 0
        self.total_cost = 0.0
        self.total_tokens_in = 0
        self.total_tokens_out = 0
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"ChatCompletionsLM(model={self.model!r}, base_url={self.base_url!r}, "
                f"api_key={mask_secret(self._api_key)!r})")

    def __call__(self, prompt: str | list[dict[str, Any]]) -> str:
        import httpx

        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        headers = dict(self._headers)
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(trust_env=False, timeout=self.timeout)
            client = self._client
        secrets = [self._api_key, *self._headers.values()]
        try:
            response = client.post(f"{self.base_url}/chat/completions", json=body,
                                   headers=headers)
        except httpx.HTTPError as exc:
            raise GepaError(scrub_secrets(
                f"The reflection model at {self.base_url} could not be reached: "
                f"{type(exc).__name__}: {exc}", secrets)) from None
        if response.status_code >= 400:
            raise GepaError(scrub_secrets(
                f"The reflection model at {self.base_url} answered HTTP "
                f"{response.status_code}: {response.text[:300]}", secrets))
        payload = response.json()
        usage = payload.get("usage") or {}
        with self._lock:
            self.calls += 1
            self.total_tokens_in += int(usage.get("prompt_tokens", 0) or 0)
            self.total_tokens_out += int(usage.get("completion_tokens", 0) or 0)
        content = payload["choices"][0]["message"]["content"]
        return content if isinstance(content, str) else str(content)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


class CountingLM:
    """Wraps a plain ``prompt -> str`` callable: counts calls, estimates tokens (4 chars
    each, as gepa does for callables), cost 0."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.calls = 0
        self.total_cost = 0.0
        self.total_tokens_in = 0
        self.total_tokens_out = 0

    def __repr__(self) -> str:
        return f"CountingLM({self.fn!r})"

    def __call__(self, prompt: str | list[dict[str, Any]]) -> str:
        text = self.fn(prompt)
        if not isinstance(text, str):
            raise GepaError(f"The reflection function {self.fn!r} returned "
                            f"{type(text).__name__}, not str.")
        self.calls += 1
        self.total_tokens_in += max(1, len(str(prompt)) // 4)
        self.total_tokens_out += max(1, len(text) // 4)
        return text


class ReflectionGuard:
    """What gepa calls as its reflection LM: the user's LM, with its failures counted.

    gepa logs a failing reflection call and goes on, spending rollouts on iterations that
    can never propose anything (a wrong key, an unreachable endpoint). The run ends as
    failed once ``MAX_FAILURES`` calls in a row have failed, with the last error.
    """

    MAX_FAILURES = 3

    def __init__(self, lm: Any) -> None:
        self.lm = lm
        self.failures = 0
        self.last_error: str | None = None

    def __repr__(self) -> str:
        return repr(self.lm)

    @property
    def total_cost(self) -> float:
        return float(getattr(self.lm, "total_cost", 0.0) or 0.0)

    @property
    def total_tokens_in(self) -> int:
        return int(getattr(self.lm, "total_tokens_in", 0) or 0)

    @property
    def total_tokens_out(self) -> int:
        return int(getattr(self.lm, "total_tokens_out", 0) or 0)

    @property
    def calls(self) -> int | None:
        return getattr(self.lm, "calls", None)

    @property
    def exhausted(self) -> bool:
        return self.failures >= self.MAX_FAILURES

    def __call__(self, prompt: str | list[dict[str, Any]]) -> str:
        try:
            text: str = self.lm(prompt)
        except Exception as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            logger.warning("Reflection LM call failed (%d in a row): %s", self.failures,
                           self.last_error)
            raise
        self.failures = 0
        return text

    def close(self) -> None:
        close = getattr(self.lm, "close", None)
        if callable(close):
            close()


def resolve_reflection_lm(value: object) -> Any:
    """Check ``reflection_lm`` before a run starts; returns what gepa is given."""
    if isinstance(value, str):
        if not value.strip():
            raise GepaParameterError("reflection_lm is an empty string.")
        if importlib.util.find_spec("litellm") is None:
            raise GepaParameterError(
                f"reflection_lm={value!r} is a gepa (litellm) model string, but litellm is not "
                "installed. Run `pip install litellm`, or pass reflection_lm=ChatCompletionsLM("
                "'model-name', base_url=..., api_key=...) which needs no litellm.")
        from gepa.lm import LM

        return LM(value)
    if callable(value):
        return value if hasattr(value, "total_cost") else CountingLM(value)
    raise GepaParameterError(
        "reflection_lm must be a gepa model string ('openai/gpt-4.1'), a ChatCompletionsLM, or "
        f"any callable prompt -> str; got {type(value).__name__}.")


def reflection_usage(lm: Any) -> dict[str, Any]:
    """Calls and tokens the reflection LM reports (estimates for plain callables)."""
    return {
        "reflection_calls": getattr(lm, "calls", None),
        "reflection_tokens_in": int(getattr(lm, "total_tokens_in", 0) or 0),
        "reflection_tokens_out": int(getattr(lm, "total_tokens_out", 0) or 0),
        "reflection_cost": float(getattr(lm, "total_cost", 0.0) or 0.0),
    }
