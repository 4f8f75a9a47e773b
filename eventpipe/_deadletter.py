"""Dead letters: where a consumer puts the events its handler failed on, each exactly once.

The dead-letter log is an ordinary eventpipe log, shared by any number of consumers. An entry
names the consumer, the consumed log (path and log id) and the event's offset, and quotes the
event and the error; it always fits the dead-letter log's ``max_event_bytes``. Exactly-once
takes the consumer's checkpoint (a marked one before each append): :class:`DeadLettering` is
that part, for the consumers that checkpoint to files (Consumer, StreamConsumer); this module
also finds an entry from a given head, and builds and appends entries.

The consumer names its dead-letter log in each checkpoint (``Checkpoint.dead_letter``), which
is how ``eventpipe status`` finds it; :func:`count_entries` counts what is there.
"""

from __future__ import annotations

import os
import time
import traceback
from collections import Counter
from typing import Any

from ._checkpoint import Checkpoint, DeadLetterLog
from ._log import EventLog
from .errors import ConfigError, EventPipeError, NotAnEventLogError

__all__ = ["DeadLetterCounts", "DeadLettering", "DeadLetters", "count_entries"]

# A dead-letter entry quotes at most this much of the error and of its traceback (characters):
# the entry must fit the dead-letter log's max_event_bytes whatever the failure.
_QUOTE_CHARS = 4000
# The smallest max_event_bytes a dead-letter log may have: an entry naming the event by its
# offset alone (no copy of it, no error text) must still fit.
_MIN_DEAD_LETTER_BYTES = 1024


class DeadLetters:
    """The dead-letter log of consumer ``consumer`` of log ``consumed``, opened (or created)
    at once, so a bad one fails at construction and not at the first failing event.

    Raises ConfigError for a path that is not a log, the consumed log itself (it would feed
    itself), or a log whose max_event_bytes cannot hold an entry.
    """

    def __init__(self, where: str | os.PathLike[str], consumed: EventLog, consumer: str) -> None:
        path = os.path.abspath(os.fspath(where))
        same = ConfigError(
            f"dead_letter {path!r} is the consumed log: its entries would be consumed again",
            option="dead_letter")
        if os.path.realpath(path) == os.path.realpath(consumed.path):
            raise same
        try:
            log = EventLog(path)
        except NotAnEventLogError as exc:
            raise ConfigError(f"dead_letter {path!r} is not an eventpipe log: {exc.message}",
                              option="dead_letter") from None
        if log.log_id == consumed.log_id:
            log.close()
            raise same
        if log.config.max_event_bytes < _MIN_DEAD_LETTER_BYTES:
            log.close()
            raise ConfigError(
                f"dead_letter log {path!r} has max_event_bytes {log.config.max_event_bytes}; "
                f"a dead-letter entry needs at least {_MIN_DEAD_LETTER_BYTES}",
                option="dead_letter")
        self.log = log
        self._consumed = consumed
        self._consumer = consumer

    @property
    def head(self) -> int:
        return self.log.head

    @property
    def where(self) -> DeadLetterLog:
        """What a checkpoint records of this dead-letter log (see ``Checkpoint.dead_letter``)."""
        return DeadLetterLog(self.log.path, self.log.log_id)

    def holds(self, offset: int, start: int) -> bool:
        """Whether an entry of ours for ``offset`` lies at or after offset ``start``."""
        log_id, name = self._consumed.log_id, self._consumer
        for record in self.log.read(max(start, self.log.first_offset)):
            e = record.event
            if (isinstance(e, dict) and e.get("offset") == offset
                    and e.get("consumer") == name and e.get("log_id") == log_id):
                return True
        return False

    def append(self, offset: int, event: Any, exc: BaseException) -> None:
        self.log.append(self.entry(offset, event, exc))

    def entry(self, offset: int, event: Any, exc: BaseException) -> dict[str, Any]:
        """The entry for a failed event, made to fit the dead-letter log's max_event_bytes.

        Quoted text is cut to _QUOTE_CHARS; if the entry is still too large, the event itself
        is left out (``event_omitted``: re-read it at ``offset`` of ``log_id``), then the
        traceback, the error text and the log's path.
        """
        error = _clip(f"{type(exc).__name__}: {exc}")
        trace = "".join(traceback.format_exception(exc))
        if len(trace) > _QUOTE_CHARS:
            trace = "...(cut)\n" + trace[-_QUOTE_CHARS:]  # the innermost frames matter most
        entry: dict[str, Any] = {
            "consumer": self._consumer,
            "log": self._consumed.path,
            "log_id": self._consumed.log_id,
            "offset": offset,
            "event": event,
            "error": error,
            "traceback": trace,
            "at": time.time(),
        }
        limit = self.log.config.max_event_bytes
        for drop in ("event", "traceback", "error", "log"):
            try:
                if len(self.log.encode(entry)) <= limit:
                    break
            except EventPipeError:
                pass  # too large (or not encodable, which only the event can be): cut more
            if drop == "event":
                entry["event"] = None
                entry["event_omitted"] = "too large to quote; read it at this offset"
            elif drop == "log":
                del entry["log"]  # a very long path: log_id names the log too
            else:
                entry[drop] = entry[drop][:200] + "...(cut)"
        return entry

    def close(self) -> None:
        self.log.close()


class DeadLettering:
    """A consumer's exactly-once appends to its dead-letter log, through its checkpoints.

    The consumer sets the three attributes (:attr:`_dead_letters`: None without a dead-letter
    log; :attr:`_pending_dead_letter`: the (offset, dead-letter head) of a checkpoint written
    just before an append; :attr:`_scan_all_dead_letters`: look through the whole dead-letter
    log, with no mark to start from) and gives :meth:`_save`.
    """

    _dead_letters: DeadLetters | None
    _pending_dead_letter: tuple[int, int] | None
    _scan_all_dead_letters: bool

    def _save(self, dead_letter_from: int | None = None) -> None:
        """Checkpoint the state and position, marked with ``dead_letter_from`` (a head of the
        dead-letter log) when an append follows."""
        raise NotImplementedError

    def _dead_letter(self, offset: int, event: Any, exc: BaseException) -> None:
        """Append the failed event to the dead-letter log, exactly once.

        First a checkpoint of the state before the event, marked with the dead-letter log's
        head: a run killed after the append then finds its entry by reading from there (and
        passes over the event), however many entries others appended meanwhile.
        """
        dead = self._dead_letters
        assert dead is not None
        if self._dead_lettered(offset):
            return
        self._save(dead_letter_from=dead.head)
        dead.append(offset, event, exc)

    def _dead_lettered(self, offset: int) -> bool:
        """Whether the dead-letter log already holds our entry for ``offset``."""
        dead = self._dead_letters
        pending = self._pending_dead_letter
        if dead is None:
            return False
        if pending is not None and pending[0] == offset:
            return dead.holds(offset, pending[1])
        if self._scan_all_dead_letters:
            return dead.holds(offset, 0)
        return False  # no mark: no append can have happened since the last checkpoint


def _clip(text: str) -> str:
    return text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS] + "...(cut)"


def count_entries(where: DeadLetterLog) -> Counter[tuple[str, str]] | None:
    """The entries of the dead-letter log ``where`` still stored, counted by (consumed log's
    id, consumer name): one read serves every consumer sharing the log.

    Reads the whole dead-letter log: the cost grows with it (entries, their quoted events and
    tracebacks), not with the consumed logs. Entries retention removed from it are not
    counted. None when it cannot be told: nothing at the path, another log there now (its log
    id differs), or a read that fails (unreadable, damaged, or cut by retention meanwhile).
    Opens the log read-only: no file in it is created or written.
    """
    counts: Counter[tuple[str, str]] = Counter()
    try:
        with EventLog(where.path, create=False) as log:
            if log.log_id != where.log_id:
                return None
            for record in log.read(log.first_offset):
                e = record.event
                if isinstance(e, dict):
                    log_id, name = e.get("log_id"), e.get("consumer")
                    if isinstance(log_id, str) and isinstance(name, str):
                        counts[log_id, name] += 1
    except (EventPipeError, OSError):
        return None
    return counts


class DeadLetterCounts:
    """Each consumer's entries in its dead-letter log, for one report: every dead-letter log
    is read once, however many consumers share it (see :func:`count_entries` for the cost)."""

    def __init__(self) -> None:
        self._read: dict[DeadLetterLog, Counter[tuple[str, str]] | None] = {}

    def fields(self, checkpoint: Checkpoint | None) -> dict[str, Any]:
        """``dead_letter_log`` (its path) and ``dead_letters`` (the consumer's entries there)
        for a consumer's report; each None when not known: no checkpoint, no dead-letter log
        named in it (none configured, or a checkpoint written before eventpipe recorded it),
        or a dead-letter log that cannot be read."""
        where = checkpoint.dead_letter if checkpoint is not None else None
        if checkpoint is None or where is None:
            return {"dead_letter_log": None, "dead_letters": None}
        if where not in self._read:
            self._read[where] = count_entries(where)
        counts = self._read[where]
        return {"dead_letter_log": where.path,
                "dead_letters": None if counts is None
                else counts[checkpoint.log_id, checkpoint.name]}
