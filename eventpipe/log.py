"""The event log: a directory of segment files that many processes append to and read.

Layout of a log directory::

    eventpipe.json   format marker and version (written once, atomically)
    head             the commit point (see ``_header``): head offset, active segment, its size
    writer.lock      flock'd by whichever process is appending
    compress.lock    held by whichever process is compressing sealed segments
    segments/        00000000000000000000.jsonl[.gz], ... named by their first offset
    quarantine/      bytes cut from the tail by recovery, kept rather than dropped

Appending, under the writer lock: read the header, cut off any torn tail a killed writer left
(saving it to ``quarantine/``), write the event bytes after the committed ones (into new
segments where the active one is full), fsync as the sync policy says, and rewrite the header.
The header rewrite is the commit: until it, readers in every process see nothing of the append,
and a failure before it is undone by truncating what was written. Offsets come from the header,
so they are dense and never reused.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import itertools
import os
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NoReturn, Self

import orjson

from . import _header
from ._fsutil import atomic_write, fsync_dir, make_dirs, open_shared, os_errors, write_all
from ._header import Header, pack_header
from .compress import Compressor
from .config import LogConfig
from .errors import (
    CorruptLogError,
    EventTooLargeError,
    LockTimeout,
    LogClosedError,
    NotAnEventLogError,
    OffsetOutOfRangeError,
    StorageError,
    UnserializableEventError,
    UnsupportedFormatError,
)
from .record import Record
from .segment import LineChunk, list_segments, read_chunks, segment_path

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "EventLog"]

FORMAT_NAME = "eventpipe-log"
FORMAT_VERSION = 1
META_FILE = "eventpipe.json"
HEAD_FILE = "head"
WRITER_LOCK = "writer.lock"
COMPRESS_LOCK = "compress.lock"
SEGMENTS_DIR = "segments"
QUARANTINE_DIR = "quarantine"
_INIT_PREFIX = ".eventpipe-init."

_dumps = orjson.dumps
_loads = orjson.loads
_pread = os.pread
_pwrite = os.pwrite
_flock = fcntl.flock
_LOCK_EX = fcntl.LOCK_EX
_LOCK_UN = fcntl.LOCK_UN
_decode_header = _header.decode_header
HEADER_SIZE = _header.HEADER_SIZE
_ENCODE_SLICE = 1000

# Every open log of this process, so a forked child can drop the parent's writer state: flock
# belongs to the open file description, which a child shares, so an inherited lock fd would
# let parent and child "hold" the writer lock at once.
_LIVE_LOGS: weakref.WeakSet[EventLog] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for log in list(_LIVE_LOGS):
        log._forget_writer_after_fork()


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


class EventLog:
    """A durable, append-only log of JSON events in the directory ``path``.

    Opens the log, creating it if ``path`` is missing or an empty directory. ``options`` are
    those of :data:`eventpipe.config.LOG_OPTIONS` (``segment_max_bytes``, ``sync``, ...), layered
    over ``EVENTPIPE_*`` environment variables and built-in defaults.

    Safe to share between threads; each process opens its own. Raises ConfigError for a bad
    option, NotAnEventLogError for a non-empty directory that is not a log,
    UnsupportedFormatError for a newer format, StoragePermissionError naming the path when the
    process may not create or read it.
    """

    def __init__(self, path: str | os.PathLike[str], **options: Any) -> None:
        self.config = LogConfig.from_options(options)
        self.path = os.path.abspath(os.fspath(path))
        self.segments_dir = os.path.join(self.path, SEGMENTS_DIR)
        self._head_path = os.path.join(self.path, HEAD_FILE)
        self._mutex = threading.Lock()
        self._writer_state: _WriterState | None = None
        self._reader_fd = -1
        self._bases: list[int] = []
        self._closed = False
        self._compressor: Compressor | None = None
        self._syncer: threading.Thread | None = None
        self._syncer_stop = threading.Event()
        self.log_id = self._open_or_create()
        _LIVE_LOGS.add(self)

    # ----------------------------------------------------------------- opening and creating

    def _open_or_create(self) -> str:
        meta_path = os.path.join(self.path, META_FILE)
        if not os.path.exists(meta_path):
            self._create(meta_path)
        meta = self._read_meta(meta_path)
        if not os.path.exists(self._head_path):
            # Created by a process that died before writing the header; finish the job.
            with self._mutex:
                self._writer()
        return str(meta["log_id"])

    def _create(self, meta_path: str) -> None:
        cfg = self.config
        make_dirs(self.path, cfg.dir_mode)
        with os_errors("inspect directory", self.path):
            others = [n for n in os.listdir(self.path) if not n.startswith(_INIT_PREFIX)]
        if others:
            raise NotAnEventLogError(
                f"directory is not empty and holds no {META_FILE} (found {sorted(others)[:5]});"
                " refusing to turn it into a log",
                path=self.path,
            )
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "log_id": uuid.uuid4().hex,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        tmp = os.path.join(self.path, f"{_INIT_PREFIX}{os.getpid()}.{uuid.uuid4().hex}")
        with os_errors("create log metadata", meta_path):
            atomic_write(tmp, orjson.dumps(meta, option=orjson.OPT_INDENT_2), cfg.file_mode)
            try:
                # link() fails if another process created the log first: theirs wins, intact.
                os.link(tmp, meta_path)
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        fsync_dir(self.path)

    def _read_meta(self, meta_path: str) -> dict[str, Any]:
        try:
            with open(meta_path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise StorageError.from_os_error(exc, "read log metadata", path=meta_path) from exc
        try:
            meta = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise NotAnEventLogError(f"{META_FILE} is not JSON", path=meta_path) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise NotAnEventLogError(f"{META_FILE} does not describe an eventpipe log",
                                     path=meta_path)
        version = meta.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"log format version {version!r} is newer than this eventpipe supports "
                f"({FORMAT_VERSION}); upgrade eventpipe to read it",
                path=meta_path,
            )
        return meta

    # ----------------------------------------------------------------------- writer state

    def _writer(self) -> _WriterState:
        """This process's writer state, opening it on first use. Caller holds ``_mutex``."""
        if self._closed:
            raise LogClosedError("log is closed", path=self.path)
        w = self._writer_state
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
            w = self._writer_state = _WriterState(lock_fd, head_fd)
            if self.config.sync == "interval":
                self._start_syncer()
            self._compression().kick()  # finish what earlier writers left unsealed
        return w

    def _open_head_for_writing(self) -> int:
        """Open ``head`` read-write, creating the first segment and header if missing."""
        mode = self.config.file_mode
        with os_errors("open log header", self._head_path):
            try:
                return os.open(self._head_path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                pass
            make_dirs(self.segments_dir, self.config.dir_mode)
            first = segment_path(self.segments_dir, 0)
            fd = os.open(first, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, mode)
            os.fchmod(fd, mode)
            os.fsync(fd)
            os.close(fd)
            fsync_dir(self.segments_dir)
            atomic_write(self._head_path, pack_header(0, 0, 0), mode)
            return os.open(self._head_path, os.O_RDWR | os.O_CLOEXEC)

    def _forget_writer_after_fork(self) -> None:
        # The child must not use the parent's lock fd (shared flock) or threads (not copied);
        # a lock held by another parent thread at fork time would never be released here.
        self._mutex = threading.Lock()
        w = self._writer_state
        if w is not None:
            w.close()
        self._writer_state = None
        self._compressor = None
        self._syncer = None
        self._syncer_stop = threading.Event()

    def _acquire(self, w: _WriterState) -> None:
        timeout = self.config.lock_timeout
        if timeout is None:
            # A raw flock on a kept-open fd costs ~1 µs; filelock's acquire costs ~100 µs of
            # Python per call, which alone would cap append() near 10k/s. Both take flock on
            # the same file, so they exclude each other correctly.
            fcntl.flock(w.lock_fd, fcntl.LOCK_EX)
            return
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
            h = _header.read_header(w.head_fd, self._head_path, retries=1)
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
                                      " it from", path=self._head_path)
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

    # --------------------------------------------------------------------------- appending

    def append(self, event: Any) -> int:
        """Store one JSON-serialisable event; return its offset.

        When this returns, the event is visible to readers in every process, and durable as
        ``sync`` says. Raises UnserializableEventError or EventTooLargeError before writing
        anything, StorageError (disk full, file too large, I/O) with the log unchanged,
        LockTimeout, LogClosedError.
        """
        try:
            data = _dumps(event)
        except orjson.JSONEncodeError as exc:
            raise UnserializableEventError(f"event is not JSON-serialisable: {exc}",
                                           path=self.path) from None
        size = len(data)
        if size > self.config.max_event_bytes:
            raise EventTooLargeError(
                f"event is {size} bytes encoded, over max_event_bytes="
                f"{self.config.max_event_bytes}",
                size=size,
                path=self.path,
            )
        return self._commit([data + b"\n"], (1,), size + 1, 1).start

    def append_many(self, events: Iterable[Any]) -> range:
        """Store a batch under one lock acquisition; return its offsets.

        All or nothing: if any event is bad (UnserializableEventError, EventTooLargeError, whose
        ``index`` names it) the error is raised before anything is written, and if the write
        fails (StorageError) what was written is cut back: either way none of the batch is
        stored.
        """
        events = events if isinstance(events, list | tuple) else list(events)
        blobs: list[bytes] = []
        counts: list[int] = []
        limit = self.config.max_event_bytes
        # Encode a slice at a time and keep only each slice's joined bytes: holding 100k small
        # bytes objects alive at once costs more in fresh memory than encoding them does.
        for i in range(0, len(events), _ENCODE_SLICE):
            try:
                payloads = list(map(_dumps, events[i : i + _ENCODE_SLICE]))
            except orjson.JSONEncodeError:
                self._raise_bad_event(events)
            count = len(payloads)
            payloads.append(b"")  # join then ends with a newline, without another copy
            blob = b"\n".join(payloads)
            if len(blob) - count > limit:  # only then can one event be over the limit
                self._check_sizes(payloads[:-1], i)
            blobs.append(blob)
            counts.append(count)
        return self._commit_batch(blobs, counts)

    def append_encoded(self, payloads: list[bytes]) -> range:
        """Store events already encoded as compact JSON (one per item, no raw newlines).

        For writers that encode ahead (the buffered writer, the CLI): the bytes are checked for
        size and framing, not parsed. All or nothing, like :meth:`append_many`.
        """
        blob = b"\n".join([*payloads, b""])
        if blob.count(b"\n") != len(payloads):
            raise UnserializableEventError("an encoded event contains a raw newline",
                                           path=self.path)
        if len(blob) - len(payloads) > self.config.max_event_bytes:
            self._check_sizes(payloads, 0)
        return self._commit_batch([blob], [len(payloads)])

    def _check_sizes(self, payloads: list[bytes], first_index: int) -> None:
        limit = self.config.max_event_bytes
        for k, p in enumerate(payloads):
            if len(p) > limit:
                index = first_index + k
                raise EventTooLargeError(
                    f"event {index} of the batch is {len(p)} bytes encoded, over "
                    f"max_event_bytes={limit}; nothing of the batch was written",
                    index=index,
                    size=len(p),
                    path=self.path,
                )

    def _commit_batch(self, blobs: list[bytes], counts: list[int]) -> range:
        n = sum(counts)
        if n == 0:
            self._check_open()
            with self._mutex:
                self._writer()
            head = self._read_header().head
            return range(head, head)
        return self._commit(blobs, counts, sum(map(len, blobs)), n)

    def _raise_bad_event(self, events: list[Any] | tuple[Any, ...]) -> NoReturn:
        for index, event in enumerate(events):
            try:
                _dumps(event)
            except orjson.JSONEncodeError as exc:
                raise UnserializableEventError(
                    f"event {index} of the batch is not JSON-serialisable: {exc}; nothing of "
                    "the batch was written",
                    index=index,
                    path=self.path,
                ) from None
        raise AssertionError("unreachable: no event failed to encode the second time")

    def _commit(self, blobs: list[bytes], counts: Sequence[int], size: int, n: int) -> range:
        """Write ``blobs`` (``counts`` events each, ``size`` bytes, ``n`` events) and commit."""
        # The hot path of every append: kept to the syscalls it needs (flock, header pread,
        # 1-byte pread for a torn tail, data pwrite, header pwrite, unlock) and few Python calls.
        cfg = self.config
        with self._mutex:
            w = self._writer_state or self._writer()
            if cfg.lock_timeout is None:
                _flock(w.lock_fd, _LOCK_EX)
            else:
                self._acquire(w)
            try:
                h = _decode_header(_pread(w.head_fd, HEADER_SIZE, 0))
                if (h is None or h[1] != w.seg_base or not w.checked
                        or _pread(w.seg_fd, 1, h[2])):
                    h = self._prepare(w)  # another writer rolled, or a torn tail, or damage
                head, base, committed = h
                in_segment = head - base
                if (committed + size <= cfg.segment_max_bytes
                        and (cfg.segment_max_events is None
                             or in_segment + n <= cfg.segment_max_events)):
                    try:
                        position = committed
                        for blob in blobs:
                            if _pwrite(w.seg_fd, blob, position) != len(blob):
                                write_all(w.seg_fd, blob, position)  # short write: finish or raise
                            position += len(blob)
                        if cfg.sync == "always":
                            os.fdatasync(w.seg_fd)
                    except BaseException as exc:
                        self._undo(w, h, [])
                        self._raise_write_error(exc, h)
                    self._publish(w, head + n, base, committed + size)
                else:
                    self._commit_across_segments(w, h, blobs, counts)
            finally:
                _flock(w.lock_fd, _LOCK_UN)
        return range(head, head + n)

    def _plan(self, h: Header, blobs: list[bytes], counts: Sequence[int]) -> list[_Part]:
        """Split a batch over the active segment and as many new ones as the limits need.

        Whole blobs are placed at once; only a blob that straddles a segment limit is walked
        line by line, so a roll costs what one blob weighs, not what the batch weighs.
        """
        cfg = self.config
        max_bytes = cfg.segment_max_bytes
        max_events = cfg.segment_max_events or sys.maxsize
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
            self._bases_stale()
            self._compression().kick()  # checksum (and compress) the sealed segments

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
        err = StorageError.from_os_error(exc, what, path=segment_path(self.segments_dir,
                                                                       h.segment_base))
        err.offset = h.head
        raise err from exc

    def _publish(self, w: _WriterState, head: int, segment_base: int, committed: int) -> None:
        # The commit point: readers see the new events from this pwrite on.
        raw = pack_header(head, segment_base, committed)
        if _pwrite(w.head_fd, raw, 0) != HEADER_SIZE:  # pragma: no cover - 32 bytes, one page
            write_all(w.head_fd, raw, 0)
        if self.config.sync == "always":
            os.fdatasync(w.head_fd)
        else:
            w.dirty = True

    # ------------------------------------------------------------------- durability thread

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
        with self._mutex:
            w = self._writer_state
            if w is None or not w.dirty:
                return
            with os_errors("fsync", self.path):
                if w.seg_fd >= 0:
                    os.fdatasync(w.seg_fd)
                os.fdatasync(w.head_fd)
            w.dirty = False

    # --------------------------------------------------------------------------- compression

    def _compression(self) -> Compressor:
        if self._compressor is None:
            self._compressor = Compressor(
                self.segments_dir,
                os.path.join(self.path, COMPRESS_LOCK),
                lambda: self._read_header().segment_base,
                compress=self.config.compression is not None,
                after_pass=self._apply_retention,
                level=self.config.compression_level,
                file_mode=self.config.file_mode,
            )
        return self._compressor

    def compress(self) -> int:
        """Compress every sealed, uncompressed segment now; return how many.

        Waits while another process is compressing. Works whatever the ``compression`` option.
        """
        self._check_open()
        return self._compression().run_pass(blocking=True, compress=True)

    def prune(
        self,
        *,
        max_age: float | None = None,
        max_bytes: int | None = None,
        before: int | None = None,
        force: bool = False,
        dry_run: bool = False,
    ) -> PruneReport:
        """Remove the oldest sealed segments by age, total size or offset.

        Never removes what a known consumer has not processed, unless ``force``; the report
        says what was held back. See :mod:`eventpipe.retention`.
        """
        from .retention import prune

        self._check_open()
        return prune(self, max_age=max_age, max_bytes=max_bytes, before=before, force=force,
                     dry_run=dry_run)

    def _apply_retention(self) -> None:
        cfg = self.config
        if cfg.retention_max_age is not None or cfg.retention_max_bytes is not None:
            from .retention import prune

            prune(self, max_age=cfg.retention_max_age, max_bytes=cfg.retention_max_bytes,
                  blocking=False)

    # ------------------------------------------------------------------------------ reading

    @property
    def first_offset(self) -> int:
        """The first offset still stored (0 unless retention removed older segments)."""
        self._check_open()
        h = self._read_header()
        bases = self._segment_bases(h)
        return bases[0] if bases else h.head

    def _check_open(self) -> None:
        if self._closed:
            raise LogClosedError("log is closed", path=self.path)

    def _read_header(self) -> Header:
        fd = self._reader_fd
        if fd < 0:
            with os_errors("open log header", self._head_path):
                try:
                    fd = os.open(self._head_path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    return Header(0, 0, 0)  # creation in progress in another process
            self._reader_fd = fd
        return _header.read_header(fd, self._head_path)

    @property
    def head(self) -> int:
        """The next offset to be assigned: the number of events ever appended."""
        self._check_open()
        return self._read_header().head

    def _bases_stale(self) -> None:
        self._bases = []

    def _segment_bases(self, h: Header) -> list[int]:
        if not self._bases or self._bases[-1] < h.segment_base:
            self._bases = [s.base for s in list_segments(self.segments_dir)
                           if s.base <= h.segment_base]
        return self._bases

    def chunks(
        self, start: int = 0, stop: int | None = None, *, position: tuple[int, int] | None = None
    ) -> Iterator[LineChunk]:
        """Raw lines from ``start`` up to ``stop`` (default: the head now), chunk by chunk.

        ``position`` is ``(segment_base, byte_position)`` of ``start`` when known (from a
        consumer checkpoint), which makes the start free to find. Nothing is decoded.
        Raises OffsetOutOfRangeError for a start beyond the head or before the first stored
        segment, CorruptLogError when stored bytes are not whole, contiguous lines.
        """
        self._check_open()
        if start < 0:
            raise OffsetOutOfRangeError("offsets start at 0", path=self.path, offset=start)
        h = self._read_header()
        end = h.head if stop is None else min(stop, h.head)
        if start > h.head:
            raise OffsetOutOfRangeError(f"offset is beyond the head ({h.head})",
                                        path=self.path, offset=start)
        if start >= end:
            return
        bases = self._segment_bases(h)
        i = bisect.bisect_right(bases, start) - 1
        if i < 0:
            raise OffsetOutOfRangeError(
                f"offset is before the first stored segment ({bases[0] if bases else 'none'})",
                path=self.path, offset=start,
            )
        for k in range(i, len(bases)):
            base = bases[k]
            if base >= end:
                break
            active = base == h.segment_base
            seg_end = h.head if active else bases[k + 1]
            first = max(start, base)
            want = min(end, seg_end)
            known = position[1] if position is not None and position[0] == base else None
            reached = first
            for chunk in read_chunks(
                self.segments_dir, base, start=first, stop=want,
                byte_limit=h.committed if active else None, end_offset=seg_end,
                start_position=known if first == start else None,
            ):
                reached = chunk.first_offset + len(chunk.lines)
                yield chunk
            if reached != want:
                raise CorruptLogError(
                    f"segment holds events up to {reached} but the log expects {want}",
                    path=segment_path(self.segments_dir, base), offset=reached,
                )

    def read(self, start: int = 0, stop: int | None = None) -> Iterator[Record]:
        """Decoded events from offset ``start`` up to ``stop`` (default: the head now).

        Finds the start from segment names alone and never decodes skipped events.
        Raises as :meth:`chunks`, and CorruptLogError naming the offset of an undecodable event.
        """
        for chunk in self.chunks(start, stop):
            try:
                yield from map(Record, zip(itertools.count(chunk.first_offset),
                                           map(_loads, chunk.lines), strict=False))
            except orjson.JSONDecodeError:
                raise self._decode_error(chunk) from None

    def read_raw(self, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """Encoded events (JSON text, no newline) from ``start`` up to ``stop``; not decoded."""
        for chunk in self.chunks(start, stop):
            yield from chunk.lines

    def _decode_error(self, chunk: LineChunk) -> CorruptLogError:
        for k, line in enumerate(chunk.lines):
            try:
                _loads(line)
            except orjson.JSONDecodeError as exc:
                return CorruptLogError(
                    f"stored event is not valid JSON ({exc})",
                    path=segment_path(self.segments_dir, chunk.segment_base),
                    offset=chunk.first_offset + k,
                )
        return CorruptLogError("stored event is not valid JSON", path=self.segments_dir)

    def follow(self, start: int | None = None, *, poll_interval: float = 1.0,
               notifications: bool = True) -> Follower:
        """Every event from ``start`` (default: the head now) on, waiting for new ones.

        Returns a :class:`~eventpipe.follow.Follower`: iterate it in a thread or ``async for``
        it in an event loop; it ends on its ``stop()`` or when the async task is cancelled.
        """
        from .follow import Follower

        self._check_open()
        return Follower(self, start, poll_interval=poll_interval, notifications=notifications)

    def writer(self, *, max_events: int = 1000, max_bytes: int = 1 << 20,
               linger: float | None = 0.05) -> BufferedWriter:
        """A buffered writer for high-rate producers; see :class:`BufferedWriter`."""
        from .buffered import BufferedWriter

        return BufferedWriter(self, max_events=max_events, max_bytes=max_bytes, linger=linger)

    # -------------------------------------------------------------------------------- closing

    def close(self) -> None:
        """Flush pending fsyncs, stop background threads, release files. Idempotent."""
        if self._closed:
            return
        self._syncer_stop.set()
        if self._syncer is not None:
            self._syncer.join()
            self._syncer = None
        if self._compressor is not None:
            self._compressor.close()
        try:
            self.sync()
        finally:
            with self._mutex:
                self._closed = True
                if self._writer_state is not None:
                    self._writer_state.close()
                    self._writer_state = None
                if self._reader_fd >= 0:
                    os.close(self._reader_fd)
                    self._reader_fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EventLog({self.path!r})"


from .buffered import BufferedWriter  # noqa: E402  (cycle: BufferedWriter wraps EventLog)
from .follow import Follower  # noqa: E402  (cycle: Follower reads an EventLog)
from .retention import PruneReport  # noqa: E402  (cycle: prune works on an EventLog)
