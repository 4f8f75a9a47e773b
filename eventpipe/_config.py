"""Options: built-in defaults < ``EVENTPIPE_*`` environment variables < keyword arguments.

One table per configurable object: :data:`LOG_OPTIONS` for :class:`~eventpipe.EventLog`,
:data:`CONSUMER_OPTIONS` for :class:`~eventpipe.Consumer`. Each
option has a parser for its environment-variable text and a check for its value, so a bad value
fails with a :class:`~eventpipe.errors.ConfigError` naming the option and where it came from,
before anything on disk is touched.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from ._timeindex import TIME_FORMS, parse_time
from .errors import ConfigError

__all__ = ["CONSUMER_OPTIONS", "ENV_PREFIX", "LOG_OPTIONS", "LogConfig", "Option", "resolve"]

ENV_PREFIX = "EVENTPIPE_"

SyncPolicy = Literal["none", "interval", "always"]


@dataclass(frozen=True)
class Option:
    """One option: its default, how to parse it from text, and how to check a value."""

    name: str
    default: Any
    parse: Callable[[str], Any]
    check: Callable[[Any], str | None]  # returns a complaint, or None when the value is fine
    doc: str

    @property
    def env_name(self) -> str:
        return ENV_PREFIX + self.name.upper()


def _parse_int(text: str) -> int:
    return int(text.replace("_", ""), 0)


def _parse_optional_int(text: str) -> int | None:
    return None if text.strip().lower() in ("", "none", "0") else _parse_int(text)


def _parse_optional_float(text: str) -> float | None:
    return None if text.strip().lower() in ("", "none") else float(text)


def _parse_optional_str(text: str) -> str | None:
    return None if text.strip().lower() in ("", "none", "off", "false") else text.strip()


def _parse_mode(text: str) -> int:
    # Modes are written in octal by habit ("664", "0o664", "0664"); never read them as decimal.
    t = text.strip().lower().removeprefix("0o")
    return int(t, 8)


def _int_at_least(low: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be an integer, got {type(value).__name__}"
        return None if value >= low else f"must be >= {low}, got {value}"

    return check


def _int_between(low: int, high: int) -> Callable[[Any], str | None]:
    at_least = _int_at_least(low)

    def check(value: Any) -> str | None:
        complaint = at_least(value)
        if complaint is None and value > high:
            complaint = f"must be <= {high}, got {value}"
        return complaint

    return check


def _optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    return lambda value: None if value is None else check(value)


def _positive_number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number, got {type(value).__name__}"
    return None if 0 < value < math.inf else f"must be finite and > 0, got {value}"


def _seconds_up_to(high: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        complaint = _positive_number(value)
        if complaint is None and value > high:
            complaint = f"must be at most {high:g} seconds, got {value}"
        return complaint

    return check


def _one_of(*choices: Any) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {choices!r}, got {value!r}"

    return check


def _mode(value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return f"must be an integer file mode such as 0o664, got {type(value).__name__}"
    if not 0 <= value <= 0o777 or value & 384 != 384:
        return f"must be within 0o600..0o777 and owner-readable and -writable, got {oct(value)}"
    return None


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _is(kind: type | tuple[type, ...], what: str) -> Callable[[Any], str | None]:
    return lambda v: None if isinstance(v, kind) and not (
        isinstance(v, bool) and kind is not bool) else f"must be {what}, got {v!r}"


LOG_OPTIONS: tuple[Option, ...] = (
    Option("segment_max_bytes", 16 * 1024 * 1024, _parse_int, _int_at_least(64),
           "Roll to a new segment before one would grow past this many bytes."),
    Option("segment_max_events", None, _parse_optional_int, _optional(_int_at_least(1)),
           "Roll to a new segment after this many events (None: no limit)."),
    Option("compression", "gzip", _parse_optional_str, _one_of("gzip", None),
           'Compress sealed segments: "gzip" or None.'),
    Option("compression_level", 6, _parse_int, _int_between(1, 9),
           "gzip level 1 (fast) .. 9 (small)."),
    Option("sync", "interval", str.strip, _one_of("none", "interval", "always"),
           'Durability: "none", "interval" (fsync every sync_interval s) or "always".'),
    Option("sync_interval", 1.0, float, _positive_number,
           'Seconds between fsyncs under sync="interval" (the power-loss window).'),
    Option("max_event_bytes", 1024 * 1024, _parse_int, _int_at_least(2),
           "Largest encoded event accepted; larger ones raise EventTooLargeError."),
    # Events are often private: the owner and the log's group may read them, others nothing.
    Option("file_mode", 0o640, _parse_mode, _mode,
           "Mode of created files; folders get the same plus x where r (0o640 -> 0o750)."),
    Option("retention_max_age", None, _parse_optional_float, _optional(_positive_number),
           "Remove sealed segments whose last event is older than this many seconds (None: keep)."),
    Option("retention_max_bytes", None, _parse_optional_int, _optional(_int_at_least(1)),
           "Remove the oldest sealed segments beyond this total size (None: keep)."),
    Option("lock_timeout", None, _parse_optional_float, _optional(_positive_number),
           "Seconds to wait for the writer lock before LockTimeout (None: wait)."),
    Option("trust_owner", False, _parse_bool, _is(bool, "True or False"),
           "As root, use a log folder owned by another user (refused otherwise)."),
)


def _parse_start(text: str) -> str | int | datetime:
    t = text.strip().lower()
    if t in ("earliest", "latest"):
        return t
    try:
        return _parse_int(t)
    except ValueError:
        return parse_time(text)


def _start(value: Any) -> str | None:
    if isinstance(value, str) and value in ("earliest", "latest"):
        return None
    if isinstance(value, datetime) or _int_at_least(0)(value) is None:
        return None
    return (f"must be \"earliest\", \"latest\", an offset >= 0 or a time ({TIME_FORMS}), "
            f"got {value!r}")


def _optional_path(value: Any) -> str | None:
    ok = value is None or isinstance(value, str | os.PathLike)
    return None if ok else f"must be a path, got {value!r}"


CONSUMER_OPTIONS: tuple[Option, ...] = (
    Option("checkpoint_every", 100_000, int, _int_at_least(1),
           "Checkpoint after this many events (bounds what a restart replays)."),
    Option("checkpoint_interval", 1.0, float, _positive_number,
           "...or after this many seconds with progress, whichever comes first."),
    Option("poll_interval", 1.0, float, _positive_number,
           "Longest wait for new events without a notification (lost, or none on NFS)."),
    Option("notifications", True, _parse_bool, _is(bool, "True or False"),
           "Use filesystem notifications (False: poll only)."),
    Option("on_error", "stop", str.strip, _one_of("stop", "retry", "dead_letter"),
           "When the handler raises: stop, retry with backoff, or dead-letter and go on."),
    Option("max_retries", 3, int, _int_at_least(0),
           "Retries of a failing event under on_error='retry' (and before dead-lettering)."),
    Option("retry_backoff", 0.1, float, _seconds_up_to(3600),
           "First retry delay in seconds (at most 3600); doubles with each retry, up to 3600."),
    Option("dead_letter", None, _parse_optional_str, _optional_path,
           "Path of the log that receives events the handler failed on."),
    Option("checkpoint_dir", None, _parse_optional_str, _optional_path,
           "Folder of checkpoint files (default: <log>/consumers)."),
    Option("standby", False, _parse_bool, _is(bool, "True or False"),
           "If another process holds the name, wait and take over when it exits."),
    Option("start", "earliest", _parse_start, _start,
           "Where a consumer without a checkpoint begins: \"earliest\" (the first stored "
           "offset), \"latest\" (the head when it takes the name), an offset, or a time "
           "(a datetime; in text ISO 8601 or -15m): the first event appended at or after it."),
    Option("pass_time", False, _parse_bool, _is(bool, "True or False"),
           "Call the handler as handler(state, event, offset, time), time being the event's "
           "append time (ns since the epoch, UTC; None if unknown)."),
)


def resolve(
    options: tuple[Option, ...],
    kwargs: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Layer defaults, environment and keyword arguments; check every value.

    Raises ConfigError naming the option for an unknown keyword, unparsable environment text,
    or a value that fails its check.
    """
    env = os.environ if environ is None else environ
    known = {o.name: o for o in options}
    for name in kwargs:
        if name not in known:
            raise ConfigError(
                f"unknown option {name!r}; known options: {', '.join(sorted(known))}",
                option=name,
            )
    values: dict[str, Any] = {}
    for opt in options:
        source = "default"
        value = opt.default
        if opt.env_name in env and opt.name not in kwargs:
            source = f"environment variable {opt.env_name}={env[opt.env_name]!r}"
            try:
                value = opt.parse(env[opt.env_name])
            except ValueError as exc:
                raise ConfigError(
                    f"option {opt.name!r} from {source} cannot be parsed: {exc}", option=opt.name
                ) from None
        if opt.name in kwargs:
            source = "keyword argument"
            value = kwargs[opt.name]
        complaint = opt.check(value)
        if complaint is not None:
            raise ConfigError(f"option {opt.name!r} ({source}) {complaint}", option=opt.name)
        values[opt.name] = value
    return values


@dataclass(frozen=True)
class LogConfig:
    """The resolved options of one :class:`~eventpipe.EventLog` (see :data:`LOG_OPTIONS`)."""

    segment_max_bytes: int
    segment_max_events: int | None
    compression: str | None
    compression_level: int
    sync: SyncPolicy
    sync_interval: float
    max_event_bytes: int
    file_mode: int
    lock_timeout: float | None
    retention_max_age: float | None
    retention_max_bytes: int | None
    trust_owner: bool

    @classmethod
    def from_options(
        cls, kwargs: Mapping[str, Any], environ: Mapping[str, str] | None = None
    ) -> LogConfig:
        return cls(**resolve(LOG_OPTIONS, kwargs, environ))

    @property
    def dir_mode(self) -> int:
        """Folder mode: the file mode plus search (x) wherever it grants read (r)."""
        return self.file_mode | ((self.file_mode & 0o444) >> 2)
