"""eventpipe: durable multi-process event pipelines on one Linux host, with no broker.

Writers in any number of processes append JSON events to a segmented log in a directory;
readers and consumers in other processes follow it, each from its own position.
"""

from ._buffered import BufferedWriter
from ._checkpoint import Checkpoint
from ._config import LogConfig
from ._consumer import Consumer
from ._dbstate import DbConsumer, Position, PositionConflictError, SqliteStore, StateStore
from ._follow import Follower
from ._log import EventLog
from ._record import Record
from ._retention import PruneReport
from ._status import log_status
from ._verify import verify_log
from .errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConfigError,
    ConsumerBusyError,
    CorruptLogError,
    DurabilityError,
    EventPipeError,
    EventTooLargeError,
    HandlerError,
    LockTimeout,
    LogClosedError,
    LogReplacedError,
    NotAnEventLogError,
    OffsetOutOfRangeError,
    StateNotStorableError,
    StorageError,
    StoragePermissionError,
    UnsafePathError,
    UnserializableEventError,
    UnsupportedFormatError,
)

__version__ = "0.1.0"

__all__ = [
    "BufferedWriter",
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "ConfigError",
    "Consumer",
    "ConsumerBusyError",
    "CorruptLogError",
    "DbConsumer",
    "DurabilityError",
    "EventLog",
    "EventPipeError",
    "EventTooLargeError",
    "Follower",
    "HandlerError",
    "LockTimeout",
    "LogClosedError",
    "LogConfig",
    "LogReplacedError",
    "NotAnEventLogError",
    "OffsetOutOfRangeError",
    "Position",
    "PositionConflictError",
    "PruneReport",
    "Record",
    "SqliteStore",
    "StateNotStorableError",
    "StateStore",
    "StorageError",
    "StoragePermissionError",
    "UnsafePathError",
    "UnserializableEventError",
    "UnsupportedFormatError",
    "__version__",
    "log_status",
    "verify_log",
]
