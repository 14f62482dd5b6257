"""Tunnels provided by a child process: the process handling, independent of cloudflared.

:class:`ManagedProcess` owns one child; :class:`SubprocessTunnel` is the lifecycle of a
tunnel backend built on one (status, deadline loop, errors with log lines, DOWN on exit).

Behaviour (see ``docs/kernel-facts.md`` facts 4, 5 and 9):

* The child runs in its **own session** (``start_new_session=True``), so "Interrupt kernel"
  (SIGINT to the kernel's process group) and ipykernel's shutdown sweep of its group do not
  reach it. We stop it ourselves.
* On Linux the child also gets a **parent-death signal** (``prctl(PR_SET_PDEATHSIG,
  SIGTERM)``), so a SIGKILLed kernel leaves no orphan. Linux sends it when the *thread* that
  spawned the child exits, so :meth:`ManagedProcess.start` must run on a long-lived thread
  (the event loop's thread), never on a short-lived worker. Other platforms have no such
  signal: there an abrupt kill of the parent can leave the child running.
* A daemon reader thread keeps the last ``max_lines`` lines of stdout+stderr (merged) in a
  bounded deque, with every secret replaced by its masked form before it is stored.
* :meth:`ManagedProcess.stop` sends SIGTERM, waits ``timeout`` seconds, then SIGKILLs, and
  always reaps the child. Children still running at interpreter exit are stopped by an
  ``atexit`` hook, a safety net behind the runner's own shutdown hooks (fact 5).
* Once open, a child that stays alive but loses its upstream connection moves the status
  CONNECTED → RECONNECTING (:meth:`SubprocessTunnel._link_lost`), → DOWN after
  ``down_after`` seconds without one, and back to CONNECTED when one returns
  (:meth:`SubprocessTunnel._link_restored`). Subclasses decide what "lost" means (log lines,
  a health endpoint); every transition happens on the event loop's thread and is reported
  once through ``ctx.on_event``. A child that exits is DOWN for good.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO

from ..errors import TunnelError, scrub_secrets
from .base import TunnelContext, TunnelState, TunnelStatus

logger = logging.getLogger(__name__)

__all__ = ["ManagedProcess", "SubprocessTunnel", "parent_death_preexec"]

_PR_SET_PDEATHSIG = 1
_running: set[ManagedProcess] = set()
_running_lock = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    with _running_lock:
        leftovers = list(_running)
    for proc in leftovers:
        with contextlib.suppress(Exception):
            proc.stop(timeout=1.0)


def parent_death_preexec(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to send ``sig`` to the child when we die.

    Returns None where that is not available (non-Linux, no libc ``prctl``).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


class ManagedProcess:
    """One child process we own from start to reaping."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        name: str = "subprocess",
        max_lines: int = 60,
        secrets: Sequence[str] = (),
        on_line: Callable[[str], None] | None = None,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.name = name
        self._env = dict(env) if env is not None else None
        self._secrets = [s for s in secrets if s]
        self._on_line = on_line
        self._on_exit = on_exit
        self._lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._lock = threading.Lock()
        self._popen: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._stopping = False

    # -- state -----------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit status once reaped (negative: killed by that signal), else None."""
        return self._popen.returncode if self._popen is not None else None

    def poll(self) -> int | None:
        """Return the exit status if the child has exited, else None (never blocks)."""
        return self._popen.poll() if self._popen is not None else None

    def log_lines(self) -> list[str]:
        """The last lines the child printed (secrets masked), oldest first."""
        with self._lock:
            return list(self._lines)

    @property
    def secrets(self) -> tuple[str, ...]:
        """The secrets this child was given (masked in its log lines and errors)."""
        return tuple(self._secrets)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the child and its reader thread. Raises OSError if it cannot be spawned."""
        if self._popen is not None:
            raise RuntimeError(f"{self.name} was already started")
        self._popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self._env,
            start_new_session=True,
            preexec_fn=parent_death_preexec(),
            close_fds=True,
        )
        with _running_lock:
            _running.add(self)
        assert self._popen.stdout is not None
        self._reader = threading.Thread(
            target=self._read,
            args=(self._popen, self._popen.stdout),
            name=f"{self.name}-reader-{self._popen.pid}",
            daemon=True,
        )
        self._reader.start()
        logger.debug("Started %s (pid %s): %s", self.name, self._popen.pid, self.argv[1:])

    def _read(self, popen: subprocess.Popen[bytes], pipe: IO[bytes]) -> None:
        with pipe:
            for raw in iter(pipe.readline, b""):
                line = scrub_secrets(raw.decode("utf-8", "replace").rstrip(), self._secrets)
                if not line:
                    continue
                with self._lock:
                    self._lines.append(line)
                logger.debug("%s[%s]: %s", self.name, popen.pid, line)
                if self._on_line is not None:
                    try:
                        self._on_line(line)
                    except Exception:  # a callback must not kill the reader
                        logger.exception("%s line callback failed", self.name)
        code = popen.wait()
        if not self._stopping and self._on_exit is not None:
            try:
                self._on_exit(code)
            except Exception:
                logger.exception("%s exit callback failed", self.name)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; always reap. Idempotent."""
        popen = self._popen
        if popen is None:
            return None
        self._stopping = True
        if popen.returncode is None:
            self._signal(popen, signal.SIGTERM)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s (pid %s) ignored SIGTERM for %.1fs; sending SIGKILL",
                    self.name,
                    popen.pid,
                    timeout,
                )
                self._signal(popen, signal.SIGKILL)
                popen.wait()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=2.0)
        with _running_lock:
            _running.discard(self)
        logger.debug("%s (pid %s) exited with %s", self.name, popen.pid, popen.returncode)
        return popen.returncode

    @staticmethod
    def _signal(popen: subprocess.Popen[bytes], sig: int) -> None:
        try:
            popen.send_signal(sig)
        except ProcessLookupError:
            pass


class SubprocessTunnel:
    """Lifecycle shared by tunnel backends that run one child process.

    Subclasses set ``mode``/``process_name``/``fatal_phrases`` and implement
    :meth:`_probe` (URL and readiness), :meth:`_explain` and :meth:`_not_ready`.
    """

    mode = "subprocess"
    process_name = "subprocess"
    #: Lower-case phrases in the child's output after which it cannot succeed.
    fatal_phrases: tuple[str, ...] = ()

    #: Seconds in RECONNECTING (no live connection) before the status becomes DOWN.
    DEFAULT_DOWN_AFTER = 60.0

    def __init__(
        self,
        *,
        timeout: float | None = None,
        stop_timeout: float = 5.0,
        down_after: float | None = None,
    ) -> None:
        self.url: str | None = None
        self.worker_token: str | None = None
        self.status = TunnelStatus()
        self.timeout = timeout
        self.stop_timeout = stop_timeout
        self.down_after = self.DEFAULT_DOWN_AFTER if down_after is None else down_after
        self.process: ManagedProcess | None = None
        self._ctx: TunnelContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fatal: str | None = None
        self._closed = False
        self._opened = False  # open() succeeded: live state tracking applies from here on
        self._down_reported = False  # the child exited after opening: DOWN for good
        self._down_timer: asyncio.TimerHandle | None = None

    def verification_headers(self) -> dict[str, str]:
        """The child forwards headers unchanged, so callers send the app's own key."""
        return {"X-API-Key": self._ctx.api_key} if self._ctx is not None else {}

    async def close(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL) and reap it. Idempotent; never raises."""
        self._closed = True
        self._stop_watching()
        proc = self.process
        if proc is not None:
            try:
                await asyncio.to_thread(proc.stop, self.stop_timeout)
            except Exception:  # e.g. the loop's executor is already shut down
                with contextlib.suppress(Exception):
                    proc.stop(self.stop_timeout)
        self.status.set(TunnelState.CLOSED)

    def close_sync(self) -> None:
        """Blocking :meth:`close` for atexit and signal handlers."""
        self._closed = True
        self._stop_watching()
        if self.process is not None:
            with contextlib.suppress(Exception):
                self.process.stop(self.stop_timeout)
        self.status.set(TunnelState.CLOSED)

    # -- hooks -----------------------------------------------------------------------------

    async def _probe(self) -> tuple[str | None, bool]:
        """(public URL or None, ready?) — polled until both are there."""
        raise NotImplementedError

    def _explain(self, line: str) -> str:
        """A sentence for a fatal output line."""
        return f"{self.process_name} reported a fatal error: {line.strip()!r}."

    def _not_ready(self, url: str | None, ready: bool, timeout: float) -> str:
        """The message when the deadline passes."""
        return f"{self.process_name} did not become ready within {timeout:g}s; it was stopped."

    def _on_line(self, line: str) -> None:  # reader thread
        if self._fatal is None and any(p in line.lower() for p in self.fatal_phrases):
            self._fatal = line

    # -- machinery -------------------------------------------------------------------------

    def _error(self, message: str) -> TunnelError:
        """A TunnelError carrying the child's last lines; sets status DOWN."""
        lines = self.process.log_lines() if self.process is not None else []
        if self.process is not None:
            message = scrub_secrets(message, self.process.secrets)
        final = TunnelState.CLOSED if self._closed else TunnelState.DOWN
        self.status.set(final, message.splitlines()[0])
        return TunnelError(message, log_lines=lines)

    def _exited(self, code: int) -> TunnelError:
        lines = self.process.log_lines() if self.process is not None else []
        fatal = next((ln for ln in lines if any(p in ln.lower() for p in self.fatal_phrases)), None)
        why = self._explain(fatal) if fatal else "See its last log lines below."
        return self._error(f"{self.process_name} exited with code {code} before connecting. {why}")

    def _on_exit(self, code: int) -> None:  # reader thread, unexpected exits only
        if self._closed or self._down_reported or not self._opened:
            return  # exits before the tunnel opened are reported by _start_and_wait
        self._down_reported = True
        pid = self.process.pid if self.process is not None else "?"
        message = f"{self.process_name} (pid {pid}) exited with code {code}; {self.url} is down."
        logger.warning("%s", message)

        def report() -> None:
            self._cancel_down_timer()
            if self._closed:
                return
            self.status.set(TunnelState.DOWN, message)
            if self._ctx is not None:
                self._ctx.on_event(message)

        self._in_loop(report)

    # -- live state while the child runs (all on the loop's thread) -------------------------

    def _in_loop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the tunnel's event loop (from any thread), in call order; inline when
        that loop is gone (then nothing else runs concurrently with it)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed between the check and the call
                loop.call_soon_threadsafe(fn)
                return
        fn()

    def _tracking(self) -> bool:
        """Whether connection signals may move the status now."""
        return self._opened and not self._closed and not self._down_reported

    def _emit(self, line: str) -> None:
        logger.warning("%s", line)
        if self._ctx is not None:
            self._ctx.on_event(line)

    def _link_lost(self, why: str) -> None:
        """CONNECTED → RECONNECTING (``why``: the child's own line or signal saying so)."""
        if not self._tracking() or self.status.state is not TunnelState.CONNECTED:
            return
        why = why.strip()[:500]
        self.status.set(TunnelState.RECONNECTING, why)
        self._emit(
            f"{self.process_name}: the {self.mode} tunnel {self.url} lost its connection and "
            f"is reconnecting: {why}"
        )
        self._cancel_down_timer()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            self._down_timer = loop.call_later(self.down_after, self._link_down)

    def _link_down(self) -> None:
        """RECONNECTING → DOWN once ``down_after`` seconds passed without a connection."""
        self._down_timer = None
        if not self._tracking() or self.status.state is not TunnelState.RECONNECTING:
            return
        last = self.status.last_error
        self.status.set(
            TunnelState.DOWN,
            f"no connection for {self.down_after:g}s" + (f" (last: {last})" if last else ""),
        )
        self._emit(
            f"{self.process_name}: the {self.mode} tunnel {self.url} has had no connection for "
            f"{self.down_after:g}s and is down ({self.process_name} keeps retrying)."
        )

    def _link_restored(self, why: str) -> None:
        """RECONNECTING or DOWN → CONNECTED (``why``: what said a connection is back)."""
        if not self._tracking():
            return
        if self.status.state not in (TunnelState.RECONNECTING, TunnelState.DOWN):
            return
        self._cancel_down_timer()
        self.status.set(TunnelState.CONNECTED)
        self._emit(
            f"{self.process_name}: the {self.mode} tunnel {self.url} is connected again: "
            f"{why.strip()[:500]}"
        )

    def _cancel_down_timer(self) -> None:
        timer, self._down_timer = self._down_timer, None
        if timer is not None:
            self._cancel_on_loop(self._loop, timer.cancel)

    @staticmethod
    def _cancel_on_loop(
        loop: asyncio.AbstractEventLoop | None, cancel: Callable[[], object]
    ) -> None:
        """Call ``cancel`` (a timer's or task's) on ``loop``'s thread, or directly when we are
        on that loop or it is not running."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or loop is running or loop.is_closed() or not loop.is_running():
            cancel()
            return
        try:
            loop.call_soon_threadsafe(cancel)
        except RuntimeError:  # closed meanwhile
            cancel()

    def _stop_watching(self) -> None:
        """Stop live tracking (close paths; any thread). Subclasses also stop their pollers."""
        self._cancel_down_timer()

    async def _start_and_wait(
        self,
        ctx: TunnelContext,
        argv: list[str],
        env: Mapping[str, str],
        secrets: Sequence[str] = (),
        install_hint: str = "",
    ) -> str:
        """Start the child and poll :meth:`_probe` until URL and readiness, or fail."""
        timeout = self.timeout if self.timeout is not None else 30.0
        self._ctx, self._loop = ctx, asyncio.get_running_loop()
        self.status.set(TunnelState.CONNECTING)
        proc = ManagedProcess(
            argv,
            env=env,
            name=self.process_name,
            secrets=secrets,
            on_line=self._on_line,
            on_exit=self._on_exit,
        )
        try:
            proc.start()  # on the loop's (long-lived) thread: PDEATHSIG follows the thread
        except OSError as exc:
            raise self._error(f"Could not start {argv[0]!r}: {exc}. {install_hint}") from exc
        self.process = proc
        ctx.on_event(f"{self.process_name} started (pid {proc.pid})")
        try:
            url = await self._wait(proc, timeout)
        except BaseException:
            proc.stop(self.stop_timeout)
            if self.status.state is TunnelState.CONNECTING:
                self.status.set(TunnelState.DOWN, "opening the tunnel was cancelled")
            raise
        self.url = url
        self.status.set(TunnelState.CONNECTED)
        self._opened = True
        if proc.returncode is not None:  # died between the last poll and now
            self._on_exit(proc.returncode)
        return url

    async def _wait(self, proc: ManagedProcess, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            if self._closed:
                proc.stop(self.stop_timeout)
                raise self._error(f"The {self.mode} tunnel was closed while it was connecting.")
            if self._fatal is not None:
                proc.stop(self.stop_timeout)
                raise self._error(self._explain(self._fatal))
            code = proc.poll()
            if code is not None:
                proc.stop(self.stop_timeout)  # reap and join the reader: full log tail
                raise self._exited(code)
            url, ready = await self._probe()
            if url and ready:
                return url
            if time.monotonic() >= deadline:
                proc.stop(self.stop_timeout)
                raise self._error(self._not_ready(url, ready, timeout))
            await asyncio.sleep(0.2)
