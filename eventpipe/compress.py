"""Background work on sealed segments: checksums, then gzip compression.

Sealed segments never change, so this work needs no writer lock and never stalls an append.

**Checksums.** Each sealed segment gets a sidecar ``<base>.sum``: its event count, size, and a
CRC-32 per 64 KiB block of its (uncompressed) content. ``eventpipe verify`` uses it to find a
flipped byte anywhere in a sealed segment and say which block holds it, even where the damage
leaves valid JSON. Compression re-checks the content against it before compressing, so damage
is never sealed into a gzip file.

**Compression.** Each segment goes through: gzip into ``<name>.gz.tmp``, fsync, decompress
the copy and compare it byte for byte with the original, rename into place, fsync the folder,
and only then unlink the original. A reader holding the original open keeps reading it; one
that opens the segment afterwards finds the gzip copy.

At most one process does this at a time (``compress.lock``, taken with filelock; never waited
on by a closing writer). A crash at any step leaves either a stale ``.tmp`` (deleted by the next
pass) or both forms of a segment (the gzip one was verified before its rename, so the next pass
deletes the plain one).
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import filelock
import orjson

from ._fsutil import atomic_write, fsync_dir, os_errors, write_all
from .errors import CorruptLogError
from .segment import CHUNK_BYTES, GZIP_SUFFIX, list_segments, parse_name, segment_path

__all__ = ["BLOCK_BYTES", "Compressor", "SegmentSum", "compress_segment", "read_sum",
           "sum_blocks", "sum_path"]

TMP_SUFFIX = ".tmp"
SUM_SUFFIX = ".sum"
SUM_FORMAT = "eventpipe-segment-sum"
BLOCK_BYTES = 64 * 1024


class _Stopped(Exception):
    """Raised inside a pass when the owner asked to stop; the pass cleans up after itself."""


class SegmentSum(NamedTuple):
    """What a sealed segment held when sealed: events, bytes, CRC-32 per 64 KiB block."""

    base: int
    events: int
    size: int
    block_crcs: list[int]


def sum_path(folder: str, base: int) -> str:
    return os.path.join(folder, f"{base:020d}{SUM_SUFFIX}")


def read_sum(folder: str, base: int) -> SegmentSum | None:
    """The segment's checksum file, None if it has none yet; CorruptLogError if unreadable."""
    path = sum_path(folder, base)
    try:
        with open(path, "rb") as f:
            doc = orjson.loads(f.read())
        return SegmentSum(int(doc["base"]), int(doc["events"]), int(doc["bytes"]),
                          [int(c) for c in doc["block_crc32"]])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptLogError(f"segment checksum file is unreadable: {exc}", path=path) from None


def sum_blocks(blocks: Iterable[bytes]) -> tuple[int, int, list[int]]:
    """(newlines, bytes, per-64 KiB-block CRC-32s) of content given as consecutive blocks."""
    crcs: list[int] = []
    lines = size = 0
    crc = 0
    filled = 0
    for block in blocks:
        lines += block.count(b"\n")
        size += len(block)
        view = memoryview(block)
        while view:
            take = min(BLOCK_BYTES - filled, len(view))
            crc = zlib.crc32(view[:take], crc)
            filled += take
            view = view[take:]
            if filled == BLOCK_BYTES:
                crcs.append(crc)
                crc = filled = 0
    if filled:
        crcs.append(crc)
    return lines, size, crcs


def _plain_blocks(fd: int) -> Iterable[bytes]:
    position = 0
    while block := os.pread(fd, CHUNK_BYTES, position):
        position += len(block)
        yield block


def write_sum(folder: str, base: int, expected_events: int, mode: int) -> SegmentSum:
    """Checksum sealed plain segment ``base`` into its ``.sum`` file.

    Raises CorruptLogError (and writes nothing) if the segment does not hold exactly
    ``expected_events`` complete lines: a checksum must never bless damaged content.
    """
    path = segment_path(folder, base)
    with os_errors("checksum segment", path):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            lines, size, crcs = sum_blocks(_plain_blocks(fd))
            last = os.pread(fd, 1, size - 1) if size else b"\n"
        finally:
            os.close(fd)
    if lines != expected_events or last != b"\n":
        raise CorruptLogError(
            f"sealed segment holds {lines} complete lines, expected {expected_events}",
            path=path, offset=base)
    doc = {"format": SUM_FORMAT, "version": 1, "base": base, "events": lines, "bytes": size,
           "block_bytes": BLOCK_BYTES, "block_crc32": crcs}
    atomic_write(sum_path(folder, base), orjson.dumps(doc), mode)
    return SegmentSum(base, lines, size, crcs)


def compress_segment(
    folder: str,
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
    plain = segment_path(folder, base)
    final = segment_path(folder, base, compressed=True)
    tmp = final + TMP_SUFFIX
    with os_errors("compress segment", plain):
        src = os.open(plain, os.O_RDONLY | os.O_CLOEXEC)
        try:
            dst = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, file_mode)
            try:
                os.fchmod(dst, file_mode)
                _deflate(src, dst, level, should_stop, expected, plain)
                os.fsync(dst)
                _verify_copy(src, dst, tmp)
            except BaseException:
                os.close(dst)
                os.unlink(tmp)
                raise
            st = os.fstat(src)
            plain_size = st.st_size
            gz_size = os.fstat(dst).st_size
            os.close(dst)
            # Keep the segment's own age: retention by age goes by when events were written.
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(src)
        os.rename(tmp, final)
        # The gzip copy must be durable under its final name before the original goes,
        # whatever the log's sync setting: otherwise a power loss could lose sealed events.
        fsync_dir(folder)
        os.unlink(plain)
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


def first_damaged_block(crcs: list[int], size: int, expected: SegmentSum) -> int | None:
    """Index of the first 64 KiB block that differs from ``expected``, None if all match."""
    for i, (got, want) in enumerate(zip(crcs, expected.block_crcs, strict=False)):
        if got != want:
            return i
    if size != expected.size or len(crcs) != len(expected.block_crcs):
        return min(len(crcs), len(expected.block_crcs))
    return None


def _verify_copy(src: int, dst: int, tmp: str) -> None:
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
            if name.endswith(TMP_SUFFIX) and (GZIP_SUFFIX in name or SUM_SUFFIX in name):
                os.unlink(os.path.join(folder, name))
            else:
                parsed = parse_name(name)
                if parsed is not None and not parsed[1]:
                    gz = os.path.basename(segment_path(folder, parsed[0], compressed=True))
                    if gz in names:
                        os.unlink(os.path.join(folder, name))


class Compressor:
    """Checksums and (optionally) compresses sealed segments in a background thread."""

    def __init__(
        self,
        folder: str,
        lock_path: str,
        sealed_below: Callable[[], int],
        *,
        compress: bool,
        level: int,
        file_mode: int,
        after_pass: Callable[[], None] = lambda: None,
    ) -> None:
        self._folder = folder
        self._lock = filelock.FileLock(lock_path, mode=file_mode, thread_local=False,
                                       is_singleton=False)
        self._sealed_below = sealed_below
        self._compress = compress
        self._after_pass = after_pass
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

    def run_pass(self, *, blocking: bool = True, compress: bool | None = None) -> int:
        """Checksum and compress every sealed segment that needs it; returns how many were
        compressed. With ``blocking`` False, returns 0 at once if another process holds the
        compress lock. ``compress`` overrides the log's compression option for this pass.
        """
        if not self._pending(compress):
            return 0  # nothing sealed needs work: not even the lock file is touched
        # flock excludes other processes only: threads of this one (the background pass and an
        # explicit compress()) share the lock file's state, so they take a thread lock first.
        if not self._in_process.acquire(blocking=blocking):
            return 0
        try:
            try:
                self._lock.acquire(timeout=-1 if blocking else 0)
            except filelock.Timeout:
                return 0
            try:
                return self._pass(self._compress if compress is None else compress)
            finally:
                self._lock.release()
        finally:
            self._in_process.release()

    def _pending(self, compress: bool | None = None) -> list[tuple[Any, int]]:
        """Sealed segments lacking a checksum or (when compressing) compression."""
        compress = self._compress if compress is None else compress
        limit = self._sealed_below()
        segs = [s for s in list_segments(self._folder) if s.base < limit]
        nexts = [s.base for s in segs[1:]] + [limit] if segs else []
        return [(s, n - s.base) for s, n in zip(segs, nexts, strict=True)
                if not os.path.exists(sum_path(self._folder, s.base))
                or (compress and not s.compressed)]

    def _pass(self, compress: bool) -> int:
        clean_stale(self._folder)
        done = 0
        damaged: list[CorruptLogError] = []
        limit = self._sealed_below()
        segs = [s for s in list_segments(self._folder) if s.base < limit]
        nexts = [s.base for s in segs[1:]] + [limit] if segs else []
        for seg, next_base in zip(segs, nexts, strict=True):
            if self._stop.is_set():
                raise _Stopped
            try:
                expected = read_sum(self._folder, seg.base)
                if expected is None and not seg.compressed:
                    expected = write_sum(self._folder, seg.base, next_base - seg.base,
                                         self._mode)
                if compress and not seg.compressed:
                    compress_segment(self._folder, seg.base, level=self._level,
                                     file_mode=self._mode, expected=expected,
                                     should_stop=self._stop.is_set)
                    done += 1
            except CorruptLogError as exc:
                damaged.append(exc)  # leave it as it is for verify to report; do the rest
        if damaged:
            raise damaged[0]
        return done

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wanted.wait()
            if self._stop.is_set():
                return
            self._wanted.clear()
            try:
                while self.run_pass(blocking=False) == 0 and self._pending():
                    # Another process holds the lock. It re-lists when it finishes, but may
                    # already be past our segment: wait for it, without ever blocking close().
                    if self._stop.wait(0.05):
                        return
                self._after_pass()
            except _Stopped:
                return
            except Exception as exc:  # a failed pass must not kill the thread; retried next kick
                self.errors.append(exc)

    def close(self) -> None:
        """Stop the thread: an in-flight segment is abandoned (its temp file removed)."""
        self._stop.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
