"""Append times: a ``<base>.times`` file beside each segment, and looking offsets up by time.

An event's time is when a writer committed it, in nanoseconds since the Unix epoch (UTC), taken
under the writer lock; the stored event itself is unchanged. The file is an array of 16-byte
entries::

    offset - base u32 | time_ns u64 | crc32 of the 12 bytes before it u32

An entry ``(r, t)`` says the events from ``base + r`` up to the next entry's were appended at
``t``. A writer adds one for a batch when it starts a segment or when at least ``GRAIN_NS``
passed since the last entry; a batch committed sooner shares the last entry's time, so times
are exact per batch for a slow writer and to the millisecond for a fast one, and the file grows
by at most one entry per millisecond of appending. Times never decrease by offset: a writer
takes ``max(clock, the last time stored)``, so a clock stepped back gives equal times, not
earlier ones (and the writer counts it).

Crash safety is the header's: the header holds how many entries of the active segment are
committed (``tcount``) and the last time stored (``tlast``), and is rewritten after the entry,
so an entry past ``tcount`` (a writer killed between the two) is never believed. A writer
truncates that leftover when it takes over and when the segment is sealed, so a sealed
segment's file holds exactly its entries. Each entry carries its own CRC, and entries must
rise, so damage is found (by readers, who then use the valid prefix, and by ``verify``).

A segment written before times existed has no file; its events' times are unknown (None) and
count as earlier than any time. The active segment of an upgraded log gets its file with the
first entry at the first offset the new writer appended.
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import repeat
from typing import NamedTuple

from ._catalog import CatalogView, bisect_by_time
from ._layout import Folder

__all__ = [
    "ENTRY_SIZE",
    "GRAIN_NS",
    "TIMES_SUFFIX",
    "TIME_FORMS",
    "Entries",
    "TimeIndex",
    "pack_entry",
    "parse_entries",
    "parse_time",
    "parse_times_name",
    "read_entries",
    "read_first_time",
    "times_name",
    "to_ns",
]

log = logging.getLogger("eventpipe.times")

TIMES_SUFFIX = ".times"
GRAIN_NS = 1_000_000  # a new entry at most every millisecond of appending
_ENTRY = struct.Struct("<IQI")
_KEY = struct.Struct("<IQ")
ENTRY_SIZE = _ENTRY.size  # 16
_crc32 = zlib.crc32


def times_name(base: int) -> str:
    """The time index file of segment ``base``."""
    return f"{base:020d}{TIMES_SUFFIX}"


def parse_times_name(name: str) -> int | None:
    """The segment base a time index file name is for; None for any other name."""
    stem = name[: -len(TIMES_SUFFIX)]
    if name.endswith(TIMES_SUFFIX) and len(stem) == 20 and stem.isdigit():
        return int(stem)
    return None


def pack_entry(rel: int, time_ns: int) -> bytes:
    """One entry: events from ``base + rel`` on were appended at ``time_ns``."""
    key = _KEY.pack(rel, time_ns)
    return key + _crc32(key).to_bytes(4, "little")


class Entries(NamedTuple):
    """The valid entries of one time index, and where damage (if any) begins.

    ``rels[i]`` (offset minus base) rises strictly, ``times[i]`` never falls. ``damaged_at``
    is the index of the first entry that failed its checks while more were claimed (None when
    the file is whole, or holds only a leftover past the claimed count).
    """

    rels: list[int]
    times: list[int]
    damaged_at: int | None = None


def parse_entries(raw: bytes, *, limit: int | None = None, claimed: int | None = None) -> Entries:
    """Check and decode entries from ``raw``; stops at the first one that fails.

    ``limit`` is the number of events in the segment (an entry at or past it is a leftover of
    a killed writer, or damage); ``claimed`` how many entries the caller was told exist (the
    header's count for the active segment): stopping before it is damage, entries past it are
    ignored.
    """
    rels: list[int] = []
    times: list[int] = []
    n = len(raw) // ENTRY_SIZE
    if claimed is not None:
        n = min(n, claimed)
    prev_rel, prev_time = -1, 1
    for i, (rel, t, crc) in enumerate(_ENTRY.iter_unpack(raw[: n * ENTRY_SIZE])):
        if (crc != _crc32(raw[i * ENTRY_SIZE : i * ENTRY_SIZE + 12]) or rel <= prev_rel
                or t < prev_time or (limit is not None and rel >= limit)):
            damaged = i if claimed is not None or limit is None or rel < limit else None
            return Entries(rels, times, damaged)
        rels.append(rel)
        times.append(t)
        prev_rel, prev_time = rel, t
    if claimed is not None and len(rels) < claimed:
        return Entries(rels, times, len(rels))
    return Entries(rels, times)


def read_entries(fd: int, *, limit: int | None = None, claimed: int | None = None,
                 start: int = 0) -> Entries:
    """The entries of an open time index file (from entry ``start``), checked as
    :func:`parse_entries` says."""
    want = (claimed - start) * ENTRY_SIZE if claimed is not None else os.fstat(fd).st_size
    raw = os.pread(fd, max(0, want - (0 if claimed is not None else start * ENTRY_SIZE)),
                   start * ENTRY_SIZE)
    return parse_entries(raw, limit=limit,
                         claimed=None if claimed is None else claimed - start)


def to_ns(when: datetime | int | float) -> int:
    """Nanoseconds since the epoch for ``when``: an ``int`` (already nanoseconds), a
    ``float`` (seconds, as ``time.time()`` gives) or a ``datetime`` (naive means local time,
    as :meth:`datetime.timestamp` takes it)."""
    if isinstance(when, bool):
        raise TypeError("a time must be a datetime, int nanoseconds or float seconds, not bool")
    if isinstance(when, int):
        return when
    if isinstance(when, float):
        return int(when * 1_000_000_000)
    if isinstance(when, datetime):
        if when.tzinfo is None:
            when = when.astimezone()  # local time, made explicit
        delta = when - datetime(1970, 1, 1, tzinfo=UTC)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 \
            + delta.microseconds * 1_000
    raise TypeError(f"a time must be a datetime, int nanoseconds or float seconds, "
                    f"not {type(when).__name__}")


def read_first_time(segments: Folder, base: int) -> int | None:
    """The time of segment ``base``'s first entry, read from ``segments/``; None when it has
    no time index or its first entry fails its check."""
    fd = segments.open_existing(times_name(base), os.O_RDONLY)
    if fd is None:  # written before times existed, or removed
        return None
    try:
        found = parse_entries(os.pread(fd, ENTRY_SIZE, 0))
    finally:
        os.close(fd)
    return found.times[0] if found.times else None


class _Cached(NamedTuple):
    rels: list[int]
    times: list[int]
    claimed: int | None  # the header's count this was read up to (active); None: sealed


class TimeIndex:
    """A reader's view of the time index files of one log, cached per segment.

    :meth:`note` is told every header the reader reads (the active segment and its committed
    entry count). Sealed segments' entries never change, so they are read once; the active
    segment's are read up to the count noted, and only what is new is read again. Thread-safe.
    ``segments`` returns ``segments/`` (the caller's Folder, kept open).
    """

    _KEPT = 64  # segments whose entries stay cached
    _FIRSTS_KEPT = 4096

    def __init__(self, segments: Callable[[], Folder]) -> None:
        self._segments = segments
        self._lock = threading.Lock()
        self._cache: dict[int, _Cached] = {}
        self._first: dict[int, int | None] = {}  # sealed segments' first entry time
        self._warned: set[int] = set()
        self._probed: set[int] = set()  # segments looked up by time at least once
        self._active = (-1, 0)  # (base, committed entries) of the newest header noted

    def note(self, segment_base: int, tcount: int) -> None:
        """A header was read: segment ``segment_base`` is active with ``tcount`` entries."""
        self._active = max(self._active, (segment_base, tcount))

    def forget(self) -> None:
        """Drop everything cached: the log was replaced by a copy, or segments were removed."""
        with self._lock:
            self._cache.clear()
            self._first.clear()
            self._probed.clear()
            self._active = (-1, 0)

    def _claimed(self, base: int) -> int | None:
        active, tcount = self._active
        return tcount if base >= active else None

    def _open(self, base: int) -> int | None:
        # None: written before times existed, or removed
        return self._segments().open_existing(times_name(base), os.O_RDONLY)

    def entries(self, base: int) -> tuple[list[int], list[int]]:
        """``(rels, times)``: the valid entries of segment ``base`` (see :class:`Entries`)."""
        claimed = self._claimed(base)
        with self._lock:
            got = self._cache.get(base)
        if got is not None and (got.claimed is None or got.claimed == claimed):
            return got.rels, got.times
        fd = self._open(base)
        start = 0
        if fd is None:
            got = _Cached([], [], claimed)
        else:
            try:
                if (got is not None and got.claimed is not None and claimed is not None
                        and 0 < got.claimed <= claimed and len(got.rels) == got.claimed):
                    start = got.claimed  # only the entries committed since
                found = read_entries(fd, claimed=claimed, start=start)
            finally:
                os.close(fd)
            if found.damaged_at is not None:
                self._warn(base, start + found.damaged_at)
            if start and got is not None:
                if found.rels and found.rels[0] <= got.rels[-1]:
                    self._warn(base, start)
                    found = Entries([], [])
                got = _Cached(got.rels + found.rels, got.times + found.times, claimed)
            else:
                got = _Cached(found.rels, found.times, claimed)
        with self._lock:
            if len(self._cache) >= self._KEPT and base not in self._cache:
                self._cache.pop(next(iter(self._cache)))
            self._cache[base] = got
        return got.rels, got.times

    def _warn(self, base: int, at: int) -> None:
        if base not in self._warned:
            self._warned.add(base)
            log.warning("%s: time index damaged at entry %d; later events of this segment "
                        "get the last valid time (run `eventpipe verify`)",
                        self._segments().path_of(times_name(base)), at)

    def times(self, base: int, first: int, n: int) -> list[int | None]:
        """The times of events ``first .. first + n - 1`` of segment ``base``."""
        rels, times = self.entries(base)
        out: list[int | None] = []
        rel, end = first - base, first - base + n
        i = bisect.bisect_right(rels, rel) - 1
        if i < 0:
            upto = min(rels[0] if rels else end, end)
            out.extend(repeat(None, upto - rel))
            rel, i = upto, 0
        while rel < end:
            upto = min(rels[i + 1] if i + 1 < len(rels) else end, end)
            out.extend(repeat(times[i], upto - rel))
            rel = upto
            i += 1
        return out

    def time_of(self, base: int, offset: int) -> int | None:
        """The time of the event at ``offset`` in segment ``base``."""
        return self.times(base, offset, 1)[0]

    def first_time(self, base: int) -> int | None:
        """The time of segment ``base``'s first entry (None: no times there)."""
        claimed = self._claimed(base)
        if claimed is None:
            with self._lock:
                if base in self._first:
                    return self._first[base]
        elif claimed == 0:
            return None
        first = read_first_time(self._segments(), base)
        if claimed is not None:
            return first  # the active segment's: not kept (a recovery may cut its index)
        with self._lock:
            if len(self._first) >= self._FIRSTS_KEPT:
                self._first.pop(next(iter(self._first)))
            self._first[base] = first
        return first

    def last_time(self, base: int) -> int | None:
        """The time of sealed segment ``base``'s last entry: when its last event was appended
        (None: no times there). Reads only that entry."""
        fd = self._open(base)
        if fd is None:
            return None
        try:
            size = os.fstat(fd).st_size
            raw = os.pread(fd, ENTRY_SIZE, size - size % ENTRY_SIZE - ENTRY_SIZE) \
                if size >= ENTRY_SIZE else b""
        finally:
            os.close(fd)
        _rel, t, crc = _ENTRY.unpack(raw) if len(raw) == ENTRY_SIZE else (0, 0, -1)
        return t if crc == _crc32(raw[:12]) and t > 0 else None

    def first_at_or_after(self, base: int, time_ns: int) -> int | None:
        """The first offset of segment ``base`` appended at or after ``time_ns``; None when
        every event there with a known time is earlier.

        Bisects the file with one-entry reads unless its entries are cached, so the first
        lookup in a segment costs log2(entries) reads, not a read of them all."""
        claimed = self._claimed(base)
        with self._lock:
            got = self._cache.get(base)
            again = base in self._probed
            self._probed.add(base)
        if not again and (got is None or (got.claimed is not None and got.claimed != claimed)):
            # The first lookup here: a few reads. A second one reads and caches the entries,
            # so a reader that keeps asking about a segment bisects them in memory.
            found = self._bisect_file(base, time_ns, claimed)
            if found is not False:
                return found
        rels, times = self.entries(base)
        i = bisect.bisect_left(times, time_ns)
        return None if i == len(times) else base + rels[i]

    def _bisect_file(self, base: int, time_ns: int, claimed: int | None) -> int | bool | None:
        """:meth:`first_at_or_after` by reading single entries; False when an entry read
        fails its checks (the caller then reads the valid prefix, as every reader does)."""
        fd = self._open(base)
        if fd is None:
            return None
        try:
            n = os.fstat(fd).st_size // ENTRY_SIZE
            if claimed is not None:
                n = min(n, claimed)
            lo, hi, found = 0, n, None
            while lo < hi:
                mid = (lo + hi) // 2
                raw = os.pread(fd, ENTRY_SIZE, mid * ENTRY_SIZE)
                if len(raw) != ENTRY_SIZE:
                    return False
                rel, t, crc = _ENTRY.unpack(raw)
                if crc != _crc32(raw[:12]):
                    return False
                if t >= time_ns:
                    hi, found = mid, rel
                else:
                    lo = mid + 1
        finally:
            os.close(fd)
        return None if found is None else base + found

    def offset_at_by_catalog(self, time_ns: int, view: CatalogView, active_base: int,
                             head: int) -> int | None:
        """:meth:`offset_at` with the sealed segments' bounds and first times read from the
        catalog (see :mod:`eventpipe._catalog`), which covers them all; None when the catalog
        turns out not to be right (a record fails its check, a segment it names is gone):
        the caller then lists the segments."""
        i = bisect_by_time(view, time_ns)
        if i is None:
            return None
        # The answer is in the segment before the first one starting at or after the time,
        # or is that one's first timed event (it has a known first time, so a time index:
        # finding nothing there means it is gone). Past the last record: the active one.
        candidates: list[tuple[int, bool]] = []
        for j in (i - 1, i):
            if j == view.count:
                candidates.append((active_base, False))
            elif j >= 0:
                rec = view.record(j)
                if rec is None:
                    return None
                candidates.append((rec[0], j == i))
        for base, must_find in candidates:
            found = self.first_at_or_after(base, time_ns)
            if found is not None:
                return found
            if must_find:
                return None
        return head

    def offset_at(self, time_ns: int, bases: list[int], head: int) -> int:
        """The first offset appended at or after ``time_ns``, ``head`` if none: ``bases`` are
        the stored segments up to the active one. Bisects the segments by their first time,
        then one segment's entries, so it costs the same on a long log as on a short one.
        Events of unknown time count as earlier than any time."""
        lo, hi = 0, len(bases)
        while lo < hi:
            mid = (lo + hi) // 2
            first = self.first_time(bases[mid])
            if first is not None and first >= time_ns:
                hi = mid
            else:
                lo = mid + 1
        # bases[lo] is the first segment starting at or after the time: the answer is in the
        # segment before it, or is its first timed event.
        for i in (lo - 1, lo):
            if 0 <= i < len(bases):
                found = self.first_at_or_after(bases[i], time_ns)
                if found is not None:
                    return found
        return head


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"-?(\d+(?:\.\d+)?)\s*([smhdw])(?:\s+ago)?")
TIME_FORMS = ("an ISO 8601 time (2026-12-01T10:00, 2026-12-01 10:00:00+01:00, ...Z; "
              "without a zone: local time), a time ago (-30s, 15m, -2h, 1d ago, -1w; "
              "--since=-15m on a command line), @<seconds since the epoch>, or now")


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """The aware datetime ``text`` names: see :data:`TIME_FORMS`. ValueError otherwise."""
    t = text.strip()
    current = now or datetime.now(UTC)
    if t.lower() == "now":
        return current
    m = _RELATIVE.fullmatch(t)
    if m:
        return current - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    if t.startswith("@"):
        try:
            return datetime.fromtimestamp(float(t[1:]), tz=UTC)
        except (ValueError, OverflowError):
            pass
    else:
        try:
            when = datetime.fromisoformat(t)
        except ValueError:
            pass
        else:
            return when if when.tzinfo is not None else when.astimezone()
    raise ValueError(f"not a time: {text!r}; give {TIME_FORMS}")
