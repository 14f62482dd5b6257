"""Follow a job to its end: the SSE event stream first, polling as the fallback.

* ``GET …/events/stream`` (SSE). A dropped or ended stream is reopened with
  ``Last-Event-ID: <last seq>``; replayed events (``seq`` already seen) are skipped.
* No stream (404/405) or three failed connects in a row: poll ``…/events?since_seq=`` and
  the status every ``poll_interval`` seconds.
* The status is also read whenever a stream ends and every ``poll_interval`` seconds (at
  least 1 s) while one is open, so a job that ended while we were disconnected, or behind a
  stream gone silent, is noticed.
* A terminal event or a terminal status ends it; then the final status is read once and the
  terminal event's status overrides its ``status`` (as synth-ai 0.9.11 does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import httpx

from .backend import JobBackend, JobError
from .events import TERMINAL_STATUSES, JobEventFeed, final_state, terminal_status_of

__all__ = ["follow_job"]

logger = logging.getLogger(__name__)

_MAX_READ_ERRORS = 5
_MAX_STREAM_FAILURES = 3
_RECONNECT_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0)

StatusCallback = Callable[[dict[str, Any]], None]


class _Follower:
    def __init__(
        self,
        backend: JobBackend,
        job_id: str,
        feed: JobEventFeed,
        *,
        poll_interval: float,
        on_status: StatusCallback | None,
        on_event: StatusCallback | None,
    ) -> None:
        self.backend = backend
        self.job_id = job_id
        self.feed = feed
        self.poll_interval = poll_interval
        self.on_status = on_status
        self.on_event = on_event
        self.terminal: str | None = None
        self.last_status: dict[str, Any] = {}
        self.read_errors = 0
        #: How the job was followed: stream connects, reconnects with Last-Event-ID, polls.
        self.stats = {"streams": 0, "resumed": 0, "polls": 0}

    async def run(self) -> dict[str, Any]:
        stream_failures = 0
        use_stream = True
        while self.terminal is None:
            if use_stream:
                ended_cleanly = await self._stream_once()
                if self.terminal is not None:
                    break
                if ended_cleanly is None:
                    use_stream = False
                    logger.info("Job %s: no event stream; polling every %gs", self.job_id,
                                self.poll_interval)
                    continue
                stream_failures = 0 if ended_cleanly else stream_failures + 1
                if stream_failures >= _MAX_STREAM_FAILURES:
                    use_stream = False
                    logger.info("Job %s: the event stream keeps failing; polling instead",
                                self.job_id)
                if await self._read_status():
                    break
                await asyncio.sleep(_RECONNECT_DELAYS[min(stream_failures,
                                                          len(_RECONNECT_DELAYS) - 1)])
            else:
                await self._poll_events()
                if self.terminal is not None or await self._read_status():
                    break
                await asyncio.sleep(self.poll_interval)
        return await self._final_status()

    async def _stream_once(self) -> bool | None:
        """One SSE connection, with the status read every ``poll_interval`` (at least 1 s)
        meanwhile, so a stream that goes silent cannot hide the end of the job.
        True: ended (by the server, a terminal event or status); False: failed; None: no
        stream."""
        reader = asyncio.ensure_future(self._read_stream())
        try:
            while True:
                done, _ = await asyncio.wait({reader}, timeout=max(self.poll_interval, 1.0))
                if done:
                    return reader.result()
                if await self._read_status():
                    return True
        finally:
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def _read_stream(self) -> bool | None:
        last = self.feed.last_seq or None
        self.stats["streams"] += 1
        if last:
            self.stats["resumed"] += 1
        try:
            async for event in self.backend.stream(self.job_id, last):
                self._apply(event)
                if self.terminal is not None:
                    return True
        except LookupError:
            return None
        except (httpx.TransportError, httpx.HTTPStatusError) as exc:
            logger.info("Job %s: event stream interrupted (%s); reconnecting", self.job_id,
                        type(exc).__name__)
            return False
        return True

    async def _poll_events(self) -> None:
        self.stats["polls"] += 1
        try:
            events = await self.backend.events(self.job_id, self.feed.last_seq)
        except (httpx.TransportError, httpx.HTTPStatusError, JobError) as exc:
            logger.debug("Job %s: reading events failed: %s", self.job_id, exc)
            return
        for event in sorted(events, key=lambda e: e.get("seq") or 0):
            self._apply(event)
            if self.terminal is not None:
                return

    def _apply(self, event: dict[str, Any]) -> None:
        if not self.feed.event(event):
            return
        if self.on_event is not None:
            _call(self.on_event, self.feed.scrub_document(event), "on_event")
        terminal = terminal_status_of(event)
        if terminal is not None:
            logger.info("Job %s: terminal event %s", self.job_id, event.get("type"))
            self.terminal = terminal

    async def _read_status(self) -> bool:
        """Read the status; True when it is terminal."""
        try:
            status = await self.backend.status(self.job_id)
        except (httpx.TransportError, httpx.HTTPStatusError) as exc:
            self.read_errors += 1
            logger.warning("Reading job %s failed (%d/%d): %s", self.job_id, self.read_errors,
                           _MAX_READ_ERRORS, type(exc).__name__)
            if self.read_errors >= _MAX_READ_ERRORS:
                raise JobError(f"Reading job {self.job_id} failed {self.read_errors} times in "
                               f"a row: {exc}") from exc
            return False
        self.read_errors = 0
        self._status(status)
        word = str(status.get("status") or status.get("state") or "").lower()
        if word in TERMINAL_STATUSES:
            self.terminal = final_state(word)
            return True
        return False

    def _status(self, status: dict[str, Any]) -> None:
        self.last_status = status
        self.feed.status(status)
        if self.on_status is not None:
            _call(self.on_status, self.feed.scrub_document(status), "on_status")

    async def _final_status(self) -> dict[str, Any]:
        for attempt in range(3):
            try:
                status = await self.backend.status(self.job_id)
            except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                logger.warning("Final status of job %s: %s", self.job_id, type(exc).__name__)
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            self._status(status)
            break
        final = dict(self.last_status) or {"job_id": self.job_id}
        if self.terminal is not None:
            final["status"] = self.terminal
        return final


def _call(callback: StatusCallback, doc: dict[str, Any], label: str) -> None:
    try:
        callback(doc)
    except Exception:  # a user callback never breaks the job
        logger.warning("%s callback raised; ignoring", label, exc_info=True)


async def follow_job(
    backend: JobBackend,
    job_id: str,
    feed: JobEventFeed,
    *,
    poll_interval: float = 5.0,
    on_status: StatusCallback | None = None,
    on_event: StatusCallback | None = None,
    stats: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Follow ``job_id`` until it ends; the final status (``status`` from the terminal event).

    ``stats``, when given, is filled with how many streams, resumed streams and polls it
    took (the caller bounds the time with ``asyncio.timeout``).
    """
    follower = _Follower(backend, job_id, feed, poll_interval=poll_interval,
                         on_status=on_status, on_event=on_event)
    try:
        return await follower.run()
    finally:
        if stats is not None:
            stats.update(follower.stats)
