"""The record type readers yield: an event with its offset and append time, as lean as a tuple."""

from __future__ import annotations

from datetime import UTC, datetime
from operator import itemgetter
from typing import TYPE_CHECKING, Any

__all__ = ["Record"]


class Record(tuple[Any, ...]):
    """One stored event: ``record.offset`` (its dense, 0-based position), ``record.event``
    and ``record.time`` (when it was appended: nanoseconds since the Unix epoch, UTC; None for
    events written before eventpipe kept times).

    It unpacks as the pair it has always been: ``offset, event = record``; ``len()`` is 2 and
    it equals the pair ``(offset, event)`` (an offset's event and time never change, so the
    time adds nothing to equality). ``record.datetime`` is the time as an aware datetime.

    A ``tuple`` subclass with no instance dict: built from ``(offset, event, time)`` triples by
    C code (``map(Record, zip(...))``), it adds about 0.2 µs per event where a NamedTuple or
    dataclass would add more.
    """

    __slots__ = ()

    if TYPE_CHECKING:

        @property
        def offset(self) -> int: ...

        @property
        def event(self) -> Any: ...

    else:
        offset = property(itemgetter(0), doc="The event's offset in the log.")
        event = property(itemgetter(1), doc="The decoded JSON event.")

    @property
    def time(self) -> int | None:
        """When the event was appended, in nanoseconds since the epoch (UTC); None if unknown."""
        return self[2] if tuple.__len__(self) > 2 else None

    @property
    def datetime(self) -> datetime | None:
        """:attr:`time` as an aware UTC datetime (to the microsecond); None if unknown."""
        t = self.time
        return None if t is None else datetime.fromtimestamp(t / 1e9, tz=UTC)

    def __iter__(self) -> Any:
        return iter((self[0], self[1]))

    def __len__(self) -> int:
        return 2

    def __eq__(self, other: object) -> bool:
        if isinstance(other, tuple):
            return len(other) == 2 and self[0] == other[0] and self[1] == other[1]
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self) -> int:
        return hash((self[0], self[1]))

    def __repr__(self) -> str:
        return f"Record(offset={self[0]!r}, event={self[1]!r}, time={self.time!r})"
