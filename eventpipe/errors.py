"""Every error eventpipe raises on purpose.

Each class derives from :class:`EventPipeError` *and* from the stdlib type a caller would
naturally catch (``ValueError``, ``TypeError``, ``TimeoutError``, ``OSError`` ...), so both
``except EventPipeError`` and ``except ValueError`` work. Errors carry the ``path`` and
``offset`` involved where there is one, put both in the message, and pickle across processes
(multiprocessing workers re-raise them in the parent). The hierarchy::

    EventPipeError
    ├── ConfigError                    bad option, environment variable or initial state
    ├── UnserializableEventError       an event JSON cannot hold
    ├── EventTooLargeError             an event over max_event_bytes
    ├── NotAnEventLogError             a folder (or file) that is not a log
    ├── UnsupportedFormatError         a log written by a newer eventpipe
    ├── CorruptLogError                damage found in stored data, named with its offsets
    ├── LogReplacedError               the log folder or header was removed or replaced
    ├── OffsetOutOfRangeError          an offset not stored (before the first, past the head)
    ├── LockTimeout                    the writer lock not had within lock_timeout
    ├── LogClosedError                 use of a closed log or consumer
    ├── StorageError                   the OS refused a read or write (errno, path)
    │   ├── StoragePermissionError     ... for lack of permission
    │   │   └── UnsafePathError        ... or because eventpipe refuses to go there (a link)
    │   └── DurabilityError            committed, but not made durable (.committed)
    ├── CheckpointError                a checkpoint file that is not valid
    │   ├── StateNotStorableError      a consumer state JSON cannot hold unchanged
    │   └── CheckpointMismatchError    a checkpoint that does not belong to this log
    ├── ConsumerBusyError              another process holds the consumer name
    └── HandlerError                   a consumer's handler raised (.offset, .event)
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "ConfigError",
    "ConsumerBusyError",
    "CorruptLogError",
    "DurabilityError",
    "EventPipeError",
    "EventTooLargeError",
    "HandlerError",
    "LockTimeout",
    "LogClosedError",
    "LogReplacedError",
    "NotAnEventLogError",
    "OffsetOutOfRangeError",
    "StateNotStorableError",
    "StorageError",
    "StoragePermissionError",
    "UnsafePathError",
    "UnserializableEventError",
    "UnsupportedFormatError",
]


def _where(path: str | os.PathLike[str] | None, offset: int | None) -> str:
    parts = []
    if path is not None:
        parts.append(f"path={os.fspath(path)!s}")
    if offset is not None:
        parts.append(f"offset={offset}")
    return f" [{', '.join(parts)}]" if parts else ""


class EventPipeError(Exception):
    """Base class of every eventpipe error.

    ``path`` is the file or directory involved and ``offset`` the event offset (or, where the
    message says so, the byte position) involved; either may be ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        offset: int | None = None,
    ) -> None:
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        self.offset = offset
        super().__init__(message + _where(path, offset))

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as cls(*args); ours take keyword-only fields, so rebuild by hand.
        return (_rebuild, (type(self), self.message, self.__dict__.copy()))

    def __str__(self) -> str:
        return self.message + _where(self.path, self.offset)


def _rebuild(cls: type[EventPipeError], message: str, state: dict[str, Any]) -> EventPipeError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class ConfigError(EventPipeError, ValueError):
    """An option is unknown, has the wrong type, or is out of range (``option`` names it)."""

    def __init__(self, message: str, *, option: str | None = None) -> None:
        self.option = option
        super().__init__(message)


class UnserializableEventError(EventPipeError, TypeError):
    """An event could not be encoded as JSON; nothing was written.

    ``index`` is the position of the bad event in its batch (0 for a single append).
    """

    def __init__(self, message: str, *, index: int = 0, path: str | None = None) -> None:
        self.index = index
        super().__init__(message, path=path)


class EventTooLargeError(EventPipeError, ValueError):
    """An encoded event exceeds ``max_event_bytes``; nothing was written."""

    def __init__(self, message: str, *, index: int = 0, size: int = 0, path: str | None = None):
        self.index = index
        self.size = size
        super().__init__(message, path=path)


class NotAnEventLogError(EventPipeError, ValueError):
    """The directory is not empty and holds no eventpipe metadata; it was not touched."""


class UnsupportedFormatError(EventPipeError, ValueError):
    """The log was written by a newer eventpipe format version; it was not touched."""


class CorruptLogError(EventPipeError, ValueError):
    """Stored bytes fail a check (framing, JSON, gzip, header checksum, contiguity)."""


class LogReplacedError(EventPipeError, RuntimeError):
    """The log folder or its header was removed, or replaced by another log, while open."""


class OffsetOutOfRangeError(EventPipeError, IndexError):
    """The requested offset is not stored (beyond the head, or removed by retention)."""


class LockTimeout(EventPipeError, TimeoutError):
    """A lock could not be acquired within the configured timeout."""


class LogClosedError(EventPipeError, ValueError):
    """The log (or writer) was used after ``close()``."""


class StorageError(EventPipeError, OSError):
    """The operating system refused a read or write (disk full, file too large, I/O error).

    ``errno`` is the OS error number. When raised by an append, nothing of that append is
    visible and the log is exactly as before it, so the call can be retried.
    """

    def __init__(
        self,
        message: str,
        *,
        errno: int | None = None,
        path: str | os.PathLike[str] | None = None,
        offset: int | None = None,
    ) -> None:
        EventPipeError.__init__(self, message, path=path, offset=offset)
        self.errno = errno
        self.strerror = os.strerror(errno) if errno is not None else message
        self.filename = self.path

    def __reduce__(self) -> tuple[Any, ...]:
        # errno, strerror and filename live in OSError's C slots, not in __dict__.
        return (_rebuild_storage, (type(self), self.message, self.errno, self.path,
                                   self.offset, self.__dict__.copy()))

    @classmethod
    def from_os_error(
        cls, exc: OSError, what: str, *, path: str | os.PathLike[str] | None = None
    ) -> StorageError:
        """Wrap ``exc`` (raised while doing ``what``) in the matching typed error."""
        target = path if path is not None else exc.filename
        kind: type[StorageError] = cls
        if exc.errno in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
            kind = StoragePermissionError
        reason = exc.strerror or str(exc)
        return kind(f"{what}: {reason}", errno=exc.errno, path=target)


def _rebuild_storage(cls: type[StorageError], message: str, errno: int | None, path: str | None,
                     offset: int | None, state: dict[str, Any]) -> StorageError:
    err = cls(message, errno=errno, path=path, offset=offset)
    err.__dict__.update(state)
    return err


class StoragePermissionError(StorageError, PermissionError):
    """The process may not read or write the named path."""


class UnsafePathError(StoragePermissionError):
    """A link (symbolic, or a hard link where eventpipe writes) or another user's folder where
    eventpipe refuses to go: nothing was read or written through it. ``path`` names it."""


class DurabilityError(StorageError):
    """An append *was committed* (its events are visible at :attr:`committed`), but what had to
    follow the commit failed: the fsync that makes them durable, or releasing the writer lock.

    Do not retry those events: a retry would store them twice. Their durability is unknown (after
    a failed fsync the kernel may have dropped the dirty pages), so the log refuses further
    appends in this process (each raises this error again) until it is reopened. Under
    ``sync="interval"`` the background fsync raises it at the next append, flush or close;
    :attr:`committed` then covers this process's appends since its last good fsync.
    """

    def __init__(self, message: str, *, committed: range = range(0), errno: int | None = None,
                 path: str | os.PathLike[str] | None = None, offset: int | None = None) -> None:
        super().__init__(message, errno=errno, path=path,
                         offset=committed.start if offset is None and committed else offset)
        self.committed = committed


class CheckpointError(EventPipeError, ValueError):
    """A consumer checkpoint file is unreadable or invalid."""


class StateNotStorableError(CheckpointError, TypeError):
    """A consumer's state cannot be checkpointed unchanged as JSON; ``offset`` names the event
    whose handling made it so (when it could be found). Nothing was checkpointed."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not belong to this log (ahead of the head, or a different event)."""


class ConsumerBusyError(EventPipeError, BlockingIOError):
    """Another process holds the consumer name; ``holder`` describes it when known."""

    def __init__(self, message: str, *, holder: str | None = None, path: str | None = None):
        self.holder = holder
        super().__init__(message, path=path)


class HandlerError(EventPipeError, RuntimeError):
    """A consumer handler raised; ``event`` and ``offset`` identify what it was given.

    State and offset were checkpointed up to the event before ``offset``; the handler's own
    exception is the ``__cause__``.
    """

    def __init__(self, message: str, *, offset: int, event: Any, path: str | None = None):
        self.event = event
        super().__init__(message, path=path, offset=offset)
