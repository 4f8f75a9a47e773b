"""Dead letters: where a consumer puts the events its handler failed on, each exactly once.

The dead-letter log is an ordinary eventpipe log, shared by any number of consumers. An entry
names the consumer, the consumed log (path and log id) and the event's offset, and quotes the
event and the error; it always fits the dead-letter log's ``max_event_bytes``. Exactly-once is
the consumer's part (a marked checkpoint before each append, see ``Consumer._dead_letter``);
this module finds an entry from a given head, and builds and appends entries.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

from ._log import EventLog
from .errors import ConfigError, EventPipeError, NotAnEventLogError

__all__ = ["DeadLetters"]

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


def _clip(text: str) -> str:
    return text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS] + "...(cut)"
