"""Kernel hooks: which cell is running, and stopping every app when the kernel goes away.

* ``pre_run_cell`` records the frontend's cell id (``info.cell_id``, sent by JupyterLab and
  VS Code as ``metadata.cellId``) so re-running a cell can replace the app it started.
* The kernel's ``shutdown_request`` handler is wrapped on *both* ``control_handlers`` and
  ``shell_handlers``: every app stops (bounded wait) before ipykernel replies and stops its
  loops. ``atexit`` is the second line of defence (docs/kernel-facts.md #5).
* ``uninstall()`` restores exactly what ``install()`` replaced.

``run_in_namespace`` runs a ``%%taskapp`` body the way the kernel runs a cell.
"""

from __future__ import annotations

import ast
import asyncio
import atexit
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from .. import registry
from ..loops import run_sync, running_loop

logger = logging.getLogger(__name__)

Handler = Callable[..., Any]
_HANDLER_TABLES = ("control_handlers", "shell_handlers")
#: How long a shutdown request waits for the apps before letting the kernel exit anyway.
SHUTDOWN_TIMEOUT = 3.0


class KernelHooks:
    """Cell-id tracking and shutdown hooks for one IPython shell (kernel or not)."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        #: The cell id of the cell running now (None outside a cell or if not sent).
        self.cell_id: str | None = None
        self._launches = 0
        self._originals: dict[str, Handler] = {}
        self._wrappers: dict[str, Handler] = {}
        self._installed = False

    @property
    def kernel(self) -> Any | None:
        """The ipykernel Kernel behind the shell, or None in a terminal/test shell."""
        return getattr(self.shell, "kernel", None)

    def install(self) -> None:
        """Register the cell hooks, wrap the kernel's shutdown handlers, add atexit."""
        if self._installed:
            return
        self._installed = True
        self.shell.events.register("pre_run_cell", self._pre_run_cell)
        self.shell.events.register("post_run_cell", self._post_run_cell)
        atexit.register(_stop_all_at_exit)
        kernel = self.kernel
        if kernel is None:
            return
        for table_name in _HANDLER_TABLES:
            table = getattr(kernel, table_name, None)
            original = table.get("shutdown_request") if isinstance(table, dict) else None
            if table is None or original is None:
                continue
            wrapper = _wrap_shutdown(original)
            self._originals[table_name] = original
            self._wrappers[table_name] = wrapper
            table["shutdown_request"] = wrapper
        logger.debug("Wrapped shutdown_request on %s", sorted(self._wrappers))

    def uninstall(self) -> None:
        """Undo ``install()``: unregister the cell hooks, restore handlers, drop atexit."""
        if not self._installed:
            return
        self._installed = False
        for event, callback in (
            ("pre_run_cell", self._pre_run_cell),
            ("post_run_cell", self._post_run_cell),
        ):
            with contextlib.suppress(ValueError):
                self.shell.events.unregister(event, callback)
        atexit.unregister(_stop_all_at_exit)
        kernel = self.kernel
        for table_name, original in self._originals.items():
            table = getattr(kernel, table_name, None)
            if isinstance(table, dict) and table.get("shutdown_request") is (
                self._wrappers[table_name]
            ):
                table["shutdown_request"] = original
        self._originals.clear()
        self._wrappers.clear()
        self.cell_id = None

    @property
    def installed(self) -> bool:
        return self._installed

    def next_launch_index(self) -> int:
        """1, 2, ... for each app started by the cell running now (reset per cell)."""
        self._launches += 1
        return self._launches

    def _pre_run_cell(self, info: Any) -> None:
        cell_id = getattr(info, "cell_id", None)
        self.cell_id = str(cell_id) if cell_id else None
        self._launches = 0

    def _post_run_cell(self, result: Any) -> None:
        self.cell_id = None


def run_in_namespace(shell: Any, cell: str) -> None:
    """Run a cell body in the user namespace, like a cell (IPython syntax, top-level await).

    An error propagates as it is (its type, message and cause), and IPython shows its
    traceback from the body's first frame on: the user's own frames, none of ours.
    """
    code = shell.transform_cell(cell)
    filename = shell.compile.cache(code, shell.execution_count, raw_code=cell)
    code_obj = compile(code, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    try:
        if not code_obj.co_flags & inspect.CO_COROUTINE:
            exec(code_obj, shell.user_global_ns, shell.user_ns)
            return
        coro = eval(code_obj, shell.user_global_ns, shell.user_ns)
        loop = running_loop()
        if loop is not None:
            run_sync(loop, coro)  # a kernel cell: nest on the kernel's loop
        else:
            asyncio.run(coro)
    except Exception as exc:
        _show_from(shell, exc, filename)
        raise


def _show_from(shell: Any, exc: BaseException, filename: str) -> None:
    """Make IPython render ``exc``'s traceback from the first frame in ``filename`` on
    (the ``_render_traceback_`` hook IPython and ipykernel honour)."""
    tb: TracebackType | None = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    formatter = getattr(shell, "InteractiveTB", None)
    if tb is None or formatter is None or hasattr(exc, "_render_traceback_"):
        return
    user_tb = tb

    def render() -> list[str]:
        lines: list[str] = formatter.structured_traceback(type(exc), exc, user_tb, tb_offset=0)
        return lines

    with contextlib.suppress(AttributeError):  # an exception class with __slots__
        exc._render_traceback_ = render  # type: ignore[attr-defined]


def _stop_all_at_exit() -> None:
    """atexit: stop whatever still runs (the interpreter is exiting)."""
    registry.stop_all()


def _wrap_shutdown(original: Handler) -> Callable[..., Awaitable[Any]]:
    """A ``shutdown_request`` handler that stops every app, then runs ``original``."""

    async def shutdown_request(stream: Any, ident: Any, parent: Any) -> Any:
        try:
            await registry.astop_all(SHUTDOWN_TIMEOUT)
        except Exception:  # noqa: BLE001 - the kernel must shut down regardless
            logger.warning("Error while stopping task apps at kernel shutdown", exc_info=True)
        result = original(stream, ident, parent)
        if inspect.isawaitable(result):
            return await result
        return result

    shutdown_request.__wrapped__ = original  # type: ignore[attr-defined]
    return shutdown_request
