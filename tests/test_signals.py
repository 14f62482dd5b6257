"""SIGTERM / SIGINT against real scripts that use InProcessTaskApp (in subprocesses).

registry.py documents the outcome: every running app is stopped gracefully (the app's
lifespan shutdown runs, the port is freed), then the signal goes to the handler that was
there before. With Python's defaults that means SIGTERM exits through ``SystemExit`` with
status 128 + 15 = 143 (``finally`` and ``with`` exits run) and SIGINT raises
KeyboardInterrupt. Handlers are installed on the first start, never at import.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import port_is_free

SCRIPTS = Path(__file__).parent / "scripts"


@dataclass
class Outcome:
    returncode: int
    lines: list[str]
    stderr: str


def run_until_signal(
    mode: str, port: int, sig: signal.Signals, preexec: Callable[[], Any] | None = None
) -> Outcome:
    """Start signal_app.py, wait until it serves, send ``sig``, collect its output."""
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "signal_app.py"), mode, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec,
    )
    try:
        assert proc.stdout is not None
        first = [proc.stdout.readline().strip(), proc.stdout.readline().strip()]
        if first[0] != "ready":
            out, err = proc.communicate(timeout=10)
            pytest.fail(f"script did not start: {first} {out} {err}")
        assert not port_is_free(port)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return Outcome(proc.returncode, first + out.splitlines(), err)


def assert_graceful(outcome: Outcome, port: int) -> None:
    lines = outcome.lines
    assert "lifespan shutdown" in lines, outcome
    # The with-block's exit and the outermost finally both ran, after the app stopped and
    # with the port already free.
    assert "cleanup with state=stopped port_free=True" in lines, outcome
    assert lines[-1] == "cleanup finally state=stopped port_free=True", outcome
    assert lines.index("lifespan shutdown") < lines.index(
        "cleanup with state=stopped port_free=True"
    )
    assert port_is_free(port)
    for noise in ("Task was destroyed", "never retrieved", "Exception in", "ERROR"):
        assert noise not in outcome.stderr, outcome.stderr


@pytest.mark.parametrize("mode", ["thread", "loop"])
def test_sigterm_stops_gracefully_and_exits_143(mode: str, port: int) -> None:
    outcome = run_until_signal(mode, port, signal.SIGTERM)
    assert outcome.lines[1] == "handlers SIGINT=ours SIGTERM=ours"
    assert_graceful(outcome, port)
    assert "KeyboardInterrupt" not in outcome.lines
    assert outcome.returncode == 128 + signal.SIGTERM  # SystemExit(143), as documented
    assert outcome.stderr == ""


@pytest.mark.parametrize("mode", ["thread", "loop"])
def test_sigint_stops_gracefully_then_raises_keyboard_interrupt(mode: str, port: int) -> None:
    outcome = run_until_signal(mode, port, signal.SIGINT)
    assert_graceful(outcome, port)
    lines = outcome.lines
    assert "KeyboardInterrupt" in lines, outcome
    assert lines.index("cleanup with state=stopped port_free=True") < lines.index(
        "KeyboardInterrupt"
    )
    # An uncaught KeyboardInterrupt makes Python exit by SIGINT.
    assert outcome.returncode == -signal.SIGINT
    assert outcome.stderr.rstrip().endswith("KeyboardInterrupt"), outcome.stderr


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_an_ignored_sigint_stays_ignored(port: int) -> None:
    """A process started with SIGINT ignored (nohup, ``cmd &``) keeps ignoring it."""
    outcome = run_until_signal("thread", port, signal.SIGTERM, preexec=_ignore_sigint)
    assert outcome.lines[1] == "handlers SIGINT=ignored SIGTERM=ours"
    assert_graceful(outcome, port)
    assert outcome.returncode == 143


def test_handlers_not_installed_at_import_and_chain_to_the_previous_one(port: int) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "signal_chain.py"), str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["unchanged_by_import"] is True
    assert result["unchanged_by_stop_all"] is True
    assert result["installed_on_start"] is True
    assert result["running_before_signal"] is True
    # Our handler stopped the app, then called the script's own SIGTERM handler, which
    # does not exit: the process lives on.
    assert result["mine_calls"] == [signal.SIGTERM]
    assert result["state_after_signal"] == "stopped"
    assert result["port_free_after_signal"] is True
    assert result["still_alive"] is True
    assert result["restored"] == {"SIGTERM": True, "SIGINT": True}
    assert port_is_free(port)
