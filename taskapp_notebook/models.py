"""Data shapes of the task-app contract: wire models and :class:`TaskAppConfig`.

Every model accepts (and keeps) keys it does not know, so apps built here can talk to clients
of any SDK version. Field names follow the public synth-ai SDK; ``RolloutRequest`` also
accepts the older ``run_id`` wire form and remembers which id key(s) it received, so the
server can echo the same form back. Only pydantic is imported here, never fastapi;
:func:`~taskapp_notebook.contract.create_task_app` turns a config into an app.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from .errors import InvalidParameterError

__all__ = [
    "CandidateValidationIssue",
    "DatasetInfo",
    "InferenceInfo",
    "LimitsInfo",
    "RewardInfo",
    "RolloutEnvSpec",
    "RolloutMetrics",
    "RolloutPolicySpec",
    "RolloutRequest",
    "RolloutResponse",
    "RolloutSafetyConfig",
    "TaskAppConfig",
    "TaskDescriptor",
    "TaskInfo",
    "ValidateCandidateRequest",
    "ValidateCandidateResponse",
]

#: The two spellings of a rollout's id, newest first.
ID_KEYS: tuple[str, str] = ("trace_correlation_id", "run_id")


class _OpenModel(BaseModel):
    """Base: unknown keys are kept (``extra="allow"``), fields may be set by name."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


# --- task metadata ---------------------------------------------------------------------------


class TaskDescriptor(_OpenModel):
    """Human-readable identity of a task."""

    id: str
    name: str
    description: str | None = None
    version: str | None = None


class DatasetInfo(_OpenModel):
    """The dataset behind the task's seeds."""

    id: str | None = None
    name: str | None = None
    version: str | None = None
    splits: list[str] | None = None
    default_split: str | None = None


class InferenceInfo(_OpenModel):
    """Suggested policy model routing."""

    model: str | None = None
    inference_url: str | None = None


class LimitsInfo(_OpenModel):
    """Operational limits the task enforces."""

    max_turns: int | None = None
    max_response_tokens: int | None = None
    timeout_seconds: float | None = None


class TaskInfo(_OpenModel):
    """Metadata of one task instance (``GET /task_info?seed=N``) or of the whole app."""

    task: TaskDescriptor
    dataset: DatasetInfo = Field(default_factory=DatasetInfo)
    inference: InferenceInfo = Field(default_factory=InferenceInfo)
    limits: LimitsInfo = Field(default_factory=LimitsInfo)
    task_metadata: dict[str, Any] = Field(default_factory=dict)


# --- rollouts --------------------------------------------------------------------------------


class RolloutEnvSpec(_OpenModel):
    """Which environment (and seed) to roll out."""

    env_id: str | None = None
    env_name: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None


class RolloutPolicySpec(_OpenModel):
    """The policy to roll out; ``config`` carries ``model``, ``inference_url``, ..."""

    policy_id: str | None = None
    policy_name: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    output_mode: str | None = None


class RolloutSafetyConfig(_OpenModel):
    """Limits the caller asks the task app to respect."""

    max_time_s: float = 3600.0


class RolloutRequest(_OpenModel):
    """``POST /rollout`` body. ``env`` and ``policy`` are required (a request without
    either is answered 422 naming the field, as both SDK generations do).

    Newer clients send ``trace_correlation_id``, older ones ``run_id``; either is accepted
    and both attributes are filled with the id received. ``received_id_keys`` says which
    key(s) actually came, which the server echoes in the response.
    """

    trace_correlation_id: str = ""
    run_id: str | None = None
    env: RolloutEnvSpec
    policy: RolloutPolicySpec
    on_done: str = "reset"
    safety: RolloutSafetyConfig = Field(default_factory=RolloutSafetyConfig)
    training_session_id: str | None = None
    synth_base_url: str | None = None
    context_overrides: list[Any] | None = None
    override_bundle_id: str | None = None

    _received_id_keys: tuple[str, ...] = PrivateAttr(default=("trace_correlation_id",))

    @model_validator(mode="after")
    def _resolve_id(self) -> RolloutRequest:
        sent = self.model_fields_set
        received = tuple(k for k in ID_KEYS if k in sent and getattr(self, k) is not None)
        if not received:
            raise ValueError(
                "a rollout request needs 'trace_correlation_id' (older clients send 'run_id')"
            )
        if "trace_correlation_id" not in received:
            self.trace_correlation_id = self.run_id or ""
        if self.run_id is None:
            self.run_id = self.trace_correlation_id
        self._received_id_keys = received
        return self

    @property
    def received_id_keys(self) -> tuple[str, ...]:
        """The id key(s) the client sent: ``trace_correlation_id``, ``run_id`` or both."""
        return self._received_id_keys


class RewardInfo(_OpenModel):
    """A rollout's reward. ``outcome_objectives`` defaults to ``{"reward": outcome_reward}``."""

    outcome_reward: float
    event_rewards: list[float] | None = None
    outcome_objectives: dict[str, float] | None = None
    event_objectives: list[dict[str, float]] | None = None
    instance_objectives: list[dict[str, float]] | None = None
    details: dict[str, Any] = Field(default_factory=dict)

    def model_post_init(self, context: Any, /) -> None:
        """Derive ``outcome_objectives`` the way the SDK does when it is not given."""
        if self.outcome_objectives is None:
            self.outcome_objectives = {"reward": self.outcome_reward}


#: The SDK's name for :class:`RewardInfo`.
RolloutMetrics = RewardInfo


class RolloutResponse(_OpenModel):
    """``POST /rollout`` result. ``reward_info`` may also arrive under the old key ``metrics``.

    The id may be left out: the server fills it from the request, under the same key(s) the
    request used.
    """

    trace_correlation_id: str | None = None
    run_id: str | None = None
    reward_info: RewardInfo = Field(validation_alias=AliasChoices("reward_info", "metrics"))
    trace: dict[str, Any] | None = None
    inference_url: str | None = None
    artifact: list[Any] | None = None
    success_status: str | None = None
    status_detail: str | None = None
    override_application_results: list[Any] | None = None


class CandidateValidationIssue(_OpenModel):
    """One problem (or warning) found in a candidate by ``/validate-candidate``."""

    code: str
    message: str | None = None
    path: str | None = None
    constraint: str | None = None


class ValidateCandidateRequest(_OpenModel):
    """``POST /validate-candidate`` body (synth-ai 0.9's optional candidate check)."""

    job_id: str | None = None
    candidate_id: str
    optimization_mode: str = "optimize_anything"
    artifact_kind: str
    artifact_payload: dict[str, Any] | list[Any] | str | int | float | bool | None
    artifact_schema: dict[str, Any] | str | None = None
    artifact_bounds: dict[str, Any] | None = None
    trace_context: dict[str, Any] | None = None


class ValidateCandidateResponse(_OpenModel):
    """``POST /validate-candidate`` result."""

    status: str
    errors: list[CandidateValidationIssue] = Field(default_factory=list)
    warnings: list[CandidateValidationIssue] = Field(default_factory=list)
    suggested_fixes: list[dict[str, Any]] | None = None
    normalized_preview: str | None = None
    validation_digest: str | None = None
    validator_version: str | None = None


# --- app configuration ----------------------------------------------------------------------


#: ``provide_taskset_description()`` -> mapping (or an awaitable of one).
TasksetDescriber = Callable[[], Any]
#: ``provide_task_instances(seeds)`` -> iterable of TaskInfo / mappings (sync or async).
InstanceProvider = Callable[[list[int]], Any]
#: ``rollout(request, fastapi_request)`` (or ``rollout(request)``) -> RolloutResponse / mapping.
RolloutExecutor = Callable[..., Any]
#: Startup / shutdown hook: ``hook()`` or ``hook(app)``, sync or async.
Hook = Callable[..., Any]
#: ``validate_candidate(request, fastapi_request)`` -> ValidateCandidateResponse / mapping.
CandidateValidator = Callable[..., Any]


@dataclass
class TaskAppConfig:
    """Declarative description of a task app (field names follow the synth-ai SDK).

    ``describe_taskset`` is the SDK's older name for ``provide_taskset_description``.
    ``middleware`` items are ``starlette.middleware.Middleware`` objects, middleware classes,
    or ``(cls, kwargs)`` pairs.

    Fields of synth-ai's ``ContainerConfig`` (0.9.x) and ``TaskAppConfig`` /
    ``LocalAPIConfig`` (0.7.x) are accepted too (docs/sdk-compatibility.md):
    ``rubrics`` defaults to an empty mapping, served as ``null`` (the SDK's empty bundle);
    ``validate_candidate`` serves ``POST /validate-candidate``; ``expose_debug_env`` serves
    ``GET /debug/env`` (which variables are set, never their values); ``dataset_registry``
    is kept (on ``app.state.taskapp_config``) and not served, as in the SDK;
    ``ensure_localapi_auth`` / ``ensure_container_auth`` are ignored (the runner hands the
    app its key; nothing is minted, persisted or uploaded); ``proxy`` vendor routes are not
    served (a warning says so when one is enabled).
    """

    app_id: str
    name: str
    description: str
    provide_taskset_description: TasksetDescriber | None = None
    provide_task_instances: InstanceProvider | None = None
    rollout: RolloutExecutor | None = None
    base_task_info: TaskInfo | Mapping[str, Any] | None = None
    rubrics: Any = field(default_factory=dict)
    routers: Sequence[Any] = ()
    middleware: Sequence[Any] = ()
    app_state: Mapping[str, Any] = field(default_factory=dict)
    require_api_key: bool = True
    cors_origins: Sequence[str] | None = None
    startup_hooks: Sequence[Hook] = ()
    shutdown_hooks: Sequence[Hook] = ()
    describe_taskset: TasksetDescriber | None = None
    validate_candidate: CandidateValidator | None = None
    dataset_registry: Any = None
    proxy: Any = None
    expose_debug_env: bool = True
    ensure_localapi_auth: bool = True
    ensure_container_auth: bool = True

    def __post_init__(self) -> None:
        for name in ("app_id", "name"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InvalidParameterError(
                    f"TaskAppConfig.{name} must be a non-empty string; got {value!r}."
                )
        if not isinstance(self.description, str):
            raise InvalidParameterError(
                f"TaskAppConfig.description must be a string; got {self.description!r}."
            )
        if self.provide_taskset_description is None:
            self.provide_taskset_description = self.describe_taskset
        for name in (
            "provide_taskset_description",
            "provide_task_instances",
            "rollout",
            "validate_candidate",
        ):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise InvalidParameterError(
                    f"TaskAppConfig.{name} must be callable (sync or async); got {value!r}."
                )
        for name in ("startup_hooks", "shutdown_hooks"):
            for hook in getattr(self, name):
                if not callable(hook):
                    raise InvalidParameterError(
                        f"TaskAppConfig.{name} must hold callables; got {hook!r}."
                    )

    def clone(self) -> TaskAppConfig:
        """A shallow copy whose sequences and ``app_state`` may be changed independently."""
        return replace(
            self,
            routers=tuple(self.routers),
            middleware=tuple(self.middleware),
            app_state=dict(self.app_state),
            startup_hooks=tuple(self.startup_hooks),
            shutdown_hooks=tuple(self.shutdown_hooks),
        )

    def task_info(self) -> TaskInfo:
        """``base_task_info`` as a model, or one derived from ``app_id``/``name``."""
        if isinstance(self.base_task_info, TaskInfo):
            return self.base_task_info
        if self.base_task_info is not None:
            return TaskInfo.model_validate(dict(self.base_task_info))
        task = {"id": self.app_id, "name": self.name, "description": self.description or None}
        return TaskInfo.model_validate({"task": task, "dataset": {"id": self.app_id}})
