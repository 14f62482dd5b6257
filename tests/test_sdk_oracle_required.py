"""In CI the SDK interop tests fail, not skip, when ``.venv-sdk`` is missing; elsewhere they
skip with the reason. Runs ``tests/test_sdk_interop.py`` in a child pytest with
``TASKAPP_SDK_PYTHON`` pointing at a path that does not exist."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_interop(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["TASKAPP_SDK_PYTHON"] = str(tmp_path / "no-sdk-venv" / "python")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "attaches_as_documented",
            "tests/test_sdk_interop.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_sdk_venv_fails_in_ci(tmp_path: Path, ci: str) -> None:
    result = run_interop(tmp_path, ci)
    assert result.returncode == 1, result.stdout
    assert "scripts/sdk-venv could not install synth-ai 0.9.11" in result.stdout
    assert "1 error" in result.stdout or "1 failed" in result.stdout


def test_missing_sdk_venv_skips_with_a_reason_elsewhere(tmp_path: Path) -> None:
    result = run_interop(tmp_path, None)
    assert result.returncode == 0 and "1 skipped" in result.stdout, result.stdout
