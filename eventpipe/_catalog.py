"""The segment catalog: where each sealed segment starts and ends, and its first append time.

A fresh reader looking an offset up by time (``EventLog.offset_at``) would otherwise list
``segments/`` and open the time index of every segment its bisection probes: a cost that grows
with the log. The catalog, ``segments.idx`` in the log folder, is one small file it bisects
with single reads instead::

    header:  b"EPSC" | version u32 | from_base u64 | reserved u64 | crc32 of the 24 bytes u32
             | 4 zero bytes
    records: base u64 | end u64 | first_time_ns u64 (0: unknown) | crc32 of the 24 bytes u32
             | 4 zero bytes

Records are in base order, each ending where the next starts, and cover every sealed segment
from ``from_base`` on (segments below it were removed before the catalog was built); a record
may outlive its segment (retention removes segments from the front). It is derived data, kept
by the sealing pass under the compress lock (see :mod:`eventpipe._compress`): a record is
appended when a segment is checksummed, the file is rebuilt from a listing whenever something
does not follow on, and compacted when many of its records name removed segments.

A reader trusts it only whole: header and the records it reads pass their CRCs, and the last
record ends at the active segment of the header it read. Anything else (no catalog yet, a
catalog behind the writer's last roll, a torn append, damage, a probed segment since removed)
sends the reader back to the listing, which is always right, only slower. So the catalog needs
no fsync on append and no recovery of its own.
"""

from __future__ import annotations

import bisect
import os
import struct
import zlib
from collections.abc import Callable, Sequence

from ._layout import SEGMENT_CATALOG, Folder

__all__ = ["RECORD_SIZE", "CatalogView", "append_record", "bisect_by_time", "open_view",
           "parse", "rebuild"]

MAGIC = b"EPSC"
VERSION = 1
RECORD_SIZE = 32
_HEAD = struct.Struct("<4sIQQ")
_RECORD = struct.Struct("<QQQ")
_SALT = 0x45505343  # so that a record of zeros does not pass its CRC
_PAD = bytes(4)
_COMPACT_AT = 1024  # records naming removed segments before the file is rewritten without them


def _seal(body: bytes) -> bytes:
    return body + zlib.crc32(body, _SALT).to_bytes(4, "little") + _PAD


def _check(raw: bytes) -> bytes | None:
    """The 24-byte body of a 32-byte block, None if it fails its CRC."""
    if len(raw) != RECORD_SIZE or raw[28:] != _PAD:
        return None
    body = raw[:24]
    return body if zlib.crc32(body, _SALT).to_bytes(4, "little") == raw[24:28] else None


def encode(from_base: int, records: Sequence[tuple[int, int, int]]) -> bytes:
    """A whole catalog file: header and ``(base, end, first_time)`` records."""
    parts = [_seal(_HEAD.pack(MAGIC, VERSION, from_base, 0))]
    parts.extend(_seal(_RECORD.pack(*r)) for r in records)
    return b"".join(parts)


class CatalogView:
    """A reader's look at the catalog through one open descriptor; see :func:`open_view`."""

    __slots__ = ("count", "fd", "from_base")

    def __init__(self, fd: int, from_base: int, count: int) -> None:
        self.fd = fd
        self.from_base = from_base
        self.count = count

    def record(self, i: int) -> tuple[int, int, int] | None:
        """Record ``i`` as ``(base, end, first_time)``; None if it fails its check."""
        body = _check(os.pread(self.fd, RECORD_SIZE, RECORD_SIZE * (i + 1)))
        return None if body is None else _RECORD.unpack(body)

    def close(self) -> None:
        os.close(self.fd)


def open_view(root: Folder, active_base: int) -> CatalogView | None:
    """The catalog of the log in ``root`` if it covers every sealed segment below
    ``active_base`` (its last record ends there, or it has none and starts there); None
    otherwise: the caller then lists ``segments/``."""
    fd = root.open_existing(SEGMENT_CATALOG, os.O_RDONLY)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        head = _check(os.pread(fd, RECORD_SIZE, 0))
        if head is None or size % RECORD_SIZE:
            os.close(fd)
            return None
        magic, version, from_base, _ = _HEAD.unpack(head)
        view = CatalogView(fd, from_base, size // RECORD_SIZE - 1)
        last = view.record(view.count - 1) if view.count else None
        covers = (magic == MAGIC and version == VERSION
                  and (last[1] == active_base if last is not None
                       else view.count == 0 and from_base == active_base))
    except BaseException:
        os.close(fd)
        raise
    if not covers:
        os.close(fd)
        return None
    return view


def bisect_by_time(view: CatalogView, time_ns: int) -> int | None:
    """The index of the first record whose first time is at or after ``time_ns`` (``count``
    if none); None when a record read on the way fails its check. Records of unknown time (0)
    count as earlier than any time, as their segments' events do."""
    lo, hi = 0, view.count
    while lo < hi:
        mid = (lo + hi) // 2
        rec = view.record(mid)
        if rec is None:
            return None
        if rec[2] and rec[2] >= time_ns:
            hi = mid
        else:
            lo = mid + 1
    return lo


# ---------------------------------------------------------------------------- the sealer's side


def parse(data: bytes) -> tuple[int, list[tuple[int, int, int]]] | None:
    """``(from_base, records)`` of a whole catalog file's bytes; None if not valid whole."""
    if len(data) < RECORD_SIZE or len(data) % RECORD_SIZE:
        return None
    head = _check(data[:RECORD_SIZE])
    if head is None:
        return None
    magic, version, from_base, _ = _HEAD.unpack(head)
    if magic != MAGIC or version != VERSION:
        return None
    records = []
    for at in range(RECORD_SIZE, len(data), RECORD_SIZE):
        body = _check(data[at:at + RECORD_SIZE])
        if body is None:
            return None
        records.append(_RECORD.unpack(body))
    return from_base, records


def rebuild(root: Folder, from_base: int, records: Sequence[tuple[int, int, int]],
            mode: int) -> None:
    """Replace the catalog with ``records`` (atomically). Caller holds the compress lock."""
    root.write_atomic(SEGMENT_CATALOG, encode(from_base, records), mode)


def append_record(root: Folder, base: int, end: int, first_time: int | None, mode: int,
                  *, first_stored: int, listing: Callable[[], list[tuple[int, int, int]]]
                  ) -> None:
    """Record sealed segment ``base`` (events up to ``end``). Caller holds the compress lock.

    Appends when the catalog's last record ends at ``base``; otherwise (no catalog, a torn
    append, a gap) rebuilds it from ``listing()`` (``(base, end, first_time)`` of the sealed
    segments on disk). Rewrites it without the records below ``first_stored`` (the first
    segment still stored) once there are many of them.
    """
    fd = root.open_existing(SEGMENT_CATALOG, os.O_RDWR)
    if fd is None:
        fd = -1
    try:
        if fd >= 0 and _appendable(fd, base):
            size = os.fstat(fd).st_size
            stale = _stale_records(fd, first_stored)
            if stale < _COMPACT_AT:
                record = _seal(_RECORD.pack(base, end, first_time or 0))
                if os.pwrite(fd, record, size) == RECORD_SIZE:
                    return
    finally:
        if fd >= 0:
            os.close(fd)
    records = [r for r in listing() if r[0] >= first_stored]
    if not records or records[-1][0] != base:
        records = [r for r in records if r[0] < base] + [(base, end, first_time or 0)]
    rebuild(root, records[0][0], records, mode)


def _appendable(fd: int, base: int) -> bool:
    """Whether the catalog open as ``fd`` is valid at its ends and its last record (or its
    start, when it has none) is where segment ``base`` follows on."""
    size = os.fstat(fd).st_size
    if size < RECORD_SIZE or size % RECORD_SIZE:
        return False
    head = _check(os.pread(fd, RECORD_SIZE, 0))
    if head is None:
        return False
    magic, version, from_base, _ = _HEAD.unpack(head)
    if magic != MAGIC or version != VERSION:
        return False
    if size == RECORD_SIZE:
        return bool(from_base == base)
    last = _check(os.pread(fd, RECORD_SIZE, size - RECORD_SIZE))
    return last is not None and int(_RECORD.unpack(last)[1]) == base


def _stale_records(fd: int, first_stored: int) -> int:
    """How many records (from the front) name segments below ``first_stored``."""

    def base_of(i: int) -> int:
        body = _check(os.pread(fd, RECORD_SIZE, RECORD_SIZE * (i + 1)))
        return first_stored if body is None else int(_RECORD.unpack(body)[0])

    return bisect.bisect_left(range(os.fstat(fd).st_size // RECORD_SIZE - 1), first_stored,
                              key=base_of)
