"""Show a run's view in the cell being run, and close the views an earlier run of that cell
showed.

A :class:`~taskapp_notebook.notebook.run_view.RunView` cannot see that the frontend cleared
its output when the user ran its cell again, so without help its widgets would live on in
the kernel (and keep sending updates to no one) for as long as its run does. Producers (a
local GEPA run, a hosted job) display their view through :func:`show_run_view`, which
remembers which cell and which execution of it showed the view. When an execution of the
same cell shows a view again, the views shown by its earlier executions are closed, unless
another cell still shows them. Without a cell id (a frontend that sends none) nothing is
closed.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class ClosableView(Protocol):
    """What this module needs of a view: display itself, and close."""

    def _ipython_display_(self) -> None: ...

    def close(self) -> None: ...


_lock = threading.Lock()
#: cell id -> (execution id, views that execution showed)
_shown: dict[str, tuple[str, list[ClosableView]]] = {}


def current_execution() -> tuple[str | None, str | None]:
    """``(cell id, execute request id)`` of the cell being run; Nones outside a kernel."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    get_parent = getattr(getattr(shell, "kernel", None), "get_parent", None)
    if get_parent is None:
        return None, None
    try:
        parent: Any = get_parent() or {}
    except Exception:  # noqa: BLE001 - an older or unusual kernel
        return None, None
    cell = parent.get("metadata", {}).get("cellId")
    execution = parent.get("header", {}).get("msg_id")
    return (str(cell) if cell else None), (str(execution) if execution else None)


def show_run(view: ClosableView | None, text: str) -> None:
    """What a producer's ``_ipython_display_`` does: show its view (see
    :func:`show_run_view`), or ``text`` when there is none (no ipywidgets)."""
    if view is not None:
        show_run_view(view)
        return
    from IPython.display import display

    display({"text/plain": text}, raw=True)  # type: ignore[no-untyped-call]


def show_run_view(view: ClosableView) -> None:
    """Display ``view`` in the current cell; close the views earlier runs of it showed."""
    cell, execution = current_execution()
    stale: list[ClosableView] = []
    if cell is not None and execution is not None:
        with _lock:
            before, views = _shown.get(cell, (execution, []))
            if before != execution:
                stale, views = views, []
            if not any(shown is view for shown in views):
                views.append(view)
            _shown[cell] = (execution, views)
            still_shown = [v for _, (_, vs) in _shown.items() for v in vs]
        for old in stale:
            if any(old is shown for shown in still_shown):
                continue  # shown again now, or by another cell
            try:
                old.close()
            except Exception:  # noqa: BLE001 - a view that cannot close is left alone
                logger.debug("closing a run view of an earlier run of the cell failed",
                             exc_info=True)
    view._ipython_display_()

