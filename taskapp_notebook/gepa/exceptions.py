"""Errors of local GEPA runs, and the check that the optional ``gepa`` engine is installed.

::

    TaskAppError
    └── GepaError                                in a notebook: one red line, no traceback
        ├── GepaParameterError (InvalidParameterError, ValueError)  bad input, before anything
        │                                        starts
        ├── GepaNotInstalledError (ImportError)  the ``gepa`` extra is missing
        ├── DeadlockError (RuntimeError)         a synchronous wait that could never finish
        └── GepaRunError (RuntimeError)          the run failed; ``.result`` keeps the best so far
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InvalidParameterError, TaskAppError

if TYPE_CHECKING:
    from .results import GepaResult

INSTALL_HINT = "pip install 'taskapp-notebook[gepa]'"


class GepaError(TaskAppError):
    """Base class of the errors of :mod:`taskapp_notebook.gepa`."""

    def _render_traceback_(self) -> list[str]:
        """What IPython shows instead of a traceback: one red line saying what to do."""
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]


class GepaParameterError(GepaError, InvalidParameterError):
    """A bad argument to a local GEPA run, found before anything starts."""


class GepaNotInstalledError(GepaError, ImportError):
    """The ``gepa`` engine (the optional extra) is not installed."""


class DeadlockError(GepaError, RuntimeError):
    """A synchronous call would block the event loop the task app serves on."""


class GepaRunError(GepaError, RuntimeError):
    """The run failed. ``result`` holds what it found before failing (None if nothing)."""

    def __init__(self, message: str, result: GepaResult | None = None) -> None:
        super().__init__(message)
        self.result = result


def require_gepa() -> None:
    """Raise :class:`GepaNotInstalledError` unless ``gepa`` (>= 0.1.4, < 0.2) is importable."""
    try:
        import gepa  # noqa: F401
    except ImportError:
        raise GepaNotInstalledError(
            "Local GEPA runs need the open-source gepa engine, which is not installed. "
            f"Install it with: {INSTALL_HINT}"
        ) from None
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("gepa")
    except PackageNotFoundError:  # importable from a source tree: trust it
        return
    parts = tuple(int(p) for p in found.split(".")[:3] if p.isdigit())
    if not (0, 1, 4) <= parts < (0, 2):
        raise GepaNotInstalledError(
            f"gepa {found} is installed, but taskapp_notebook.gepa needs gepa>=0.1.4,<0.2. "
            f"Install a matching version with: {INSTALL_HINT}"
        )
