"""The error tree drawn in ``taskapp_notebook/errors.py`` is complete and true: every
exception class the package defines appears there, under its real parent, with the
built-in it subclasses and the module it lives in."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path

import taskapp_notebook
from taskapp_notebook import errors

_NAME = re.compile(r"^(?P<prefix>[\s│├└─]*)(?P<name>[A-Z][A-Za-z]+)\b(?P<rest>.*)$")
_BUILTIN = re.compile(r"^\s+\((?P<builtin>[A-Z][A-Za-z]+)\)")
_MODULE = re.compile(r"\((?P<module>[a-z_]+(?:\.[a-z_]+)*)\)")


@dataclass
class Drawn:
    name: str
    column: int
    parent: str | None
    builtin: str | None
    module: str


def drawn_tree() -> dict[str, Drawn]:
    """The classes in the docstring's ``::`` blocks, with parent, built-in and module."""
    drawn: dict[str, Drawn] = {}
    stack: list[Drawn] = []
    in_tree = False
    for line in (errors.__doc__ or "").splitlines():
        if line.endswith("::"):
            in_tree, stack = True, []
            continue
        if not line.startswith("    "):
            in_tree = in_tree and not line.strip()  # a blank line does not end a block
            continue
        if not in_tree:
            continue
        match = _NAME.match(line)
        if match is None or len(match["prefix"]) > 40:  # a description's continuation
            if stack and (module := _MODULE.search(line)):
                stack[-1].module = "taskapp_notebook." + module["module"]
            continue
        column = len(match["prefix"])
        while stack and stack[-1].column >= column:
            stack.pop()
        builtin = _BUILTIN.match(match["rest"])
        module = _MODULE.search(match["rest"])
        entry = Drawn(
            match["name"],
            column,
            stack[-1].name if stack else None,
            builtin["builtin"] if builtin else None,
            "taskapp_notebook." + module["module"] if module else "taskapp_notebook.errors",
        )
        drawn[entry.name] = entry
        stack.append(entry)
    return drawn


def package_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(taskapp_notebook.__path__, "taskapp_notebook."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == info.name
                and not name.startswith("_")
            ):
                assert name not in found, f"two exceptions named {name}"
                found[name] = obj
    return found


def test_every_exception_is_drawn_under_its_parent() -> None:
    drawn, real = drawn_tree(), package_exceptions()
    assert "TaskAppError" in drawn and len(real) >= 10
    assert sorted(real) == sorted(drawn), "errors.py's tree and the package's exceptions differ"
    for name, cls in real.items():
        entry = drawn[name]
        assert cls.__module__ == entry.module, f"{name} lives in {cls.__module__}"
        if entry.parent is not None:
            assert entry.parent in [base.__name__ for base in cls.__bases__], (
                f"{name} is drawn under {entry.parent}, its bases are {cls.__bases__}"
            )
        if entry.builtin is not None:
            assert entry.builtin in [base.__name__ for base in cls.__mro__], name


def test_no_module_name_is_used_twice() -> None:
    """One name, one concept: ``frames.py`` / ``server.py`` / ``leases.py`` each existed twice
    for different things (relay vs agent vs task app) before."""
    root = Path(taskapp_notebook.__file__).parent
    names = [p.name for p in root.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(names) > 30
    assert sorted({n for n in names if names.count(n) > 1}) == []
