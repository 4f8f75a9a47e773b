"""Group commit for ``sync="always"``: one flush makes every writer's committed appends durable.

Under ``sync="always"`` an append returns only once its events and a header that commits them
are on disk. Flushing under the writer lock (segment, then header) would make every other
writer, thread or process, wait behind two flushes per append, so adding writers could not
raise throughput. Instead a writer commits under the writer lock (data, time entry, header:
readers see the events at once), releases it, and then waits until the append is durable:

* ``sync.state`` in the log folder holds the **durable mark**: the head up to which a flush has
  made everything durable in this boot, with the segment and bytes it covered, a count of
  flushes, and the range of offsets of any flush that failed. It is read and rewritten under a
  ``flock`` on that same file, held for a read or a read and a write, never during a flush.
* A writer whose append is below the mark returns at once: a flush that began after its commit
  covered it. Otherwise it flushes: it reads the header (everything committed so far, its own
  append included), fdatasyncs the active segment, its time index (an fsync covers every
  byte written to the file before it, by any process) and the header, all at once (see
  ``_fdatasync_all``), and moves the mark up to that header's head (never down: a flush in
  another process may have gone further).
* Threads of one process share their flushes: they queue on a mutex, and the one holding it
  flushes for every thread that committed before it read the header; the others usually find
  themselves covered when their turn comes.
* Processes do not wait for each other's flushes. A writer that committed after another
  process's flush read the header is not covered by it, and waiting for that flush to end
  before starting its own cost more than flushing at once, since the kernel merges the
  flushes asked for while one is under way: on the VM disk here 4 writer processes ran
  1.9-2.4x one process's rate this way against 1.7-1.9x waiting
  (``benchmarks/bench_groupcommit.py`` row 2). A process that finds the mark past its append
  when it looks still skips its flush. (A flush asked for while another is under way waits
  for that one and then its own, about 1.5 flushes, so N writers appending one at a time stay
  under about N/1.5 times one writer's rate; 4 processes doing nothing but a write and the two
  fdatasyncs reach 2.0-2.2x here, ``benchmarks/bench_flush_floor.py`` row 4.)

Segments sealed by a roll are flushed by the rolling writer before its header is published, so
a flush only ever needs the active segment of the header it read.

The header may now reach the disk before the data it commits (the kernel writes pages back when
it likes). Recovery after a reboot already handles it: bytes past the header's ``synced`` may
be cut back to the last whole event, never below it, and a committing writer sets ``synced``
from the mark, so it only ever claims bytes a finished flush made durable. An append that has
returned was covered by a flush of its data and of a header at least as new, so no cut reaches
it.

**A failed flush** (an I/O error) leaves the durability of ``[mark, header head)`` unknown, and
the kernel may have dropped those dirty pages, so a later flush could succeed without them: the
range is recorded in ``sync.state`` (merged with any earlier one in this boot) and every writer
whose append lies in it and who looks at the mark after it gets ``DurabilityError``, whichever
process flushed. A writer in another process flushing at the same time through its own
descriptor learns of a real I/O error from its own fdatasync (Linux reports a writeback error
to every open file description once). Appends committed after the failure get a flush of their
own.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import NamedTuple

from . import _header
from ._layout import SYNC_STATE, Folder
from ._segment import segment_name
from ._timeindex import times_name

__all__ = ["DurableMark", "GroupSync", "SyncFailed", "read_mark"]

# boot, head, base, committed, failed_from, failed_to, flushes, tcount
_STATE = struct.Struct("<QQQQQQQI")
_SIZE = _STATE.size + 4
_SALT = 0x45505347


class DurableMark(NamedTuple):
    """What ``sync.state`` says, for this boot (all zero when it is another boot's)."""

    boot: int = 0
    head: int = 0  # every offset below it is durable
    base: int = 0  # the active segment the flush covered
    committed: int = 0  # its bytes the flush covered
    failed_from: int = 0  # offsets whose flush failed: [failed_from, failed_to)
    failed_to: int = 0
    flushes: int = 0  # flushes that moved the mark in this boot (how well they are shared)
    tcount: int = 0  # time index entries of ``base`` the flush covered


class SyncFailed(Exception):
    """A flush covering ``failed`` failed (raised to the appender, which reports it)."""

    def __init__(self, failed: range, cause: OSError | None) -> None:
        super().__init__(failed)
        self.failed = failed
        self.cause = cause


def _decode(raw: bytes, boot: int) -> DurableMark:
    if len(raw) != _SIZE or zlib.crc32(raw[:-4], _SALT).to_bytes(4, "little") != raw[-4:]:
        return DurableMark()
    mark = DurableMark(*_STATE.unpack(raw[:-4]))
    return mark if mark.boot == boot else DurableMark()


def read_mark(root: Folder) -> DurableMark:
    """The durable mark of the log in ``root`` for this boot (for tests and ``status``)."""
    data = root.read_bytes(SYNC_STATE)
    return DurableMark() if data is None else _decode(data[:_SIZE], _header.boot_id())


def _encode(mark: DurableMark) -> bytes:
    body = _STATE.pack(*mark)
    return body + zlib.crc32(body, _SALT).to_bytes(4, "little")


class GroupSync:
    """This process's side of the group commit of one log (see the module docstring).

    ``root`` is the log folder, ``segments`` is ``segments/`` (open); the appender passes
    its header descriptor to each :meth:`wait_durable`.
    """

    def __init__(self, root: Folder, segments: Folder, boot: int, file_mode: int) -> None:
        self._root = root
        self._segments = segments
        self._boot = boot
        self._mode = file_mode
        self.mutex = threading.Lock()  # threads of this process, one at a time
        self._opening = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None  # flushes besides the calling thread's own
        self._state_fd = root.open_shared(SYNC_STATE, file_mode)
        self._base = -1  # the segment whose descriptors are open below
        self._seg_fd = -1
        self._times_fd = -1

    def mark(self) -> DurableMark:
        """The durable mark as it is now (a committing writer's ``synced``). No lock: a torn
        read fails the CRC and reads as no mark, which only makes ``synced`` smaller."""
        fd = self._open_state()
        return _decode(os.pread(fd, _SIZE, 0), self._boot)

    def wait_durable(self, done: range, head_fd: int) -> None:
        """Return once offsets ``done`` (committed) are durable, flushing if no flush that
        began after their commit has finished. Raises SyncFailed when a flush covering them
        failed."""
        with self.mutex:
            mark = self._update(None)
            if done.start < mark.failed_to and done.stop > mark.failed_from:
                raise SyncFailed(range(mark.failed_from, mark.failed_to), None)
            if mark.head >= done.stop:
                return
            h = _header.read_header(head_fd, "head", retries=2)
            try:
                if h.segment_base != self._base:
                    self._open_segment(h.segment_base)
                fds = [head_fd]
                if self._seg_fd >= 0:
                    fds.append(self._seg_fd)
                    if h.tcount != mark.tcount or h.segment_base != mark.base:
                        fds.append(self._times_fd)
                self._fdatasync_all(fds)
            except OSError as exc:
                after = self._update(lambda now: now._replace(
                    failed_from=min(now.failed_from, mark.head) if now.failed_to else mark.head,
                    failed_to=max(now.failed_to, h.head)))
                raise SyncFailed(range(after.failed_from, after.failed_to), exc) from exc

            def flushed(now: DurableMark) -> DurableMark:
                if h.head <= now.head:  # a flush in another process went further
                    return now._replace(flushes=now.flushes + 1)
                return now._replace(head=h.head, base=h.segment_base, committed=h.committed,
                                    tcount=h.tcount, flushes=now.flushes + 1)
            self._update(flushed)

    def _update(self, change: Callable[[DurableMark], DurableMark] | None) -> DurableMark:
        """The mark, read under the flock, and rewritten through ``change`` if one is given.
        Caller holds ``mutex`` (a flock does not exclude threads sharing a descriptor)."""
        fd = self._open_state()
        try:
            # Inside the try: an interrupt just after the flock must still release it.
            fcntl.flock(fd, fcntl.LOCK_EX)
            mark = _decode(os.pread(fd, _SIZE, 0), self._boot)
            if change is not None:
                mark = change(mark._replace(boot=self._boot))
                os.pwrite(fd, _encode(mark), 0)
            return mark
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _fdatasync_all(self, fds: list[int]) -> None:
        """fdatasync every descriptor, at the same time: the header, the segment and its time
        index need each other only at the end (recovery copes with a header on disk before
        its data), and flushes issued together cost little more than one (on the VM disk
        here three concurrent fdatasyncs took ~0.2 ms where three in a row took 0.7-1 ms).
        Raises the first error once all have returned."""
        pool = self._pool
        if pool is None:
            pool = self._pool = ThreadPoolExecutor(max_workers=2,
                                                   thread_name_prefix="eventpipe-flush")
        others = [pool.submit(os.fdatasync, fd) for fd in fds[1:]]
        error: OSError | None = None
        try:
            os.fdatasync(fds[0])
        except OSError as exc:
            error = exc
        finally:
            # Never leave with a flush running: the descriptors may be closed after us.
            wait(others)
        for future in others:
            failed = future.exception()
            if isinstance(failed, OSError) and error is None:
                error = failed
            elif failed is not None and not isinstance(failed, OSError):
                raise failed
        if error is not None:
            raise error

    def _open_segment(self, base: int) -> None:
        """Open segment ``base`` and its time index for flushing. A segment gone already was
        sealed by a roll after the header was read, and a roll flushes what it seals."""
        self._close_segment()
        seg = self._segments.open_existing(segment_name(base), os.O_RDONLY)
        if seg is None:
            return
        try:
            times = self._segments.open_file(times_name(base), os.O_RDONLY)
        except BaseException:
            os.close(seg)
            raise
        self._base, self._seg_fd, self._times_fd = base, seg, times

    def _open_state(self) -> int:
        if self._state_fd < 0:  # closed, or dropped after a fork: reopened by one thread
            with self._opening:
                if self._state_fd < 0:
                    self._state_fd = self._root.open_shared(SYNC_STATE, self._mode)
        return self._state_fd

    def forget_beyond(self, head: int) -> None:
        """Forget the mark if it claims offsets at or past ``head``, the committed head read
        under the writer lock. A flush only ever moves the mark to a head it read, so such a
        mark is not this log's history: a header rebuilt shorter after damage, or head and
        segments restored from a copy beside a newer ``sync.state``. Believed, it would let
        the appends that reuse those offsets return unflushed. Caller holds the writer lock."""
        if self.mark().head <= head:
            return
        with self.mutex:
            self._update(lambda now: DurableMark(boot=self._boot))

    def _close_segment(self) -> None:
        for fd in (self._seg_fd, self._times_fd):
            if fd >= 0:
                os.close(fd)
        self._base = self._seg_fd = self._times_fd = -1

    def close(self) -> None:
        """Close every descriptor (reopened on next use)."""
        with self.mutex:
            self._close_segment()
            if self._state_fd >= 0:
                os.close(self._state_fd)
                self._state_fd = -1
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's mutex may be held by a thread not copied."""
        self.mutex = threading.Lock()
        self._opening = threading.Lock()
        self._pool = None  # its threads are the parent's: not in this process
        self._close_segment()
        if self._state_fd >= 0:
            os.close(self._state_fd)  # its flock is shared with the parent's description
            self._state_fd = -1
