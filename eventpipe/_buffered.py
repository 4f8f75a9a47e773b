"""A buffered writer: encode now, commit many events under one lock acquisition later."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Self

from .errors import LogClosedError

if TYPE_CHECKING:
    from ._log import EventLog

__all__ = ["BufferedWriter"]

_log = logging.getLogger("eventpipe")

# Every writer of this process, so that a forked child can empty the parent's buffers and
# interpreter exit can flush what nobody closed. Weak: a dropped writer is not kept alive.
_LIVE: weakref.WeakSet[BufferedWriter] = weakref.WeakSet()


def _committed(exc: BaseException) -> range:
    """The offsets a failed append says were committed (``DurabilityError.committed``, or the
    same attribute the appender sets on an interrupt that landed after its commit point);
    empty if it committed nothing."""
    committed = getattr(exc, "committed", None)
    return committed if isinstance(committed, range) else range(0)


def _events(n: int) -> str:
    return f"{n} event{'' if n == 1 else 's'}"


class BufferedWriter:
    """Collects events and appends them in batches, for producers of many events per second.

    ``append`` encodes and checks the event at once (so a bad event raises at the call that
    gave it) and buffers the bytes. The buffer is committed as one atomic batch when it holds
    ``max_events`` events or ``max_bytes`` bytes, when ``linger`` seconds have passed since its
    first event (a background thread sees to that; ``linger=None`` disables it), on
    :meth:`flush`, and on :meth:`close` / leaving the ``with`` block. Events become visible to
    readers, and get their offsets, at that commit: :meth:`flush` returns them, and
    :attr:`last_flushed` holds the most recent batch's. Thread-safe.

    What an exception means, so that giving an event again never stores it twice:

    * :meth:`append` raised: *that event was not accepted*: it is neither buffered nor stored,
      and may be given again. This holds whatever the error: a bad event
      (``UnserializableEventError``, ``EventTooLargeError``), a closed writer
      (``LogClosedError``), a failed commit of the batch this call completed (``StorageError``,
      say a full disk), or the error of an earlier background flush reported here. Events
      buffered before it stay buffered, in order, and are retried by the next flush.
    * :meth:`flush` / :meth:`close` raised: the events still buffered (:attr:`pending`) were not
      committed and stay buffered for the next flush; after a ``StorageError`` that is the
      whole buffer. The one error that reports a commit is ``DurabilityError``: the offsets in
      its ``committed`` *were* committed, but may not be durable (an fsync after the commit
      failed). If they were this buffer's batch it is no longer buffered (:attr:`pending` is
      0, :attr:`last_flushed` is ``committed``): never give those events again. After a
      ``DurabilityError`` the log refuses further appends in this process until it is
      reopened, so events still buffered then cannot be committed by this writer.
    * A commit that a call to :meth:`append` completed and that raised ``DurabilityError``
      did accept that event: ``append`` returns normally and the error is raised by the next
      call (``append`` then does not accept *its* event, by the first rule).
    * A background (linger) flush that fails keeps its events buffered and retries every
      ``linger`` seconds; its error is raised by the next ``append`` (which does not accept its
      event) and superseded by the next ``flush`` / ``close``, which try again and raise their
      own error if they fail too. One that raised ``DurabilityError`` is raised by the next
      call of any kind, under the rules above.
    * :meth:`close` closes the writer once nothing is left buffered; if it raised with events
      still pending, the writer stays open, and ``close()`` may be called again.
    * An interrupt (``KeyboardInterrupt``) may land anywhere, even just after a commit: the
      events still buffered (:attr:`pending`) are then exactly those not committed, and a
      batch that was committed is no longer buffered (:attr:`last_flushed` holds its offsets),
      the event of an interrupted ``append`` included.

    Across ``os.fork()`` the child starts with an empty buffer (the parent's events are the
    parent's to commit; a child that flushed them too would store them twice) and its own
    linger thread, started at its first event. At interpreter exit (a normal one: not
    ``os._exit`` or a signal) every writer not closed is closed, committing what it holds;
    if that fails, a warning on the ``eventpipe`` logger says how many events were lost and
    why. A writer garbage-collected while holding events logs the same warning.
    """

    def __init__(
        self,
        log: EventLog,
        *,
        max_events: int = 1000,
        max_bytes: int = 1 << 20,
        linger: float | None = 0.05,
    ) -> None:
        if max_events < 1 or max_bytes < 1 or (linger is not None and linger <= 0):
            raise ValueError("max_events and max_bytes must be >= 1 and linger > 0 or None")
        self._log = log
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._encode = log.encode
        self._linger = linger
        # Events are kept as one growing run of JSON lines, not as a list of bytes objects:
        # orjson gives each result a 4 KiB allocation, and a thousand of them alive at once
        # cost more in fresh memory than the encoding (a list here ran at ~350k events/s).
        self._data = bytearray()
        self._count = 0
        self._first_at = 0.0
        self._cond = threading.Condition()
        self._closed = False
        # A background flush failed; its events are still buffered. The next append raises
        # it; the next flush or close tries again instead.
        self._failed: BaseException | None = None
        # A batch was committed but its commit raised (DurabilityError): the next call of any
        # kind raises it. Never dropped unreported.
        self._report: BaseException | None = None
        self.last_flushed: range = range(0)
        self._thread: threading.Thread | None = None  # the linger thread, from the first event
        _LIVE.add(self)

    @property
    def pending(self) -> int:
        """Events buffered and not yet committed.

        Read under the buffer's lock, so it waits for a commit in progress: an event that
        readers can already see is never counted here.
        """
        with self._cond:
            return self._count

    def append(self, event: Any) -> None:
        """Encode and buffer one event; it is committed at the next flush.

        If this raises, ``event`` was not accepted (neither buffered nor stored) and may be
        given again; events buffered before it stay buffered. Raises
        UnserializableEventError / EventTooLargeError for a bad event, LogClosedError after
        :meth:`close`, the error of the flush this call triggered (``max_events`` /
        ``max_bytes`` reached) if that batch was not committed, or the error of an earlier
        background flush. See the class documentation.
        """
        data = self._encode(event)
        with self._cond:
            if self._closed:
                raise LogClosedError("buffered writer is closed", path=self._log.path)
            err = self._report or self._failed
            if err is not None:
                self._report = self._failed = None
                raise err
            if not self._count:
                self._first_at = time.monotonic()
                if self._linger is not None:
                    if self._thread is None:
                        self._start_linger()
                    self._cond.notify()
            buf = self._data
            buf += data
            buf += b"\n"
            self._count += 1
            if self._count >= self._max_events or len(buf) >= self._max_bytes:
                try:
                    self._flush_locked()
                except BaseException as exc:
                    if self._count:
                        # The batch was not committed: it stays buffered, but without this
                        # event, which the caller is told was not accepted.
                        buf = self._data
                        del buf[len(buf) - len(data) - 1 :]
                        self._count -= 1
                        raise
                    if not isinstance(exc, Exception):
                        raise
                    # Committed, this event with it, but not durably: accepted. Say so at
                    # the next call rather than have the caller give the event again.
                    self._report = exc

    def flush(self) -> range:
        """Commit everything buffered; return its offsets (empty range if nothing was).

        If this raises, the events still buffered (:attr:`pending`) were not committed and
        the next flush retries them; only a ``DurabilityError`` reports a commit (offsets in
        its ``committed``). See the class documentation.
        """
        with self._cond:
            return self._flush_or_report_locked()

    def close(self) -> range:
        """Flush and stop the linger thread; returns the last batch's offsets. Idempotent.

        Raises as :meth:`flush` does. The writer is closed once nothing is left buffered:
        after a failure that left events buffered it stays open, and ``close()`` may be
        called again.
        """
        try:
            with self._cond:
                if self._closed:
                    return range(0)
                try:
                    return self._flush_or_report_locked()
                finally:
                    if not self._count:
                        self._closed = True
                        self._cond.notify_all()
        finally:
            if self._closed:
                self._join_linger()

    def _flush_or_report_locked(self) -> range:
        err = self._report
        if err is not None:
            self._report = None
            raise err
        return self._flush_locked()

    def _flush_locked(self) -> range:
        count = self._count
        if not count:
            return range(0)
        self._failed = None  # superseded by this attempt, whatever it gives
        # Offsets this batch can get are at least the head now (the log's head only grows),
        # which tells this batch's DurabilityError from one about earlier appends that the
        # log repeats to refuse this one. If the header cannot be read here, the appender
        # will say why (or repair it); the last batch's end is a lower bound too.
        try:
            floor = self._log.head
        except Exception:
            floor = self.last_flushed.stop
        data = self._data
        # Unbuffer before committing: an interrupt landing after the commit must leave the
        # batch unbuffered (at worst unreported), never buffered to be stored again.
        self._data = bytearray()
        self._count = 0
        try:
            offsets = self._log.append_lines(bytes(data), count)
        except BaseException as exc:
            committed = _committed(exc)
            if len(committed) == count and committed.start >= floor:
                self.last_flushed = committed  # this batch, committed but not durably
            else:
                # Nothing of this batch was committed (a batch is all or nothing).
                self._data = data
                self._count = count
            raise
        self.last_flushed = offsets
        return offsets

    def _start_linger(self) -> None:
        self._thread = threading.Thread(target=self._linger_loop, daemon=True,
                                        name="eventpipe-linger")
        self._thread.start()

    def _linger_loop(self) -> None:
        linger = self._linger
        assert linger is not None
        cond = self._cond
        with cond:
            while not self._closed:
                if not self._count:
                    cond.wait()
                    continue
                due = self._first_at + linger - time.monotonic()
                if due > 0:
                    cond.wait(due)
                    continue
                try:
                    self._flush_locked()
                except Exception as exc:  # surfaced to the producer on its next call
                    if self._count:
                        self._failed = exc
                    elif self._report is None:
                        self._report = exc
                    cond.wait(linger)

    def _join_linger(self) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _forget_after_fork(self) -> None:
        """In a forked child: start empty, with a fresh lock and no linger thread yet."""
        self._cond = threading.Condition()
        self._data = bytearray()
        self._count = 0
        self._failed = self._report = None
        self._thread = None

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except Exception as exc:
            with self._cond:
                lost = self._count
                self._data = bytearray()
                self._count = 0
                self._closed = True
                self._cond.notify_all()
            self._join_linger()
            if lost:
                _log.warning("eventpipe: %s buffered for %s were lost at exit, never "
                             "committed: %s", _events(lost), self._log.path, exc)
            else:
                _log.warning("eventpipe: a buffered writer's events in %s were committed but "
                             "may not be durable: %s", self._log.path, exc)

    def __del__(self) -> None:
        lost = getattr(self, "_count", 0)
        if lost:
            _log.warning("eventpipe: %s buffered for %s were lost: the writer was "
                         "garbage-collected without close()", _events(lost), self._log.path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _after_fork_in_child() -> None:
    for writer in list(_LIVE):
        writer._forget_after_fork()


def _close_all_at_exit() -> None:
    for writer in list(_LIVE):
        writer._close_at_exit()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)
