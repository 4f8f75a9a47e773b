"""Retention: removing the oldest sealed segments by age, total size or offset.

Only whole sealed segments go, oldest first, so what remains is always one contiguous range
ending at the head. By default nothing is removed that a known consumer (a checkpoint in the
log's ``consumers/`` folder) has not processed yet: such segments are held back and reported.
Readers and consumers positioned in a removed range get OffsetOutOfRangeError.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING, NamedTuple

import filelock

from ._fsutil import fsync_dir, os_errors
from .checkpoint import load_checkpoint
from .compress import sum_path
from .errors import EventPipeError
from .segment import list_segments, segment_path

if TYPE_CHECKING:
    from .log import EventLog

__all__ = ["PruneReport", "prune"]


class PruneReport(NamedTuple):
    """What a prune removed (segment bases), and what it held back and why."""

    removed: list[int]
    bytes_removed: int
    first_offset: int
    held_back: list[str]


def _consumer_offsets(log: EventLog) -> dict[str, int]:
    folder = os.path.join(log.path, "consumers")
    offsets = {}
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.endswith(".json"):
                try:
                    cp = load_checkpoint(os.path.join(folder, name))
                except EventPipeError:
                    offsets[name[:-5]] = 0  # unreadable: assume it still needs everything
                    continue
                if cp is not None:
                    offsets[name[:-5]] = cp.offset
    return offsets


def prune(
    log: EventLog,
    *,
    max_age: float | None = None,
    max_bytes: int | None = None,
    before: int | None = None,
    force: bool = False,
    dry_run: bool = False,
    blocking: bool = True,
) -> PruneReport:
    """Remove old sealed segments; see the module docstring. Returns what was done.

    ``max_age``: remove segments last written more than this many seconds ago.
    ``max_bytes``: remove the oldest until all segments together take at most this much.
    ``before``: remove segments whose events all lie before this offset.
    ``force``: also remove what known consumers have not processed.
    """
    header = log._read_header()
    segs = [s for s in list_segments(log.segments_dir) if s.base < header.segment_base]
    if not segs:
        first = header.segment_base
        return PruneReport([], 0, first, [])
    stats: list[os.stat_result | None] = []
    for s in segs:
        try:
            stats.append(os.stat(s.path))
        except FileNotFoundError:
            stats.append(None)
    total = sum(st.st_size for st in stats if st is not None)
    with contextlib.suppress(FileNotFoundError):
        total += os.path.getsize(segment_path(log.segments_dir, header.segment_base))
    nexts = [s.base for s in segs[1:]] + [header.segment_base]
    now = time.time()
    chosen = 0
    remaining = total
    for st, next_base in zip(stats, nexts, strict=True):
        size = st.st_size if st is not None else 0
        wanted = ((before is not None and next_base <= before)
                  or (max_age is not None and st is not None and now - st.st_mtime > max_age)
                  or (max_bytes is not None and remaining > max_bytes))
        if not wanted:
            break
        chosen += 1
        remaining -= size
    held_back = []
    if not force and chosen:
        for name, offset in sorted(_consumer_offsets(log).items()):
            allowed = sum(1 for n in nexts[:chosen] if n <= offset)
            if allowed < chosen:
                seg = segs[allowed]
                held_back.append(
                    f"segment {seg.base} (offsets {seg.base}..{nexts[allowed] - 1}) and later: "
                    f"consumer {name!r} is at offset {offset}")
                chosen = allowed
    removed = [s.base for s in segs[:chosen]]
    freed = sum(st.st_size for st in stats[:chosen] if st is not None)
    if dry_run or not removed:
        return PruneReport(removed, freed, segs[chosen].base if chosen < len(segs)
                           else header.segment_base, held_back)
    lock = filelock.FileLock(os.path.join(log.path, "compress.lock"),
                             mode=log.config.file_mode, thread_local=False, is_singleton=False)
    try:
        lock.acquire(timeout=-1 if blocking else 0)
    except filelock.Timeout:
        return PruneReport([], 0, segs[0].base, ["another process is compressing; try later"])
    try:
        with os_errors("remove segment", log.segments_dir):
            for base in removed:
                for path in (segment_path(log.segments_dir, base),
                             segment_path(log.segments_dir, base, compressed=True),
                             sum_path(log.segments_dir, base)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
        fsync_dir(log.segments_dir)
    finally:
        lock.release()
    log._bases_stale()
    first = segs[chosen].base if chosen < len(segs) else header.segment_base
    return PruneReport(removed, freed, first, held_back)
