"""Run a GEPA / eval task app inside this process — a notebook kernel or a script.

``import taskapp_notebook`` is cheap: fastapi, uvicorn, httpx, websockets and IPython are
imported only when an app starts or the extension loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    HealthCheckError,
    InvalidParameterError,
    PortInUseError,
    StartError,
    TaskAppError,
    TaskAppLoadError,
    TaskAppNotFoundError,
    TunnelError,
    TunnelVerificationError,
)

if TYPE_CHECKING:
    from .contract import create_task_app
    from .jobs import run_in_process_job
    from .models import TaskAppConfig
    from .runner import AppState, InProcessContainer, InProcessTaskApp

__version__ = "0.1.0"

__all__ = [
    "AppState",
    "HealthCheckError",
    "InProcessContainer",
    "InProcessTaskApp",
    "InvalidParameterError",
    "PortInUseError",
    "StartError",
    "TaskAppConfig",
    "TaskAppError",
    "TaskAppLoadError",
    "TaskAppNotFoundError",
    "TunnelError",
    "TunnelVerificationError",
    "astop_all",
    "create_task_app",
    "load_ipython_extension",
    "run_in_process_job",
    "stop_all",
    "unload_ipython_extension",
]

_LAZY = {
    "AppState": "taskapp_notebook.runner",
    "InProcessContainer": "taskapp_notebook.runner",
    "InProcessTaskApp": "taskapp_notebook.runner",
    "TaskAppConfig": "taskapp_notebook.models",
    "create_task_app": "taskapp_notebook.contract",
    "run_in_process_job": "taskapp_notebook.jobs",
    "astop_all": "taskapp_notebook.registry",
    "stop_all": "taskapp_notebook.registry",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'taskapp_notebook' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext taskapp_notebook``: register the magics and kernel hooks."""
    from .notebook.extension import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext taskapp_notebook``: stop every app and remove the hooks."""
    from .notebook.extension import unload

    unload(ipython)
