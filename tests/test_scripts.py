"""scripts/test on a machine where the browser cannot be installed: everything else runs,
and it says what it skipped and why; under CI=true the same gap is an error.

A stand-in ``apt-get`` on PATH fails the way apt-get does without the Debian archive (exit
100), and ``TASKAPP_CHROMIUM`` points at a chromium that does not exist.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def no_browser_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    fake_apt = tmp_path / "apt-get"
    fake_apt.write_text("#!/bin/sh\necho 'E: The repository is not reachable' >&2\nexit 100\n")
    fake_apt.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env.update(PATH=f"{tmp_path}{os.pathsep}{env['PATH']}",
               TASKAPP_CHROMIUM=str(tmp_path / "no-chromium"), **extra)
    return env


def test_without_a_browser_everything_else_runs_and_the_skip_is_explained(
    tmp_path: Path,
) -> None:
    proc = subprocess.run(
        ["scripts/test", "-q", "-p", "no:cacheprovider", "tests/test_layering.py",
         "tests/e2e/test_notebook7.py"],
        cwd=ROOT, env=no_browser_env(tmp_path), capture_output=True, text=True, timeout=280,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for step in ("==> ruff", "==> mypy", "==> pytest"):
        assert step in out, out
    assert "apt-get could not install chromium (exit 100" in out, out
    assert "The repository is not reachable" in out, out
    tail = out[out.index("==> pytest"):]
    assert "==> skipped on this machine" in tail, tail
    assert "browser tests (tests/e2e): apt-get could not install chromium" in tail, tail
    assert "SKIPPED" in tail and "is not installed; run scripts/install-browser-deps" in tail
    assert " passed" in tail


def test_under_ci_a_missing_browser_fails_loudly(tmp_path: Path) -> None:
    env = no_browser_env(tmp_path, CI="true")
    proc = subprocess.run(["scripts/install-browser-deps"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "CI=true: the browser tests must run" in proc.stderr
    proc = subprocess.run(
        [str(ROOT / ".venv/bin/python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/e2e/test_notebook7.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stdout
    assert "CI=true runs the browser tests" in proc.stdout and "SKIPPED" not in proc.stdout
