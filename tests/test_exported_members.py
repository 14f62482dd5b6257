"""The public API: a sorted ``__all__`` whose names all resolve, and a cheap import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import taskapp_notebook

HEAVY = ("fastapi", "uvicorn", "httpx", "websockets", "IPython", "ipywidgets", "starlette")


def test_all_is_sorted_and_unique() -> None:
    names = taskapp_notebook.__all__
    assert names == sorted(names)
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", taskapp_notebook.__all__)
def test_every_exported_name_resolves(name: str) -> None:
    value = getattr(taskapp_notebook, name)
    assert value is not None
    assert name in dir(taskapp_notebook) or name in vars(taskapp_notebook)


def test_exported_classes_come_from_the_package() -> None:
    for name in taskapp_notebook.__all__:
        module = getattr(getattr(taskapp_notebook, name), "__module__", "") or ""
        assert module.startswith("taskapp_notebook"), (name, module)


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        taskapp_notebook.nope  # noqa: B018


def test_import_is_cheap_in_a_fresh_interpreter() -> None:
    code = (
        "import json, sys; import taskapp_notebook; "
        "taskapp_notebook.InProcessTaskApp; "
        f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_bare_import_imports_no_heavy_module() -> None:
    code = (
        "import json, sys; import taskapp_notebook; "
        f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
