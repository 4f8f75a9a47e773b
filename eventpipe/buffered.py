"""A buffered writer: encode now, commit many events under one lock acquisition later."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Self

from .errors import LogClosedError

if TYPE_CHECKING:
    from .log import EventLog

__all__ = ["BufferedWriter"]


class BufferedWriter:
    """Collects events and appends them in batches, for producers of many events per second.

    ``append`` encodes and checks the event at once (so a bad event raises at the call that
    gave it) and buffers the bytes. The buffer is committed as one atomic batch when it holds
    ``max_events`` events or ``max_bytes`` bytes, when ``linger`` seconds have passed since its
    first event (a background thread sees to that; ``linger=None`` disables it), on
    :meth:`flush`, and on :meth:`close` / leaving the ``with`` block. Events become visible to
    readers, and get their offsets, at that commit: :meth:`flush` returns them, and
    :attr:`last_flushed` holds the most recent batch's.

    A commit that fails (say, disk full) keeps the events buffered and raises from ``flush``,
    or, for a background flush, from the next ``append`` or ``flush``; nothing is dropped.
    Thread-safe.
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
        self._error: BaseException | None = None
        self.last_flushed: range = range(0)
        self._thread: threading.Thread | None = None
        if linger is not None:
            self._thread = threading.Thread(target=self._linger_loop, daemon=True,
                                            name="eventpipe-linger")
            self._thread.start()

    @property
    def pending(self) -> int:
        """Events buffered and not yet committed."""
        return self._count

    def append(self, event: Any) -> None:
        """Encode and buffer one event; it is committed at the next flush.

        Raises UnserializableEventError / EventTooLargeError at once for a bad event (the
        buffer is unchanged), or the error of a failed background flush.
        """
        data = self._encode(event)
        with self._cond:
            if self._closed:
                raise LogClosedError("buffered writer is closed", path=self._log.path)
            if self._error is not None:
                err, self._error = self._error, None
                raise err
            if not self._count:
                self._first_at = time.monotonic()
                self._cond.notify()
            buf = self._data
            buf += data
            buf += b"\n"
            self._count += 1
            if self._count >= self._max_events or len(buf) >= self._max_bytes:
                self._flush_locked()

    def flush(self) -> range:
        """Commit everything buffered; return its offsets (empty range if nothing was)."""
        with self._cond:
            if self._error is not None:
                err, self._error = self._error, None
                if not self._count:
                    raise err
            return self._flush_locked()

    def _flush_locked(self) -> range:
        if not self._count:
            return range(0)
        # On failure the batch stays buffered: a batch commit is all-or-nothing.
        offsets = self._log.append_lines(bytes(self._data), self._count)
        self._data = bytearray()
        self._count = 0
        self.last_flushed = offsets
        return offsets

    def _linger_loop(self) -> None:
        assert self._linger is not None
        with self._cond:
            while not self._closed:
                if not self._count:
                    self._cond.wait()
                    continue
                due = self._first_at + self._linger - time.monotonic()
                if due > 0:
                    self._cond.wait(due)
                    continue
                try:
                    self._flush_locked()
                except Exception as exc:  # surfaced to the producer on its next call
                    self._error = exc
                    self._cond.wait(self._linger)

    def close(self) -> range:
        """Flush and stop the linger thread; returns the last batch's offsets. Idempotent."""
        with self._cond:
            if self._closed:
                return range(0)
            try:
                offsets = self._flush_locked()
            finally:
                self._closed = True
                self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        return offsets

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
