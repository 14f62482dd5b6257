"""README.md's code blocks run exactly as printed, so they cannot rot.

* A ```` ```python ```` block is a script: it runs in a fresh interpreter and must exit 0.
* The ```` ```python ```` blocks between ``<!-- notebook:start -->`` and
  ``<!-- notebook:end -->`` are the cells of one notebook, executed in order on a real
  kernel (nbclient): no error, and nothing written to stderr (no red line).
* A ```` ```text ```` block after ``<!-- output-of: COMMAND -->`` is what COMMAND prints: it is
  run and compared line by line (numbers, ports and tokens aside).
* Any other block must follow ``<!-- not-run: REASON -->`` and is skipped with that reason.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!-- (not-run|output-of): (.+?) -->$")


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    code: str
    marker: tuple[str, str] | None
    in_notebook: bool

    @property
    def id(self) -> str:
        return f"README.md:{self.line}:{self.lang or 'plain'}"


def blocks() -> list[Block]:
    found: list[Block] = []
    lines = README.read_text().splitlines()
    in_notebook = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line == "<!-- notebook:start -->":
            in_notebook = True
        elif line == "<!-- notebook:end -->":
            in_notebook = False
        fence = FENCE.match(line)
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = MARKER.match(lines[i - 1]) if i else None
        found.append(Block(line=i + 1, lang=fence.group(1), code="\n".join(lines[i + 1:end]),
                           marker=(before.group(1), before.group(2)) if before else None,
                           in_notebook=in_notebook))
        i = end + 1
    return found


BLOCKS = blocks()
SCRIPTS = [b for b in BLOCKS if b.lang == "python" and not b.in_notebook and b.marker is None]
CELLS = [b for b in BLOCKS if b.lang == "python" and b.in_notebook and b.marker is None]
OUTPUTS = [b for b in BLOCKS if b.marker is not None and b.marker[0] == "output-of"]
NOT_RUN = [b for b in BLOCKS if b.marker is not None and b.marker[0] == "not-run"]


def clean_env() -> dict[str, str]:
    drop = ("SYNTH_API_KEY", "SYNTH_BACKEND_URL", "ENVIRONMENT_API_KEY", "PYTEST_ADDOPTS")
    return {k: v for k, v in os.environ.items() if k not in drop}


def test_every_block_is_run_or_says_why_not() -> None:
    assert SCRIPTS and CELLS and OUTPUTS
    unmarked = [b.id for b in BLOCKS
                if b.lang != "python" and b.marker is None]
    assert unmarked == [], "mark these <!-- not-run: REASON --> or make them runnable"
    for block in NOT_RUN:
        assert len(block.marker[1]) > 10, f"{block.id}: say why it is not run"  # type: ignore[index]


@pytest.mark.parametrize("block", SCRIPTS, ids=lambda b: b.id)
def test_script_block_runs_as_printed(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "readme_block.py"
    script.write_text(block.code + "\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.kernel
@pytest.mark.timeout(180)
def test_notebook_blocks_run_as_printed_on_a_kernel(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(block.code) for block in CELLS]
    client = NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=clean_env())
    outputs = [(i, out) for i, c in enumerate(nb.cells) for out in c.get("outputs", [])]
    assert not [out for _, out in outputs if out.get("output_type") == "error"]
    stderr = [(CELLS[i].id, out.get("text")) for i, out in outputs
              if out.get("output_type") == "stream" and out.get("name") == "stderr"]
    assert stderr == []
    assert any("'healthy': True" in str(out.get("text", "")) for _, out in outputs)


def normalise(text: str) -> list[str]:
    text = re.sub(r"rt_[\w-]+", "rt_…", text)
    text = re.sub(r"…\S+", "…", text)
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return [line.rstrip() for line in text.strip().splitlines()]


@pytest.mark.parametrize("block", OUTPUTS, ids=lambda b: b.id)
def test_sample_output_is_what_the_command_prints(block: Block) -> None:
    assert block.marker is not None
    argv = shlex.split(block.marker[1])
    if argv[0] == "python":
        argv[0] = sys.executable
    proc = subprocess.run(argv, cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert normalise(proc.stdout) == normalise(block.code)


@pytest.mark.parametrize("block", NOT_RUN, ids=lambda b: b.id)
def test_blocks_marked_not_run(block: Block) -> None:
    assert block.marker is not None
    pytest.skip(f"{block.id} is not run: {block.marker[1]}")
