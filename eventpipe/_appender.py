"""Appending to a log from this process: the writer lock and the commit.

Under the writer lock (a flock on ``writer.lock``): read the header, make the active segment
match it (see ``_recovery``), write the event bytes after the committed ones (into new segments
where the active one is full), fsync as the sync policy says, and rewrite the header. The header
rewrite is the commit: until it, readers in every process see nothing of the append, and a
failure before it is undone by truncating what was written. After it, the append has happened:
a failure there (the fsync that makes it durable, the unlock) raises DurabilityError carrying the
committed offsets, never an error that invites a retry. Offsets come from the header, so they
are dense and never reused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Sequence
from typing import NoReturn

from . import _header, _meta, _recovery, _timeindex
from ._config import LogConfig
from ._fsutil import os_errors, write_all
from ._groupsync import DurableMark, GroupSync, SyncFailed
from ._header import ROLLING, Header, boot_id, encode_header
from ._layout import HEAD_FILE, SEGMENTS_DIR, WRITER_LOCK, Folder
from ._segment import list_segments, segment_name, segment_path
from ._timeindex import ENTRY_SIZE, GRAIN_NS, pack_entry, times_name
from .errors import (
    CorruptLogError,
    DurabilityError,
    EventPipeError,
    LockTimeout,
    LogClosedError,
    StorageError,
)

__all__ = ["Appender"]


_pread = os.pread
_pwrite = os.pwrite
_flock = fcntl.flock
_LOCK_EX = fcntl.LOCK_EX
_LOCK_UN = fcntl.LOCK_UN
_RECORD = _header.RECORD_SIZE
_MAGIC = _header.MAGIC
_BODY = _header.BODY_SIZE
_pack_body = _header.pack_body
_unpack_record = _header.unpack_record
_PAD = bytes(_header.COPY_AT - _header.RECORD_SIZE)
_join = b"".join
_crc32 = zlib.crc32
_time_ns = time.time_ns

# Every appender of this process, so a forked child can drop the parent's writer state: flock
# belongs to the open file description, which a child shares, so an inherited lock fd would
# let parent and child "hold" the writer lock at once.
_LIVE: weakref.WeakSet[Appender] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for appender in list(_LIVE):
        appender.forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _say_committed(exc: BaseException, done: range) -> None:
    """Tell whoever catches ``exc`` (an interrupt after the commit point) that ``done`` was
    committed: a note, and ``committed`` as DurabilityError has it."""
    exc.add_note(f"eventpipe: the append was committed at offsets {done.start}.."
                 f"{done.stop - 1} before this was raised; do not append them again")
    exc.committed = done  # type: ignore[attr-defined]


class _WriterState:
    """File descriptors and bookkeeping a process needs to append; created on first append."""

    __slots__ = ("checked", "dirty", "head_fd", "lock_fd", "seg_base", "seg_fd", "times_fd",
                 "unsynced_from")

    def __init__(self, lock_fd: int, head_fd: int) -> None:
        self.lock_fd = lock_fd
        self.head_fd = head_fd
        self.seg_fd = -1
        self.times_fd = -1  # the active segment's time index (see _timeindex)
        self.seg_base = -1
        self.checked = False  # active segment checked against the header once per process
        self.dirty = False  # written since the last fsync (sync="interval")
        self.unsynced_from = 0  # first offset this process appended since its last fsync

    def close(self) -> None:
        for fd in (self.seg_fd, self.times_fd, self.head_fd, self.lock_fd):
            if fd >= 0:
                os.close(fd)
        self.seg_fd = self.times_fd = self.head_fd = self.lock_fd = -1


class _Part:
    """Where part of a batch goes: segment ``base`` from byte ``position``."""

    __slots__ = ("base", "count", "pieces", "position")

    def __init__(self, base: int, position: int) -> None:
        self.base = base
        self.position = position
        self.pieces: list[bytes | memoryview] = []
        self.count = 0


class Appender:
    """This process's writer for one log; :class:`~eventpipe.EventLog` owns one.

    ``on_roll`` is called (outside no lock of its own) whenever segments were sealed, and once
    when the writer opens, so sealed segments get checksummed and compressed.
    """

    def __init__(self, root: Folder, config: LogConfig, on_roll: Callable[[], None]) -> None:
        self.root = root  # the log folder; every file is reached through it (see _layout)
        self.path = root.path
        self.segments_dir = os.path.join(root.path, SEGMENTS_DIR)  # for messages
        self.head_path = root.path_of(HEAD_FILE)  # for messages
        self._segments: Folder | None = None  # opened on first use
        self.config = config
        self.mutex = threading.Lock()
        self._on_roll = on_roll
        self._state: _WriterState | None = None
        self._closed = False
        self._failure: DurabilityError | None = None  # set once durability is unknown
        self._syncer: threading.Thread | None = None
        self._group: GroupSync | None = None  # sync="always": the shared flush
        self._syncer_stop = threading.Event()
        # Options the hot path reads, as plain attributes.
        self._max_bytes = config.segment_max_bytes
        self._max_events = config.segment_max_events or sys.maxsize
        self._always = config.sync == "always"
        self._lock_timeout = config.lock_timeout
        self._boot = boot_id()
        self.clock_steps_back = 0  # appends whose clock read earlier than a stored time
        _LIVE.add(self)

    # ------------------------------------------------------------------------------ opening

    def open(self) -> _WriterState:
        """This process's writer state, opening it on first use. Caller holds ``mutex``."""
        if self._closed:
            raise LogClosedError("log is closed", path=self.path)
        if self._failure is not None:
            raise self._failure
        w = self._state
        if w is None:
            mode = self.config.file_mode
            lock_path = self.root.path_of(WRITER_LOCK)
            lock_fd = self.root.open_shared(WRITER_LOCK, mode)
            head_fd = -1
            try:
                with os_errors("take writer lock", lock_path):
                    fcntl.flock(lock_fd, fcntl.LOCK_EX)
                try:
                    # An older log is marked as this format before anything is written in
                    # it, so an older eventpipe refuses it rather than misread the header.
                    _meta.upgrade(self.root, self.config.file_mode)
                    head_fd = self._open_head_for_writing()
                finally:
                    # (Closing lock_fd below releases the lock if this fails.)
                    with os_errors("release writer lock", lock_path):
                        fcntl.flock(lock_fd, fcntl.LOCK_UN)
            except BaseException:
                if head_fd >= 0:
                    os.close(head_fd)
                os.close(lock_fd)
                raise
            w = self._state = _WriterState(lock_fd, head_fd)
            if self.config.sync == "interval":
                self._start_syncer()
            elif self._always and self._group is None:
                self._group = GroupSync(self.root, self._segments_folder(), self._boot,
                                        self.config.file_mode)
            self._on_roll()  # finish sealing what earlier writers left
        return w

    def _open_head_for_writing(self) -> int:
        """Open ``head`` read-write, creating the first segment and header if missing."""
        mode = self.config.file_mode
        root = self.root
        try:
            return root.open_file(HEAD_FILE, os.O_RDWR)
        except StorageError as exc:
            if exc.errno != errno.ENOENT:
                raise
        root.mkdir(SEGMENTS_DIR, self.config.dir_mode)
        segments = self._segments_folder()
        first = segment_name(0)
        try:
            fd = segments.open_file(first, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except StorageError as exc:  # left by a creator that died before writing the header
            if exc.errno != errno.EEXIST:
                raise
            fd = segments.open_file(first, os.O_WRONLY)
        with os_errors("create first segment", segments.path_of(first)):
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        segments.fsync()
        root.write_atomic(HEAD_FILE, encode_header(Header(0, 0, 0, 0, self._boot)), mode)
        return root.open_file(HEAD_FILE, os.O_RDWR)

    def _segments_folder(self) -> Folder:
        """``segments/``, open (once): new segment files are created through it."""
        if self._segments is None:
            self._segments = self.root.sub(SEGMENTS_DIR)
        return self._segments

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's files, locks and threads; reopen on demand."""
        # The child must not use the parent's lock fd (shared flock) or threads (not copied);
        # a lock held by another parent thread at fork time would never be released here.
        self.mutex = threading.Lock()
        w = self._state
        if w is not None:
            w.close()
        self._state = None
        self._syncer = None
        self._syncer_stop = threading.Event()
        if self._group is not None:
            self._group.forget_after_fork()

    # ------------------------------------------------------------------------------ locking

    def _lock(self, w: _WriterState) -> None:
        """Take the writer lock (within ``lock_timeout`` if set)."""
        timeout = self._lock_timeout
        try:
            if timeout is None:
                _flock(w.lock_fd, _LOCK_EX)
                return
            deadline = time.monotonic() + timeout
            delay = 0.0001
            while True:
                try:
                    _flock(w.lock_fd, _LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockTimeout(
                            f"writer lock still held by another process after {timeout}s",
                            path=os.path.join(self.path, WRITER_LOCK),
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.01)
        except OSError as exc:
            if isinstance(exc, EventPipeError):
                raise
            self._raise_lock_error(exc)

    def _raise_lock_error(self, exc: OSError) -> NoReturn:
        raise StorageError.from_os_error(
            exc, "take writer lock", path=os.path.join(self.path, WRITER_LOCK)) from exc

    def _unlock(self, w: _WriterState, committed: range | None) -> None:
        try:
            _flock(w.lock_fd, _LOCK_UN)
        except OSError as exc:
            self._unlock_failed(w, exc, committed)

    def _unlock_failed(self, w: _WriterState, exc: OSError, committed: range | None) -> NoReturn:
        # The lock may still be held: only closing the descriptor surely drops it. This
        # process can no longer append safely; reopening the log starts afresh.
        with contextlib.suppress(OSError):
            os.close(w.lock_fd)
        w.lock_fd = -1
        self._fail(exc, "release writer lock", committed or range(0))

    def _fail(self, exc: BaseException, what: str, committed: range) -> NoReturn:
        """Record that this process may no longer append, and raise the error that says so."""
        word = (f"offsets {committed.start}..{committed.stop - 1} were committed, but"
                if committed else "the log is consistent, but")
        err = DurabilityError(
            f"{word} {what} failed ({getattr(exc, 'strerror', None) or exc}); do not append "
            "them again. This process refuses further appends until the log is reopened",
            committed=committed, errno=getattr(exc, "errno", None),
            path=getattr(exc, "filename", None) or self.head_path)
        self._failure = err
        raise err from exc

    # ------------------------------------------------------------------------------ commit

    def commit(self, blobs: list[bytes], counts: Sequence[int], size: int, n: int,
               at: int | None = None) -> range:
        """Write ``blobs`` (``counts`` events each, ``size`` bytes, ``n`` events) and commit.

        ``at`` gives the batch its append time (ns) instead of the clock: a copy of another
        log keeps that log's times (it still never goes below the last time stored, and
        gets an entry of its own whenever it differs from the last one).

        ``size`` and ``n`` could be derived from ``blobs`` and ``counts``; every caller has
        them already (it checked the batch against the limits), and summing again would
        cost a pass over the batch on the hot path of every append.
        """
        # One function on purpose: the hot path of every append, kept to the syscalls it
        # needs (flock, header pread, 1-byte pread for a torn tail, data pwrite, a time entry
        # pwrite at most once a millisecond, header pwrite, unlock), with the header decoded
        # and encoded inline and the options read from attributes set up front; split into
        # calls it costs a few % of append() (benchmarks/bench_storage.py row 2).
        with self.mutex:
            if self._failure is not None:
                raise self._failure
            w = self._state or self.open()
            group = self._group
            flush = False
            # The durable mark, read before taking the lock (it only grows, so an older
            # value only makes the header's ``synced`` claim less): the header claims only
            # what a finished flush made durable.
            mark = self._durable_mark(group) if group is not None else None
            if self._lock_timeout is None:
                # A raw flock on the kept-open fd: ~1 µs, where filelock's acquire+release
                # costs ~70 µs of Python (benchmark row 10) and would cap append() near 14k/s.
                # Both take flock on the same file, so they exclude each other.
                try:
                    _flock(w.lock_fd, _LOCK_EX)
                except OSError as exc:
                    self._raise_lock_error(exc)
            else:
                self._lock(w)
            done: range | None = None
            try:
                try:
                    raw = _pread(w.head_fd, _RECORD, 0)
                    if len(raw) == _RECORD:
                        magic, head, base, committed, synced, boot, flags, tcount, tlast, \
                            crc = _unpack_record(raw)
                    else:
                        magic = b""
                    if (magic != _MAGIC or crc != _crc32(raw[:_BODY]) or base != w.seg_base
                            or flags or boot != self._boot or not w.checked
                            or _pread(w.seg_fd, 1, committed)):
                        # Damage, another writer rolled, a writer died leaving a torn tail or
                        # mid-roll, or the first append of this process or this boot.
                        head, base, committed, synced, boot, flags, tcount, tlast = \
                            self._prepare(w)
                except OSError as exc:
                    if isinstance(exc, StorageError):
                        raise
                    raise StorageError.from_os_error(exc, "read log header",
                                                     path=self.head_path) from exc
                # The append time, under the lock so times rise with offsets across writers;
                # never below the last one stored, whatever the clock did.
                now = _time_ns() if at is None else at
                if now < tlast:
                    self._clock_stepped_back(now, tlast)
                    now = tlast
                if (committed + size <= self._max_bytes
                        and head - base + n <= self._max_events):
                    seg_fd = w.seg_fd
                    new_tcount, new_tlast = tcount, tlast
                    try:
                        position = committed
                        for blob in blobs:
                            if _pwrite(seg_fd, blob, position) != len(blob):
                                write_all(seg_fd, blob, position)  # short write: finish or raise
                            position += len(blob)
                        if not tcount or now - tlast >= GRAIN_NS or (at is not None
                                                                     and now != tlast):
                            # A time entry for this batch (see _timeindex for the grain).
                            write_all(w.times_fd, pack_entry(head - base, now),
                                      tcount * ENTRY_SIZE)
                            new_tcount, new_tlast = tcount + 1, now
                        if (mark is not None and mark.base == base
                                and synced < mark.committed <= committed):
                            # (A mark past the committed bytes is not this log's history:
                            # forgotten in _prepare, never claimed here.)
                            synced = mark.committed
                    except BaseException as exc:
                        h = Header(head, base, committed, synced, boot, 0, tcount, tlast)
                        self._undo(w, h, [])
                        self._raise_write_error(exc, h)
                    body = _pack_body(_MAGIC, head + n, base, position, synced, self._boot, 0,
                                      new_tcount, new_tlast)
                    record = body + _crc32(body).to_bytes(4, "little")
                    header = _join((record, _PAD, record))
                    try:
                        # The commit point: readers see the new events from this pwrite on.
                        _pwrite(w.head_fd, header, 0)
                        if group is not None:
                            flush = True
                        elif not w.dirty:
                            w.dirty = True
                            w.unsynced_from = head
                    except BaseException as exc:
                        self._after_failed_publish(
                            w, Header(head, base, committed, synced, boot, 0, tcount, tlast),
                            header, range(head, head + n), [], exc)
                    done = range(head, head + n)
                else:
                    done = self._commit_across_segments(
                        w, Header(head, base, committed, synced, boot, 0, tcount, tlast),
                        blobs, counts, now, at is not None)
            finally:
                try:
                    _flock(w.lock_fd, _LOCK_UN)
                except OSError as exc:
                    self._unlock_failed(w, exc, done)
        if flush:
            self._wait_durable(w, done)
        return done

    @staticmethod
    def _durable_mark(group: GroupSync) -> DurableMark | None:
        """The durable mark for the header's ``synced`` claim; None when it cannot be read
        (the claim then stays what it was: never more than is durable)."""
        try:
            return group.mark()
        except (OSError, EventPipeError):
            return None

    def _wait_durable(self, w: _WriterState, done: range) -> None:
        """Under ``sync="always"``: return once the committed ``done`` is durable (a flush
        shared by this process's threads, see _groupsync); DurabilityError if the flush that
        covered it failed."""
        group = self._group
        assert group is not None
        try:
            group.wait_durable(done, w.head_fd)
        except (SyncFailed, OSError, EventPipeError) as exc:
            with self.mutex:
                self._flush_failed(exc, done)
        except BaseException as exc:
            # Interrupted after the commit (KeyboardInterrupt, a signal handler's exception):
            # make it as durable as promised, then let the interrupt through, saying what
            # was stored.
            try:
                group.wait_durable(done, w.head_fd)
            except (SyncFailed, OSError, EventPipeError) as sync_exc:
                with contextlib.suppress(DurabilityError), self.mutex:
                    self._flush_failed(sync_exc, done)  # this process appends no more
            _say_committed(exc, done)
            raise

    def _flush_failed(self, exc: BaseException, done: range) -> NoReturn:
        """DurabilityError for ``done``: the flush that was to make it durable failed, here or
        (a SyncFailed without a cause) in another writer. Caller holds ``mutex``."""
        if isinstance(exc, SyncFailed):
            exc = exc.cause or OSError(
                errno.EIO, f"a flush of offsets {exc.failed.start}..{exc.failed.stop - 1} by "
                           "another writer failed")
        self._fail(exc, "fsync", done)

    def _publish(self, w: _WriterState, before: Header, header: bytes, done: range,
                 created: list[tuple[int, int, int]]) -> None:
        """Write ``header``: the commit point, after which the append of ``done`` happened;
        from then on this process appends to the last of the ``created`` segments, if any."""
        try:
            _pwrite(w.head_fd, header, 0)
            self._owe_durability(w, done)
        except BaseException as exc:
            self._after_failed_publish(w, before, header, done, created, exc)
        self._adopt(w, created)

    def _owe_durability(self, w: _WriterState, done: range) -> None:
        """After the commit of ``done`` outside the hot path (a roll, an interrupted
        commit): under ``always`` make it durable now, else note it for the next sync."""
        if not self._always:
            if not w.dirty:
                w.dirty = True
                w.unsynced_from = done.start
        else:
            assert self._group is not None  # opened with the writer state under "always"
            self._group.wait_durable(done, w.head_fd)  # the data too, and moves the mark

    @staticmethod
    def _adopt(w: _WriterState, created: list[tuple[int, int, int]]) -> None:
        if created:
            os.close(w.seg_fd)
            os.close(w.times_fd)
            for _, fd, times_fd in created[:-1]:
                os.close(fd)
                os.close(times_fd)
            w.seg_base, w.seg_fd, w.times_fd = created[-1]

    def _after_failed_publish(self, w: _WriterState, before: Header, header: bytes,
                              done: range, created: list[tuple[int, int, int]],
                              exc: BaseException) -> NoReturn:
        # Whether the commit happened is what the header now says, not where the exception
        # came from (a KeyboardInterrupt may land just after the pwrite returned).
        try:
            on_disk = os.pread(w.head_fd, _RECORD, 0)
        except OSError:
            on_disk = b""
        if on_disk != header[:_RECORD]:
            # Not committed: put the old header back (in case the copy was half written) and
            # cut the data off, so the log is exactly as before the append.
            with contextlib.suppress(OSError):
                write_all(w.head_fd, encode_header(before), 0)
            self._undo(w, before, created)
            self._raise_write_error(exc, before)
        self._adopt(w, created)
        if isinstance(exc, (SyncFailed, OSError, EventPipeError)):
            self._flush_failed(exc, done)  # committed: only the flush after it can have failed
        # Interrupted after the commit: make it as durable as promised, then let the
        # interrupt through, saying what was stored.
        try:
            self._owe_durability(w, done)
        except (SyncFailed, OSError, EventPipeError) as sync_exc:
            with contextlib.suppress(DurabilityError):
                self._flush_failed(sync_exc, done)
        _say_committed(exc, done)
        raise exc

    def _prepare(self, w: _WriterState) -> Header:
        """Read the committed header and make the active segment match it. Holds the lock."""
        rebuilt = False
        try:
            h = _header.read_header(w.head_fd, self.head_path, retries=2)
        except CorruptLogError:
            h = self._rebuild(w)
            rebuilt = True
        if h.flags & ROLLING:
            # A writer died while creating segments: remove what it left past the active one.
            self._remove_orphans(h)
            h = h._replace(flags=0)
            self._write_header(w, h)
        if h.segment_base != w.seg_base:
            self._open_active(w, h.segment_base)
        path = segment_path(self.segments_dir, h.segment_base)
        if not w.checked or h.boot != self._boot:
            checked = _recovery.check_active(w.seg_fd, path, h)
            if checked != h:
                h = checked
                self._quarantine(w.seg_fd, h.segment_base, h.committed,
                                 os.fstat(w.seg_fd).st_size)
                self._write_header(w, h)
        size = os.fstat(w.seg_fd).st_size
        if size > h.committed:
            # A writer died mid-write, or a failed append could not be cut back.
            self._quarantine(w.seg_fd, h.segment_base, h.committed, size)
        elif size < h.committed:
            raise CorruptLogError(
                f"active segment is {size} bytes but the header commits {h.committed}",
                path=path, offset=h.head)
        h = self._check_times(w, h, rebuilt)
        if h.boot != self._boot:
            # From now on this boot vouches for the committed bytes (see _header).
            h = h._replace(boot=self._boot)
            self._write_header(w, h)
        if self._group is not None:
            self._group.forget_beyond(h.head)
        w.checked = True
        return h

    def _check_times(self, w: _WriterState, h: Header, rebuilt: bool) -> Header:
        """Make the active segment's time index match header ``h``: entries past its count
        (a killed writer's) are cut; entries it counts that fail their checks (a power loss
        under a sync policy that had not synced them, or damage) are cut with a warning, and
        later events share the last valid time. A rebuilt header keeps every valid entry."""
        events = h.head - h.segment_base
        found = _timeindex.read_entries(w.times_fd, limit=events,
                                        claimed=None if rebuilt else h.tcount)
        keep = len(found.rels)
        tlast = max(h.tlast, found.times[-1] if found.times else 0)
        if keep != h.tcount or tlast != h.tlast:
            if not rebuilt and found.damaged_at is not None:
                _timeindex.log.warning(
                    "%s: time index holds %d valid entries of the %d committed; events from "
                    "offset %d get the time of the last valid one",
                    self._segments_folder().path_of(times_name(h.segment_base)), keep,
                    h.tcount, h.segment_base + (found.rels[-1] if found.rels else 0))
            h = h._replace(tcount=keep, tlast=tlast)
            self._write_header(w, h)
        with os_errors("cut time index", times_name(h.segment_base)):
            if os.fstat(w.times_fd).st_size > keep * ENTRY_SIZE:
                os.ftruncate(w.times_fd, keep * ENTRY_SIZE)
        return h

    def _write_header(self, w: _WriterState, h: Header) -> None:
        """Rewrite the header outside the append path (recovery, roll flags); always fsynced."""
        with os_errors("write log header", self.head_path):
            write_all(w.head_fd, encode_header(h), 0)
            os.fdatasync(w.head_fd)

    def _rebuild(self, w: _WriterState) -> Header:
        segs = [s for s in list_segments(self._segments_folder()) if not s.compressed]
        if not segs:
            raise CorruptLogError("log header is invalid and no segment is left to rebuild"
                                  " it from", path=self.head_path)
        self._open_active(w, segs[-1].base)
        h = _recovery.rebuild_header(w.seg_fd, segs[-1].path, segs[-1].base)
        size = os.fstat(w.seg_fd).st_size
        if size > h.committed:
            self._quarantine(w.seg_fd, h.segment_base, h.committed, size)
        self._write_header(w, h)
        return h

    def _open_active(self, w: _WriterState, base: int) -> None:
        path = segment_path(self.segments_dir, base)
        try:
            fd = self._segments_folder().open_file(segment_name(base), os.O_RDWR)
        except StorageError as exc:
            if exc.errno != errno.ENOENT:
                raise
            raise CorruptLogError(
                "the header names an active segment that does not exist", path=path
            ) from None
        try:
            times_fd = self._segments_folder().open_shared(times_name(base),
                                                           self.config.file_mode)
        except BaseException:
            os.close(fd)
            raise
        if w.seg_fd >= 0:
            os.close(w.seg_fd)
        if w.times_fd >= 0:
            os.close(w.times_fd)
        w.seg_fd, w.times_fd, w.seg_base = fd, times_fd, base

    def _quarantine(self, fd: int, base: int, start: int, end: int) -> None:
        if end > start:
            _recovery.quarantine(
                fd, segment_path(self.segments_dir, base), self.root, base, start, end,
                file_mode=self.config.file_mode, dir_mode=self.config.dir_mode)

    def _clock_stepped_back(self, now: int, stored: int) -> None:
        self.clock_steps_back += 1
        if self.clock_steps_back == 1:  # once per process: the clock, not the log, is wrong
            _timeindex.log.warning(
                "%s: the clock reads %.3f s earlier than the last append time stored; appends "
                "get that stored time until the clock passes it (times never go back)",
                self.path, (stored - now) / 1e9)

    # ------------------------------------------------------------------------------ rolling

    def _plan(self, h: Header, blobs: list[bytes], counts: Sequence[int]) -> list[_Part]:
        """Split a batch over the active segment and as many new ones as the limits need.

        Whole blobs are placed at once; only a blob that straddles a segment limit is walked
        line by line, so a roll costs what one blob weighs, not what the batch weighs.
        """
        max_bytes, max_events = self._max_bytes, self._max_events
        used, events, offset = h.committed, h.head - h.segment_base, h.head
        part = _Part(h.segment_base, used)
        parts = [part]
        for blob, count in zip(blobs, counts, strict=True):
            if used + len(blob) <= max_bytes and events + count <= max_events:
                part.pieces.append(blob)
                part.count += count
                used += len(blob)
                events += count
                offset += count
                continue
            view = memoryview(blob)
            run = pos = 0
            while pos < len(blob):
                end = blob.index(b"\n", pos) + 1
                # An event bigger than a segment still gets one: only roll a non-empty one.
                if events and (used + end - pos > max_bytes or events >= max_events):
                    if pos > run:
                        part.pieces.append(view[run:pos])
                    part = _Part(offset, 0)
                    parts.append(part)
                    used = events = 0
                    run = pos
                used += end - pos
                events += 1
                offset += 1
                part.count += 1
                pos = end
            if run < len(blob):
                part.pieces.append(view[run:])
        return parts

    def _commit_across_segments(
        self, w: _WriterState, h: Header, blobs: list[bytes], counts: Sequence[int], now: int,
        exact: bool,
    ) -> range:
        """Write a batch that rolls the active segment; one header rewrite commits it all.

        ``now`` is the batch's append time (already at least ``h.tlast``); ``exact``: it was
        given (see :meth:`commit`), so it gets an entry whenever it differs from the last."""
        cfg = self.config
        parts = self._plan(h, blobs, counts)
        done = range(h.head, h.head + sum(counts))
        created: list[tuple[int, int, int]] = []  # (base, fd, time index fd) of new segments
        tcount, tlast = h.tcount, h.tlast
        try:
            if len(parts) > 1:
                # Say a roll is under way before creating files past the active segment, so a
                # writer killed here leaves a header that tells the next one to look for them
                # (the only listing of the folder a roll ever needs).
                _pwrite(w.head_fd, encode_header(h._replace(flags=ROLLING)), 0)
                if cfg.sync != "none":
                    os.fdatasync(w.head_fd)
            for part in parts:
                tcount, tlast = self._write_part(w, h, part, len(parts) > 1, created, now,
                                                 tcount, tlast, exact)
            if cfg.sync != "none":
                # Sealed segments are synced whatever the policy's interval: it is once per
                # roll, and it keeps "interval" from ever losing more than the active segment.
                for fd in [w.seg_fd, w.times_fd] + [f for _, sf, tf in created[:-1]
                                                     for f in (sf, tf)]:
                    os.fdatasync(fd)
                if cfg.sync == "always" and created:
                    os.fdatasync(created[-1][1])
                    os.fdatasync(created[-1][2])
                self._segments_folder().fsync()
        except BaseException as exc:
            self._undo(w, h, created)
            with contextlib.suppress(OSError):
                write_all(w.head_fd, encode_header(h), 0)
            self._raise_write_error(exc, h)
        last = parts[-1]
        last_size = last.position + sum(map(len, last.pieces))
        synced = last_size if self._always else (0 if created else h.synced)
        after = Header(done.stop, last.base, last_size, synced, self._boot, 0, tcount, tlast)
        self._publish(w, h, encode_header(after), done, created)
        if created:
            self._on_roll()  # checksum (and compress) the sealed segments
        return done

    def _write_part(self, w: _WriterState, h: Header, part: _Part, rolls: bool,
                    created: list[tuple[int, int, int]], now: int, tcount: int,
                    tlast: int, exact: bool) -> tuple[int, int]:
        """Write one part of a batch (into the active segment, or a new one it adds to
        ``created``) and its time entry; returns the time entry count and last time of the
        segment written."""
        if part.base == h.segment_base:
            fd, times_fd = w.seg_fd, w.times_fd
        else:
            fd, times_fd = self._new_segment(h, part.base)
            created.append((part.base, fd, times_fd))
        position = part.position
        for piece in part.pieces:
            write_all(fd, piece, position)
            position += len(piece)
        if part.base != h.segment_base:
            write_all(times_fd, pack_entry(0, now), 0)
            return 1, now
        if part.count and (not tcount or now - tlast >= GRAIN_NS or (exact and now != tlast)):
            write_all(times_fd, pack_entry(h.head - h.segment_base, now), tcount * ENTRY_SIZE)
            tcount, tlast = tcount + 1, now
        if rolls:
            # Sealed from here on: its time index holds exactly its entries (a killed
            # writer's leftover past them goes).
            os.ftruncate(times_fd, tcount * ENTRY_SIZE)
        return tcount, tlast

    def _remove_orphans(self, h: Header) -> None:
        """Remove segments past the active one: left by a writer that died mid-roll.

        Readers ignore them (they only list up to the header's active segment), but a roll
        must not leave one behind, or it would sit inside the committed range.
        """
        segments = self._segments_folder()
        for name in segments.names():
            base = _timeindex.parse_times_name(name)
            if base is not None and base > h.segment_base:
                segments.unlink(name)
        for seg in list_segments(segments):
            if seg.base <= h.segment_base:
                continue
            if not seg.compressed:
                fd = segments.open_file(seg.name, os.O_RDWR)
                try:
                    with os_errors("remove uncommitted segment", seg.path):
                        self._quarantine(fd, seg.base, 0, os.fstat(fd).st_size)
                finally:
                    os.close(fd)
            segments.unlink(seg.name)

    def _new_segment(self, h: Header, base: int) -> tuple[int, int]:
        """Create segment ``base`` and its time index; returns both descriptors."""
        path = segment_path(self.segments_dir, base)
        mode = self.config.file_mode
        segments = self._segments_folder()
        for attempt in range(2):
            try:
                fd = segments.open_file(segment_name(base),
                                        os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
                try:
                    # A leftover index of a writer killed mid-roll is cut, not believed.
                    times_fd = segments.open_shared(times_name(base), mode)
                    os.ftruncate(times_fd, 0)
                except BaseException:
                    os.close(fd)
                    with contextlib.suppress(OSError):
                        segments.unlink(segment_name(base))
                    raise
                return fd, times_fd
            except StorageError as exc:
                if exc.errno != errno.EEXIST:
                    raise
                if attempt:
                    break
                # Left by a writer that died mid-roll without a durable ROLLING flag (a
                # power loss, or an older eventpipe): the one case a roll lists the folder.
                self._remove_orphans(h)
        raise CorruptLogError(
            "a segment to be created already exists (is another program writing here?)",
            path=path)

    # ------------------------------------------------------------------------------ failures

    def _undo(self, w: _WriterState, h: Header, created: list[tuple[int, int, int]]) -> None:
        """Cut back an append that failed before its commit; the log is as before it."""
        # If cutting back fails too, the next writer's _prepare quarantines the leftover,
        # and the ROLLING flag makes it remove leftover segments: readers never see either.
        with contextlib.suppress(OSError):
            os.ftruncate(w.seg_fd, h.committed)
        with contextlib.suppress(OSError):
            os.ftruncate(w.times_fd, h.tcount * ENTRY_SIZE)
        for base, fd, times_fd in created:
            os.close(fd)
            os.close(times_fd)
            with contextlib.suppress(OSError):
                self._segments_folder().unlink(segment_name(base))
            with contextlib.suppress(OSError):
                self._segments_folder().unlink(times_name(base))

    def _raise_write_error(self, exc: BaseException, h: Header) -> NoReturn:
        """Re-raise the error of a failed (and undone) append, OSErrors as StorageError."""
        if not isinstance(exc, OSError) or isinstance(exc, StorageError):
            raise exc
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            what = "append failed, nothing of it is stored (the log is as before; retry later)"
        else:
            what = "append failed, nothing of it is stored"
        # Name what refused: the OS says which file (a new segment, the folder) when it can.
        where = exc.filename or segment_path(self.segments_dir, h.segment_base)
        err = StorageError.from_os_error(exc, what, path=where)
        err.offset = h.head
        raise err from exc

    # ------------------------------------------------------------------------------ syncing

    def _start_syncer(self) -> None:
        self._syncer_stop.clear()
        self._syncer = threading.Thread(target=self._sync_loop, name="eventpipe-sync",
                                        daemon=True)
        self._syncer.start()

    def _sync_loop(self) -> None:
        stop = self._syncer_stop
        while not stop.wait(self.config.sync_interval):
            try:
                self.sync()
            except Exception:  # recorded in self._failure: the next append raises it
                return

    def sync(self) -> None:
        """fsync what this process has appended and not yet synced (any sync policy), and
        record in the header how much of the active segment is now durable.

        Raises DurabilityError (and the log refuses appends from then on) if an fsync fails.
        """
        with self.mutex:
            if self._failure is not None:
                raise self._failure
            w = self._state
            if w is None or not w.dirty:
                return
            try:
                self._sync(w)
            except DurabilityError:
                raise
            except (OSError, CorruptLogError) as exc:
                head = self._peek_head(w)
                self._fail(exc, "fsync", range(w.unsynced_from, max(head, w.unsynced_from)))
            w.dirty = False

    def _sync(self, w: _WriterState) -> None:
        # Raw blocking flocks: a lock_timeout is for appends; a sync waits its turn.
        _flock(w.lock_fd, _LOCK_EX)
        try:
            h = _header.read_header(w.head_fd, self.head_path)
        finally:
            self._unlock(w, None)
        # Outside the lock: an fsync never stalls other writers. It covers every byte of the
        # file written before it, whoever wrote them.
        if h.segment_base != w.seg_base:
            self._open_active(w, h.segment_base)
        os.fdatasync(w.seg_fd)
        os.fdatasync(w.times_fd)
        _flock(w.lock_fd, _LOCK_EX)
        try:
            now = _header.read_header(w.head_fd, self.head_path)
            if now.segment_base == h.segment_base and now.synced < h.committed:
                write_all(w.head_fd, encode_header(now._replace(synced=h.committed)), 0)
        finally:
            self._unlock(w, None)
        os.fdatasync(w.head_fd)

    def _peek_head(self, w: _WriterState) -> int:
        try:
            return _header.read_header(w.head_fd, self.head_path).head
        except (OSError, CorruptLogError):
            return w.unsynced_from

    def close(self) -> None:
        """Stop the sync thread, fsync what is pending, close the files. Idempotent.

        Raises DurabilityError if an fsync failed (now or in the background) since the log
        was opened; the files are closed either way.
        """
        self._syncer_stop.set()
        if self._syncer is not None:
            self._syncer.join()
            self._syncer = None
        try:
            if not self._closed:
                self.sync()
        finally:
            with self.mutex:
                self._closed = True
                if self._state is not None:
                    self._state.close()
                    self._state = None
                if self._group is not None:
                    self._group.close()
                    self._group = None
                if self._segments is not None:
                    self._segments.close()
                    self._segments = None
