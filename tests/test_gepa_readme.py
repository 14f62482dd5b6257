"""The README's "Interactive GEPA" code runs as printed: the names it says the user brings
(``task_app``, ``my_model``, ``my_reflection``) are a real task app and the deterministic
stand-ins of tests/gepa_task.py."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gepa_task import stand_in_model, stand_in_reflection, task_config
from support import free_port

from taskapp_notebook import InProcessTaskApp

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block() -> str:
    section = README.read_text().split("<!-- gepa:start -->", 1)[1].split("<!-- gepa:end -->")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section has one code block"
    return blocks[0]


@pytest.fixture
def task_app() -> Iterator[InProcessTaskApp]:
    app = InProcessTaskApp(config=task_config(), tunnel_mode="local", serve_on="thread",
                           port=free_port())
    app.start()
    yield app
    app.stop()


async def test_readme_gepa_code_runs_as_printed(task_app: InProcessTaskApp, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # run_dir="gepa-runs/..." is relative
    namespace: dict[str, Any] = {"task_app": task_app, "my_model": stand_in_model,
                                 "my_reflection": stand_in_reflection}
    code = compile(readme_block(), "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    await eval(code, namespace)
    result = namespace["result"]
    assert result.best_score > result.seed_score
    assert result.best_prompt and "step by step" in result.best_prompt
    assert (tmp_path / "gepa-runs" / "multiply" / "result.json").exists()
