"""Where a log's segments start: a cached listing shared by the readers of one EventLog.

Readers find the segment holding an offset from the bases (first offsets) of the segment
files. Listing the folder on every read would cost a directory scan per read, so the bases are
cached; the cache is refreshed when a header names an active segment past its end, and
dropped (:meth:`SegmentIndex.invalidate`) when this process removes or seals segments.

Threads of one process share the index: readers fill it, the compressor thread and retention
invalidate it. A generation counter, bumped by every invalidation under the index's lock,
keeps a listing that was started before an invalidation from being stored after it (it may
predate the change it was invalidated for). Another process's retention is not announced:
:meth:`SegmentIndex.first_base` checks that the cached first segment still exists, and readers
list again before concluding anything from a segment that is gone.

The index also keeps what never changes once known: each sealed segment's checksum
(:class:`~eventpipe._segment.Seal`, read from its ``.sum`` file) and which sealed plain
segments were already counted whole and how many lines they hold, each in a small
bounded cache.
"""

from __future__ import annotations

import bisect
import os
import threading
import weakref
from collections.abc import Callable

from ._checksum import BLOCK_BYTES, read_sum, sum_path
from ._layout import Folder
from ._segment import CountKey, Seal, list_bases, segment_exists
from .errors import CorruptLogError

__all__ = ["SegmentIndex"]

_SEALS_KEPT = 64  # checksums of the segments read most recently (a few KiB each)
_COUNTS_KEPT = 1024


class _Bounded(dict[CountKey, int]):
    """A dict that forgets its oldest entries past a size (for the counted-segments cache)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self._size = size
        self._lock = threading.Lock()

    def forget_after_fork(self) -> None:
        self._lock = threading.Lock()

    def __setitem__(self, key: CountKey, value: int) -> None:
        with self._lock:
            super().__setitem__(key, value)
            while len(self) > self._size:
                del self[next(iter(self))]


class SegmentIndex:
    """The sorted bases of the segment files in ``folder``, listed on demand and cached.

    Thread-safe. Methods take ``active_base``, the active segment named by the caller's header:
    a cached listing that ends before it is stale and is refreshed.
    """

    def __init__(self, open_folder: Callable[[], Folder]) -> None:
        self._open_folder = open_folder
        self._lock = threading.Lock()
        self._bases: tuple[int, ...] = ()
        self._generation = 0
        self._seals: dict[int, Seal] = {}
        self.counted = _Bounded(_COUNTS_KEPT)  # newline counts of sealed plain segments
        _INDEXES.add(self)


    @property
    def folder(self) -> Folder:
        """The segments folder (opened by the log on first use)."""
        return self._open_folder()

    def _forget_after_fork(self) -> None:
        # Another thread of the parent may have held a lock at fork(): it would never be
        # released in the child. The data each guards is consistent between statements.
        self._lock = threading.Lock()
        self.counted.forget_after_fork()

    @property
    def generation(self) -> int:
        """How many times the index was invalidated."""
        return self._generation

    def invalidate(self) -> None:
        """Forget the listing: segments were removed or sealed. A listing in progress in
        another thread is not stored."""
        with self._lock:
            self._generation += 1
            self._bases = ()

    def cached(self, active_base: int) -> tuple[int, ...] | None:
        """The cached listing if it reaches ``active_base`` (what :meth:`bases` would give
        without listing), else None."""
        with self._lock:
            cached = self._bases
        return cached if cached and cached[-1] >= active_base else None

    def bases(self, active_base: int) -> tuple[int, ...]:
        """Sorted bases of the segment files, reaching at least ``active_base`` if it exists.

        May include bases past ``active_base`` (listed for a newer header); callers bound
        their search by it.
        """
        with self._lock:
            cached, generation = self._bases, self._generation
        if cached and cached[-1] >= active_base:
            return cached
        listed = tuple(list_bases(self.folder))
        with self._lock:
            if self._generation == generation:
                self._bases = listed
        return listed

    def locate(self, offset: int, active_base: int) -> tuple[int, int] | None:
        """``(base, next base)`` of the sealed segment that should hold ``offset`` (below
        ``active_base``), or None when no listed segment starts at or before it.

        The next base is the following listed segment's, or ``active_base``: what the reader
        then checks the segment's event count against.
        """
        bases = self.bases(active_base)
        hi = bisect.bisect_right(bases, active_base)
        i = bisect.bisect_right(bases, offset, 0, hi) - 1
        if i < 0:
            return None
        return bases[i], bases[i + 1] if i + 1 < hi else active_base

    def first_base(self, active_base: int) -> int | None:
        """The first segment's base, None if no segment up to ``active_base`` is listed.

        Another process's retention may have removed the cached first segment: one existence
        check, and a fresh listing if it is gone.
        """
        bases = self.bases(active_base)
        if bases and bases[0] < active_base and not segment_exists(self.folder, bases[0]):
            self.invalidate()
            bases = self.bases(active_base)
        if not bases or bases[0] > active_base:
            return None
        return bases[0]

    def seal(self, base: int) -> Seal | None:
        """What sealed segment ``base`` was sealed with (its ``.sum``), None if it has no
        checksum file yet. Raises CorruptLogError if the file is unreadable."""
        seal = self._seals.get(base)
        if seal is not None:
            return seal
        found = read_sum(self.folder, base)
        if found is None:
            return None
        if found.base != base:
            raise CorruptLogError(f"the checksum file of segment {base} is segment "
                                  f"{found.base}'s", path=sum_path(self.folder, base))
        seal = Seal(found.events, found.size, BLOCK_BYTES, tuple(found.block_crcs))
        with self._lock:
            self._seals[base] = seal
            while len(self._seals) > _SEALS_KEPT:
                del self._seals[next(iter(self._seals))]
        return seal


_INDEXES: weakref.WeakSet[SegmentIndex] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for index in list(_INDEXES):
        index._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
