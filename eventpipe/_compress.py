"""The sealing pass: checksum sealed segments, gzip them, then run retention.

Sealed segments never change, so this work needs no writer lock and never stalls an append.

**Checksums.** Each sealed segment gets a sidecar ``<base>.sum`` (see :mod:`eventpipe._checksum`).
Compression re-checks the content against it before compressing, so damage is never sealed
into a gzip file. A segment found already compressed without a ``.sum`` gets one from its
decompressed content.

**Compression.** Each segment goes through: gzip into ``<name>.gz.tmp``, fsync, decompress
the copy and compare it byte for byte with the original, rename into place, fsync the folder,
and only then unlink the original. A reader holding the original open keeps reading it; one
that opens the segment afterwards finds the gzip copy.

**The watermark.** ``compress.state`` (beside ``compress.lock``, replaced atomically, only
under that lock) says: every sealed segment below offset ``checksummed_below`` has its ``.sum``
(or is recorded as damaged), every one below ``compressed_below`` is also gzip. A pass starts
there and walks forward one segment at a time, each next base being the current base plus its
event count, so it touches only segments sealed since the last pass: its cost does not grow
with the number of segments. A segment whose line count does not lead to the next segment is
damaged: it is recorded (shown by ``eventpipe status``), left as it is for ``verify`` to report,
and never retried by the background passes (an explicit ``compress()`` re-checks everything).
The state also keeps the base of the first segment and the bytes the segments below the
watermark take, for cheap retention (:mod:`eventpipe._retention`), and the last few errors.
The file is a cache: missing or unreadable, it is rebuilt from a listing.

At most one process does this at a time (``compress.lock``, a flock, never waited
on by a closing writer). Whoever releases the lock looks again for work sealed meanwhile, so a
process that found the lock taken may leave its work to the holder. A crash at any step leaves
either a temp file (``.gz.tmp`` / ``.sum.tmp``, named per segment: overwritten when the segment
is processed again, and swept by :func:`clean_stale`) or both forms of a segment (the gzip one
was verified before its rename, so the next pass deletes the plain one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import _catalog as catalog
from ._checksum import (
    BLOCK_BYTES,
    SUM_SUFFIX,
    TMP_SUFFIX,
    SegmentSum,
    check_count,
    first_damaged_block,
    read_sum,
    replace_file,
    sum_blocks,
    sum_name,
    sum_path,
    summarize,
    write_sum_file,
)
from ._fsutil import os_errors, write_all
from ._layout import COMPRESS_LOCK, COMPRESS_STATE, FlockFile, Folder, folder_of
from ._segment import (
    CHUNK_BYTES,
    GZIP_SUFFIX,
    SegmentDamage,
    gzip_blocks,
    list_segments,
    parse_name,
    segment_name,
    segment_path,
)
from ._timeindex import read_first_time
from .errors import CorruptLogError, EventPipeError

__all__ = ["FINISH_TIMEOUT", "STATE_FILE", "Compressor", "SealState", "clean_stale",
           "compress_segment", "load_state", "save_state", "visible_size"]

_log = logging.getLogger("eventpipe.compress")  # a name users configure

STATE_FILE = COMPRESS_STATE
STATE_FORMAT = "eventpipe-compress-state"
FINISH_TIMEOUT = 10.0  # what a closing writer gives the sealing work it leaves (see finish())
MAX_ERRORS = 10  # errors kept in memory and in the state file
MAX_DAMAGED = 100  # damaged segments remembered in the state file (verify finds them all)
_BUSY_POLL = 0.05  # seconds between attempts at a lock another process holds
_SAVE_EVERY = 1.0  # seconds between state saves during a long pass


class _Stopped(Exception):
    """Raised inside a pass when the owner asked to stop; the pass cleans up after itself."""


class _Lost(Exception):
    """The segment a walk expected is not on disk: re-list."""


class _Damaged(Exception):
    """A segment that cannot be checksummed or compressed; ``next`` is the base after it."""

    def __init__(self, error: CorruptLogError, next_base: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.next = next_base


def compress_segment(
    where: Folder | str,
    base: int,
    *,
    level: int,
    file_mode: int,
    expected: SegmentSum | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> int:
    """Replace plain segment ``base`` with a verified gzip copy; returns bytes saved.

    The caller holds the compress lock and has checked that the segment is sealed. With
    ``expected``, the content must match that checksum first. Raises CorruptLogError if the
    content or the copy does not verify (the original is then kept, the copy removed).
    """
    with folder_of(where) as folder:
        return _compress_segment(folder, base, level, file_mode, expected, should_stop)


def _compress_segment(folder: Folder, base: int, level: int, file_mode: int,
                      expected: SegmentSum | None, should_stop: Callable[[], bool]) -> int:
    plain_name, final_name = segment_name(base), segment_name(base, compressed=True)
    plain = folder.path_of(plain_name)
    tmp_name = final_name + TMP_SUFFIX
    tmp = folder.path_of(tmp_name)
    src = folder.open_file(plain_name, os.O_RDONLY)
    try:
        folder.unlink(tmp_name)
        dst = folder.open_file(tmp_name, os.O_RDWR | os.O_CREAT | os.O_EXCL, file_mode)
        with os_errors("compress segment", plain):
            try:
                _deflate(src, dst, level, should_stop, expected, plain)
                os.fsync(dst)
                _verify_copy(src, dst, tmp)
                st = os.fstat(src)
                plain_size = st.st_size
                gz_size = os.fstat(dst).st_size
                # Keep the segment's own age: retention by age goes by when events were
                # written.
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            except BaseException:
                os.close(dst)
                folder.unlink(tmp_name)
                raise
            os.close(dst)
    finally:
        os.close(src)
    folder.rename(tmp_name, final_name)
    # The gzip copy must be durable under its final name before the original goes, whatever
    # the log's sync setting: otherwise a power loss could lose sealed events.
    folder.fsync()
    folder.unlink(plain_name)
    return plain_size - gz_size


def _deflate(src: int, dst: int, level: int, should_stop: Callable[[], bool],
             expected: SegmentSum | None, path: str) -> None:
    deflater = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: gzip framing, zcat reads it
    read_at = write_at = 0
    blocks: list[bytes] = []
    while True:
        if should_stop():
            raise _Stopped
        block = os.pread(src, CHUNK_BYTES, read_at)
        if not block:
            break
        if expected is not None:
            blocks.append(block)
        read_at += len(block)
        out = deflater.compress(block)
        write_all(dst, out, write_at)
        write_at += len(out)
    out = deflater.flush()
    write_all(dst, out, write_at)
    if expected is not None:
        _, size, crcs = sum_blocks(blocks)
        damaged = first_damaged_block(crcs, size, expected)
        if damaged is not None:
            raise CorruptLogError(
                f"segment content differs from its checksum in block {damaged} (bytes "
                f"{damaged * BLOCK_BYTES}..{(damaged + 1) * BLOCK_BYTES - 1}); not compressed",
                path=path)


def _verify_copy(src: int, dst: int, tmp: str) -> None:
    """The gzip copy ``dst`` must decompress to exactly the original ``src``."""
    position = 0
    try:
        for data in gzip_blocks(dst, 0, None):
            if data != os.pread(src, len(data), position):
                raise CorruptLogError("gzip copy differs from the original", path=tmp,
                                      offset=position)
            position += len(data)
    except SegmentDamage as damage:
        raise CorruptLogError(f"gzip copy does not decompress: {damage}", path=tmp) from None
    if position != os.fstat(src).st_size:
        raise CorruptLogError("gzip copy is shorter than the original", path=tmp)


def _is_temp(name: str) -> bool:
    """A compressor's temp file: ``<base>.jsonl.gz.tmp``, ``<base>.sum.tmp`` (this version),
    ``<base>.sum.tmp.<pid>`` (earlier versions wrote the ``.sum`` with a per-process name)."""
    stem, rest = name[:20], name[20:]
    if not stem.isdigit():
        return False
    return (rest in (GZIP_SUFFIX + TMP_SUFFIX, SUM_SUFFIX + TMP_SUFFIX)
            or (rest.startswith(SUM_SUFFIX + TMP_SUFFIX + ".")
                and rest[len(SUM_SUFFIX + TMP_SUFFIX) + 1:].isdigit()))


def clean_stale(where: Folder | str) -> None:
    """Remove what a killed compression left: temp files, and originals already replaced.

    Only call it holding the compress lock: only its holder writes these files.
    """
    with folder_of(where) as folder:
        names = set(folder.names())
        for name in names:
            if _is_temp(name):
                folder.unlink(name)
            else:
                parsed = parse_name(name)
                if parsed is not None and not parsed[1] and (
                        segment_name(parsed[0], compressed=True) in names):
                    folder.unlink(name)


# ------------------------------------------------------------------------------ the state


@dataclass
class SealState:
    """What ``compress.state`` records; see the module docstring."""

    summed_below: int = 0  # every sealed segment below: has its .sum, or is damaged
    gzipped_below: int = 0  # ... and is gzip, or is damaged (never above summed_below)
    first_base: int = 0  # the first segment's base, as retention left it
    sealed_bytes: int = 0  # bytes on disk of the segments from first_base to summed_below
    damaged: dict[int, tuple[int, str]] = field(default_factory=dict)  # base: (next, why)
    errors: list[dict[str, Any]] = field(default_factory=list)  # {"time", "pid", "error"}

    def to_json(self) -> bytes:
        return orjson.dumps({
            "format": STATE_FORMAT, "version": 1,
            "checksummed_below": self.summed_below, "compressed_below": self.gzipped_below,
            "first_segment": self.first_base, "sealed_bytes": self.sealed_bytes,
            "damaged": [{"segment": b, "next": n, "error": e}
                        for b, (n, e) in sorted(self.damaged.items())],
            "errors": self.errors,
        }, option=orjson.OPT_INDENT_2)


def load_state(root: Folder | str) -> SealState | None:
    """The log's ``compress.state``; None when missing or unreadable (it is then rebuilt)."""
    try:
        with folder_of(root) as f:
            raw = f.read_bytes(STATE_FILE)
        if raw is None:
            return None
        doc = orjson.loads(raw)
        if doc.get("format") != STATE_FORMAT or doc.get("version") != 1:
            return None
        st = SealState(int(doc["checksummed_below"]), int(doc["compressed_below"]),
                       int(doc["first_segment"]), int(doc["sealed_bytes"]),
                       {int(d["segment"]): (int(d["next"]), str(d["error"]))
                        for d in doc["damaged"]},
                       [dict(e) for e in doc["errors"]][-MAX_ERRORS:])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if st.gzipped_below > st.summed_below:
        return None
    return st


def save_state(root: Folder, state: SealState, mode: int) -> None:
    """Replace ``compress.state``; the caller holds the compress lock."""
    if len(state.damaged) > MAX_DAMAGED:
        state.damaged = dict(sorted(state.damaged.items())[-MAX_DAMAGED:])
    replace_file(root, STATE_FILE, state.to_json(), mode)


def visible_size(folder: Folder, base: int) -> int:
    """Bytes on disk of segment ``base`` in the form readers open (plain first), 0 if gone."""
    for compressed in (False, True):
        st = folder.lstat(segment_name(base, compressed))
        if st is not None:
            return st.st_size
    return 0


def _exists(folder: Folder, base: int) -> bool:
    return folder.exists(segment_name(base)) or folder.exists(segment_name(base, True))


def _error_record(exc: BaseException) -> dict[str, Any]:
    return {"time": round(time.time(), 3), "pid": os.getpid(),
            "error": f"{type(exc).__name__}: {exc}"}


@dataclass
class _PassResult:
    done: int = 0  # segments processed (checksummed, compressed or found damaged)
    compressed: int = 0
    damaged: list[CorruptLogError] = field(default_factory=list)
    complete: bool = True  # reached the sealed limit (not stopped on the way)


class Compressor:
    """Checksums and (optionally) compresses sealed segments, then calls ``after_pass``
    (retention), in a background thread started by :meth:`kick`; :meth:`finish` completes
    the work in the caller's thread, in bounded time."""

    def __init__(
        self,
        root: Folder,
        segments: Callable[[], Folder],
        sealed_below: Callable[[], int],
        *,
        compress: bool,
        level: int,
        file_mode: int,
        after_pass: Callable[[], None] = lambda: None,
    ) -> None:
        self._segments = segments
        self._root = root
        self._lock = FlockFile(root, COMPRESS_LOCK, file_mode)
        self._sealed_below = sealed_below
        self._compress = compress
        self._after_pass = after_pass
        self._level = level
        self._mode = file_mode
        self._in_process = threading.Lock()
        self._wanted = threading.Event()
        self._stop = threading.Event()  # the thread ends after its current segment
        self._abandon = threading.Event()  # ... or at once, abandoning it (close())
        self._deadline: float | None = None  # finish(): nothing runs past this
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()  # one thread, whichever threads kick at once
        # Recent errors only: bounded, and stripped of tracebacks (whose frames would pin
        # whatever the failed pass held).
        self._errors: deque[BaseException] = deque(maxlen=MAX_ERRORS)
        self._unsaved: deque[dict[str, Any]] = deque(maxlen=MAX_ERRORS)

    @property
    def _folder(self) -> Folder:
        return self._segments()

    @property
    def errors(self) -> list[BaseException]:
        """The last few errors of this process's passes (a failed pass is retried later)."""
        return list(self._errors)

    def _note_error(self, exc: BaseException, *, saved: bool = False) -> None:
        exc.__traceback__ = exc.__context__ = exc.__cause__ = None
        self._errors.append(exc)
        if not saved:
            self._unsaved.append(_error_record(exc))

    # ------------------------------------------------------------------------- control

    def kick(self) -> None:
        """Ask for a pass soon; never blocks the caller (cheap: call it on every roll)."""
        self._wanted.set()
        if self._thread is None and not self._stop.is_set():
            with self._starting:
                if self._thread is None and not self._stop.is_set():
                    self._thread = threading.Thread(
                        target=self._loop, name="eventpipe-compressor", daemon=True
                    )
                    self._thread.start()

    def pending(self, compress: bool | None = None) -> bool:
        """Whether sealed segments await a checksum (or compression): one header read and one
        small file read, whatever the number of segments."""
        compress = self._compress if compress is None else compress
        limit = self._sealed_below()
        state = load_state(self._root)
        if state is None:
            return limit > 0
        return (state.gzipped_below if compress else state.summed_below) != limit

    def finish(self, timeout: float = FINISH_TIMEOUT) -> bool:
        """Stop the background thread after its current segment, then do what is left in the
        caller's thread: checksums, compression, retention. Returns True when nothing is left.

        Never waits for the compress lock: if another process holds it, that process does the
        work (whoever releases the lock looks for work sealed meanwhile), and this returns
        False. Gives up at ``timeout`` seconds (abandoning a segment half compressed, which
        the next pass redoes); what is left is done by the next writer to open the log, the
        next roll, or a consumer's :meth:`kick`. The compressor stays stopped afterwards.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        self._deadline = deadline
        with self._starting:
            self._stop.set()
        self._wanted.set()
        thread = self._thread
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
            if thread.is_alive():  # pragma: no cover - the thread honours the deadline
                self._abandon.set()
                thread.join()
            self._thread = None
        try:
            return self._drain(wait_when_busy=False, pause=self._past_deadline)
        except _Stopped:
            return False
        except Exception as exc:
            self._note_error(exc)
            return False

    def resume(self) -> None:
        """After :meth:`finish`: let :meth:`kick` start the background thread again and
        passes run without a deadline (a finished compressor would otherwise stop every later
        pass, an explicit ``compress()`` included, at once)."""
        with self._starting:
            if self._thread is None:
                self._stop.clear()
                self._abandon.clear()
                self._deadline = None

    @property
    def running(self) -> bool:
        """Whether the background thread is alive (idle or in a pass)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def close(self) -> None:
        """Stop the thread now: an in-flight segment is abandoned (its temp file removed)."""
        self._abandon.set()
        with self._starting:
            self._stop.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _past_deadline(self) -> bool:
        return self._abandon.is_set() or (
            self._deadline is not None and time.monotonic() >= self._deadline)

    def _thread_should_pause(self) -> bool:
        return self._stop.is_set() or self._past_deadline()

    # ------------------------------------------------------------------------- passes

    def run_pass(self, *, blocking: bool = True, compress: bool | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> int:
        """Checksum and compress sealed segments; returns how many were compressed.

        A blocking pass (an explicit request: ``EventLog.compress()``) re-checks every
        segment from a listing, damaged ones included, and raises CorruptLogError for the
        first damaged one; a non-blocking one walks on from the watermark, and returns 0 at
        once if another process holds the compress lock. ``compress`` overrides the log's
        compression option for this pass.

        ``on_progress(done, total)`` (a blocking pass only) is called in this thread with the
        segments that need work (a checksum, or compression), once the lock is held and the
        listing made, then after each of them. A blocking pass saves ``compress.state`` after
        each segment it works on, so an interrupted one (KeyboardInterrupt) keeps its work.
        """
        compress = self._compress if compress is None else compress
        if blocking:
            if self._sealed_below() <= 0:
                return 0  # nothing sealed: not even the lock file is touched
        elif not self.pending(compress):
            return 0
        result = self._try_pass(blocking=blocking, compress=compress, full=blocking,
                                pause=self._past_deadline,
                                on_progress=on_progress if blocking else None)
        if result is None:
            return 0
        if result.damaged:
            raise result.damaged[0]
        return result.compressed

    def _try_pass(self, *, blocking: bool, compress: bool, full: bool,
                  pause: Callable[[], bool],
                  on_progress: Callable[[int, int], None] | None = None) -> _PassResult | None:
        """One pass under the compress lock; None if another process (or thread) holds it."""
        # flock excludes other processes only: threads of this one (the background pass and an
        # explicit compress()) share the lock file's state, so they take a thread lock first.
        if not self._in_process.acquire(blocking=blocking):
            return None
        try:
            if not self._lock.acquire(blocking=blocking):
                return None
            try:
                return self._pass(compress, full, pause, on_progress)
            finally:
                self._lock.release()
        finally:
            self._in_process.release()

    def _drain(self, *, wait_when_busy: bool, pause: Callable[[], bool]) -> bool:
        """Passes (each followed by ``after_pass``) until no work is left; True if none is.

        Looks again after every release of the lock: another process may have sealed
        segments meanwhile and, finding the lock taken, left them to us.
        """
        ran = False
        while self.pending():
            if pause():
                return False
            result = self._try_pass(blocking=False, compress=self._compress, full=False,
                                    pause=pause)
            if result is None:
                if not wait_when_busy:
                    return False  # the holder looks again after releasing it
                if self._stop.wait(_BUSY_POLL) or self._past_deadline():
                    return False
                continue
            ran = True
            self._retention()
            if not result.complete:
                return False
        if not ran and not pause():
            self._retention()  # by age, retention has work even when nothing was sealed
        return True

    def _retention(self) -> None:
        try:
            self._after_pass()
        except Exception as exc:
            _log.warning("retention after sealing failed (retried after the next seal): %s: %s",
                         type(exc).__name__, exc)
            self._note_error(exc)

    def _loop(self) -> None:
        while True:
            self._wanted.wait()
            if self._stop.is_set():
                return
            self._wanted.clear()
            try:
                self._drain(wait_when_busy=True, pause=self._thread_should_pause)
            except _Stopped:
                return
            except Exception as exc:  # a failed pass must not kill the thread; retried next kick
                _log.warning("sealing pass failed (retried at the next roll): %s: %s",
                             type(exc).__name__, exc)
                self._note_error(exc)

    # --------------------------------------------------------------------- one pass

    def _pass(self, compress: bool, full: bool, pause: Callable[[], bool],
              on_progress: Callable[[int, int], None] | None = None) -> _PassResult:
        limit = self._sealed_below()
        state = load_state(self._root)
        result = _PassResult()
        abandon = self._past_deadline
        if (full or state is None or state.summed_below > limit
                or state.first_base > state.summed_below):
            # No state yet (a log of an earlier version, or its first roll), or one the header
            # contradicts, or an explicit request: from a listing.
            state = self._full_walk(limit, compress, state, pause, abandon, result,
                                    on_progress)
        else:
            self._walk(limit, compress, state, pause, abandon, result)
        return result

    def _save(self, state: SealState, result: _PassResult) -> None:
        if self._unsaved:
            state.errors = (state.errors + list(self._unsaved))[-MAX_ERRORS:]
            self._unsaved.clear()
        elif result.done and not result.damaged:
            state.errors = []  # a clean pass clears what status shows
        save_state(self._root, state, self._mode)

    def _walk(self, limit: int, compress: bool, state: SealState, pause: Callable[[], bool],
              abandon: Callable[[], bool], result: _PassResult) -> None:
        """From the watermark to ``limit``, each next base from the current one's count."""
        pos = state.gzipped_below if compress else state.summed_below
        saved_at = time.monotonic()
        try:
            while pos < limit:
                if pause():
                    result.complete = False
                    break
                try:
                    nxt, compressed = self._step(pos, limit, compress, state, abandon)
                    result.compressed += compressed
                except _Lost:
                    nxt = self._resync(pos, limit, state)
                except _Damaged as d:
                    nxt = self._record_damage(pos, d, state, result, counted=pos
                                              < state.summed_below)
                    self._catalog_add(pos, nxt, state)
                else:
                    self._catalog_add(pos, nxt, state)
                result.done += 1
                pos = max(nxt, pos + 1)
                state.summed_below = max(state.summed_below, pos)
                if compress:
                    state.gzipped_below = pos
                if time.monotonic() - saved_at > _SAVE_EVERY:
                    self._save(state, result)
                    saved_at = time.monotonic()
        except _Stopped:
            result.complete = False
        except BaseException:
            with contextlib.suppress(Exception):
                self._save(state, result)  # keep what was done
            raise
        if result.done or self._unsaved:
            self._save(state, result)

    def _record_damage(self, base: int, d: _Damaged, state: SealState, result: _PassResult,
                       *, counted: bool) -> int:
        state.damaged[base] = (d.next, d.error.message)
        result.damaged.append(d.error)
        _log.warning("segment %d is damaged, left as it is (eventpipe verify reports it): %s",
                     base, d.error)
        self._note_error(d.error)
        if not counted:
            state.sealed_bytes += visible_size(self._folder, base)
        return d.next

    def _step(self, base: int, limit: int, compress: bool, state: SealState,
              abandon: Callable[[], bool]) -> tuple[int, int]:
        """Checksum (and compress) segment ``base``; returns (next base, 1 if compressed)."""
        folder = self._folder
        has_plain = folder.exists(segment_name(base))
        has_gz = folder.exists(segment_name(base, compressed=True))
        if not (has_plain or has_gz):
            raise _Lost
        counted = base < state.summed_below  # its size is in state.sealed_bytes already
        if has_plain and has_gz:
            # Killed after the verified gzip copy was renamed in, before the original went.
            before = visible_size(folder, base)
            folder.unlink(segment_name(base))
            has_plain = False
            if counted:
                state.sealed_bytes += visible_size(folder, base) - before
        try:
            known = read_sum(folder, base)
        except CorruptLogError as exc:
            raise _Damaged(exc, self._next_listed(base, limit)) from None
        if known is None:
            known = self._checksum(base, has_plain, None, limit)
        compressed = 0
        if compress and has_plain:
            try:
                saved = compress_segment(folder, base, level=self._level, file_mode=self._mode,
                                         expected=known, should_stop=abandon)
            except CorruptLogError as exc:
                raise _Damaged(exc, base + known.events) from None
            compressed = 1
            if counted:
                state.sealed_bytes -= saved
        if not counted:
            state.sealed_bytes += visible_size(folder, base)
        return base + known.events, compressed

    def _checksum(self, base: int, plain: bool, expected: int | None, limit: int) -> SegmentSum:
        """Write the ``.sum`` of a segment that has none. Without ``expected`` the count is
        checked by the next segment being where it says (a listing only when it is not)."""
        path = segment_path(self._folder, base, compressed=not plain)
        try:
            lines, size, crcs, whole = summarize(self._folder, segment_name(base, not plain),
                                                 compressed=not plain)
        except CorruptLogError as exc:
            nxt = base + expected if expected is not None else self._next_listed(base, limit)
            raise _Damaged(exc, nxt) from None
        if expected is None:
            nxt = base + lines
            if lines > 0 and whole and (nxt == limit or (nxt < limit
                                                         and _exists(self._folder, nxt))):
                expected = lines
            else:
                expected = self._next_listed(base, limit) - base
        try:
            check_count(path, base, lines, whole, expected)
        except CorruptLogError as exc:
            raise _Damaged(exc, base + expected) from None
        return write_sum_file(self._folder, base, lines, size, crcs, self._mode)

    def _next_listed(self, base: int, limit: int) -> int:
        """The next segment's base after ``base`` from a listing (only when something is off)."""
        return next((s.base for s in list_segments(self._folder) if base < s.base < limit),
                    limit)

    def _resync(self, pos: int, limit: int, state: SealState) -> int:
        """The segment at ``pos`` is gone (removed by something that did not update the state,
        or never there): re-list, recount, and go on from the next segment found."""
        clean_stale(self._folder)
        segs = [s for s in list_segments(self._folder) if s.base < limit]
        bases = {s.base for s in segs}
        state.first_base = segs[0].base if segs else limit
        state.sealed_bytes = sum(visible_size(self._folder, s.base) for s in segs
                          if s.base < state.summed_below)
        state.damaged = {b: v for b, v in state.damaged.items() if b in bases}
        return next((s.base for s in segs if s.base > pos), limit)

    def _full_walk(self, limit: int, compress: bool, old: SealState | None,
                   pause: Callable[[], bool], abandon: Callable[[], bool],
                   result: _PassResult,
                   on_progress: Callable[[int, int], None] | None = None) -> SealState:
        """Every sealed segment from a listing: (re)builds the state.

        The state is saved after each segment worked on (not after those found done: a walk
        over sealed segments writes nothing), each time claiming only the segments walked so
        far, so an interrupted walk (KeyboardInterrupt, a kill) keeps its work and the state's
        byte count stays true to the disk. What a save costs (a small file, fsync, rename)
        is little beside a segment's checksum or gzip copy.
        """
        # One function on purpose: the walk's running state (the byte count, the first plain
        # segment, the segment in hand) is what the interrupt handler below must save
        # exactly; spread over calls it would travel in and out of each one.
        folder = self._folder
        clean_stale(folder)
        segs = [s for s in list_segments(folder) if s.base < limit]
        nexts = [s.base for s in segs[1:]] + [limit]
        state = SealState(first_base=segs[0].base if segs else limit,
                          errors=old.errors if old is not None else [])
        end = limit
        plain_from: int | None = None  # the first segment left plain (and not damaged)

        def needs_work(base: int) -> bool:
            return not folder.exists(sum_name(base)) or (
                compress and folder.exists(segment_name(base)))

        total = sum(map(needs_work, (s.base for s in segs))) if on_progress else 0
        if on_progress is not None:
            on_progress(0, total)

        def walked(upto: int, *, show: bool = True) -> None:
            """The segments below ``upto`` are walked: save, and say so."""
            state.summed_below = upto
            state.gzipped_below = upto if plain_from is None else min(plain_from, upto)
            self._save(state, result)
            if on_progress is not None and show:
                on_progress(min(result.done, total), total)

        seg = None
        bytes_below = 0  # state.sealed_bytes before ``seg``
        try:
            for seg, nxt in zip(segs, nexts, strict=True):
                bytes_below = state.sealed_bytes
                if pause():
                    end, result.complete = seg.base, False
                    break
                has_plain = folder.exists(segment_name(seg.base))
                has_sum = folder.exists(sum_name(seg.base))
                if not has_sum or (compress and has_plain):
                    try:
                        result.compressed += self._seal_listed(seg.base, nxt, has_plain,
                                                               has_sum, compress, limit, abandon)
                        result.done += 1
                    except _Damaged as d:
                        self._record_damage(seg.base, d, state, result, counted=False)
                        result.done += 1
                        walked(nxt)
                        continue
                    has_plain = folder.exists(segment_name(seg.base))
                    state.sealed_bytes += visible_size(folder, seg.base)
                    if has_plain and plain_from is None:
                        plain_from = seg.base
                    walked(nxt)
                    continue
                state.sealed_bytes += visible_size(folder, seg.base)
                if has_plain and plain_from is None:
                    plain_from = seg.base
        except _Stopped:
            end, result.complete = seg.base if seg is not None else limit, False
        except BaseException:
            # Interrupted (KeyboardInterrupt, an error): keep what the walk did up to the
            # segment it was on, which is not counted in the state yet.
            if seg is not None and state.summed_below < seg.base:
                state.sealed_bytes = bytes_below
                with contextlib.suppress(Exception):
                    walked(seg.base, show=False)
            raise
        state.summed_below = end
        state.gzipped_below = end if plain_from is None else min(plain_from, end)
        self._save(state, result)
        done = [(s.base, n) for s, n in zip(segs, nexts, strict=True) if s.base < end]
        self._catalog_rebuild(state.first_base, [b for b, _ in done],
                              done[-1][1] if done else end)
        return state

    # ------------------------------------------------------------------------ the catalog

    def _catalog_add(self, base: int, end: int, state: SealState) -> None:
        """Record sealed segment ``base`` in the segment catalog (see :mod:`._catalog`)."""
        folder = self._folder
        try:
            catalog.append_record(
                self._root, base, end, read_first_time(folder, base), self._mode,
                first_stored=state.first_base,
                listing=lambda: self._catalog_records(
                    [s.base for s in list_segments(folder) if s.base < end], end))
        except (OSError, EventPipeError) as exc:
            self._catalog_failed(exc)

    def _catalog_rebuild(self, first_base: int, bases: list[int], end: int) -> None:
        """Write the catalog afresh for the listed sealed segments ``bases`` (the last one
        ending at ``end``)."""
        try:
            catalog.rebuild(self._root, first_base, self._catalog_records(bases, end),
                            self._mode)
        except (OSError, EventPipeError) as exc:
            self._catalog_failed(exc)

    def _catalog_records(self, bases: list[int], end: int) -> list[tuple[int, int, int]]:
        """Catalog records for the listed segments ``bases``: each ends where the next one
        begins, the last at ``end``."""
        return [(b, e, read_first_time(self._folder, b) or 0)
                for b, e in zip(bases, [*bases[1:], end], strict=True)]

    @staticmethod
    def _catalog_failed(exc: BaseException) -> None:
        # The catalog only speeds lookups up: readers list the segments when it is not right.
        _log.warning("could not update the segment catalog (time lookups list segments "
                     "until the next sealing pass): %s: %s", type(exc).__name__, exc)

    def _seal_listed(self, base: int, nxt: int, has_plain: bool, has_sum: bool,
                     compress: bool, limit: int, abandon: Callable[[], bool]) -> int:
        """Checksum (and compress) a listed segment whose next base the listing gives."""
        folder = self._folder
        if has_plain and folder.exists(segment_name(base, compressed=True)):
            folder.unlink(segment_name(base))
            has_plain = False
        try:
            known = read_sum(folder, base) if has_sum else None
        except CorruptLogError as exc:
            raise _Damaged(exc, nxt) from None
        if known is None:
            known = self._checksum(base, has_plain, nxt - base, limit)
        elif known.events != nxt - base:
            raise _Damaged(CorruptLogError(
                f"checksum file says {known.events} events, but offsets {base}..{nxt - 1} "
                f"({nxt - base} events) belong here", path=sum_path(folder, base),
                offset=base), nxt)
        if not (compress and has_plain):
            return 0
        try:
            compress_segment(folder, base, level=self._level, file_mode=self._mode,
                             expected=known, should_stop=abandon)
        except CorruptLogError as exc:
            raise _Damaged(exc, nxt) from None
        return 1

