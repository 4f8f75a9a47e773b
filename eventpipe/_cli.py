"""The ``eventpipe`` command line: JSON lines in and out, messages on stderr.

Exit codes: 0 success; 1 a check failed or some input was rejected (``verify``, ``append``);
2 bad usage or a bad option; 3 an eventpipe error (corrupt log, storage, busy consumer...);
130 interrupted by SIGINT; 143 ``append`` stopped by SIGTERM (after committing the complete
lines it had read).

Run by root on a log folder another user owns, every command but ``demo`` first becomes that
user (see :func:`eventpipe._ownership.drop_to_owner`) and says so on stderr.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import importlib.util
import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO, TextIO

import orjson

from . import __version__
from .errors import ConfigError, CorruptLogError, EventPipeError, OffsetOutOfRangeError

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_TERMINATED = 143
_APPEND_BATCH = 1000


def _err(msg: str) -> None:
    print(f"eventpipe: {msg}", file=sys.stderr)


def _stdout() -> BinaryIO:
    return sys.stdout.buffer


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
        return None, f"not JSON ({exc})"
    except orjson.JSONEncodeError as exc:  # valid JSON orjson cannot write (depth)
        return None, f"cannot be stored ({exc})"
    if len(encoded) > limit:
        return None, f"event is {len(encoded)} bytes encoded, over max_event_bytes={limit}"
    if (b"e" in encoded or b"." in encoded) and _has_huge_int(text):
        # orjson reads integers beyond 64 bits as floats: storing that would silently
        # change the event, so refuse it as the Python API does.
        return None, "an integer does not fit in 64 bits"
    return encoded, None


def cmd_append(args: argparse.Namespace) -> int:
    from ._log import EventLog

    out = _stdout()
    rejected = written = lineno = 0
    first_offset: int | None = None
    terminated = False
    batch = bytearray()  # JSON lines: see BufferedWriter on why not a list of orjson results
    batched = 0
    with EventLog(args.path) as log:

        def commit() -> None:
            nonlocal written, first_offset, batched
            if not batched:
                return
            # SIGTERM waits while a batch commits: all of it is stored, or none.
            masked = _block_sigterm()
            try:
                offsets = log._append_lines(bytes(batch), batched)
            finally:
                _unblock_sigterm(masked)
            batch.clear()
            batched = 0
            written += len(offsets)
            if first_offset is None:
                first_offset = offsets.start
            if not args.json:
                out.write(b"".join(b"%d\n" % o for o in offsets))
                out.flush()
            if show_progress is not None:
                show_progress(written)

        # Long input on a terminal: a running count on stderr (nothing when piped).
        show_progress = _counter(sys.stderr, "events appended") if sys.stderr.isatty() else None
        limit = log.config.max_event_bytes
        restore = _raise_on_sigterm()
        try:
            stopped = False
            for lines in _input_lines(sys.stdin.buffer):
                for raw in lines:
                    lineno += 1
                    text = raw.strip()
                    if not text:
                        continue
                    encoded, problem = _check_line(text, limit)
                    if encoded is not None:
                        batch += encoded
                        batch += b"\n"
                        batched += 1
                        if batched >= _APPEND_BATCH:
                            commit()
                        continue
                    rejected += 1
                    _err(f"line {lineno}: {problem}; nothing of it was written")
                    if not args.skip_bad:
                        commit()
                        _err(f"stopped at line {lineno}: {written} events written before it")
                        stopped = True
                        break
                if stopped:
                    break
                commit()
        except _Terminated:
            terminated = True
            commit()  # the complete lines read so far
        finally:
            restore()
    if show_progress is not None:
        print(f"\r  {written:,} events appended", file=sys.stderr)
    if args.json:
        doc = {"written": written, "first_offset": first_offset, "rejected": rejected}
        out.write(orjson.dumps(doc) + b"\n")
    elif rejected and args.skip_bad:
        _err(f"{written} events written, {rejected} lines rejected")
    if terminated:
        _err(f"terminated: {written} events written")
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


def _raw_follow(log: Any, start: int, stop: int | None, poll: float,
                notifications: bool) -> Iterator[tuple[int, list[bytes]]]:
    """(first offset, lines) from ``start``, waiting for more until ``stop`` (if any).

    While idle it also watches stdout, so that a follower whose reader went away ends at
    once instead of at its next write.
    """
    from ._changes import ChangeNotifier

    out_fd = sys.stdout.fileno()
    with ChangeNotifier(log.path, "head", notifications=notifications,
                        poll_interval=poll) as notifier:
        offset = start
        while stop is None or offset < stop:
            for chunk in log.chunks(offset, stop):
                yield chunk.first_offset, chunk.lines
                offset = chunk.first_offset + len(chunk.lines)
            if stop is not None and offset >= stop:
                return
            log.check_replaced()  # a replaced header would stall `read --follow` for good
            deadline = time.monotonic() + poll
            while not notifier.wait(min(0.2, max(0.0, deadline - time.monotonic()))):
                if _reader_gone(out_fd):
                    raise BrokenPipeError
                if time.monotonic() >= deadline:
                    break


def cmd_read(args: argparse.Namespace) -> int:
    from ._log import EventLog

    out = _stdout()
    with EventLog(args.path, create=False) as log:
        if args.from_ is None:
            start = log.first_offset  # "from the start" of a pruned log is its first event
        else:
            start = args.from_ if args.from_ >= 0 else max(log.first_offset, log.head + args.from_)
        if args.follow:
            source = _raw_follow(log, start, args.to, args.poll_interval, not args.no_notifications)
        else:
            source = ((c.first_offset, c.lines) for c in log.chunks(start, args.to))
        for first, stored in source:
            bad = _first_invalid(stored)
            # Print every good event before a bad one, then fail: damaged bytes (say in the
            # active segment, which has no checksum yet) are never printed as an event.
            lines = stored if bad is None else stored[:bad]
            if args.with_offsets:
                # Byte-level framing: no decode and re-encode of stored events.
                data = b"".join(b'{"offset":%d,"event":%s}\n' % (first + i, line)
                                for i, line in enumerate(lines))
            else:
                data = b"\n".join(lines) + b"\n"
            if lines:
                out.write(data)
            if bad is not None:
                out.flush()
                raise CorruptLogError("stored event is not valid JSON", path=log.path,
                                      offset=first + bad)
            if args.follow:
                out.flush()
    out.flush()
    return EXIT_OK


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


# -------------------------------------------------------------------------------- consume


def load_handler(spec: str) -> Callable[[Any, Any, int], Any]:
    """``module:function`` or ``path/to/file.py:function`` to a callable; ConfigError if not."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(f"handler {spec!r} must look like MODULE:FUNCTION", option="handler")
    try:
        if target.endswith(".py") or os.sep in target:
            name = "eventpipe_handler_" + os.path.basename(target).removesuffix(".py")
            module_spec = importlib.util.spec_from_file_location(name, target)
            if module_spec is None or module_spec.loader is None:
                raise ImportError(f"cannot load {target}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        func = getattr(module, attr)
    except Exception as exc:  # whatever importing the module raised (SyntaxError too)
        raise ConfigError(f"cannot load handler {spec!r}: {type(exc).__name__}: {exc}",
                          option="handler") from None
    if not callable(func):
        raise ConfigError(f"handler {spec!r} is not callable", option="handler")
    return func  # type: ignore[no-any-return]


def cmd_consume(args: argparse.Namespace) -> int:
    from ._consumer import Consumer

    handler = load_handler(args.handler)
    try:
        initial = orjson.loads(args.initial_state) if args.initial_state is not None else None
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"--initial-state is not JSON: {exc}", option="initial_state") from None
    options: dict[str, Any] = {}
    for key in ("checkpoint_every", "checkpoint_interval", "poll_interval", "on_error",
                "max_retries", "dead_letter", "checkpoint_dir"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    if args.standby:
        options["standby"] = True
    if args.no_notifications:
        options["notifications"] = False
    with Consumer(args.path, args.name, handler, initial, **options) as consumer:
        state = consumer.catch_up() if args.catch_up else consumer.run()
        if args.print_state:
            _stdout().write(orjson.dumps(state) + b"\n")
        _err(f"consumer {args.name}: stopped at offset {consumer.offset}")
    return EXIT_OK


# --------------------------------------------------------------------- status, verify, etc.


def cmd_status(args: argparse.Namespace) -> int:
    from ._status import format_status, log_status

    report = log_status(args.path)
    if args.json:
        _stdout().write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        sys.stdout.write(format_status(report))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from ._verify import verify_log

    progress = _progress_printer(sys.stderr) if sys.stderr.isatty() and not args.json else None
    problems, summary = verify_log(args.path, progress=progress)
    warnings = summary.pop("warnings", [])
    if args.json:
        doc = {"ok": not problems, "problems": [p._asdict() for p in problems],
               "warnings": [w._asdict() for w in warnings], **summary}
        _stdout().write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        for p in problems:
            where = f" offset {p.offset}" if p.offset is not None else ""
            print(f"{p.path}:{where} {p.problem}")
        for w in warnings:
            print(f"{w.path}: warning: {w.problem}")
        verdict = "ok" if not problems else f"{len(problems)} problem(s)"
        if warnings:
            verdict += f", {len(warnings)} warning(s)"
        _err(f"verified {summary['segments']} segments, {summary['events']} events, "
             f"{summary['checkpoints']} checkpoints: {verdict}")
    return EXIT_OK if not problems else EXIT_FAILED


def _counter(stream: TextIO, what: str) -> Callable[[int], None]:
    """A running "N <what>" line, redrawn at most five times a second."""
    last = [0.0]

    def show(done: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.2:
            last[0] = now
            print(f"\r  {done:,} {what}", end="", file=stream, flush=True)

    return show


def _progress_printer(stream: TextIO) -> Callable[[int, int], None]:
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.2 or done == total:
            last[0] = now
            end = "\n" if done == total else ""
            print(f"\r  {done}/{total} segments", end=end, file=stream, flush=True)

    return show


def cmd_prune(args: argparse.Namespace) -> int:
    from ._log import EventLog

    if args.max_age is None and args.max_bytes is None and args.before is None:
        raise ConfigError("prune needs --max-age, --max-bytes or --before", option="prune")
    with EventLog(args.path, create=False) as log:
        report = log.prune(max_age=args.max_age, max_bytes=args.max_bytes,
                           before=args.before, force=args.force, dry_run=args.dry_run)
    if args.json:
        _stdout().write(orjson.dumps(report._asdict()) + b"\n")
    else:
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {len(report.removed)} segments ({report.bytes_removed} bytes); "
              f"log now starts at offset {report.first_offset}")
        for note in report.held_back:
            _err(f"held back: {note}")
    return EXIT_OK


def cmd_consumers_forget(args: argparse.Namespace) -> int:
    from ._log import EventLog
    from ._registry import known_checkpoints, unregister_external
    from ._status import flock_holders

    with EventLog(args.path, create=False) as log:
        root = log.path
    wanted = os.path.abspath(args.checkpoint) if args.checkpoint is not None else None
    mine = [k for k in known_checkpoints(root) if k.external and k.name == args.name
            and k.checkpoint is not None and wanted in (None, k.checkpoint)]
    for k in mine:
        assert k.checkpoint is not None
        pids = flock_holders(os.path.join(os.path.dirname(k.checkpoint), f"{args.name}.lock"))
        if pids:
            _err(f"consumer {args.name!r} (checkpoint {k.checkpoint}) is running (pid "
                 f"{', '.join(map(str, pids))}): stop it first; nothing was forgotten")
            return EXIT_FAILED
    removed = unregister_external(root, args.name, args.checkpoint)
    if not removed:
        inside = os.path.join(root, "consumers", f"{args.name}.json")
        if os.path.exists(inside):
            _err(f"consumer {args.name!r} checkpoints inside the log ({inside}), it is not "
                 "registered: remove that checkpoint to forget it")
        else:
            _err(f"no registration of consumer {args.name!r}"
                 + (f" with checkpoint {wanted}" if wanted else ""))
        return EXIT_FAILED
    for path in removed:
        print(f"forgot {args.name}: removed {path}")
    return EXIT_OK


def cmd_compress(args: argparse.Namespace) -> int:
    from ._log import EventLog

    with EventLog(args.path, create=False) as log:
        done = log.compress()
    print(f"compressed {done} segments")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    result = run_demo(args.dir, seconds=args.seconds, writers=args.writers, rate=args.rate)
    return EXIT_OK if result.ok else EXIT_FAILED


# ---------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    # Long but flat: one block of argparse declarations per command, read top to bottom.
    parser = argparse.ArgumentParser(
        prog="eventpipe",
        description="Durable multi-process event logs and consumers in a directory.",
        epilog="Exit codes: 0 ok, 1 check failed or input rejected, 2 usage, 3 eventpipe "
               "error, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"eventpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument("--with-offsets", action="store_true",
                   help='print {"offset": N, "event": ...} objects')
    p.add_argument("--poll-interval", type=float, default=1.0)
    p.add_argument("--no-notifications", action="store_true",
                   help="poll only (network filesystems)")
    p.set_defaults(func=cmd_read)

    env = os.environ
    p = sub.add_parser(
        "consume", help="run a consumer (what the systemd unit starts)",
        description="Run a consumer until SIGTERM/SIGINT. PATH, --handler and "
                    "--initial-state default to $EVENTPIPE_LOG_PATH, $EVENTPIPE_HANDLER and "
                    "$EVENTPIPE_INITIAL_STATE, --name to $EVENTPIPE_CONSUMER_NAME (as set by a "
                    "systemd EnvironmentFile); other "
                    "options also read EVENTPIPE_<OPTION> variables.")
    p.add_argument("path", nargs="?" if env.get("EVENTPIPE_LOG_PATH") else None,
                   default=env.get("EVENTPIPE_LOG_PATH"))
    p.add_argument("--name", required="EVENTPIPE_CONSUMER_NAME" not in env,
                   default=env.get("EVENTPIPE_CONSUMER_NAME"),
                   help="the consumer name (processes sharing it take turns: see --standby)")
    p.add_argument("--handler", required="EVENTPIPE_HANDLER" not in env,
                   default=env.get("EVENTPIPE_HANDLER"),
                   help="MODULE:FUNCTION or FILE.py:FUNCTION")
    p.add_argument("--initial-state", default=env.get("EVENTPIPE_INITIAL_STATE"),
                   help="JSON for the state before the first event")
    p.add_argument("--standby", action="store_true",
                   help="wait for the name if another process holds it")
    p.add_argument("--catch-up", action="store_true",
                   help="stop once caught up instead of following")
    p.add_argument("--print-state", action="store_true", help="print the final state as JSON")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--checkpoint-interval", type=float)
    p.add_argument("--poll-interval", type=float)
    p.add_argument("--no-notifications", action="store_true")
    p.add_argument("--on-error", choices=("stop", "retry", "dead_letter"))
    p.add_argument("--max-retries", type=int)
    p.add_argument("--dead-letter", help="log path for events the handler fails on")
    p.add_argument("--checkpoint-dir")
    p.set_defaults(func=cmd_consume)

    p = sub.add_parser("status", help="head, segments, consumers and writers")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "verify", help="check every segment and checkpoint, and the log's layout",
        description="Check every segment and checkpoint, and what lies in the log folder: "
                    "symbolic links, files hard-linked elsewhere, FIFOs and devices, entries "
                    "of other owners, world-writable files or folders, setuid files (problems, "
                    "exit 1) and permissions beyond the log's file_mode (warnings; set "
                    "EVENTPIPE_FILE_MODE to the log's mode).")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("prune", help="remove old sealed segments (retention)")
    p.add_argument("path")
    p.add_argument("--max-age", type=float, help="seconds: remove segments sealed longer ago")
    p.add_argument("--max-bytes", type=int, help="keep at most this many bytes of segments")
    p.add_argument("--before", type=int, help="remove segments wholly before this offset")
    p.add_argument("--force", action="store_true",
                   help="also remove what known consumers have not processed yet")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("consumers", help="manage the consumers a log knows of")
    consumers = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = consumers.add_parser(
        "forget", help="remove an external consumer's registration (retention stops waiting)",
        description="Remove the registration of a consumer whose checkpoint lives outside the "
                    "log (checkpoint_dir), so retention no longer keeps events for it. The "
                    "checkpoint itself is left alone. Refused while the consumer runs. Exit "
                    "1 when there is no such registration.")
    p.add_argument("path")
    p.add_argument("name")
    p.add_argument("--checkpoint", help="only the registration of this checkpoint file")
    p.set_defaults(func=cmd_consumers_forget)

    p = sub.add_parser("compress", help="gzip every sealed segment now")
    p.add_argument("path")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("demo", help="run a writer/consumer pipeline demo and check it")
    p.add_argument("--dir", help="directory to use (default: a new temporary one)")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--writers", type=int, default=3)
    p.add_argument("--rate", type=float, default=20000.0, help="events/s, all writers")
    p.set_defaults(func=cmd_demo)
    return parser


def _as_owner(args: argparse.Namespace) -> None:
    """Root on a log folder another user owns: become that user before touching the log."""
    path = getattr(args, "path", None)
    if path is None or os.geteuid() != 0:
        return
    from ._ownership import drop_to_owner

    _preload()
    note = drop_to_owner(path)
    if note is not None:
        _err(note)


def _preload() -> None:
    """Import, while still root, what the commands import later.

    After dropping to a log's owner, modules under a folder only root may read (a Python
    installed in /root, pyenv's default as root) can no longer be imported: a command would
    fail half-way. The handler of ``consume`` is loaded after the drop, as the owner.
    """
    from . import _changes, _consumer, _log, _registry, _status, _verify  # noqa: F401

    # notify imports this lazily; off Linux it is missing and notify uses watchdog's Observer.
    with contextlib.suppress(ImportError):
        from watchdog.observers import inotify_c  # noqa: F401


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (see the module docstring).

    Run as root on a log another user owns, it makes the whole process that user for good:
    call it in a process of its own (as the ``eventpipe`` command does).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _as_owner(args)
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`eventpipe read ... | head`): not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except OffsetOutOfRangeError as exc:
        _err(str(exc))
        return EXIT_ERROR
    except EventPipeError as exc:
        _err(f"{type(exc).__name__}: {exc}")
        return EXIT_ERROR
