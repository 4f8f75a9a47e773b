"""Segment checksums: a ``<base>.sum`` beside each sealed segment.

A sealed segment's checksum file records its event count, its size and a CRC-32 per 64 KiB
block of its (uncompressed) content. Readers check every block they hand out against it
(:mod:`eventpipe._segment`), compression re-checks the content before compressing, and
``eventpipe verify`` uses it to say which block holds a flipped byte, even where the damage
leaves valid JSON. A checksum is only ever written for content that holds exactly the events
its name and the next segment's name imply: it must never bless damaged content.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import orjson

from ._fsutil import os_errors, write_all
from ._layout import Folder, folder_of
from ._segment import SegmentDamage, gzip_blocks, plain_blocks, segment_name, segment_path
from .errors import CorruptLogError

__all__ = [
    "BLOCK_BYTES",
    "SUM_FORMAT",
    "SUM_SUFFIX",
    "TMP_SUFFIX",
    "SegmentSum",
    "check_count",
    "checksum_segment",
    "first_damaged_block",
    "read_sum",
    "replace_file",
    "sum_blocks",
    "sum_name",
    "sum_path",
    "summarize",
    "write_sum",
    "write_sum_file",
]

TMP_SUFFIX = ".tmp"
SUM_SUFFIX = ".sum"
SUM_FORMAT = "eventpipe-segment-sum"
BLOCK_BYTES = 64 * 1024


class SegmentSum(NamedTuple):
    """What a sealed segment held when sealed: events, bytes, CRC-32 per 64 KiB block."""

    base: int
    events: int
    size: int
    block_crcs: list[int]


def sum_name(base: int) -> str:
    return f"{base:020d}{SUM_SUFFIX}"


def sum_path(folder: Folder | str, base: int) -> str:
    """Where segment ``base``'s checksum file lies, for messages."""
    where = folder.path if isinstance(folder, Folder) else os.fspath(folder)
    return os.path.join(where, sum_name(base))


def read_sum(folder: Folder | str, base: int) -> SegmentSum | None:
    """The segment's checksum file, None if it has none yet; CorruptLogError if unreadable."""
    path = sum_path(folder, base)
    try:
        with folder_of(folder) as f:
            raw = f.read_bytes(sum_name(base))
        if raw is None:
            return None
        doc = orjson.loads(raw)
        return SegmentSum(int(doc["base"]), int(doc["events"]), int(doc["bytes"]),
                          [int(c) for c in doc["block_crc32"]])
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


def summarize(folder: Folder, name: str, *,
              compressed: bool) -> tuple[int, int, list[int], bool]:
    """(complete lines, bytes, block CRCs, ends with a newline) of segment file ``name``.

    Raises CorruptLogError when gzip data is damaged, StorageError when unreadable.
    """
    path = folder.path_of(name)
    last = b"\n"

    def tracked(blocks: Iterator[bytes]) -> Iterator[bytes]:
        nonlocal last
        for block in blocks:
            last = block[-1:]
            yield block

    fd = folder.open_file(name, os.O_RDONLY)
    with os_errors("checksum segment", path):
        try:
            blocks = (gzip_blocks(fd, 0, None) if compressed
                      else plain_blocks(fd, 0, os.fstat(fd).st_size))
            lines, size, crcs = sum_blocks(tracked(blocks))
        except SegmentDamage as damage:
            raise CorruptLogError(str(damage), path=path) from None
        finally:
            os.close(fd)
    return lines, size, crcs, last == b"\n"


def replace_file(folder: Folder, name: str, data: bytes, mode: int) -> None:
    """Atomically replace ``name``: ``<name>.tmp``, fsync, rename, fsync of the folder.

    The temp name is fixed, not per process: only the compress lock's holder writes these
    files, and a temp file a killed holder left is removed and created anew (exclusively).
    """
    tmp = name + TMP_SUFFIX
    folder.unlink(tmp)
    fd = folder.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os_errors("atomic write", folder.path_of(name)):
        try:
            write_all(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    folder.rename(tmp, name)
    folder.fsync()


def checksum_segment(folder: Folder, base: int, *, compressed: bool, expected_events: int,
                     mode: int) -> SegmentSum:
    """Checksum sealed segment ``base`` (plain or gzip) into its ``.sum`` file.

    Raises CorruptLogError (and writes nothing) if the segment does not hold exactly
    ``expected_events`` complete lines: a checksum must never bless damaged content.
    """
    path = segment_path(folder, base, compressed)
    lines, size, crcs, whole = summarize(folder, segment_name(base, compressed),
                                         compressed=compressed)
    check_count(path, base, lines, whole, expected_events)
    return write_sum_file(folder, base, lines, size, crcs, mode)


def check_count(path: str, base: int, lines: int, whole: bool, expected: int) -> None:
    if lines != expected or not whole:
        torn = "" if whole else " and an unterminated one"
        raise CorruptLogError(
            f"sealed segment holds {lines} complete lines{torn}, expected {expected}",
            path=path, offset=base)


def write_sum_file(folder: Folder, base: int, lines: int, size: int, crcs: list[int],
               mode: int) -> SegmentSum:
    doc = {"format": SUM_FORMAT, "version": 1, "base": base, "events": lines, "bytes": size,
           "block_bytes": BLOCK_BYTES, "block_crc32": crcs}
    replace_file(folder, sum_name(base), orjson.dumps(doc), mode)
    return SegmentSum(base, lines, size, crcs)


def write_sum(folder: Folder | str, base: int, expected_events: int, mode: int) -> SegmentSum:
    """Checksum sealed plain segment ``base``; see :func:`checksum_segment`."""
    with folder_of(folder) as f:
        return checksum_segment(f, base, compressed=False, expected_events=expected_events,
                                mode=mode)


def first_damaged_block(crcs: list[int], size: int, expected: SegmentSum) -> int | None:
    """Index of the first 64 KiB block that differs from ``expected``, None if all match."""
    for i, (got, want) in enumerate(zip(crcs, expected.block_crcs, strict=False)):
        if got != want:
            return i
    if size != expected.size or len(crcs) != len(expected.block_crcs):
        return min(len(crcs), len(expected.block_crcs))
    return None
