"""The event log: a directory of segment files that many processes append to and read.

Layout of a log directory::

    eventpipe.json   format marker, version and log id (written once, atomically)
    head             the commit point (see ``_header``): head offset, active segment, its size
    writer.lock      flock'd by whichever process is appending (see ``_appender``)
    compress.lock    held by whichever process checksums/compresses sealed segments
    segments/        00000000000000000000.jsonl[.gz] (+ .sum), named by their first offset
    quarantine/      bytes cut from the tail by recovery, kept rather than dropped
    consumers/       consumer checkpoints (see ``checkpoint``)

This module opens and creates logs, encodes events for the appender, and reads: a reader
takes the header first and segment bytes up to the committed size second, so it never sees a
partial or uncommitted event, whatever writers in other processes are doing.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any, NoReturn, Self

import orjson

from . import _header
from ._appender import Appender
from ._buffered import BufferedWriter
from ._catalog import open_view
from ._compress import FINISH_TIMEOUT, Compressor
from ._config import ENV_PREFIX, LogConfig
from ._follow import Follower
from ._fsutil import make_dirs, os_errors
from ._header import Header
from ._layout import HEAD_FILE, META_FILE, SEGMENTS_DIR, Folder
from ._meta import FORMAT_NAME, FORMAT_VERSION, new_meta, read_meta, stored_file_mode
from ._ownership import check_owner
from ._record import Record
from ._retention import PruneReport, prune
from ._segindex import SegmentIndex
from ._segment import LineChunk, read_chunks, segment_path
from ._timeindex import TimeIndex, to_ns
from .errors import (
    CorruptLogError,
    EventPipeError,
    EventTooLargeError,
    LogClosedError,
    LogReplacedError,
    NotAnEventLogError,
    OffsetOutOfRangeError,
    StorageError,
    UnserializableEventError,
)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "EventLog"]

_INIT_PREFIX = ".eventpipe-init."

_dumps = orjson.dumps
_loads = orjson.loads
_ENCODE_SLICE = 1000
_DECODE_SLICE = 256


class EventLog:
    """A durable, append-only log of JSON events in the directory ``path``.

    Opens the log, creating it if ``path`` is missing or an empty directory (unless ``create``
    is False: then NotAnEventLogError). ``options`` are
    those of :data:`eventpipe._config.LOG_OPTIONS` (``segment_max_bytes``, ``sync``, ...), layered
    over ``EVENTPIPE_*`` environment variables and built-in defaults.

    Safe to share between threads; each process opens its own. Raises ConfigError for a bad
    option, NotAnEventLogError for a non-empty directory that is not a log,
    UnsupportedFormatError for a newer format, StoragePermissionError naming the path when the
    process may not create or read it.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True,
                 **options: Any) -> None:
        self.config = LogConfig.from_options(options)
        self._mode_given = "file_mode" in options or f"{ENV_PREFIX}FILE_MODE" in os.environ
        self._create_missing = create
        self.path = os.path.abspath(os.fspath(path))
        self.segments_dir = os.path.join(self.path, SEGMENTS_DIR)  # for messages
        self._head_path = os.path.join(self.path, HEAD_FILE)  # for messages
        self.folder = self._open_folder()
        """The log folder, open: everything inside it is reached through this descriptor,
        never by path (see :mod:`eventpipe._layout`)."""
        # Descriptors opened on first use (the header's, the segments folder). Dicts, not a
        # lock: setdefault is atomic, and a lock held by another thread at fork() would stay
        # held in the child.
        self._reader_fds: dict[str, int] = {}
        self._folders: dict[str, Folder] = {}
        self._closed = False
        self._compressor: Compressor | None = None
        self._compressor_pid = 0
        self._lookups_list = False  # offset_at: list segments (after a first lookup)
        try:
            check_owner(self.folder.stat(), self.path, self.config.trust_owner)
            self._appender = Appender(self.folder, self.config, self._sealed)
            self.segment_index = SegmentIndex(lambda: self.segments)
            """Where segments start (a cached listing); see
            :class:`~eventpipe._segindex.SegmentIndex`. Whatever removes or seals segments in
            this process calls its ``invalidate()``."""
            self.time_index = TimeIndex(lambda: self.segments)
            """Append times by offset, and offsets by time (see :mod:`eventpipe._timeindex`)."""
            self.log_id = self._open_or_create()
        except BaseException:
            self.folder.close()
            raise

    # ----------------------------------------------------------------- opening and creating

    def _open_folder(self) -> Folder:
        """Open the log folder (creating it if allowed). The one path followed as given:
        the operator may reach the log through a link of their own."""
        if self._create_missing:
            make_dirs(self.path, self.config.dir_mode)
        try:
            return Folder.open(self.path)
        except StorageError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise NotAnEventLogError("no eventpipe log here (create=False)",
                                         path=self.path) from None
            raise

    @property
    def segments(self) -> Folder:
        """The ``segments/`` folder, open (see :mod:`eventpipe._layout`)."""
        folder = self._folders.get(SEGMENTS_DIR)
        if folder is None:
            fresh = self.folder.sub(SEGMENTS_DIR)
            folder = self._folders.setdefault(SEGMENTS_DIR, fresh)
            if folder is not fresh:  # another thread opened it meanwhile
                fresh.close()
        return folder

    def _open_or_create(self) -> str:
        root = self.folder
        if not root.exists(META_FILE):
            if not self._create_missing:
                raise NotAnEventLogError("no eventpipe log here (create=False)", path=self.path)
            self._create()
        meta = read_meta(root)
        self._use_stored_mode(meta)
        if not root.exists(HEAD_FILE):
            # Created by a process that died before writing the header; finish the job.
            with self._appender.mutex:
                self._appender.open()
        return str(meta["log_id"])

    def _use_stored_mode(self, meta: dict[str, Any]) -> None:
        """Create files with the mode the log was created with, unless this process was told
        one (option or EVENTPIPE_FILE_MODE): a writer with other defaults (an administrator's
        shell, another service) must not leave files the log's other users cannot use."""
        stored = stored_file_mode(meta)
        if stored is None or self._mode_given or stored == self.config.file_mode:
            return
        self.config = dataclasses.replace(self.config, file_mode=stored)
        self._appender.config = self.config

    def _create(self) -> None:
        root = self.folder
        others = [n for n in root.names() if not n.startswith(_INIT_PREFIX)]
        if others and root.exists(META_FILE):
            return  # another process created the log since we looked: theirs is used
        if others:
            raise NotAnEventLogError(
                f"directory is not empty and holds no {META_FILE} (found {sorted(others)[:5]});"
                " refusing to turn it into a log",
                path=self.path,
            )
        tmp = f"{_INIT_PREFIX}{os.getpid()}.{uuid.uuid4().hex}"
        root.write_atomic(tmp, new_meta(self.config.file_mode), self.config.file_mode)
        try:
            # link() fails if another process created the log first: theirs wins, intact.
            root.link(tmp, META_FILE)
        except StorageError as exc:
            if exc.errno != errno.EEXIST:
                raise
        finally:
            root.unlink(tmp)
        root.fsync()

    # --------------------------------------------------------------------------- appending

    def append(self, event: Any) -> int:
        """Store one JSON-serialisable event; return its offset.

        When this returns, the event is visible to readers in every process, and durable as
        ``sync`` says. Raises UnserializableEventError or EventTooLargeError before writing
        anything, StorageError (disk full, file too large, I/O) with the log unchanged,
        LockTimeout, LogClosedError.
        """
        data = self.encode(event)
        return self._appender.commit([data + b"\n"], (1,), len(data) + 1, 1).start

    def encode(self, event: Any) -> bytes:
        """The bytes ``event`` is stored as (compact JSON, no newline), checked for size.

        Raises UnserializableEventError or EventTooLargeError. Shared by :meth:`append` and
        the buffered writer, which encodes at the call that gives it an event.
        """
        try:
            data = _dumps(event)
        except orjson.JSONEncodeError as exc:
            raise UnserializableEventError(f"event is not JSON-serialisable: {exc}",
                                           path=self.path) from None
        if len(data) > self.config.max_event_bytes:
            raise EventTooLargeError(
                f"event is {len(data)} bytes encoded, over max_event_bytes="
                f"{self.config.max_event_bytes}",
                size=len(data),
                path=self.path,
            )
        return data

    def append_many(self, events: Iterable[Any]) -> range:
        """Store a batch under one lock acquisition; return its offsets.

        All or nothing: if any event is bad (UnserializableEventError, EventTooLargeError, whose
        ``index`` names it) the error is raised before anything is written, and if the write
        fails (StorageError) what was written is cut back: either way none of the batch is
        stored.
        """
        if isinstance(events, str | bytes | bytearray | dict):
            # Iterable, but surely not a batch: its characters or keys are not events.
            raise UnserializableEventError(
                f"append_many takes an iterable of events, not a {type(events).__name__}",
                path=self.path)
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

    def append_lines(self, lines: bytes, count: int, *, time_ns: int | None = None) -> range:
        """Store ``count`` events given as JSON lines, as one atomic batch; return their
        offsets.

        ``lines`` holds ``count`` JSON documents, each on one line ending in a newline: what
        :meth:`encode` returns plus ``b"\\n"``, or JSON text the caller has checked (read
        from a file, say). For writers that encode ahead (the buffered writer, ``eventpipe
        append``). The framing is checked (UnserializableEventError unless the newlines make
        exactly ``count`` lines) and so is each event's size (EventTooLargeError over
        ``max_event_bytes``); nothing of the batch is written then. The JSON is not parsed,
        for speed: a line that is not JSON would be stored, and reading it would raise
        CorruptLogError. Re-encode text of unknown origin first (``eventpipe append``
        re-encodes every line), or use :meth:`append_many`. Other errors are as for
        :meth:`append`.

        ``time_ns`` gives the batch its append time instead of the clock: a copy of another
        log (a mirror) keeps that log's times, to the nanosecond (never below the last time
        stored: a time earlier than that is raised to it, as for a clock stepped back).
        """
        if lines.count(b"\n") != count or (lines and not lines.endswith(b"\n")):
            raise UnserializableEventError(
                f"expected {count} newline-terminated lines; nothing of the batch was written",
                path=self.path)
        if len(lines) - count > self.config.max_event_bytes:
            self._check_sizes(lines.split(b"\n")[:-1], 0)
        return self._commit_batch([lines], [count], time_ns)

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

    def _commit_batch(self, blobs: list[bytes], counts: list[int],
                      time_ns: int | None = None) -> range:
        n = sum(counts)
        if n == 0:
            self._check_open()
            with self._appender.mutex:
                self._appender.open()
            head = self.committed_header().head
            return range(head, head)
        return self._appender.commit(blobs, counts, sum(map(len, blobs)), n, time_ns)

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

    def sync(self) -> None:
        """fsync what this process has appended and not yet synced (any sync policy)."""
        self._appender.sync()

    # --------------------------------------------------------------------------- compression

    def _sealed(self) -> None:
        """Segments were sealed (or a writer opened): checksum and compress in the background."""
        self.segment_index.invalidate()
        self._compression().kick()

    def _compression(self) -> Compressor:
        if self._compressor is None or self._compressor_pid != os.getpid():
            # A forked child inherits the object but not its thread: give it its own.
            self._compressor_pid = os.getpid()
            self._compressor = Compressor(
                self.folder,
                lambda: self.segments,
                lambda: self.committed_header().segment_base,
                compress=self.config.compression is not None,
                after_pass=self._apply_retention,
                level=self.config.compression_level,
                file_mode=self.config.file_mode,
            )
        return self._compressor

    def seal_soon(self) -> None:
        """Ask for the sealing work on sealed segments (checksums, compression, retention) to
        run soon in a background thread of this process. Never blocks; cheap enough to call
        on every roll. Writers do it on each roll; long-lived readers (consumers) call it when
        they see one, so the work gets done even where every writer is short-lived."""
        self._check_open()
        self._compression().kick()

    def compress(self) -> int:
        """Compress every sealed, uncompressed segment now; return how many.

        Waits while another process is compressing. Works whatever the ``compression`` option.
        """
        self._check_open()
        return self._compression().run_pass(blocking=True, compress=True)

    def finish_sealing(self, timeout: float = FINISH_TIMEOUT) -> bool:
        """Do the sealing work left (checksums, compression, retention) now, in this thread,
        as :meth:`close` does; True when none is left.

        For a writer that wants its sealed segments done before it goes on or exits, with a
        time limit of its choosing (:meth:`close` gives them 10 s). Stops the background
        thread first, after its current segment; the next roll or :meth:`seal_soon` starts
        it again. Never waits for the compress lock: if another process holds it, that
        process does the work (whoever releases the lock looks for work sealed meanwhile),
        and this returns False. Gives up at ``timeout`` seconds, returning False (a segment
        half compressed is done again by the next pass). Errors are in :attr:`sealing_errors`.
        """
        self._check_open()
        compressor = self._compression()
        done = compressor.finish(timeout)
        compressor.resume()
        return done

    @property
    def sealing_errors(self) -> list[BaseException]:
        """The last few errors (at most 10) of this process's sealing passes on this log,
        oldest first, without tracebacks; a failed pass is retried at the next roll.
        ``eventpipe status`` shows the last pass's errors of every process."""
        compressor = self._compressor
        if compressor is None or self._compressor_pid != os.getpid():
            return []
        return compressor.errors

    @property
    def sealing_in_background(self) -> bool:
        """Whether this process's background sealing thread for this log is alive (started
        by a roll, a writer opening the log, or :meth:`seal_soon`; stopped by
        :meth:`finish_sealing` and :meth:`close`)."""
        compressor = self._compressor
        return (compressor is not None and self._compressor_pid == os.getpid()
                and compressor.running)

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
        says what was held back. See :mod:`eventpipe._retention`.
        """
        self._check_open()
        return prune(self, max_age=max_age, max_bytes=max_bytes, before=before, force=force,
                     dry_run=dry_run)

    def _apply_retention(self) -> None:
        cfg = self.config
        if cfg.retention_max_age is not None or cfg.retention_max_bytes is not None:
            prune(self, max_age=cfg.retention_max_age, max_bytes=cfg.retention_max_bytes,
                  blocking=False)

    # ------------------------------------------------------------------------------ reading

    @property
    def first_offset(self) -> int:
        """The first offset still stored (0 unless retention removed older segments)."""
        self._check_open()
        h = self.committed_header()
        first = self.segment_index.first_base(h.segment_base)
        return h.head if first is None else first

    def _check_open(self) -> None:
        if self._closed:
            raise LogClosedError("log is closed", path=self.path)

    def committed_header(self) -> Header:
        """The log's committed state (head, active segment, its committed size), read now.

        Raises CorruptLogError if the header is damaged beyond repair by a reader.
        """
        fd = self._reader_fds.get(HEAD_FILE, -1)
        if fd < 0:
            try:
                fd = self.folder.open_file(HEAD_FILE, os.O_RDONLY)
            except StorageError as exc:
                if exc.errno == errno.ENOENT:
                    return Header(0, 0, 0)  # creation in progress in another process
                raise
            kept = self._reader_fds.setdefault(HEAD_FILE, fd)
            if kept != fd:  # another thread opened it meanwhile
                os.close(fd)
                fd = kept
        h = _header.read_header(fd, self._head_path)
        self.time_index.note(h.segment_base, h.tcount)
        return h

    def check_replaced(self) -> None:
        """Follow the log's header if it was replaced by a copy of itself; raise if the log went.

        A header file replaced by another file (``rsync``, ``cp --remove-destination``, a
        restore) leaves this process reading the old one forever: it would see no new events
        and report no lag. Compares the open header with the one now at the path (two stats):
        the same log (its metadata names the same log id) is re-opened; a removed log folder,
        or another log in its place, raises LogReplacedError. Followers and consumers call this
        each time they find nothing new.
        """
        self._check_open()
        fd = self._reader_fds.get(HEAD_FILE, -1)
        if fd < 0:
            return
        # By path on purpose: the log folder itself may have been removed or replaced (our
        # descriptor would still show the old one); only identities are compared here.
        try:
            now = os.stat(self._head_path, follow_symlinks=False)
        except FileNotFoundError:
            raise LogReplacedError("the log's header file is gone: the log folder was removed "
                                   "or moved away", path=self._head_path) from None
        except OSError as exc:
            raise StorageError.from_os_error(exc, "check log header", path=self._head_path) \
                from exc
        was = os.fstat(fd)
        if (now.st_dev, now.st_ino) == (was.st_dev, was.st_ino):
            return
        try:
            with Folder.open(self.path) as current:
                log_id = str(read_meta(current)["log_id"])
        except EventPipeError as exc:
            raise LogReplacedError(f"the log's header was replaced and its metadata cannot be "
                                   f"read ({exc})", path=self.path) from exc
        if log_id != self.log_id:
            raise LogReplacedError(
                f"the log was replaced by another one (log id {log_id}, was {self.log_id}): "
                "the folder was removed and created again, or restored from another log",
                path=self.path)
        try:
            folder_now = os.stat(self.path)
        except OSError as exc:
            raise StorageError.from_os_error(exc, "check log folder", path=self.path) from exc
        ours = self.folder.stat()
        if (folder_now.st_dev, folder_now.st_ino) != (ours.st_dev, ours.st_ino):
            raise LogReplacedError(
                "the log folder was replaced by a copy of this log (a restore?): open the log "
                "again", path=self.path)
        fresh = self.folder.open_file(HEAD_FILE, os.O_RDONLY)
        with os_errors("reopen log header", self._head_path):
            # dup2 swaps the file under the same descriptor number in one step: another thread
            # reading through it meanwhile gets the old header or the new, never a closed or
            # reused descriptor.
            try:
                os.dup2(fresh, fd, inheritable=False)
            finally:
                os.close(fresh)
        self.segment_index.invalidate()
        self.time_index.forget()

    @property
    def head(self) -> int:
        """The next offset to be assigned: the number of events ever appended."""
        self._check_open()
        return self.committed_header().head

    def _not_stored(self, offset: int, base: int | None) -> EventPipeError:
        """Why ``offset`` (in segment ``base``, when known) is not on disk, judged on a fresh
        header and listing: removed by retention (OffsetOutOfRangeError), or damage.

        A reader's header may be old: while it was slow, segments rolled and retention removed
        the one that was active when it looked. Only a segment that a fresh header still names
        as active, or one missing between stored ones, is damage.
        """
        fresh = self.committed_header()
        index = self.segment_index
        if base is not None and base >= fresh.segment_base:
            return CorruptLogError("the active segment named by the header is missing",
                                   path=segment_path(self.segments_dir, base), offset=offset)
        index.invalidate()
        first = index.first_base(fresh.segment_base)
        if first is None:
            return CorruptLogError(
                "the active segment named by the header is missing",
                path=segment_path(self.segments_dir, fresh.segment_base), offset=offset)
        if offset < first:
            return OffsetOutOfRangeError(
                f"offset is before the first stored segment ({first}); removed by retention",
                path=self.path, offset=offset)
        missing = offset if base is None else base
        later = [b for b in index.bases(fresh.segment_base) if missing < b <= fresh.segment_base]
        until = later[0] if later else fresh.segment_base
        return CorruptLogError(
            f"segment {missing} is missing between stored segments: offsets "
            f"{missing}..{until - 1} are lost",
            path=segment_path(self.segments_dir, missing), offset=offset)

    def chunks(
        self, start: int = 0, stop: int | None = None, *, position: tuple[int, int] | None = None
    ) -> Iterator[LineChunk]:
        """Raw lines from ``start`` up to ``stop`` (default: the head now), chunk by chunk.

        ``position`` is ``(segment_base, byte_position)`` of ``start`` when known (from a
        consumer checkpoint), which makes the start free to find. Nothing is decoded.
        Raises OffsetOutOfRangeError for a start beyond the head or before the first stored
        segment, CorruptLogError when stored bytes are not whole, contiguous lines, when a
        segment's event count disagrees with the names of the segments around it (a gap, an
        overlap, lost lines) or when a sealed segment's bytes fail their checksum: naming the
        file and the first offset affected, after yielding every event before it.
        """
        # One function on purpose: the retry state (listed again yet? how far did the read get?)
        # spans the lookup, the read and the error handling of each segment; it is the one
        # reading loop every reader, follower and consumer goes through.
        self._check_open()
        if start < 0:
            raise OffsetOutOfRangeError("offsets start at 0", path=self.path, offset=start)
        h = self.committed_header()
        end = h.head if stop is None else min(stop, h.head)
        if start > h.head:
            raise OffsetOutOfRangeError(f"offset is beyond the head ({h.head})",
                                        path=self.path, offset=start)
        if start >= end:
            return
        index = self.segment_index
        offset = start
        relisted = False
        while offset < end:
            active = offset >= h.segment_base
            if active:
                # In the active segment: the header names it and gives its extent, no listing
                # needed. Followers and consumers at the head, and readers of the last events,
                # stay here.
                base, seg_end, seal = h.segment_base, h.head, None
            else:
                found = index.locate(offset, h.segment_base)
                if found is None:
                    if not relisted:
                        index.invalidate()
                        relisted = True
                        continue
                    raise self._not_stored(offset, None)
                base, seg_end = found
                seal = index.seal(base)
            want = min(end, seg_end)
            known = (position[1] if position is not None and position[0] == base
                     and offset == start else None)
            reached = offset
            try:
                for chunk in read_chunks(
                    self.segments, base, start=offset, stop=want, end_offset=seg_end,
                    byte_limit=h.committed if active else None, start_position=known,
                    seal=seal, counted=index.counted,
                ):
                    reached = chunk.first_offset + len(chunk.lines)
                    yield chunk
            except (OffsetOutOfRangeError, CorruptLogError) as exc:
                if not active and not relisted and reached < want:
                    # The listing may be stale or have raced with compression or retention
                    # (a directory read can miss a file renamed in and one unlinked
                    # meanwhile): list again before concluding anything. (Damage found past
                    # the last event wanted, at the check of a segment's end, is not a
                    # listing's doing.)
                    index.invalidate()
                    relisted = True
                    offset = reached
                    continue
                if isinstance(exc, OffsetOutOfRangeError):  # the segment file is gone
                    raise self._not_stored(reached, base) from exc
                raise
            offset = want
            relisted = False

    def read(self, start: int = 0, stop: int | None = None, *,
             since: datetime | int | float | None = None,
             until: datetime | int | float | None = None) -> Iterator[Record]:
        """Decoded events from offset ``start`` up to ``stop`` (default: the head now).

        ``since`` and ``until`` narrow that to events appended at or after ``since`` and
        before ``until`` (a datetime, naive meaning local time; int nanoseconds or float
        seconds since the epoch): see :meth:`offset_at`. Finds the start from segment names
        and time indexes alone and never decodes skipped events. Raises as :meth:`chunks`, and
        CorruptLogError naming the offset of an undecodable event (after yielding every event
        before it).
        """
        if since is not None:
            start = max(start, self.offset_at(since))
        if until is not None:
            end = self.offset_at(until)
            stop = end if stop is None else min(stop, end)
            if start > end:
                return iter(())
        # Each chunk is decoded into a list by C code and the lists are chained by C code, so
        # no Python frame runs per event (a generator resumed per event costs ~15% of a read).
        return itertools.chain.from_iterable(self._decoded_chunks(start, stop))

    @property
    def clock_steps_back(self) -> int:
        """How many of this process's appends found the clock earlier than a time already
        stored (a clock stepped back): they were given that stored time instead, so times
        never decrease by offset."""
        return self._appender.clock_steps_back

    def offset_at(self, when: datetime | int | float) -> int:
        """The first offset appended at or after ``when``; the head if every event is older.

        ``when`` is a datetime (naive means local time), int nanoseconds or float seconds
        since the epoch. Costs a few reads of small index files whatever the log's length:
        it bisects the segments by their first time, then one segment's time index. Events
        written before eventpipe kept times count as older than any time.
        """
        self._check_open()
        time_ns = to_ns(when)
        h = self.committed_header()
        if h.segment_base == 0:
            bases = [0]  # the first segment is the active one: nothing to list
        else:
            # A reader's first lookup reads the catalog: one file bisected with single reads,
            # where a listing of segments/ and a time index opened per probed segment grow
            # with the log. A reader that looks up again lists once and bisects the listing
            # and the first times it caches, in memory, from then on.
            listed = self.segment_index.cached(h.segment_base)
            view = None
            if listed is None and not self._lookups_list:
                self._lookups_list = True
                view = open_view(self.folder, h.segment_base)
            if view is not None:
                try:
                    found = self.time_index.offset_at_by_catalog(time_ns, view,
                                                                 h.segment_base, h.head)
                finally:
                    view.close()
                if found is not None:
                    return found
            bases = [b for b in self.segment_index.bases(h.segment_base)
                     if b <= h.segment_base]
        return self.time_index.offset_at(time_ns, bases, h.head)

    def lag_seconds(self, offset: int, *, now: float | None = None) -> float | None:
        """How long ago the event at ``offset`` was appended, for a reader whose next event
        is ``offset``: 0.0 when it is at the head (nothing waits), None when the time is not
        known (written before eventpipe kept times, or no longer stored). ``now`` defaults
        to the current time (seconds since the epoch)."""
        self._check_open()
        if offset >= self.head:
            return 0.0
        try:
            appended = self.time_of(offset)
        except EventPipeError:
            return None
        if appended is None:
            return None
        return max(0.0, (time.time() if now is None else now) - appended / 1e9)

    def time_of(self, offset: int) -> int | None:
        """When the event at ``offset`` was appended (ns since the epoch, UTC); None when
        unknown (written before eventpipe kept times). OffsetOutOfRangeError if it is not
        stored."""
        self._check_open()
        h = self.committed_header()
        if offset < 0 or offset >= h.head:
            raise OffsetOutOfRangeError(f"no event at this offset (head {h.head})",
                                        path=self.path, offset=offset)
        if offset >= h.segment_base:
            return self.time_index.time_of(h.segment_base, offset)
        found = self.segment_index.locate(offset, h.segment_base)
        if found is None:
            raise self._not_stored(offset, None)
        return self.time_index.time_of(found[0], offset)

    def _decoded_chunks(self, start: int, stop: int | None) -> Iterator[list[Record]]:
        for chunk in self.chunks(start, stop):
            yield from self.decode(chunk)

    def decode(self, chunk: LineChunk) -> Iterator[list[Record]]:
        """The records of a chunk from :meth:`chunks`, a few hundred at a time.

        Raises CorruptLogError naming the offset of an undecodable event, after yielding
        every event before it.
        """
        # Small lists: a few hundred decoded events alive at once reuse the same memory, where
        # a whole chunk's worth (tens of thousands) would keep claiming fresh pages.
        step = _DECODE_SLICE
        lines, first = chunk.lines, chunk.first_offset
        times = self.time_index.times(chunk.segment_base, first, len(lines))
        try:
            for i in range(0, len(lines), step):
                yield list(map(Record, zip(itertools.count(first + i),
                                           map(_loads, lines[i : i + step]),
                                           times[i : i + step], strict=False)))
        except orjson.JSONDecodeError:
            error = self._decode_error(chunk)
            bad = (error.offset or first) - first
            done = bad - bad % step  # events of earlier slices were yielded already
            yield list(map(Record, zip(itertools.count(first + done),
                                       map(_loads, lines[done:bad]), times[done:bad],
                                       strict=False)))
            raise error from None

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

        Returns a :class:`~eventpipe._follow.Follower`: iterate it in a thread or ``async for``
        it in an event loop; it ends on its ``stop()`` or when the async task is cancelled.
        """
        self._check_open()
        return Follower(self, start, poll_interval=poll_interval, notifications=notifications)

    def writer(self, *, max_events: int = 1000, max_bytes: int = 1 << 20,
               linger: float | None = 0.05) -> BufferedWriter:
        """A buffered writer for high-rate producers; see :class:`BufferedWriter`."""
        return BufferedWriter(self, max_events=max_events, max_bytes=max_bytes, linger=linger)

    # -------------------------------------------------------------------------------- closing

    def close(self) -> None:
        """Flush pending fsyncs, stop background threads, release files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._compressor is not None and self._compressor_pid == os.getpid():
            # Finish the sealing work (checksums, compression, retention) this process
            # started or found, in bounded time: a short-lived writer must not leave it.
            self._compressor.finish(FINISH_TIMEOUT)
        try:
            self._appender.close()
        finally:
            fd = self._reader_fds.pop(HEAD_FILE, -1)
            if fd >= 0:
                os.close(fd)
            for folder in self._folders.values():
                folder.close()
            self.folder.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EventLog({self.path!r})"
