"""Retention: removing the oldest sealed segments by age, total size or offset.

Only whole sealed segments go, oldest first, so what remains is always one contiguous range
ending at the head. By default nothing is removed that a known consumer has not processed yet:
such segments are held back and reported. Known consumers are those with a checkpoint in the
log's ``consumers/`` folder and those registered in ``consumers/external/`` with a checkpoint
elsewhere (see :mod:`eventpipe._registry`). A consumer whose position cannot be known (a
registered one that has not checkpointed yet, a checkpoint that cannot be read, a registration
that is not valid) is taken to be at offset 0: nothing more is removed until it checkpoints, is
fixed, or is forgotten (``eventpipe consumers forget``), and the report says which and why.
Readers and consumers positioned in a removed range get OffsetOutOfRangeError.

Everything happens under ``compress.lock``. The automatic retention that follows each
compressor pass (``blocking=False``) lists nothing: it starts at the first segment recorded in
``compress.state``, takes the total size from there (the bytes of the segments below the
compressor's watermark, plus the active segment) and walks forward one segment at a time (the
next base from each ``.sum``), looking at only the segments it removes and one more. Segments
sealed after the last pass are not counted until the next pass has checksummed them. An
explicit prune (``eventpipe prune``, :meth:`EventLog.prune`) lists and measures every segment,
and recounts the state from that listing. When the state does not match the disk (a segment
it names is gone), the listing is used too.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple

from ._checksum import TMP_SUFFIX, read_sum, sum_name
from ._compress import SealState, load_state, save_state, visible_size
from ._layout import COMPRESS_LOCK, FlockFile
from ._registry import consumer_positions, describe
from ._segment import list_segments, segment_name
from ._timeindex import times_name
from .errors import CorruptLogError

if TYPE_CHECKING:
    from ._log import EventLog

__all__ = ["PruneReport", "prune"]

_log = logging.getLogger("eventpipe.retention")  # a name users configure


class PruneReport(NamedTuple):
    """What a prune removed (segment bases), and what it held back and why."""

    removed: list[int]
    bytes_removed: int
    first_offset: int
    held_back: list[str]


class _Seg(NamedTuple):
    base: int
    next: int  # the base after it
    size: int  # bytes on disk (0 if it vanished while we looked)
    mtime: float | None  # None if it vanished


class _Criteria(NamedTuple):
    max_age: float | None
    max_bytes: int | None
    before: int | None


class _Stale(Exception):
    """The state does not match the disk: fall back to a listing."""


def _holds(log: EventLog) -> list[tuple[int, str]]:
    """(first offset to keep, why) for every known consumer, in- or outside the log (see
    :mod:`eventpipe._registry`): one whose position is unknown (not checkpointed yet,
    unreadable, invalid) holds from offset 0, and the reason says so."""
    holds = []
    for pos in consumer_positions(log.folder, log.log_id):
        offset = pos.hold
        if offset is None:
            continue
        who = describe(pos.consumer)
        if pos.checkpoint is not None:
            why = f"{who} is at offset {offset}"
        elif pos.pending:
            why = (f"{who} is registered ({pos.consumer.registration}) but has not "
                   "checkpointed yet, so it starts at offset 0; if it no longer exists, "
                   f"run: eventpipe consumers forget {log.path} {pos.consumer.name}")
        else:
            why = f"{who} has an unknown position, taken as offset 0: {pos.error}"
        holds.append((offset, why))
    return holds


def _listed(log: EventLog, active: int) -> tuple[list[_Seg], int]:
    """Every sealed segment from a listing, oldest first, and the total size with the active
    segment."""
    folder = log.segments
    segs = [s for s in list_segments(folder) if s.base < active]
    nexts = [s.base for s in segs[1:]] + [active] * bool(segs)  # (no sealed segment: none)
    out = []
    for s, n in zip(segs, nexts, strict=True):
        st = folder.lstat(s.name)
        out.append(_Seg(s.base, n, 0, None) if st is None
                   else _Seg(s.base, n, st.st_size, st.st_mtime))
    total = sum(s.size for s in out) + visible_size(folder, active)
    return out, total


def _walked(log: EventLog, state: SealState) -> Iterator[_Seg]:
    """Sealed segments from the state's first one, oldest first, found one by one (raises
    _Stale when the state does not match the disk)."""
    folder = log.segments
    base = state.first_base
    while base < state.summed_below:
        st = None
        for compressed in (False, True):
            st = folder.lstat(segment_name(base, compressed))
            if st is not None:
                break
        if st is None:
            raise _Stale
        try:
            known = read_sum(folder, base)
        except CorruptLogError:
            known = None
        if known is not None and known.events > 0:
            nxt = base + known.events
        elif base in state.damaged:
            nxt = state.damaged[base][0]
        else:
            raise _Stale
        if nxt <= base:
            raise _Stale
        yield _Seg(base, nxt, st.st_size, st.st_mtime)
        base = nxt


def _choose(log: EventLog, candidates: Iterator[_Seg], total: int,
            c: _Criteria) -> tuple[list[_Seg], _Seg | None]:
    """The oldest segments the criteria want removed, and the first one kept (if any).

    A segment's age is that of its last event, from its time index; the file's mtime (which
    a copy or a restore changes) only for a segment written before eventpipe kept times.
    """
    now = time.time()
    max_age, max_bytes, before = c
    chosen: list[_Seg] = []
    remaining = total
    for seg in candidates:
        wanted = ((before is not None and seg.next <= before)
                  or (max_age is not None and _age(log, seg, now) > max_age)
                  or (max_bytes is not None and remaining > max_bytes))
        if not wanted:
            return chosen, seg
        chosen.append(seg)
        remaining -= seg.size
    return chosen, None


def _age(log: EventLog, seg: _Seg, now: float) -> float:
    """Seconds since segment ``seg``'s last event was appended (-inf if unknown)."""
    last = log.time_index.last_time(seg.base)
    if last is not None:
        return now - last / 1e9
    return now - seg.mtime if seg.mtime is not None else -math.inf


def prune(
    log: EventLog,
    *,
    max_age: float | None = None,
    max_bytes: int | None = None,
    before: int | None = None,
    force: bool = False,
    dry_run: bool = False,
    blocking: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> PruneReport:
    """Remove old sealed segments; see the module docstring. Returns what was done.

    ``max_age``: remove segments whose last event was appended more than this many seconds
    ago (by its time index; by the file's mtime for a segment written before times).
    ``max_bytes``: remove the oldest until all segments together take at most this much.
    ``before``: remove segments whose events all lie before this offset.
    ``force``: also remove what known consumers have not processed.
    ``blocking`` False (the automatic retention after a compressor pass): return at once if
    another process holds the compress lock, and go by the compressor's state, not a listing.
    ``on_progress(done, total)``: called in this thread with the segments to remove, once
    chosen, then after each removal (not for a dry run, which removes nothing).
    """
    criteria = _Criteria(max_age, max_bytes, before)
    if dry_run:
        header = log.committed_header()
        segs, total = _listed(log, header.segment_base)
        return _decide(log, iter(segs), total, header.segment_base, force, criteria)[0]
    lock = FlockFile(log.folder, COMPRESS_LOCK, log.config.file_mode)
    if not lock.acquire(blocking=blocking):
        state = load_state(log.folder)
        first = state.first_base if state is not None else log.committed_header().segment_base
        return PruneReport([], 0, first, ["another process is compressing; try later"])
    try:
        report = _prune_locked(log, force, criteria, incremental=not blocking,
                               on_progress=on_progress)
    finally:
        lock.release()
    if report.removed:
        log.segment_index.invalidate()
    return report


def _prune_locked(log: EventLog, force: bool, criteria: _Criteria, *, incremental: bool,
                  on_progress: Callable[[int, int], None] | None = None) -> PruneReport:
    header = log.committed_header()
    active = header.segment_base
    state = load_state(log.folder)
    if incremental and state is not None and state.summed_below <= active:
        try:
            # Segments sealed since the last pass (above the watermark) are not counted yet.
            total = state.sealed_bytes + visible_size(log.segments, active)
            report, chosen = _decide(log, _walked(log, state), total, active, force, criteria)
        except _Stale:
            incremental = False
    if not incremental:
        segs, total = _listed(log, active)
        report, chosen = _decide(log, iter(segs), total, active, force, criteria)
    if not chosen:
        return report
    folder = log.segments
    if on_progress is not None:
        on_progress(0, len(chosen))
    # Oldest first: a crash half-way leaves the state's first one gone.
    for i, seg in enumerate(chosen, 1):
        for name in (segment_name(seg.base), segment_name(seg.base, compressed=True),
                     sum_name(seg.base), sum_name(seg.base) + TMP_SUFFIX, times_name(seg.base),
                     segment_name(seg.base, compressed=True) + TMP_SUFFIX):
            folder.unlink(name)
        if on_progress is not None:
            on_progress(i, len(chosen))
    folder.fsync()
    _log.info("%s: retention removed %d segment(s) (offsets %d..%d, %d bytes); the log now "
              "starts at offset %d", log.path, len(chosen), chosen[0].base,
              report.first_offset - 1, report.bytes_removed, report.first_offset)
    if state is not None:
        if incremental:
            state.first_base = report.first_offset
            state.sealed_bytes -= report.bytes_removed
        else:
            # Recount from the listing: corrects whatever the state had wrong.
            state.first_base = report.first_offset
            state.sealed_bytes = sum(visible_size(folder, s.base) for s in segs
                                     if report.first_offset <= s.base < state.summed_below)
        state.damaged = {b: v for b, v in state.damaged.items() if b >= report.first_offset}
        save_state(log.folder, state, log.config.file_mode)
    return report


def _decide(log: EventLog, candidates: Iterator[_Seg], total: int, active: int, force: bool,
            criteria: _Criteria) -> tuple[PruneReport, list[_Seg]]:
    chosen, kept = _choose(log, candidates, total, criteria)
    held_back = []
    if not force and chosen:
        for offset, why in _holds(log):
            allowed = sum(1 for s in chosen if s.next <= offset)
            if allowed < len(chosen):
                seg = chosen[allowed]
                held_back.append(
                    f"segment {seg.base} (offsets {seg.base}..{seg.next - 1}) and later: {why}")
                kept = seg
                chosen = chosen[:allowed]
    if chosen:
        first = chosen[-1].next if kept is None else kept.base
    else:
        first = kept.base if kept is not None else active
    freed = sum(s.size for s in chosen)
    return PruneReport([s.base for s in chosen], freed, first, held_back), chosen

