"""How the package's modules depend on each other: the runner registers itself with the
registry (never the reverse), no module reaches into another's private names, and one
function masks secrets."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "taskapp_notebook"
#: Attributes of objects that are not ours (asyncio's transport internals).
FOREIGN_PRIVATE = {("tunnels/synthtunnel/agent.py", "_sock")}
#: namedtuple methods (urllib's SplitResult._replace, ...) are public despite the underscore.
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}


def modules() -> dict[str, ast.Module]:
    return {str(path.relative_to(PACKAGE)): ast.parse(path.read_text())
            for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(tree: ast.Module, here: str) -> set[str]:
    """Package-relative module names ``here`` imports anywhere (TYPE_CHECKING included)."""
    package = here.replace("/", ".").removesuffix(".py").split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = ".".join([*base, node.module]) if node.module else ".".join(base)
            found.add(target)
            found.update(f"{target}.{alias.name}" if target else alias.name
                         for alias in node.names)
    return found


def test_registry_does_not_import_the_runner() -> None:
    trees = modules()
    assert "runner" not in imported_modules(trees["registry.py"], "registry.py")
    assert "registry" in imported_modules(trees["runner.py"], "runner.py")


def test_no_private_attribute_of_another_object() -> None:
    offenders = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.endswith("_"):  # protocols: __dunder__, _repr_html_, ...
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call):  # super()._x
                continue
            if node.attr in NAMEDTUPLE_API:  # public API despite the underscore
                continue
            if (name, node.attr) in FOREIGN_PRIVATE:
                continue
            offenders.append(f"{name}:{node.lineno} .{node.attr}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                offenders += [f"{name}:{node.lineno} import {alias.name}" for alias in node.names
                              if alias.name.startswith("_") and not alias.name.endswith("_")]
    assert offenders == []


def test_one_secret_masker() -> None:
    """``errors.mask_secret`` / ``scrub_secrets`` are the only functions that mask: no
    module defines another (``mask``, ``redact``, ``scrub``, ...)."""
    words = ("mask", "redact", "scrub")
    defined = sorted(
        f"{name}:{node.name}"
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and any(word in node.name.lower() for word in words)
        and name != "errors.py"
    )
    assert defined == []
