"""Event-loop plumbing: a dedicated server thread, and waiting from sync code.

``LoopThread`` is the home of ``serve_on="thread"`` apps. ``run_sync`` lets a synchronous
caller (``start()``, a magic, a widget button) wait for a coroutine on the instance's loop,
wherever the caller is: on that loop's thread while it runs (a notebook cell — nest-asyncio2,
applied lazily and only then), on another thread, or with no loop running at all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sys
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The loop running in this thread, or None."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def in_ipython_kernel() -> bool:
    """True inside a Jupyter (ipykernel) kernel: ``serve_on="auto"`` then serves on its loop,
    and SIGINT means "interrupt the cell" rather than "stop the apps"."""
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class LoopThread:
    """A daemon thread running its own event loop until ``close()``."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self, timeout: float = 10.0) -> None:
        """Let pending tasks finish (up to ``timeout``), cancel the rest, stop, join."""
        if self.loop.is_closed():
            return
        if threading.current_thread() is self.thread:
            raise RuntimeError("LoopThread.close() called from its own thread")
        if self.thread.is_alive():
            drained = self.submit(self._drain(timeout))
            with contextlib.suppress(Exception):
                drained.result(timeout + 1.0)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)
        if not self.thread.is_alive():
            self.loop.close()
        else:  # pragma: no cover - a task refused to finish
            logger.warning("Server thread %s did not stop in %.1f s", self.thread.name, timeout)

    async def _drain(self, timeout: float) -> None:
        # Our own work has finished when close() is called; what is left are tasks the app
        # spawned. Give them a short grace, then cancel them.
        me = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not me]
        if pending:
            _, still = await asyncio.wait(pending, timeout=min(timeout, 1.0))
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=1.0)
        await self.loop.shutdown_asyncgens()
        await self.loop.shutdown_default_executor()


def run_sync(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, T],
    timeout: float | None = None,
    *,
    finish_on_interrupt: bool = False,
) -> T:
    """Run ``coro`` on ``loop`` and wait for its result from synchronous code.

    When the wait is interrupted (KeyboardInterrupt from "Interrupt kernel") while nested on
    the loop's own thread, the coroutine is cancelled and run to the end of its cleanup —
    or, with ``finish_on_interrupt`` (stops), simply run to its end — before the interrupt
    propagates, so it never keeps running unseen.
    """
    if loop.is_closed():
        coro.close()
        raise RuntimeError("The event loop of this task app is closed.")
    here = running_loop()
    if here is loop:
        # A notebook cell (or sync callback) on the loop's own thread: nest.
        make_reentrant(loop)
        task = asyncio.ensure_future(coro, loop=loop)
        try:
            return loop.run_until_complete(task)
        except BaseException:
            if not task.done():
                if not finish_on_interrupt:
                    task.cancel()
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(task)
            raise
    if loop.is_running():
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)
    if here is not None:
        # Another loop runs in this thread; ``loop`` is idle. Drive it from a helper thread.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(loop.run_until_complete, coro).result(timeout)
    return loop.run_until_complete(coro)


def make_reentrant(loop: asyncio.AbstractEventLoop) -> None:
    """Let ``loop.run_until_complete`` nest inside ``loop`` (nest-asyncio2), lazily.

    nest-asyncio2 also replaces ``asyncio.run`` with a version that, on Python < 3.12, never
    closes the loop it makes (each ``asyncio.run`` in a thread would leak a loop and its
    sockets). We need only the loop patch, so unless the user patched asyncio themselves,
    ``asyncio.run`` is put back as it was.
    """
    import nest_asyncio2

    user_patched = hasattr(asyncio, "_nest_patched")
    original_run = asyncio.run
    nest_asyncio2.apply(loop, run_close_loop=True)
    if not user_patched:
        asyncio.run = original_run
