"""The commands that move events: ``append`` JSON lines from stdin, ``read`` them to stdout."""

from __future__ import annotations

import argparse
import collections
import json
import select
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, BinaryIO

import orjson

from ..errors import ConfigError, CorruptLogError
from ._common import EXIT_FAILED, EXIT_OK, EXIT_TERMINATED, counter, err, stdout, write_json

if TYPE_CHECKING:
    from .._log import EventLog

_APPEND_BATCH = 1000


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``append`` and ``read``."""
    p = sub.add_parser("append", help="append JSON lines from stdin; prints their offsets")
    p.add_argument("path")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip lines that are not JSON (reported on stderr) instead of stopping")
    p.add_argument("--json", action="store_true", help="print one summary object instead")
    p.set_defaults(func=cmd_append)

    p = sub.add_parser("read", help="print events as JSON lines")
    p.add_argument("path")
    p.add_argument("--from", dest="from_", type=int, default=None,
                   help="first offset (negative: that many before the head; default: the "
                        "first stored event)")
    p.add_argument("--to", type=int, default=None, help="stop before this offset")
    p.add_argument("--since", metavar="TIME",
                   help="first event appended at or after TIME: ISO 8601 (2026-12-01T10:00, "
                        "local time without a zone), -15m / -2h / -1d ago, @EPOCH, now")
    p.add_argument("--until", metavar="TIME",
                   help="stop before the first event appended at or after TIME")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument("--with-offsets", action="store_true",
                   help='print {"offset": N, "event": ...} objects')
    p.add_argument("--with-times", action="store_true",
                   help='print {"offset": N, "time": "2026-12-01T10:00:00.123456Z", "event": '
                        '...} objects (time null if unknown)')
    p.add_argument("--poll-interval", type=float, default=1.0)
    p.add_argument("--no-notifications", action="store_true",
                   help="poll only (network filesystems)")
    p.set_defaults(func=cmd_read)


# --------------------------------------------------------------------------------- append


def _has_huge_int(text: bytes) -> bool:
    """Whether JSON ``text`` holds an integer outside the signed/unsigned 64-bit range.

    Only called for lines whose re-encoding shows a float, so the slow parser rarely runs.
    """
    def check(literal: str) -> int:
        value = int(literal)
        if not -(2**63) <= value < 2**64:
            raise OverflowError(literal)
        return value

    try:
        json.loads(text, parse_int=check)
    except OverflowError:
        return True
    except ValueError:
        return False
    return False


class _Terminated(Exception):
    """SIGTERM arrived while append was waiting for input."""


def _input_lines(source: BinaryIO) -> Iterator[list[bytes]]:
    """Lines of ``source`` in the groups they arrive in (what one read returns).

    So that a slow stream (``journalctl -f | eventpipe append``) is committed as it comes,
    not once 1000 lines have gathered.
    """
    read1 = getattr(source, "read1", None)
    pending = b""
    while True:
        data = read1(1 << 16) if read1 is not None else source.readline()
        if not data:
            break
        lines = (pending + data).split(b"\n")
        pending = lines.pop()
        if lines:
            yield lines
    if pending:
        yield [pending]


def _check_line(text: bytes, limit: int) -> tuple[bytes | None, str | None]:
    """(compact encoding, None) for a good input line, or (None, what is wrong)."""
    try:
        # Re-encode: stored events are compact, one per line, whatever came in.
        encoded = orjson.dumps(orjson.loads(text))
    except orjson.JSONDecodeError as exc:
        # Not orjson's "line 1 column N": each input line is one document, and "line 1"
        # right after our own "line 7" would mislead.
        return None, f"not JSON ({exc.msg} at column {exc.colno})"
    except orjson.JSONEncodeError as exc:  # valid JSON orjson cannot write (depth)
        return None, f"cannot be stored ({exc})"
    if len(encoded) > limit:
        return None, f"event is {len(encoded)} bytes encoded, over max_event_bytes={limit}"
    if (b"e" in encoded or b"." in encoded) and _has_huge_int(text):
        # orjson reads integers beyond 64 bits as floats: storing that would silently
        # change the event, so refuse it as the Python API does.
        return None, "an integer does not fit in 64 bits"
    return encoded, None


class _Batches:
    """Checked JSON lines on their way to the log, committed a batch at a time."""

    def __init__(self, log: EventLog, out: BinaryIO, quiet: bool) -> None:
        self.log, self.out, self.quiet = log, out, quiet
        self.written = self.rejected = 0
        self.first_offset: int | None = None
        self.batch = bytearray()  # JSON lines: see BufferedWriter on why not a list
        self.batched = 0
        # Long input on a terminal: a running count on stderr (nothing when piped).
        self.show_progress = counter(sys.stderr, "events appended") \
            if sys.stderr.isatty() else None

    def add(self, encoded: bytes) -> None:
        self.batch += encoded
        self.batch += b"\n"
        self.batched += 1
        if self.batched >= _APPEND_BATCH:
            self.commit()

    def commit(self) -> None:
        if not self.batched:
            return
        # SIGTERM waits while a batch commits: all of it is stored, or none.
        masked = _block_sigterm()
        try:
            offsets = self.log.append_lines(bytes(self.batch), self.batched)
        finally:
            _unblock_sigterm(masked)
        self.batch.clear()
        self.batched = 0
        self.written += len(offsets)
        if self.first_offset is None:
            self.first_offset = offsets.start
        if not self.quiet:
            self.out.write(b"".join(b"%d\n" % o for o in offsets))
            self.out.flush()
        if self.show_progress is not None:
            self.show_progress(self.written)


def _feed(batches: _Batches, skip_bad: bool, limit: int) -> None:
    """Read stdin's lines into ``batches``, committing what each read brought; stops at the
    first bad line unless ``skip_bad``."""
    lineno = 0
    for lines in _input_lines(sys.stdin.buffer):
        for raw in lines:
            lineno += 1
            text = raw.strip()
            if not text:
                continue
            encoded, problem = _check_line(text, limit)
            if encoded is not None:
                batches.add(encoded)
                continue
            batches.rejected += 1
            err(f"line {lineno}: {problem}; nothing of it was written")
            if not skip_bad:
                batches.commit()
                err(f"stopped at line {lineno}: {batches.written} events written before it")
                return
        batches.commit()


def cmd_append(args: argparse.Namespace) -> int:
    from .._log import EventLog

    terminated = False
    with EventLog(args.path) as log:
        batches = _Batches(log, stdout(), args.json)
        restore = _raise_on_sigterm()
        try:
            _feed(batches, args.skip_bad, log.config.max_event_bytes)
        except _Terminated:
            terminated = True
            batches.commit()  # the complete lines read so far
        finally:
            restore()
    written, rejected = batches.written, batches.rejected
    if batches.show_progress is not None:
        print(f"\r  {written:,} events appended", file=sys.stderr)
    if args.json:
        write_json({"written": written, "first_offset": batches.first_offset,
                    "rejected": rejected})
    elif rejected and args.skip_bad:
        err(f"{written} events written, {rejected} lines rejected")
    if terminated:
        err(f"terminated: {written} events written")
        return EXIT_TERMINATED
    return EXIT_FAILED if rejected else EXIT_OK


def _raise_on_sigterm() -> Callable[[], None]:
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_term(signum: int, frame: object) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, on_term)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def _block_sigterm() -> bool:
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    return True


def _unblock_sigterm(masked: bool) -> None:
    if masked:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


# ----------------------------------------------------------------------------------- read


def _reader_gone(fd: int) -> bool:
    """True once the read end of our stdout pipe is closed (``... | head`` finished)."""
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR and POLLHUP are always reported
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


def _time_arg(flag: str, text: str | None) -> datetime | None:
    from .._timeindex import parse_time

    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}", option=flag.lstrip("-")) from None


def _start(args: argparse.Namespace, log: EventLog, since: datetime | None) -> int:
    """The first offset ``read`` prints: ``--from`` (negative: back from the head; default:
    the first stored event), moved up to ``--since``'s first event."""
    if args.from_ is None:
        start = log.first_offset  # "from the start" of a pruned log is its first event
    else:
        start = args.from_ if args.from_ >= 0 else max(log.first_offset, log.head + args.from_)
    return start if since is None else max(start, log.offset_at(since))


def cmd_read(args: argparse.Namespace) -> int:
    from .._log import EventLog

    since, until = _time_arg("--since", args.since), _time_arg("--until", args.until)
    if until is not None and args.follow:
        raise ConfigError("--until ends a read: it cannot be given with --follow",
                          option="until")
    out = stdout()
    with EventLog(args.path, create=False) as log:
        start = _start(args, log, since)
        if until is not None:
            end = log.offset_at(until)
            args.to = end if args.to is None else min(args.to, end)
            if args.to <= start:
                return EXIT_OK
        if args.follow:
            out_fd = sys.stdout.fileno()

            def reader_still_there() -> None:
                # A follower whose reader went away (``... | head``) ends at once, not at
                # its next write.
                if _reader_gone(out_fd):
                    raise BrokenPipeError

            chunks = log.follow(start, poll_interval=args.poll_interval,
                                notifications=not args.no_notifications).chunks(
                args.to, while_waiting=reader_still_there)
        else:
            chunks = log.chunks(start, args.to)
        source = ((c.segment_base, c.first_offset, c.lines) for c in chunks)
        for base, first, stored in source:
            bad = _first_invalid(stored)
            # Print every good event before a bad one, then fail: damaged bytes (say in the
            # active segment, which has no checksum yet) are never printed as an event.
            lines = stored if bad is None else stored[:bad]
            if lines:
                out.write(_framed(args, log, base, first, lines))
            if bad is not None:
                out.flush()
                raise CorruptLogError("stored event is not valid JSON", path=log.path,
                                      offset=first + bad)
            if args.follow:
                out.flush()
    out.flush()
    return EXIT_OK


def _framed(args: argparse.Namespace, log: EventLog, base: int, first: int,
            lines: list[bytes]) -> bytes:
    """Stored lines as ``read`` prints them: as they are, or framed with their offset (and
    time) at the byte level, with no decode and re-encode of stored events."""
    if args.with_times:
        times = log.time_index.times(base, first, len(lines))
        return b"".join(b'{"offset":%d,"time":%s,"event":%s}\n' % (first + i, _iso(t), line)
                        for i, (line, t) in enumerate(zip(lines, times, strict=True)))
    if args.with_offsets:
        return b"".join(b'{"offset":%d,"event":%s}\n' % (first + i, line)
                        for i, line in enumerate(lines))
    return b"\n".join(lines) + b"\n"


def _iso(time_ns: int | None) -> bytes:
    """A JSON string of the UTC time ``time_ns`` (to the microsecond), or null."""
    if time_ns is None:
        return b"null"
    when = datetime.fromtimestamp(time_ns // 10**9, tz=UTC)
    return b'"%s.%06dZ"' % (when.strftime("%Y-%m-%dT%H:%M:%S").encode(), time_ns // 1000 % 10**6)


def _first_invalid(lines: list[bytes]) -> int | None:
    """Index of the first line that is not JSON, None if all are (checked by C code)."""
    try:
        collections.deque(map(orjson.loads, lines), maxlen=0)
    except orjson.JSONDecodeError:
        for i, line in enumerate(lines):
            try:
                orjson.loads(line)
            except orjson.JSONDecodeError:
                return i
    return None
