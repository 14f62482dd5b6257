"""Job configs: load (TOML / JSON / dict), apply dot-path overrides, refuse what the backend
refuses, and build the create body of synth-ai 0.9's offline job API.

The shapes follow ``docs/hosted-jobs-wire.md`` (what synth-ai 0.9.11 sends). For GEPA the
config is completed client-side exactly as the SDK's ``PromptLearningJob.from_config`` does
(the pydantic defaults it fills in), so the backend sees the same job from either client.
"""

from __future__ import annotations

import copy
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidParameterError

__all__ = [
    "JOB_KINDS",
    "JobConfigError",
    "JobSpec",
    "build_job_spec",
    "load_job_config",
    "merge_dot_overrides",
]

#: job_type accepted by the public functions -> what it means.
JOB_KINDS = ("prompt_learning", "eval")
_ALGORITHM_KIND = {"gepa": "gepa_offline", "mipro": "mipro_offline", "voyager": "mipro_offline"}
_SYSTEM_NAMES = {"gepa_offline": "sdk-gepa-offline", "mipro_offline": "sdk-mipro-offline"}
_EVAL_SYSTEM_NAME = "sdk-offline-job"
_FORBIDDEN_KEYS = ("container_api_key", "container_api_keys", "task_app_api_key")
_HEALTH_MODES = {"strict", "warn", "off", "required", "on", "enabled", "true", "best_effort",
                 "continue_on_failure", "relaxed", "skip", "disabled", "false"}
_HEALTH_KEYS = ("rollout_health_check_mode", "backend_rollout_health_check_mode")
#: Flat GEPA fields the SDK refuses, with the nested place each moved to.
_FLAT_GEPA = {
    "rollout_budget": "gepa.rollout.budget",
    "max_concurrent_rollouts": "gepa.rollout.max_concurrent",
    "minibatch_size": "gepa.rollout.minibatch_size", "evaluation_seeds": "gepa.evaluation.seeds",
    "validation_seeds": "gepa.evaluation.validation_seeds", "mutation_rate": "gepa.mutation.rate",
    "initial_population_size": "gepa.population.initial_size",
    "num_generations": "gepa.population.num_generations", "archive_size": "gepa.archive.size",
    "max_token_limit": "gepa.proposed_prompt_max_tokens",
}
#: Section defaults the SDK's pydantic models fill in when the section is present.
_GEPA_SECTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "rollout": {"max_concurrent": 20, "minibatch_size": 8},
    "mutation": {"rate": 0.3},
    "population": {"initial_size": 20, "num_generations": 10, "children_per_generation": 5,
                   "crossover_rate": 0.5, "selection_pressure": 1.0, "patience_generations": 3},
    "archive": {"size": 64, "pareto_set_size": 64, "pareto_eps": 1e-06, "feedback_fraction": 0.5},
}
_GEPA_DEFAULTS: dict[str, Any] = {
    "proposer_type": "synth", "proposer_effort": "LOW", "proposer_output_tokens": "FAST",
    "proposed_prompt_max_tokens": 32000,
}
_TOKEN_DEFAULTS: dict[str, Any] = {"counting_model": "gpt-4", "enforce_pattern_limit": True}


class JobConfigError(InvalidParameterError):
    """The job config is one the backend (or synth-ai 0.9) refuses; nothing was started."""


@dataclass(frozen=True)
class JobSpec:
    """One create request: the path below the API base, the body, and the job's kind."""

    kind: str  # "gepa_offline" | "mipro_offline" | "eval"
    path: str
    body: dict[str, Any]

    @property
    def progress_kind(self) -> str:
        return "hosted eval" if self.kind == "eval" else f"hosted {self.kind.split('_')[0]}"


def merge_dot_overrides(
    base: Mapping[str, Any] | None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Deep-merge ``extra`` into a copy of ``base``; keys like ``"a.b.c"`` address nesting."""
    merged: dict[str, Any] = copy.deepcopy(dict(base or {}))
    for dotted, value in (extra or {}).items():
        *parents, leaf = str(dotted).split(".")
        node = merged
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            node[leaf] = merge_dot_overrides(node[leaf], value)
        else:
            node[leaf] = copy.deepcopy(value)
    return merged


def load_job_config(
    config_path: str | os.PathLike[str] | None, config_dict: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Exactly one of a TOML/JSON file or a dict (the SDK's ``from_dict`` shape), copied."""
    if (config_path is None) == (config_dict is None):
        raise InvalidParameterError("Pass exactly one of config_path= (TOML/JSON) or config_dict=.")
    if config_dict is not None:
        if not isinstance(config_dict, Mapping):
            raise InvalidParameterError(
                f"config_dict must be a mapping, got {type(config_dict).__name__}."
            )
        return copy.deepcopy(dict(config_dict))
    assert config_path is not None
    path = Path(config_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Job config file {str(config_path)!r} not found.")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise InvalidParameterError(f"Job config {str(path)!r} is not valid: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidParameterError(f"Job config {str(path)!r} must hold a table/object.")
    return data


def build_job_spec(
    job_type: str,
    config: Mapping[str, Any],
    *,
    container_url: str,
    backend_api_base: str,
    container_worker_token: str | None = None,
    system_name: str | None = None,
    seed_prompt: str | Mapping[str, str] | None = None,
) -> JobSpec:
    """The create request for ``config`` (overrides already merged) against ``container_url``.

    Raises :class:`JobConfigError` for anything the backend would refuse.
    """
    if job_type not in JOB_KINDS:
        raise InvalidParameterError(
            f"job_type must be one of {', '.join(map(repr, JOB_KINDS))}; got {job_type!r}."
        )
    _refuse_container_keys(config)
    if job_type == "eval":
        return _eval_spec(config, container_url, container_worker_token, system_name)
    section = _prompt_learning_section(config)
    algorithm = str(section.get("algorithm") or section.get("algorithm_name") or "gepa").lower()
    kind = _ALGORITHM_KIND.get(algorithm)
    if kind is None:
        raise JobConfigError(
            f"prompt_learning.algorithm {algorithm!r} is not a hosted prompt-learning algorithm; "
            "use 'gepa' or 'mipro'."
        )
    section["algorithm"] = algorithm
    section["container_url"] = container_url
    if seed_prompt is not None:
        section.setdefault("gepa" if algorithm == "gepa" else "mipro", {})["initial_candidate"] = (
            _initial_candidate(seed_prompt)
        )
    if algorithm == "gepa":
        _complete_gepa(section)
    else:
        _complete_mipro(section)
    _complete_prompt_learning(section)
    body = {
        "kind": kind,
        "technique": "discrete_optimization",
        "config_mode": "DEFAULT",
        "system": {"name": system_name or _SYSTEM_NAMES[kind], "reuse": True},
        "config": {"prompt_learning": section},
        "metadata": {"backend_base_url": backend_api_base},
        "auto_start": True,
    }
    return JobSpec(kind=kind, path="/v1/offline/jobs", body=body)


# --------------------------------------------------------------------------- refusals


def _refuse_container_keys(config: Mapping[str, Any]) -> None:
    found = _paths_of(config, _FORBIDDEN_KEYS)
    if found:
        raise JobConfigError(
            f"The job config holds a task-app key at {', '.join(found)}. The backend refuses "
            "container keys in a job (they are resolved server-side), and this package never "
            "sends the app's key: remove it. The app's key stays on this machine; the tunnel "
            "adds it to each request locally."
        )


def _paths_of(value: Any, names: tuple[str, ...], prefix: str = "") -> list[str]:
    found: list[str] = []
    if isinstance(value, Mapping):
        for key, child in value.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if str(key).strip().lower().split(".")[-1] in names:
                found.append(path)
            found.extend(_paths_of(child, names, path))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found.extend(_paths_of(child, names, f"{prefix}[{index}]"))
    return found


def _prompt_learning_section(config: Mapping[str, Any]) -> dict[str, Any]:
    legacy = [k for k in ("algorithm", "config_body", "policy_optimization") if k in config]
    if "prompt_learning" in config or legacy:
        if legacy:
            raise JobConfigError(
                f"Top-level {', '.join(map(repr, legacy))} is the pre-0.9 job shape, which "
                "synth-ai 0.9 and the backend refuse. Put the settings in a [prompt_learning] "
                "table (e.g. prompt_learning.algorithm = 'gepa'); the job kind is derived "
                "from it."
            )
        section = config["prompt_learning"]
        if not isinstance(section, Mapping):
            raise JobConfigError("prompt_learning must be a table/object.")
    else:  # the SDK also accepts the section's content at the top level
        section = config
    section = copy.deepcopy(dict(section))
    if section.get("initial_prompt") is not None:
        raise JobConfigError(
            "prompt_learning.initial_prompt is no longer supported (synth-ai 0.9 and the "
            "backend refuse it). Give the seed prompt as prompt_learning.gepa.initial_candidate "
            '= {stages = [{stage_id = "main", instruction = "..."}]}, or pass seed_prompt=.'
        )
    for old in ("task_app_url",):
        if old in section:
            raise JobConfigError(
                f"prompt_learning.{old} is the pre-0.9 name; remove it: container_url is set "
                "to the running app's URL for you."
            )
    return section


def _initial_candidate(seed_prompt: str | Mapping[str, str]) -> dict[str, Any]:
    stages = {"main": seed_prompt} if isinstance(seed_prompt, str) else dict(seed_prompt)
    if not stages or not all(isinstance(v, str) and v for v in stages.values()):
        raise InvalidParameterError(
            "seed_prompt must be a non-empty string or a mapping of stage id -> instruction."
        )
    return {"stages": [{"stage_id": k, "instruction": v} for k, v in stages.items()]}


# --------------------------------------------------------------------------- completion


def _complete_prompt_learning(section: dict[str, Any]) -> None:
    """Fields the SDK's ``PromptLearningConfig.to_dict`` and job builder always send."""
    section.setdefault("job_kind", "optimization")
    section["algorithm_name"] = str(section.get("algorithm_name") or section["algorithm"])
    nested = section.get(section["algorithm"])
    mode = section.get("execution_mode")
    if not (isinstance(mode, str) and mode.strip()) and isinstance(nested, Mapping):
        mode = nested.get("execution_mode") or nested.get("mode")
    section["execution_mode"] = str(mode or "offline").strip().lower()
    section.setdefault("auto_discover_patterns", False)
    declared = [
        node[key]
        for node in (section, nested if isinstance(nested, Mapping) else {})
        for key in _HEALTH_KEYS
        if isinstance(node.get(key), str) and node[key].strip()
    ]
    for value in declared:
        if value.strip().lower() not in _HEALTH_MODES:
            raise JobConfigError(
                f"rollout_health_check_mode {value!r} is not one of strict, warn, off."
            )
    if not declared:
        # The app was health-checked here before the job is submitted; like the SDK's
        # in-process runner, let the backend's own pre-flight warn rather than fail.
        section["rollout_health_check_mode"] = "warn"


def _complete_gepa(section: dict[str, Any]) -> None:
    """Validate a GEPA section and fill the defaults synth-ai 0.9.11 fills client-side."""
    gepa = section.get("gepa")
    if not isinstance(gepa, dict):
        raise JobConfigError("A GEPA job needs a [prompt_learning.gepa] table.")
    flat = [k for k in _FLAT_GEPA if gepa.get(k) is not None]
    if flat:
        moves = ", ".join(f"gepa.{k} -> {_FLAT_GEPA[k]}" for k in flat)
        raise JobConfigError(f"Flat GEPA fields are refused since synth-ai 0.9: {moves}.")
    if not isinstance(gepa.get("env_name"), str) or not gepa["env_name"].strip():
        raise JobConfigError(
            "prompt_learning.gepa.env_name is required: name the task your app serves "
            "(synth-ai would silently send 'banking77')."
        )
    found = gepa.get("evaluation")
    evaluation: dict[str, Any] = found if isinstance(found, dict) else {}
    if evaluation.get("train_seeds") is None and evaluation.get("seeds") is not None:
        evaluation["train_seeds"] = evaluation["seeds"]
    if evaluation.get("validation_seeds") is None and evaluation.get("val_seeds") is not None:
        evaluation["validation_seeds"] = evaluation["val_seeds"]
    task_data = _table(section.get("task_data"))
    pools = _table(task_data.get("train_pools"))
    train = evaluation.get("train_seeds") or [
        *pools.get("reflection_seeds", []), *pools.get("pareto_seeds", [])
    ]
    main = _table(task_data.get("validation_pools")).get("main_seeds")
    validation = evaluation.get("validation_seeds") or main or task_data.get("validation_seeds")
    if not train:
        raise JobConfigError(
            "A GEPA job needs train seeds: prompt_learning.task_data.train_pools."
            "{reflection_seeds, pareto_seeds} or prompt_learning.gepa.evaluation.seeds."
        )
    if not validation:
        raise JobConfigError(
            "A GEPA job needs validation seeds: prompt_learning.task_data.validation_seeds or "
            "prompt_learning.gepa.evaluation.validation_seeds."
        )
    for name, defaults in _GEPA_SECTION_DEFAULTS.items():
        if isinstance(gepa.get(name), dict):
            gepa[name] = {**defaults, **gepa[name]}
    throughput = gepa.get("throughput")
    if isinstance(throughput, dict) and throughput.get("max_concurrent_rollouts") is not None:
        rollout = gepa.setdefault("rollout", dict(_GEPA_SECTION_DEFAULTS["rollout"]))
        rollout["max_concurrent"] = throughput["max_concurrent_rollouts"]
    for key, value in _GEPA_DEFAULTS.items():
        gepa.setdefault(key, value)
    token = gepa["token"] = {**_TOKEN_DEFAULTS, **(gepa.get("token") or {})}
    if isinstance(token.get("max_limit"), int):
        gepa["proposed_prompt_max_tokens"] = token["max_limit"]
    else:
        token["max_limit"] = gepa["proposed_prompt_max_tokens"]


def _complete_mipro(section: dict[str, Any]) -> None:
    """Validate a MIPRO section as synth-ai 0.9.11's ``_normalize_mipro_section`` does."""
    mipro = section.get("mipro")
    if not isinstance(mipro, dict):
        raise JobConfigError("A MIPRO job needs a [prompt_learning.mipro] table.")
    for key in ("bootstrap_train_seeds", "online_pool", "test_pool", "reference_pool"):
        if mipro.get(key) is None and section.get(key) is not None:
            mipro[key] = section[key]
    if mipro.get("online_pool") is None:
        legacy = mipro.get("online_train_seeds", section.get("online_train_seeds"))
        if legacy is not None:
            mipro["online_pool"] = legacy
    if mipro.get("env_name") and not section.get("env_name") and not section.get("container_id"):
        section["env_name"] = mipro["env_name"]
    for key in ("bootstrap_train_seeds", "online_pool"):
        if mipro.get(key) is None:
            raise JobConfigError(f"A MIPRO job needs prompt_learning.mipro.{key}.")


def _table(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _eval_spec(
    config: Mapping[str, Any],
    container_url: str,
    worker_token: str | None,
    system_name: str | None,
) -> JobSpec:
    """An eval job, as ``PolicyOptimizationOfflineJob.create(kind="eval")`` sends it: the
    config flat, and the worker token in the body (that client's transport)."""
    if "prompt_learning" in config:
        raise JobConfigError(
            "An eval job takes a flat config (env_name, seeds, policy, ...), not a "
            "[prompt_learning] table; use job_type='prompt_learning' for GEPA."
        )
    flat = copy.deepcopy(dict(config.get("eval", config)))
    for old in ("task_app_url",):
        if old in flat:
            raise JobConfigError(f"{old} is the pre-0.9 name; remove it (container_url is set).")
    flat["container_url"] = container_url
    body: dict[str, Any] = {
        "technique": "discrete_optimization",
        "kind": "eval",
        "system": {"name": system_name or _EVAL_SYSTEM_NAME, "reuse": True},
        "config_mode": "DEFAULT",
        "config": flat,
        "metadata": {},
        "auto_start": True,
        "prompt_opt_version": "v1",
    }
    if worker_token and worker_token.strip():
        body["container_worker_token"] = worker_token.strip()
    return JobSpec(kind="eval", path="/v1/offline/jobs", body=body)
