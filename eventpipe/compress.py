"""Background gzip compression of sealed segments.

Sealed segments never change, so compressing one needs no writer lock and never stalls an
append. Each segment goes through: gzip into ``<name>.gz.tmp``, fsync, decompress the copy and
compare it byte for byte with the original, rename into place, fsync the folder, and only then
unlink the original. A reader holding the original open keeps reading it; one that opens the
segment afterwards finds the gzip copy.

At most one process compresses at a time (``compress.lock``, taken with filelock, non-blocking
so a closing writer never waits on another process). A crash at any step leaves either a stale
``.tmp`` (deleted by the next pass) or both forms of a segment (the gzip one was verified before
its rename, so the next pass deletes the plain one).
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections.abc import Callable

import filelock

from ._fsutil import fsync_dir, os_errors, write_all
from .errors import CorruptLogError
from .segment import CHUNK_BYTES, GZIP_SUFFIX, list_segments, parse_name, segment_path

__all__ = ["Compressor", "compress_segment"]

TMP_SUFFIX = ".tmp"


class _Stopped(Exception):
    """Raised inside a pass when the owner asked to stop; the pass cleans up after itself."""


def compress_segment(
    folder: str,
    base: int,
    *,
    level: int,
    file_mode: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> int:
    """Replace plain segment ``base`` with a verified gzip copy; returns bytes saved.

    The caller holds the compress lock and has checked that the segment is sealed.
    Raises CorruptLogError if the copy does not verify (the original is then kept).
    """
    plain = segment_path(folder, base)
    final = segment_path(folder, base, compressed=True)
    tmp = final + TMP_SUFFIX
    with os_errors("compress segment", plain):
        src = os.open(plain, os.O_RDONLY | os.O_CLOEXEC)
        try:
            dst = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, file_mode)
            try:
                os.fchmod(dst, file_mode)
                _deflate(src, dst, level, should_stop)
                os.fsync(dst)
                _verify(src, dst, tmp)
            except BaseException:
                os.close(dst)
                os.unlink(tmp)
                raise
            plain_size = os.fstat(src).st_size
            gz_size = os.fstat(dst).st_size
            os.close(dst)
        finally:
            os.close(src)
        os.rename(tmp, final)
        # The gzip copy must be durable under its final name before the original goes,
        # whatever the log's sync setting: otherwise a power loss could lose sealed events.
        fsync_dir(folder)
        os.unlink(plain)
    return plain_size - gz_size


def _deflate(src: int, dst: int, level: int, should_stop: Callable[[], bool]) -> None:
    deflater = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: gzip framing, zcat reads it
    read_at = write_at = 0
    while True:
        if should_stop():
            raise _Stopped
        block = os.pread(src, CHUNK_BYTES, read_at)
        if not block:
            break
        read_at += len(block)
        out = deflater.compress(block)
        write_all(dst, out, write_at)
        write_at += len(out)
    out = deflater.flush()
    write_all(dst, out, write_at)


def _verify(src: int, dst: int, tmp: str) -> None:
    inflater = zlib.decompressobj(wbits=31)
    read_at = position = 0
    try:
        while not inflater.eof:
            raw = os.pread(dst, CHUNK_BYTES, read_at)
            if not raw:
                raise CorruptLogError("gzip copy is truncated", path=tmp)
            read_at += len(raw)
            data = inflater.decompress(raw)
            if data != os.pread(src, len(data), position):
                raise CorruptLogError("gzip copy differs from the original", path=tmp,
                                      offset=position)
            position += len(data)
    except zlib.error as exc:
        raise CorruptLogError(f"gzip copy does not decompress: {exc}", path=tmp) from None
    if position != os.fstat(src).st_size:
        raise CorruptLogError("gzip copy is shorter than the original", path=tmp)


def clean_stale(folder: str) -> None:
    """Remove what a crashed compression left: temp files, and originals already replaced."""
    with os_errors("clean up after compression", folder):
        names = set(os.listdir(folder))
        for name in names:
            if name.endswith(GZIP_SUFFIX + TMP_SUFFIX):
                os.unlink(os.path.join(folder, name))
            else:
                parsed = parse_name(name)
                if parsed is not None and not parsed[1]:
                    gz = os.path.basename(segment_path(folder, parsed[0], compressed=True))
                    if gz in names:
                        os.unlink(os.path.join(folder, name))


class Compressor:
    """Compresses sealed segments of one log in a background thread of this process."""

    def __init__(
        self,
        folder: str,
        lock_path: str,
        sealed_below: Callable[[], int],
        *,
        level: int,
        file_mode: int,
    ) -> None:
        self._folder = folder
        self._lock = filelock.FileLock(lock_path, mode=file_mode, thread_local=False)
        self._sealed_below = sealed_below
        self._level = level
        self._mode = file_mode
        self._in_process = threading.Lock()
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[BaseException] = []  # kept for status; a failed pass retries later

    def kick(self) -> None:
        """Ask for a pass soon; never blocks the caller."""
        self._wanted.set()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="eventpipe-compressor", daemon=True
            )
            self._thread.start()

    def run_pass(self, *, blocking: bool = True) -> int:
        """Compress every sealed plain segment now; returns how many were compressed.

        With ``blocking`` False, returns 0 at once if another process is compressing.
        """
        # flock excludes other processes only: threads of this one (the background pass and an
        # explicit compress()) share the lock file's state, so they take a thread lock first.
        if not self._in_process.acquire(blocking=blocking):
            return 0
        try:
            return self._pass_holding_thread_lock(blocking)
        finally:
            self._in_process.release()

    def _pass_holding_thread_lock(self, blocking: bool) -> int:
        try:
            self._lock.acquire(timeout=-1 if blocking else 0)
        except filelock.Timeout:
            return 0
        try:
            clean_stale(self._folder)
            done = 0
            limit = self._sealed_below()
            for seg in list_segments(self._folder):
                if seg.base >= limit:
                    break
                if seg.compressed:
                    continue
                compress_segment(
                    self._folder, seg.base, level=self._level, file_mode=self._mode,
                    should_stop=self._stop.is_set,
                )
                done += 1
            return done
        finally:
            self._lock.release()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wanted.wait()
            if self._stop.is_set():
                return
            self._wanted.clear()
            try:
                while self.run_pass(blocking=False) == 0 and self._busy_elsewhere():
                    # Another process holds the lock. It re-lists when it finishes, but may
                    # already be past our segment: wait for it, without ever blocking close().
                    if self._stop.wait(0.05):
                        return
            except _Stopped:
                return
            except Exception as exc:  # a failed pass must not kill the thread; retried next kick
                self.errors.append(exc)

    def _busy_elsewhere(self) -> bool:
        return any(
            not s.compressed and s.base < self._sealed_below()
            for s in list_segments(self._folder)
        )

    def close(self) -> None:
        """Stop the thread: an in-flight segment is abandoned (its temp file removed)."""
        self._stop.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def wait_for_compression(folder: str, below: int, timeout: float) -> bool:
    """Poll until every segment under ``below`` is compressed; for tests and tools."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(s.compressed for s in list_segments(folder) if s.base < below):
            return True
        time.sleep(0.01)
    return False
