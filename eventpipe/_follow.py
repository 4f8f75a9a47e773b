"""Following a log as it grows: a blocking iterator and an async iterator on one notifier.

:meth:`Follower.chunks` is the one blocking follow loop (read to the end, check the log is still
there, wait for a hint or the poll interval): records are decoded from it, and
``eventpipe read --follow`` prints its raw lines. The async iterator is its twin for event
loops. A consumer has its own loop (checkpoints, standby and handler errors interleave with
the waits there, for threads and event loops alike: see ``_consumer``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

from ._changes import ChangeNotifier
from ._layout import HEAD_FILE

if TYPE_CHECKING:
    from ._log import EventLog
    from ._record import Record
    from ._segment import LineChunk

__all__ = ["Follower"]

# The async form hands the loop back at least this often while records are available (the
# loop is not otherwise entered between records: an async generator's yield is not an await).
_ASYNC_SLICE = 0.005
# While waiting, a ``while_waiting`` check runs at least this often (seconds).
_CHECK_SLICE = 0.2


class Follower:
    """Yields every event from ``start`` on, then each new one as it is committed.

    Iterate it (``for record in log.follow(0)``) in a thread, or ``async for`` it in an event
    loop. New events are noticed through filesystem notifications on the log's header, with
    ``poll_interval`` as the bound when a notification is lost or none exist (network
    filesystems; ``notifications=False``). The async form never blocks the loop on a wait and
    stops cleanly when its task is cancelled, and hands the loop back every few milliseconds
    while it works through a backlog. :meth:`stop` (thread-safe) ends iteration. Iteration
    raises LogReplacedError if the log folder is removed or replaced by another log.
    """

    def __init__(
        self,
        log: EventLog,
        start: int | None = None,
        *,
        poll_interval: float = 1.0,
        notifications: bool = True,
    ) -> None:
        self._log = log
        self._start = start
        self._poll = poll_interval
        self._notifications = notifications
        self._stopped = threading.Event()
        self._notifier: ChangeNotifier | None = None

    def stop(self) -> None:
        """End iteration soon (from any thread); a blocked wait returns at once."""
        self._stopped.set()
        notifier = self._notifier
        if notifier is not None:
            notifier.wake()

    def _begin(self) -> tuple[ChangeNotifier, int]:
        notifier = ChangeNotifier(self._log.path, HEAD_FILE, notifications=self._notifications,
                                  poll_interval=self._poll)
        # Watch first, read second: an append racing with the first read leaves a hint.
        notifier.start()
        self._notifier = notifier
        offset = self._log.head if self._start is None else self._start
        return notifier, offset

    def __iter__(self) -> Iterator[Record]:
        decode = self._log.decode
        stopped = self._stopped.is_set
        for chunk in self.chunks():
            for records in decode(chunk):
                for record in records:
                    yield record
                    if stopped():
                        return

    def chunks(self, stop: int | None = None, *,
               while_waiting: Callable[[], None] | None = None) -> Iterator[LineChunk]:
        """Raw lines (nothing decoded) from the start, chunk by chunk, waiting for more,
        until offset ``stop`` (if given) or :meth:`stop`. A start past the head waits until
        the log reaches it; one before the first stored offset raises OffsetOutOfRangeError.

        ``while_waiting`` runs at least every 0.2 s of a wait (``eventpipe read --follow``
        checks there that its reader is still there); what it raises ends the iteration.
        """
        notifier, offset = self._begin()
        try:
            while not self._stopped.is_set() and (stop is None or offset < stop):
                if offset > self._log.head:
                    # A start past the head waits for that offset (as ``tail -f`` waits for
                    # a file to grow); chunks() would raise OffsetOutOfRangeError.
                    self._log.check_replaced()
                    self._wait(notifier, while_waiting)
                    continue
                for chunk in self._log.chunks(offset, stop):
                    yield chunk
                    offset = chunk.first_offset + len(chunk.lines)
                    if self._stopped.is_set():
                        return
                if stop is not None and offset >= stop:
                    return
                self._log.check_replaced()  # a replaced header would stall us for good
                self._wait(notifier, while_waiting)
        finally:
            notifier.close()

    def _wait(self, notifier: ChangeNotifier, while_waiting: Callable[[], None] | None) -> None:
        if while_waiting is None:
            notifier.wait(self._poll)
            return
        deadline = time.monotonic() + self._poll
        while not notifier.wait(min(_CHECK_SLICE, max(0.0, deadline - time.monotonic()))):
            while_waiting()
            if time.monotonic() >= deadline:
                return

    async def _aiter(self) -> AsyncIterator[Record]:
        notifier, offset = self._begin()
        clock = time.monotonic
        try:
            while not self._stopped.is_set():
                yielded_at = clock()
                if offset > self._log.head:  # as in chunks(): wait for the log to reach it
                    self._log.check_replaced()
                    await notifier.wait_async(self._poll)
                    continue
                for record in self._log.read(offset):
                    yield record
                    offset = record[0] + 1
                    if self._stopped.is_set():
                        return
                    # One clock read per record (tens of ns) against an async generator step
                    # (about a microsecond): the caller's loop body is timed too.
                    if clock() - yielded_at >= _ASYNC_SLICE:
                        await asyncio.sleep(0)
                        yielded_at = clock()
                self._log.check_replaced()
                await notifier.wait_async(self._poll)
        finally:
            notifier.close()

    def __aiter__(self) -> AsyncIterator[Record]:
        return self._aiter()
