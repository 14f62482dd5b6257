"""Validation of everything a local GEPA run is given, before anything starts.

Each check raises :class:`~taskapp_notebook.errors.GepaParameterError` saying what is
wrong, why, and what to pass instead. The result is a frozen :class:`RunOptions`.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import mask_secret
from .exceptions import GepaParameterError

#: The component the interceptor swaps into the system message (see interceptor.py).
SYSTEM_COMPONENT = "system_prompt"
#: gepa.optimize arguments the run sets itself; ``gepa_options`` may not override them.
RESERVED_GEPA_OPTIONS = frozenset({
    "seed_candidate", "trainset", "valset", "adapter", "task_lm", "evaluator", "reflection_lm",
    "max_metric_calls", "stop_callbacks", "logger", "run_dir", "callbacks",
    "display_progress_bar", "seed", "raise_on_exception", "reflection_minibatch_size",
})


@dataclass(frozen=True)
class TaskExample:
    """One training or validation example: a task-app seed and/or an ``env.config``."""

    split: str
    index: int
    seed: int | None = None
    config: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What the reflective dataset and the history show of this example."""
        out: dict[str, Any] = {"split": self.split, "index": self.index}
        if self.seed is not None:
            out["seed"] = self.seed
        if self.config:
            out["config"] = dict(self.config)
        return out


@dataclass(frozen=True)
class Upstream:
    """The model behind the interceptor: any OpenAI-compatible ``/chat/completions`` server.

    ``base_url`` is the part before ``/chat/completions`` (``https://api.openai.com/v1``,
    ``http://localhost:11434/v1`` for Ollama, a vLLM or LiteLLM proxy...). ``model``, when
    set, replaces the model the task app asked for. The key never appears in a repr, a log
    or a run file.
    """

    base_url: str
    api_key: str | None = field(default=None, repr=False)
    model: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    timeout: float = 120.0

    def __post_init__(self) -> None:
        check_http_url(self.base_url, "Upstream.base_url")
        if self.base_url.rstrip("/").endswith("/chat/completions"):
            raise GepaParameterError(
                f"Upstream.base_url is the part before /chat/completions (e.g. "
                f"'https://api.openai.com/v1'); got {self.base_url!r}.")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        if not (isinstance(self.timeout, int | float) and self.timeout > 0):
            raise GepaParameterError(
                f"Upstream.timeout must be a positive number of seconds; got {self.timeout!r}."
            )

    def __repr__(self) -> str:
        return (f"Upstream(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key={mask_secret(self.api_key)!r})")


#: A stand-in or custom model: ``fn(request_body) -> reply text`` or a full
#: chat-completion response mapping; sync or async.
ModelFunction = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class RunOptions:
    """Everything a run needs, validated."""

    name: str
    seed_candidate: dict[str, str]
    #: True when the seed was a plain string (results then give plain strings back).
    plain_prompt: bool
    train: tuple[TaskExample, ...]
    val: tuple[TaskExample, ...]
    max_metric_calls: int
    time_limit: float | None
    score_threshold: float | None
    concurrency: int
    run_dir: Path | None
    seed: int
    deliver_components: bool
    model: str
    policy_config: Mapping[str, Any]
    env_name: str | None
    rollout_timeout: float
    reflection_minibatch_size: int
    gepa_options: Mapping[str, Any]


def check_http_url(url: object, what: str) -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise GepaParameterError(
            f"{what} must be an http(s) URL such as 'http://127.0.0.1:8114'; got {url!r}."
        )
    return url


def seed_candidate_of(value: object) -> tuple[dict[str, str], bool]:
    """``"prompt"`` → ``{"system_prompt": "prompt"}``; a mapping of non-empty texts as is."""
    if isinstance(value, str):
        if not value.strip():
            raise GepaParameterError("seed_candidate is an empty string; give the system "
                                        "prompt to start from.")
        return {SYSTEM_COMPONENT: value}, True
    if not isinstance(value, Mapping) or not value:
        raise GepaParameterError(
            "seed_candidate must be a system prompt (str) or a non-empty dict of named "
            f"components, e.g. {{'system_prompt': '...'}}; got {value!r}."
        )
    out: dict[str, str] = {}
    for key, text in value.items():
        if not isinstance(key, str) or not key.strip():
            raise GepaParameterError(f"seed_candidate has a bad component name {key!r}; "
                                        "names are non-empty strings.")
        if not isinstance(text, str) or not text.strip():
            raise GepaParameterError(
                f"seed_candidate[{key!r}] must be a non-empty string; got {text!r}.")
        out[key] = text
    return out, False


def examples_of(items: object, split: str) -> tuple[TaskExample, ...]:
    """Seeds (ints) or example dicts (sent as ``env.config``; a ``"seed"`` key becomes
    ``env.seed``) → :class:`TaskExample` list."""
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Sequence | range):
        raise GepaParameterError(
            f"{split} must be a list of task seeds (ints) or of example dicts; got {items!r}.")
    out: list[TaskExample] = []
    for index, item in enumerate(items):
        if isinstance(item, bool):
            item = None  # reported below
        if isinstance(item, int):
            out.append(TaskExample(split, index, seed=item))
        elif isinstance(item, Mapping):
            seed = item.get("seed")
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                raise GepaParameterError(
                    f"{split}[{index}]['seed'] must be an int; got {seed!r}.")
            out.append(TaskExample(split, index, seed=seed, config=dict(item)))
        else:
            raise GepaParameterError(
                f"{split}[{index}] is {item!r}: each example is a task seed (int) or a dict "
                "(sent to the task app as env.config).")
    if not out:
        raise GepaParameterError(f"{split} is empty; give at least one seed or example.")
    return tuple(out)


def positive_int(value: object, what: str, *, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GepaParameterError(f"{what} must be a positive int; got {value!r}.{hint}")
    return value


def optional_seconds(value: object, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value > 0):
        raise GepaParameterError(f"{what} must be a positive number of seconds or None; "
                                    f"got {value!r}.")
    return float(value)


def build_options(
    *,
    name: str | None,
    seed_candidate: object,
    train: object,
    val: object,
    max_metric_calls: object,
    time_limit: object,
    score_threshold: object,
    concurrency: object,
    run_dir: object,
    seed: object,
    deliver_components: bool,
    has_upstream: bool,
    model: object,
    policy_config: object,
    env_name: object,
    rollout_timeout: object,
    reflection_minibatch_size: object,
    gepa_options: object,
) -> RunOptions:
    """Check every argument of :func:`~taskapp_notebook.gepa.start_gepa`."""
    candidate, plain = seed_candidate_of(seed_candidate)
    others = sorted(set(candidate) - {SYSTEM_COMPONENT})
    if others and not deliver_components:
        raise GepaParameterError(
            f"Component(s) {others} of seed_candidate would reach neither the model nor the app: "
            f"the interceptor swaps only {SYSTEM_COMPONENT!r} into the system message. Rename "
            "the component, or pass deliver_components=True so the app receives every "
            "component in policy.config['prompt_components'].")
    if not has_upstream and not deliver_components:
        raise GepaParameterError(
            "Pass upstream= (the OpenAI-compatible model the interceptor forwards to, or a "
            "stand-in function), or deliver_components=True for an app that builds its "
            "prompts itself; otherwise no candidate would ever reach the model.")
    train_examples = examples_of(train, "train")
    val_examples = examples_of(val, "val") if val is not None else tuple(
        TaskExample("val", e.index, e.seed, e.config) for e in train_examples)
    budget = positive_int(max_metric_calls, "max_metric_calls",
                          hint=" It is the number of rollouts the run may spend.")
    if budget < len(val_examples):
        raise GepaParameterError(
            f"max_metric_calls={budget} is less than the {len(val_examples)} rollouts that "
            "scoring the seed on the validation set takes; raise it (a few times the "
            "validation size lets GEPA try several candidates).")
    threshold: float | None = None
    if score_threshold is not None:
        if isinstance(score_threshold, bool) or not isinstance(score_threshold, int | float):
            raise GepaParameterError(
                f"score_threshold must be a number or None; got {score_threshold!r}.")
        threshold = float(score_threshold)
    folder: Path | None = None
    if run_dir is not None:
        if not isinstance(run_dir, str | Path) or not str(run_dir).strip():
            raise GepaParameterError(f"run_dir must be a path or None; got {run_dir!r}.")
        folder = Path(run_dir).expanduser()
        if folder.exists() and not folder.is_dir():
            raise GepaParameterError(f"run_dir {str(folder)!r} exists and is not a folder.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GepaParameterError(f"seed must be an int; got {seed!r}.")
    if model is not None and (not isinstance(model, str) or not model):
        raise GepaParameterError(f"model must be a non-empty string or None; got {model!r}.")
    if policy_config is not None and not isinstance(policy_config, Mapping):
        raise GepaParameterError(f"policy_config must be a dict; got {policy_config!r}.")
    if env_name is not None and not isinstance(env_name, str):
        raise GepaParameterError(f"env_name must be a string or None; got {env_name!r}.")
    timeout = optional_seconds(rollout_timeout, "rollout_timeout")
    if timeout is None:
        raise GepaParameterError("rollout_timeout must be a positive number of seconds.")
    extra = dict(gepa_options) if isinstance(gepa_options, Mapping) else None
    if gepa_options is not None and extra is None:
        raise GepaParameterError(f"gepa_options must be a dict; got {gepa_options!r}.")
    clash = sorted(set(extra or {}) & RESERVED_GEPA_OPTIONS)
    if clash:
        raise GepaParameterError(
            f"gepa_options may not set {clash}: the run sets them itself (use the arguments "
            "of start_gepa of the same meaning).")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise GepaParameterError(f"name must be a non-empty string or None; got {name!r}.")
    return RunOptions(
        name=name or f"gepa-{secrets.token_hex(2)}",
        seed_candidate=candidate,
        plain_prompt=plain,
        train=train_examples,
        val=val_examples,
        max_metric_calls=budget,
        time_limit=optional_seconds(time_limit, "time_limit"),
        score_threshold=threshold,
        concurrency=positive_int(concurrency, "concurrency",
                                 hint=" It is how many rollouts run at once."),
        run_dir=folder,
        seed=seed,
        deliver_components=deliver_components,
        model=model or "gpt-4.1-mini",
        policy_config=dict(policy_config or {}),
        env_name=env_name,
        rollout_timeout=timeout,
        reflection_minibatch_size=positive_int(reflection_minibatch_size,
                                               "reflection_minibatch_size"),
        gepa_options=extra or {},
    )
