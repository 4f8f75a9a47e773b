"""Segment files: naming, listing, and reading lines from any offset without decoding.

A segment holds consecutive events as JSON lines. It is named by the offset of its first event,
zero-padded to 20 digits so names sort as numbers (``00000000000000001000.jsonl``). Once sealed
(a later segment exists) it never changes, and may be replaced by an identical gzip copy
(``.jsonl.gz``); readers accept either form and keep reading an open file whose name was
removed, which is how compression never disturbs a reader.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from typing import NamedTuple

from .errors import CorruptLogError, OffsetOutOfRangeError, StorageError

__all__ = [
    "GZIP_SUFFIX",
    "PLAIN_SUFFIX",
    "LineChunk",
    "SegmentFile",
    "list_segments",
    "read_chunks",
    "segment_path",
]

PLAIN_SUFFIX = ".jsonl"
GZIP_SUFFIX = ".jsonl.gz"
NAME_DIGITS = 20
CHUNK_BYTES = 1 << 20  # big enough to amortise syscalls, small enough to keep memory flat


class SegmentFile(NamedTuple):
    """A segment file found on disk."""

    base: int
    path: str
    compressed: bool


class LineChunk(NamedTuple):
    """Consecutive complete lines of one segment (without their newlines).

    ``position`` is the byte position of the first line in the segment's uncompressed content;
    a consumer stores it so that resuming needs no scan.
    """

    segment_base: int
    first_offset: int
    position: int
    lines: list[bytes]


def segment_path(folder: str, base: int, compressed: bool = False) -> str:
    suffix = GZIP_SUFFIX if compressed else PLAIN_SUFFIX
    return os.path.join(folder, f"{base:0{NAME_DIGITS}d}{suffix}")


def parse_name(name: str) -> tuple[int, bool] | None:
    """``(base, compressed)`` for a segment file name, None for anything else."""
    if name.endswith(GZIP_SUFFIX):
        stem, compressed = name[: -len(GZIP_SUFFIX)], True
    elif name.endswith(PLAIN_SUFFIX):
        stem, compressed = name[: -len(PLAIN_SUFFIX)], False
    else:
        return None
    if len(stem) != NAME_DIGITS or not stem.isdigit():
        return None
    return int(stem), compressed


def list_segments(folder: str) -> list[SegmentFile]:
    """Segment files in ``folder`` sorted by base; one entry per base (plain wins over gzip).

    A base present in both forms is mid-compression or left by a crash after the verified gzip
    copy was renamed into place; the two are identical, and the plain one is cheaper to read.
    """
    found: dict[int, SegmentFile] = {}
    try:
        names = os.listdir(folder)
    except OSError as exc:
        raise StorageError.from_os_error(exc, "list segments", path=folder) from exc
    for name in names:
        parsed = parse_name(name)
        if parsed is None:
            continue
        base, compressed = parsed
        if base in found and compressed:
            continue
        found[base] = SegmentFile(base, os.path.join(folder, name), compressed)
    return [found[b] for b in sorted(found)]


def _open_segment(folder: str, base: int, first_wanted: int) -> tuple[int, str, bool]:
    """Open the segment at ``base``, plain or gzip. Returns (fd, path, compressed)."""
    for compressed in (False, True):
        path = segment_path(folder, base, compressed)
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC), path, compressed
        except FileNotFoundError:
            continue  # compressed and removed between listing and opening: try the other form
        except OSError as exc:
            raise StorageError.from_os_error(exc, "open segment", path=path) from exc
    raise OffsetOutOfRangeError(
        f"segment {base} is gone (removed by retention?); offset {first_wanted} is not stored",
        path=segment_path(folder, base),
        offset=first_wanted,
    )


def _plain_blocks(fd: int, position: int, limit: int) -> Iterator[bytes]:
    while position < limit:
        block = os.pread(fd, min(CHUNK_BYTES, limit - position), position)
        if not block:
            return
        position += len(block)
        yield block


def _gzip_blocks(fd: int, path: str, skip: int) -> Iterator[bytes]:
    """Decompressed content of a gzip segment, minus its first ``skip`` bytes.

    Inflates at most CHUNK_BYTES at a time (JSON compresses ~8x, so one compressed read would
    otherwise become a block eight times the size readers are meant to hold).
    """
    inflater = zlib.decompressobj(wbits=31)
    position = 0
    pending = b""  # compressed input not yet inflated
    try:
        while not inflater.eof:
            if not pending:
                pending = os.pread(fd, CHUNK_BYTES // 8, position)
                position += len(pending)
                if not pending:
                    raise CorruptLogError("gzip segment is truncated", path=path, offset=None)
            data = inflater.decompress(pending, CHUNK_BYTES)
            pending = inflater.unconsumed_tail
            if skip:
                cut = min(skip, len(data))
                data, skip = data[cut:], skip - cut
            if data:
                yield data
    except zlib.error as exc:
        raise CorruptLogError(f"gzip segment is damaged: {exc}", path=path) from None


def _find_from_end(fd: int, end: int, lines_back: int) -> int:
    """Byte position where the line ``lines_back`` lines before ``end`` starts.

    ``end`` is just past a newline. Scans backward, so finding the last events of a large
    segment costs what they weigh, not what the segment weighs.
    """
    need = lines_back  # newlines to pass, not counting the one that ends the last line
    hi = end - 1
    step = 4096  # start small: the last few events are what most readers want
    while hi > 0:
        lo = max(0, hi - step)
        step = min(step * 4, CHUNK_BYTES)
        block = os.pread(fd, hi - lo, lo)
        count = block.count(b"\n")
        if count >= need:
            cut = len(block)
            for _ in range(need):
                cut = block.rfind(b"\n", 0, cut)
            return lo + cut + 1
        need -= count
        hi = lo
    return 0


def read_chunks(
    folder: str,
    base: int,
    *,
    start: int,
    stop: int | None,
    byte_limit: int | None = None,
    end_offset: int | None = None,
    start_position: int | None = None,
) -> Iterator[LineChunk]:
    """Yield lines of segment ``base`` for offsets ``start`` .. ``stop`` (exclusive).

    ``byte_limit`` caps what is read (the committed size of the active segment); without it the
    segment is read to its end (sealed segments never change). ``end_offset``, when known, is
    the offset after the segment's last event: it lets a start near the end be found by
    scanning backward. ``start_position`` is the known byte position of ``start``, which skips
    the scan entirely. Skipped events are never decoded.

    Raises CorruptLogError for an unterminated last line, OffsetOutOfRangeError if the
    segment is gone, StorageError for I/O errors.
    """
    if stop is not None and start >= stop:
        return
    fd, path, compressed = _open_segment(folder, base, start)
    try:
        yield from _read_open(
            fd, path, compressed, base, start, stop, byte_limit, end_offset, start_position
        )
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise StorageError.from_os_error(exc, "read segment", path=path) from exc
    finally:
        os.close(fd)


def _read_open(
    fd: int,
    path: str,
    compressed: bool,
    base: int,
    start: int,
    stop: int | None,
    byte_limit: int | None,
    end_offset: int | None,
    start_position: int | None,
) -> Iterator[LineChunk]:
    position = 0
    to_skip = start - base
    if start_position is not None:
        position, to_skip = start_position, 0
    elif not compressed and end_offset is not None and to_skip > 0:
        limit = byte_limit if byte_limit is not None else os.fstat(fd).st_size
        lines_back = end_offset - start
        if 0 < lines_back < to_skip:
            position, to_skip = _find_from_end(fd, limit, lines_back), 0
        elif lines_back == 0:
            return
    if compressed:
        blocks = _gzip_blocks(fd, path, position)
    else:
        limit = byte_limit if byte_limit is not None else os.fstat(fd).st_size
        blocks = _plain_blocks(fd, position, limit)

    offset = start
    pending = b""
    try:
        for block in blocks:
            buf = pending + block if pending else block
            last_nl = buf.rfind(b"\n")
            if last_nl < 0:
                pending = buf
                continue
            pending = buf[last_nl + 1 :]
            complete = buf[:last_nl]
            if to_skip:
                count = complete.count(b"\n") + 1
                if count <= to_skip:
                    to_skip -= count
                    position += last_nl + 1
                    continue
                parts = complete.split(b"\n", to_skip)
                skipped = len(complete) - len(parts[-1])
                position += skipped
                complete = parts[-1]
                to_skip = 0
            lines = complete.split(b"\n")
            if stop is not None and offset + len(lines) >= stop:
                extra = len(lines) - (stop - offset)
                del lines[stop - offset :]
                if lines:
                    yield LineChunk(base, offset, position, lines)
                offset = stop
                # Read to the end of a segment that was sealed when the caller looked (one that
                # was active then may have grown since): if gzip, check it really ends here,
                # with its CRC trailer intact. A plain one ends at its size by construction.
                if (compressed and byte_limit is None and stop == end_offset
                        and (extra or pending or any(blocks))):
                    raise CorruptLogError("segment holds more events than its offsets",
                                          path=path, offset=stop)
                return
            yield LineChunk(base, offset, position, lines)
            offset += len(lines)
            position += len(complete) + 1
    except CorruptLogError as exc:
        if exc.offset is None:
            exc.offset = offset  # damaged compressed data: events from here on are lost
        raise

    if pending:
        raise CorruptLogError(
            f"segment ends with {len(pending)} bytes of an unterminated line",
            path=path,
            offset=offset,
        )
    if to_skip:
        raise OffsetOutOfRangeError(
            f"segment holds fewer events than expected ({to_skip} short of offset {start})",
            path=path,
            offset=start,
        )
