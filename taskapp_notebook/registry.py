"""Every running InProcessTaskApp, the one stop-all (sync and async), and the
process-level hooks that stop them.

The registry knows apps only through :class:`ManagedApp` (what it calls on them), so it does
not import the runner: the runner registers itself here, never the other way round.

Hooks are installed on the first start, never at import:

* SIGTERM (and SIGINT outside an IPython kernel): stop every app, then hand the signal to
  the handler that was there before (so Ctrl-C still raises KeyboardInterrupt). Inside a
  kernel SIGINT means "interrupt the cell" and must not stop apps.
* atexit: stop whatever is still running.
"""

from __future__ import annotations

import atexit
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import asyncio
    import concurrent.futures

logger = logging.getLogger(__name__)

#: How long :func:`astop_all` waits by default before giving up on the apps still stopping.
STOP_ALL_TIMEOUT = 30.0


class ManagedApp(Protocol):
    """What the registry needs from a running app (``InProcessTaskApp`` is one)."""

    name: str
    port: int

    def stop(self) -> None: ...

    async def astop(self) -> None: ...

    def stop_from_signal(self) -> concurrent.futures.Future[None] | None: ...


_lock = threading.RLock()
_instances: list[Any] = []
_previous_handlers: dict[int, Any] = {}
_hooks_installed = False


def register(app: ManagedApp) -> None:
    with _lock:
        if app not in _instances:
            _instances.append(app)
    install_hooks()


def unregister(app: ManagedApp) -> None:
    with _lock:
        if app in _instances:
            _instances.remove(app)


def running() -> list[Any]:
    """The apps (``InProcessTaskApp``) started and not yet stopped, oldest first."""
    with _lock:
        return list(_instances)


def find_by_port(port: int) -> Any | None:
    """The running app on ``port``, if any."""
    for app in running():
        if app.port == port:
            return app
    return None


def stop_all() -> None:
    """Stop every running app, from sync code (newest first). Never raises."""
    for app in reversed(running()):
        try:
            app.stop()
        except Exception:  # noqa: BLE001 - shutdown must go on
            logger.warning("Error while stopping %r", app, exc_info=True)


async def astop_all(timeout: float = STOP_ALL_TIMEOUT) -> None:
    """Stop every running app, from async code: concurrently, giving up after ``timeout``
    seconds (the apps still stopping then finish on their own). Never raises."""
    import asyncio

    apps = running()
    if not apps:
        return
    logger.info("Stopping %d task app(s)", len(apps))
    results = asyncio.gather(*(app.astop() for app in apps), return_exceptions=True)
    try:
        for app, result in zip(apps, await asyncio.wait_for(results, timeout), strict=True):
            if isinstance(result, BaseException):
                logger.warning("Error while stopping %r: %s", app, result)
    except TimeoutError:
        logger.warning("Task apps did not stop within %.1f s; going on without them", timeout)


def install_hooks() -> None:
    """Install the atexit and signal hooks once (signals only from the main thread)."""
    global _hooks_installed
    with _lock:
        if _hooks_installed:
            return
        _hooks_installed = True
    atexit.register(stop_all)
    if threading.current_thread() is not threading.main_thread():
        logger.debug("Not in the main thread: signal handlers not installed")
        return
    from .loops import in_ipython_kernel

    signals = [signal.SIGTERM]
    if not in_ipython_kernel():
        signals.append(signal.SIGINT)
    for sig in signals:
        try:
            previous = signal.getsignal(sig)
            if previous == signal.SIG_IGN:
                continue  # the process ignores it on purpose (nohup, background job)
            _previous_handlers[sig] = previous
            signal.signal(sig, _handle_signal)
        except (ValueError, OSError):  # pragma: no cover - exotic embedders
            logger.debug("Could not install a handler for %s", sig, exc_info=True)
    logger.debug("Signal handlers installed for %s", [s.name for s in signals])


def _handle_signal(signum: int, frame: FrameType | None) -> None:
    apps = running()
    if apps:
        logger.info("Received %s: stopping %d task app(s)", signal.Signals(signum).name,
                    len(apps))
    pending: list[concurrent.futures.Future[None]] = []
    for app in reversed(apps):
        try:
            stopping = app.stop_from_signal()
        except Exception:  # noqa: BLE001
            logger.warning("Error while stopping %r on a signal", app, exc_info=True)
        else:
            if stopping is not None:
                pending.append(stopping)
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    loop = _running_loop()
    if pending and loop is not None and (
        previous is signal.default_int_handler or previous == signal.SIG_DFL
    ):
        # The signal interrupted the loop those apps serve on. Raising here would abort the
        # loop mid-stop (asyncio.run then cancels the app's lifespan shutdown); raise from
        # the loop once the stops are done instead.
        exc = KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)
        loop.call_soon_threadsafe(loop.create_task, _raise_when_stopped(pending, exc))
        return
    if callable(previous):
        handler: Callable[[int, FrameType | None], Any] = previous
        handler(signum, frame)
    elif previous == signal.SIG_IGN:
        return
    elif signum == signal.SIGINT:
        raise KeyboardInterrupt
    else:
        # Default action for SIGTERM is to die; exit through Python so ``with`` blocks,
        # ``finally`` and atexit run, with the shell's conventional status.
        raise SystemExit(128 + signum)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    import asyncio  # not at import: %load_ext stays cheap outside a kernel

    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _raise_when_stopped(
    pending: list[concurrent.futures.Future[None]], exc: BaseException
) -> None:
    import asyncio

    await asyncio.wait([asyncio.wrap_future(f) for f in pending], timeout=30.0)
    asyncio.get_running_loop().call_soon(_raise, exc)  # out of run_forever, not a task


def _raise(exc: BaseException) -> None:
    raise exc


def uninstall_hooks() -> None:
    """Restore the previous signal handlers (used by tests and %unload_ext)."""
    global _hooks_installed
    with _lock:
        if threading.current_thread() is threading.main_thread():
            for sig, previous in _previous_handlers.items():
                if signal.getsignal(sig) is _handle_signal:
                    signal.signal(sig, previous)
        _previous_handlers.clear()
        atexit.unregister(stop_all)
        _hooks_installed = False
