"""Interactive GEPA: optimise a task app's prompt from this process, live.

``start_gepa(task_app, seed_candidate=..., train=..., reflection_lm=..., upstream=...,
max_metric_calls=...)`` runs the open-source gepa engine (the optional extra
``pip install 'taskapp-notebook[gepa]'``) in the background and returns a
:class:`GepaRun` at once: ``await run`` gives the :class:`GepaResult`, ``run.stop()``
ends it keeping the best so far, and displaying ``run`` in a notebook shows the live view.
Candidates reach the app through an interceptor, the way hosted GEPA delivers them
(``interceptor.py``). Importing this package is cheap; gepa is needed only to run.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .exceptions import (
    DeadlockError,
    GepaError,
    GepaNotInstalledError,
    GepaParameterError,
    GepaRunError,
)

if TYPE_CHECKING:
    from .api import optimize, start_gepa
    from .interceptor import Interceptor, apply_candidate
    from .reflection import ChatCompletionsLM
    from .results import GepaResult
    from .run import GepaRun, stop_all_runs
    from .run_options import Upstream

__all__ = [
    "ChatCompletionsLM",
    "DeadlockError",
    "GepaError",
    "GepaNotInstalledError",
    "GepaParameterError",
    "GepaResult",
    "GepaRun",
    "GepaRunError",
    "Interceptor",
    "Upstream",
    "apply_candidate",
    "optimize",
    "start_gepa",
    "stop_all_runs",
]

_LAZY = {
    "ChatCompletionsLM": ".reflection",
    "GepaResult": ".results",
    "GepaRun": ".run",
    "Interceptor": ".interceptor",
    "Upstream": ".run_options",
    "apply_candidate": ".interceptor",
    "optimize": ".api",
    "start_gepa": ".api",
    "stop_all_runs": ".run",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'taskapp_notebook.gepa' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
