"""eventpipe: durable multi-process event pipelines on one Linux host, with no broker.

Writers in any number of processes append JSON events to a segmented log in a directory;
readers and consumers in other processes follow it, each from its own position.
"""

from .buffered import BufferedWriter
from .checkpoint import Checkpoint
from .config import LogConfig
from .consumer import Consumer
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
from .follow import Follower
from .log import EventLog
from .record import Record
from .retention import PruneReport

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
    "PruneReport",
    "Record",
    "StateNotStorableError",
    "StorageError",
    "StoragePermissionError",
    "UnsafePathError",
    "UnserializableEventError",
    "UnsupportedFormatError",
    "__version__",
]
