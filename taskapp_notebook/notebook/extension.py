"""``%load_ext taskapp_notebook``: register the magics and kernel hooks, cheaply.

Loading imports neither fastapi nor uvicorn; they load when the first app starts.
Unloading (``%unload_ext`` / ``%reload_ext``) stops every app and removes every hook.
"""

from __future__ import annotations

import logging
import re
import shlex
from typing import Any

from .. import registry
from .kernel import KernelHooks
from .magics import TaskAppMagics

logger = logging.getLogger(__name__)

#: id(shell) → (magics, hooks) for each shell the extension is loaded into.
_loaded: dict[int, tuple[TaskAppMagics, KernelHooks]] = {}


def load(shell: Any) -> None:
    """Register ``%taskapp`` / ``%%taskapp`` and install the kernel hooks (idempotent)."""
    if id(shell) in _loaded:
        return
    hooks = KernelHooks(shell)
    hooks.install()
    shell.input_transformers_cleanup.append(cell_help_alone)
    magics = TaskAppMagics(shell, hooks=hooks)
    shell.register_magics(magics)
    _loaded[id(shell)] = (magics, hooks)
    logger.debug("taskapp_notebook extension loaded")


def unload(shell: Any) -> None:
    """Stop every app, unregister the magics, restore every hook."""
    registry.stop_all()
    entry = _loaded.pop(id(shell), None)
    if entry is not None:
        magics, hooks = entry
        _unregister_magics(shell, magics)
        magics.close()
        hooks.uninstall()
    while cell_help_alone in shell.input_transformers_cleanup:
        shell.input_transformers_cleanup.remove(cell_help_alone)
    registry.uninstall_hooks()
    logger.debug("taskapp_notebook extension unloaded")


_CELL_MAGIC = re.compile(r"%%taskapp(?:\s+(?P<args>.*))?$")


def cell_help_alone(lines: list[str]) -> list[str]:
    """An input transformer: ``%%taskapp -h`` alone in a cell prints the help.

    IPython refuses a cell magic whose body is empty before the magic runs ("the cell body
    is empty"); a body of one blank line lets ``%%taskapp`` see ``-h`` and print every option.
    """
    if not lines or any(line.strip() for line in lines[1:]):
        return lines
    match = _CELL_MAGIC.match(lines[0].strip())
    if match is None:
        return lines
    try:
        args = shlex.split(match.group("args") or "")
    except ValueError:
        return lines
    if "-h" not in args and "--help" not in args:
        return lines
    return [lines[0].rstrip("\n") + "\n", "\n"]


def loaded_magics(shell: Any) -> TaskAppMagics | None:
    """The TaskAppMagics registered on ``shell``, if the extension is loaded."""
    entry = _loaded.get(id(shell))
    return entry[0] if entry is not None else None


def _unregister_magics(shell: Any, magics: TaskAppMagics) -> None:
    manager = shell.magics_manager
    for kind, table in magics.magics.items():
        for name in table:
            registered = manager.magics.get(kind, {}).get(name)
            if getattr(registered, "__self__", None) is magics:
                del manager.magics[kind][name]
    if manager.registry.get(type(magics).__name__) is magics:
        del manager.registry[type(magics).__name__]
