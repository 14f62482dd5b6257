"""``start_gepa`` (returns at once) and ``optimize`` (waits): the entry points of local GEPA."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .exceptions import GepaParameterError, require_gepa
from .reflection import resolve_reflection_lm
from .results import GepaResult
from .run import GepaRun, active_runs, check_can_block
from .run_options import ModelFunction, RunOptions, Upstream, build_options, check_http_url
from .target import resolve_target

logger = logging.getLogger(__name__)


def start_gepa(
    task_app: Any,
    *,
    seed_candidate: str | Mapping[str, str],
    train: Sequence[int] | Sequence[Mapping[str, Any]],
    reflection_lm: Any,
    max_metric_calls: int,
    val: Sequence[int] | Sequence[Mapping[str, Any]] | None = None,
    upstream: Upstream | str | ModelFunction | None = None,
    time_limit: float | None = None,
    score_threshold: float | None = None,
    concurrency: int = 8,
    run_dir: str | Path | None = None,
    seed: int = 0,
    api_key: str | None = None,
    worker_token: str | None = None,
    through_tunnel: bool = False,
    deliver_components: bool = False,
    model: str | None = None,
    policy_config: Mapping[str, Any] | None = None,
    env_name: str | None = None,
    rollout_timeout: float = 300.0,
    reflection_minibatch_size: int = 3,
    gepa_options: Mapping[str, Any] | None = None,
    interceptor_host: str = "127.0.0.1",
    name: str | None = None,
) -> GepaRun:
    """Start optimising ``seed_candidate`` against a task app; returns the run at once.

    ``task_app`` is a running :class:`~taskapp_notebook.InProcessTaskApp` (called on its
    local URL, or through its tunnel with ``through_tunnel=True``) or a task-app URL with
    ``api_key=`` and/or ``worker_token=`` (SynthTunnel). Rollouts get
    ``policy.config.inference_url`` pointing at this run's interceptor, which swaps the
    candidate's ``system_prompt`` into the app's messages and forwards the call to
    ``upstream`` (an :class:`Upstream`, a base URL, or a stand-in function). Every argument
    is checked before anything starts. ``await run`` gives the :class:`GepaResult`.

    * ``seed_candidate``: a system prompt, or named components (other names than
      ``system_prompt`` need ``deliver_components=True``: the app gets them in
      ``policy.config["prompt_components"]``).
    * ``train`` / ``val``: task seeds (``env.seed``) or example dicts (``env.config``; a
      ``"seed"`` key becomes ``env.seed``); ``val`` defaults to ``train``.
    * ``reflection_lm``: :class:`ChatCompletionsLM`, a gepa model string (needs litellm),
      or any ``prompt -> str`` function.
    * ``max_metric_calls``: the rollout budget (gepa checks it between iterations, so the
      last iteration may go a little over); ``time_limit`` (s) and ``score_threshold`` end
      the run earlier, also between iterations.
    * ``concurrency``: rollouts in flight; ``rollout_timeout`` (s): a slower rollout scores 0.
    * ``run_dir``: results as JSON plus gepa's checkpoint; the same folder resumes a run.
    * ``seed``: gepa's random seed. ``model``: ``policy.config.model`` (default: the
      upstream's model). ``policy_config``: extra ``policy.config`` keys. ``env_name``:
      ``env.env_name``. ``gepa_options``: more ``gepa.optimize`` arguments
      (``candidate_selection_strategy``, ``use_merge``, ``frontier_type``...).
    * ``interceptor_host``: where the interceptor listens. Apps are given a 127.0.0.1 URL,
      so the task app must run on this machine (an InProcessTaskApp, a local URL, or the
      SynthTunnel URL of an app of this machine).
    """
    require_gepa()
    up = _upstream_of(upstream)
    options = build_options(
        name=name, seed_candidate=seed_candidate, train=train, val=val,
        max_metric_calls=max_metric_calls, time_limit=time_limit,
        score_threshold=score_threshold, concurrency=concurrency, run_dir=run_dir, seed=seed,
        deliver_components=bool(deliver_components), has_upstream=up is not None,
        model=model or (up.model if isinstance(up, Upstream) else None),
        policy_config=policy_config, env_name=env_name, rollout_timeout=rollout_timeout,
        reflection_minibatch_size=reflection_minibatch_size, gepa_options=gepa_options)
    if interceptor_host not in ("127.0.0.1", "0.0.0.0", "localhost"):
        raise GepaParameterError(
            f"interceptor_host must be '127.0.0.1', 'localhost' or '0.0.0.0'; got "
            f"{interceptor_host!r}.")
    target = resolve_target(task_app, api_key=api_key, worker_token=worker_token,
                            through_tunnel=through_tunnel)
    cell = current_cell_id()
    replaced = [old for old in active_runs() if (cell is not None and old.cell_id == cell)
                or old.name == options.name]
    for old in active_runs():
        if old not in replaced and options.run_dir is not None and (
                old.options.run_dir == options.run_dir):
            raise GepaParameterError(
                f"The run {old.name!r} is using run_dir {str(options.run_dir)!r}; stop it "
                "first (run.stop()) or choose another run_dir.")
    resume = _resume_seed_scores(options)
    lm = resolve_reflection_lm(reflection_lm)
    run = GepaRun(options, target, up, lm, interceptor_host=interceptor_host,
                  resume_seed_scores=resume)
    run.cell_id = cell
    for old in replaced:  # re-running the cell (or the name) replaces its run
        logger.info("Stopping the GEPA run %r: replaced by a new run", old.name)
        old.stop(reason="replaced by a new run of the same cell or name")
    return run.start(after=replaced)


def optimize(task_app: Any, **kwargs: Any) -> GepaResult:
    """Like :func:`start_gepa`, then wait for the result on this thread.

    Refused (:class:`~taskapp_notebook.gepa.DeadlockError`, before anything starts) where
    waiting would block the event loop the task app serves on — a notebook cell with the
    app on the kernel's loop: use ``run = start_gepa(...)`` and ``await run`` there.
    """
    require_gepa()
    probe = resolve_target(task_app, api_key=kwargs.get("api_key"),
                           worker_token=kwargs.get("worker_token"),
                           through_tunnel=bool(kwargs.get("through_tunnel", False)))
    check_can_block(probe, "optimize()")
    run = start_gepa(task_app, **kwargs)
    try:
        return run.result()
    except BaseException:  # an interrupt while waiting: do not leave the run behind
        run.stop()
        raise


def current_cell_id() -> str | None:
    """The frontend's id of the cell being run (JupyterLab, VS Code send it), else None."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    kernel = getattr(shell, "kernel", None)
    get_parent = getattr(kernel, "get_parent", None)
    if get_parent is None:
        return None
    try:
        parent = get_parent()
    except Exception:  # noqa: BLE001 - an older or unusual kernel
        return None
    cell = (parent or {}).get("metadata", {}).get("cellId")
    return str(cell) if cell else None


def _upstream_of(value: object) -> Upstream | ModelFunction | None:
    if value is None or isinstance(value, Upstream):
        return value
    if isinstance(value, str):
        return Upstream(check_http_url(value, "upstream"))
    if callable(value):
        return value
    raise GepaParameterError(
        "upstream must be an Upstream(base_url, api_key=..., model=...), an OpenAI-compatible "
        f"base URL, or a function body -> reply (a stand-in model); got {type(value).__name__}.")


def _resume_seed_scores(options: RunOptions) -> dict[int, float] | None:
    """When ``run_dir`` holds a checkpoint: check it matches, return its seed scores."""
    if options.run_dir is None or not (options.run_dir / "gepa_state.bin").exists():
        return None
    from gepa.core.state import GEPAState

    try:
        state: Any = GEPAState.load(str(options.run_dir))
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign checkpoint
        raise GepaParameterError(
            f"run_dir {str(options.run_dir)!r} holds a gepa checkpoint that cannot be read "
            f"({type(exc).__name__}: {exc}). Use another run_dir, or delete the folder to "
            "start over.") from None
    if state.program_candidates[0] != options.seed_candidate:
        raise GepaParameterError(
            f"run_dir {str(options.run_dir)!r} holds a run that started from another seed "
            "candidate; resuming needs the same seed_candidate. Use another run_dir to start "
            "a new run.")
    seed_scores = state.prog_candidate_val_subscores[0]
    if set(seed_scores) != set(range(len(options.val))):
        raise GepaParameterError(
            f"run_dir {str(options.run_dir)!r} holds a run with {len(seed_scores)} validation "
            f"examples; this call has {len(options.val)}. Resume with the same val=, or use "
            "another run_dir.")
    logger.info("Resuming the GEPA run in %s (%d candidates, %d metric calls spent)",
                options.run_dir, len(state.program_candidates), state.total_num_evals)
    return {int(k): float(v) for k, v in seed_scores.items()}
