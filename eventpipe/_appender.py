"""Appending to a log from this process: the writer lock, the commit, recovery.

Under the writer lock (a flock on ``writer.lock``): read the header, cut off any torn tail a
killed writer left (saving it to ``quarantine/``), write the event bytes after the committed
ones (into new segments where the active one is full), fsync as the sync policy says, and
rewrite the header. The header rewrite is the commit: until it, readers in every process see
nothing of the append, and a failure before it is undone by truncating what was written.
Offsets come from the header, so they are dense and never reused.
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

from . import _header
from ._fsutil import atomic_write, fsync_dir, make_dirs, open_shared, os_errors, write_all
from ._header import Header, pack_header
from .config import LogConfig
from .errors import CorruptLogError, LockTimeout, LogClosedError, StorageError
from .segment import list_segments, segment_path

__all__ = ["Appender"]

WRITER_LOCK = "writer.lock"
QUARANTINE_DIR = "quarantine"

_pread = os.pread
_pwrite = os.pwrite
_flock = fcntl.flock
_LOCK_EX = fcntl.LOCK_EX
_LOCK_UN = fcntl.LOCK_UN
HEADER_SIZE = _header.HEADER_SIZE
_MAGIC = _header.MAGIC
_BODY = _header.BODY_SIZE
_pack_body = _header.pack_body
_unpack_header = _header.unpack_header
_crc32 = zlib.crc32

# Every appender of this process, so a forked child can drop the parent's writer state: flock
# belongs to the open file description, which a child shares, so an inherited lock fd would
# let parent and child "hold" the writer lock at once.
_LIVE: weakref.WeakSet[Appender] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for appender in list(_LIVE):
        appender.forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _WriterState:
    """File descriptors and bookkeeping a process needs to append; created on first append."""

    __slots__ = ("checked", "dirty", "head_fd", "lock_fd", "seg_base", "seg_fd")

    def __init__(self, lock_fd: int, head_fd: int) -> None:
        self.lock_fd = lock_fd
        self.head_fd = head_fd
        self.seg_fd = -1
        self.seg_base = -1
        self.checked = False  # tail checked against the header once per process (power loss)
        self.dirty = False  # written since the last fsync (sync="interval")

    def close(self) -> None:
        for fd in (self.seg_fd, self.head_fd, self.lock_fd):
            if fd >= 0:
                os.close(fd)
        self.seg_fd = self.head_fd = self.lock_fd = -1


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

    def __init__(self, path: str, segments_dir: str, head_path: str, config: LogConfig,
                 on_roll: Callable[[], None]) -> None:
        self.path = path
        self.segments_dir = segments_dir
        self.head_path = head_path
        self.config = config
        self.mutex = threading.Lock()
        self._on_roll = on_roll
        self._state: _WriterState | None = None
        self._closed = False
        self._syncer: threading.Thread | None = None
        self._syncer_stop = threading.Event()
        # Options the hot path reads, as plain attributes.
        self._max_bytes = config.segment_max_bytes
        self._max_events = config.segment_max_events or sys.maxsize
        self._always = config.sync == "always"
        self._lock_timeout = config.lock_timeout
        _LIVE.add(self)

    def open(self) -> _WriterState:
        """This process's writer state, opening it on first use. Caller holds ``mutex``."""
        if self._closed:
            raise LogClosedError("log is closed", path=self.path)
        w = self._state
        if w is None:
            mode = self.config.file_mode
            lock_path = os.path.join(self.path, WRITER_LOCK)
            with os_errors("open writer lock", lock_path):
                lock_fd = open_shared(lock_path, mode)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
                try:
                    head_fd = self._open_head_for_writing()
                finally:
                    fcntl.flock(lock_fd, fcntl.LOCK_UN)
            except BaseException:
                os.close(lock_fd)
                raise
            w = self._state = _WriterState(lock_fd, head_fd)
            if self.config.sync == "interval":
                self._start_syncer()
            self._on_roll()  # finish sealing what earlier writers left
        return w

    def _open_head_for_writing(self) -> int:
        """Open ``head`` read-write, creating the first segment and header if missing."""
        mode = self.config.file_mode
        with os_errors("open log header", self.head_path):
            try:
                return os.open(self.head_path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                pass
            make_dirs(self.segments_dir, self.config.dir_mode)
            first = segment_path(self.segments_dir, 0)
            fd = os.open(first, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, mode)
            os.fchmod(fd, mode)
            os.fsync(fd)
            os.close(fd)
            fsync_dir(self.segments_dir)
            atomic_write(self.head_path, pack_header(0, 0, 0), mode)
            return os.open(self.head_path, os.O_RDWR | os.O_CLOEXEC)

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

    def _acquire(self, w: _WriterState) -> None:
        """Take the writer lock within ``lock_timeout`` or raise LockTimeout.

        (Without a timeout, commit() blocks in flock directly.)
        """
        timeout = self._lock_timeout
        assert timeout is not None
        deadline = time.monotonic() + timeout
        delay = 0.0001
        while True:
            try:
                fcntl.flock(w.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"writer lock still held by another process after {timeout}s",
                        path=os.path.join(self.path, WRITER_LOCK),
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.01)

    def _prepare(self, w: _WriterState) -> Header:
        """Read the committed header and make the active segment match it. Holds the lock."""
        try:
            h = _header.read_header(w.head_fd, self.head_path, retries=1)
        except CorruptLogError:
            h = self._recover(w, None)
        if h.segment_base != w.seg_base:
            self._open_active(w, h.segment_base)
        size = os.fstat(w.seg_fd).st_size
        if size < h.committed or (not w.checked and not self._tail_ok(w, h)):
            # Bytes the header counts are missing (a power loss with sync off lost them).
            h = self._recover(w, h.segment_base)
        elif size > h.committed:
            # A writer died mid-write, or a failed append could not be cut back.
            self._quarantine(w.seg_fd, h.segment_base, h.committed, size)
        w.checked = True
        return h

    def _open_active(self, w: _WriterState, base: int) -> None:
        path = segment_path(self.segments_dir, base)
        with os_errors("open active segment", path):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                raise CorruptLogError(
                    "the header names an active segment that does not exist", path=path
                ) from None
        if w.seg_fd >= 0:
            os.close(w.seg_fd)
        w.seg_fd, w.seg_base = fd, base

    def _tail_ok(self, w: _WriterState, h: Header) -> bool:
        if h.committed == 0:
            return True
        tail = os.pread(w.seg_fd, min(h.committed, 4096), h.committed - min(h.committed, 4096))
        return tail.endswith(b"\n") and b"\0" not in tail

    def _quarantine(self, fd: int, base: int, start: int, end: int) -> None:
        """Move bytes ``start..end`` of segment ``base`` to quarantine/ and cut them off."""
        qdir = os.path.join(self.path, QUARANTINE_DIR)
        make_dirs(qdir, self.config.dir_mode)
        name = f"{base:020d}-{start}-{time.time_ns()}.bin"
        qpath = os.path.join(qdir, name)
        with os_errors("quarantine torn tail", qpath):
            qfd = os.open(qpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                          self.config.file_mode)
            try:
                pos = start
                while pos < end:
                    block = os.pread(fd, min(1 << 20, end - pos), pos)
                    if not block:
                        break
                    write_all(qfd, block, pos - start)
                    pos += len(block)
                os.fsync(qfd)
            finally:
                os.close(qfd)
            fsync_dir(qdir)
        with os_errors("cut torn tail", segment_path(self.segments_dir, base)):
            os.ftruncate(fd, start)
            os.fsync(fd)

    def _recover(self, w: _WriterState, base: int | None) -> Header:
        """Rebuild the header from the last segment's complete lines (power loss, bad header).

        Everything after the last complete, NUL-free line is quarantined. Holds the lock.
        """
        if base is None:
            segs = [s for s in list_segments(self.segments_dir) if not s.compressed]
            if not segs:
                raise CorruptLogError("log header is invalid and no segment is left to rebuild"
                                      " it from", path=self.head_path)
            base = segs[-1].base
            self._open_active(w, base)
        fd = w.seg_fd
        size = os.fstat(fd).st_size
        good = count = 0
        pos = 0
        pending = b""
        while pos < size:
            block = os.pread(fd, min(1 << 20, size - pos), pos)
            if not block:
                break
            pos += len(block)
            buf = pending + block
            cut = buf.rfind(b"\n") + 1
            complete, pending = buf[:cut], buf[cut:]
            nul = complete.find(b"\0")
            if nul >= 0:
                cut = complete.rfind(b"\n", 0, nul) + 1
                complete = complete[:cut]
            lines = complete.count(b"\n")
            if b"\n\n" in complete or complete.startswith(b"\n"):
                break  # an empty line is no event: stop trusting bytes here
            good += len(complete)
            count += lines
            if nul >= 0:
                break
        if good < size:
            self._quarantine(fd, base, good, size)
        h = Header(base + count, base, good)
        write_all(w.head_fd, pack_header(*h), 0)
        os.fsync(w.head_fd)
        return h

    def commit(self, blobs: list[bytes], counts: Sequence[int], size: int, n: int) -> range:
        """Write ``blobs`` (``counts`` events each, ``size`` bytes, ``n`` events) and commit."""
        # The hot path of every append: kept to the syscalls it needs (flock, header pread,
        # 1-byte pread for a torn tail, data pwrite, header pwrite, unlock), with the header
        # decoded and encoded inline and the options read from attributes set up front.
        with self.mutex:
            w = self._state or self.open()
            if self._lock_timeout is None:
                # A raw flock on the kept-open fd: ~1 µs, where filelock's acquire+release
                # costs ~70 µs of Python (benchmark row 10) and would cap append() near 14k/s.
                # Both take flock on the same file, so they exclude each other.
                _flock(w.lock_fd, _LOCK_EX)
            else:
                self._acquire(w)
            try:
                raw = _pread(w.head_fd, HEADER_SIZE, 0)
                if len(raw) == HEADER_SIZE:
                    magic, head, base, committed, crc = _unpack_header(raw)
                else:
                    magic = b""
                if (magic != _MAGIC or crc != _crc32(raw[:_BODY]) or base != w.seg_base
                        or not w.checked or _pread(w.seg_fd, 1, committed)):
                    # Damage, another writer rolled, or a writer died leaving a torn tail.
                    head, base, committed = self._prepare(w)
                if (committed + size <= self._max_bytes
                        and head - base + n <= self._max_events):
                    seg_fd = w.seg_fd
                    try:
                        position = committed
                        for blob in blobs:
                            if _pwrite(seg_fd, blob, position) != len(blob):
                                write_all(seg_fd, blob, position)  # short write: finish or raise
                            position += len(blob)
                        if self._always:
                            os.fdatasync(seg_fd)
                    except BaseException as exc:
                        h = Header(head, base, committed)
                        self._undo(w, h, [])
                        self._raise_write_error(exc, h)
                    # The commit point: readers see the new events from this pwrite on.
                    body = _pack_body(_MAGIC, head + n, base, position)
                    _pwrite(w.head_fd, body + _crc32(body).to_bytes(4, "little"), 0)
                    if self._always:
                        os.fdatasync(w.head_fd)
                    else:
                        w.dirty = True
                else:
                    self._commit_across_segments(w, Header(head, base, committed), blobs,
                                                 counts)
            finally:
                _flock(w.lock_fd, _LOCK_UN)
        return range(head, head + n)

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
        self, w: _WriterState, h: Header, blobs: list[bytes], counts: Sequence[int]
    ) -> None:
        """Write a batch that rolls the active segment; one header rewrite commits it all."""
        cfg = self.config
        self._remove_orphans(h)
        parts = self._plan(h, blobs, counts)
        created: list[tuple[int, int]] = []  # (base, fd) of new segment files
        try:
            for part in parts:
                if part.base == h.segment_base:
                    fd = w.seg_fd
                else:
                    fd = self._new_segment(part.base)
                    created.append((part.base, fd))
                position = part.position
                for piece in part.pieces:
                    write_all(fd, piece, position)
                    position += len(piece)
            if cfg.sync != "none":
                # Sealed segments are synced whatever the policy's interval: it is once per
                # roll, and it keeps "interval" from ever losing more than the active segment.
                for fd in [w.seg_fd] + [fd for _, fd in created[:-1]]:
                    os.fdatasync(fd)
                if cfg.sync == "always" and created:
                    os.fdatasync(created[-1][1])
                fsync_dir(self.segments_dir)
        except BaseException as exc:
            self._undo(w, h, created)
            self._raise_write_error(exc, h)
        last = parts[-1]
        last_size = last.position + sum(map(len, last.pieces))
        self._publish(w, h.head + sum(counts), last.base, last_size)
        if created:
            os.close(w.seg_fd)
            for _, fd in created[:-1]:
                os.close(fd)
            w.seg_base, w.seg_fd = created[-1]
            self._on_roll()  # checksum (and compress) the sealed segments

    def _remove_orphans(self, h: Header) -> None:
        """Remove segments past the active one: left by writers that died before committing.

        Readers ignore them (they only list up to the header's active segment), but a roll
        must not leave one behind, or it would sit inside the committed range.
        """
        for seg in list_segments(self.segments_dir):
            if seg.base <= h.segment_base:
                continue
            with os_errors("remove uncommitted segment", seg.path):
                if not seg.compressed:
                    fd = os.open(seg.path, os.O_RDWR | os.O_CLOEXEC)
                    try:
                        size = os.fstat(fd).st_size
                        if size:
                            self._quarantine(fd, seg.base, 0, size)
                    finally:
                        os.close(fd)
                os.unlink(seg.path)

    def _new_segment(self, base: int) -> int:
        path = segment_path(self.segments_dir, base)
        mode = self.config.file_mode
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            os.fchmod(fd, mode)
            return fd
        except FileExistsError:
            raise CorruptLogError(
                "a segment to be created already exists (is another program writing here?)",
                path=path,
            ) from None

    def _undo(self, w: _WriterState, h: Header, created: list[tuple[int, int]]) -> None:
        """Cut back an append that failed before its commit; the log is as before it."""
        # If cutting back fails too, the next writer's _prepare quarantines the leftover,
        # and the next roll removes leftover segments: readers never see either.
        with contextlib.suppress(OSError):
            os.ftruncate(w.seg_fd, h.committed)
        for base, fd in created:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(segment_path(self.segments_dir, base))

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

    def _publish(self, w: _WriterState, head: int, segment_base: int, committed: int) -> None:
        # The commit point: readers see the new events from this pwrite on. (commit() inlines
        # this for the common case.) 32 bytes in one page: a pwrite that cannot come up short.
        write_all(w.head_fd, pack_header(head, segment_base, committed), 0)
        if self._always:
            os.fdatasync(w.head_fd)
        else:
            w.dirty = True

    def _start_syncer(self) -> None:
        self._syncer_stop.clear()
        self._syncer = threading.Thread(target=self._sync_loop, name="eventpipe-sync",
                                        daemon=True)
        self._syncer.start()

    def _sync_loop(self) -> None:
        stop = self._syncer_stop
        while not stop.wait(self.config.sync_interval):
            self.sync()

    def sync(self) -> None:
        """fsync what this process has appended and not yet synced (any sync policy)."""
        with self.mutex:
            w = self._state
            if w is None or not w.dirty:
                return
            with os_errors("fsync", self.path):
                if w.seg_fd >= 0:
                    os.fdatasync(w.seg_fd)
                os.fdatasync(w.head_fd)
            w.dirty = False

    def close(self) -> None:
        """Stop the sync thread, fsync what is pending, close the files. Idempotent."""
        self._syncer_stop.set()
        if self._syncer is not None:
            self._syncer.join()
            self._syncer = None
        try:
            self.sync()
        finally:
            with self.mutex:
                self._closed = True
                if self._state is not None:
                    self._state.close()
                    self._state = None
