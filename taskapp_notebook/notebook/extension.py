"""``%load_ext taskapp_notebook``: register the magics and kernel hooks, cheaply.

Loading imports neither fastapi nor uvicorn; they load when the first app starts.
Unloading (``%unload_ext`` / ``%reload_ext``) stops every app and removes every hook.
"""

from __future__ import annotations

import logging
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
    registry.uninstall_hooks()
    logger.debug("taskapp_notebook extension unloaded")


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
