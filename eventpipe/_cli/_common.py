"""What every command shares: exit codes, messages and log lines on stderr, stdout and JSON,
progress lines."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TextIO

import orjson

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_TERMINATED = 143

# syslog priorities, as journald reads them from a "<N>" line prefix (SyslogLevelPrefix=).
PRIORITY_ERR, PRIORITY_WARNING, PRIORITY_INFO = 3, 4, 6


def to_journal() -> bool:
    """Whether stderr is the journal's stream (systemd then sets JOURNAL_STREAM to its
    device:inode; a child whose stderr was redirected inherits the variable, so compare)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        dev, ino = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError, io.UnsupportedOperation):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def err(msg: str, *, priority: int = PRIORITY_INFO) -> None:
    """``msg`` on stderr, prefixed ``eventpipe:``; under systemd every line of it also carries
    its syslog ``priority`` as ``<N>``, so ``journalctl -p warning`` selects by it."""
    first, *rest = msg.split("\n")
    lines = [f"eventpipe: {first}", *rest]
    if to_journal():
        lines = [f"<{priority}>{line}" for line in lines]
    print("\n".join(lines), file=sys.stderr, flush=True)


def _priority(levelno: int) -> int:
    if levelno >= logging.ERROR:
        return PRIORITY_ERR
    return PRIORITY_WARNING if levelno >= logging.WARNING else PRIORITY_INFO


class _StderrHandler(logging.Handler):
    """Log records as :func:`err` lines: ``eventpipe: warning: ...`` (the level word left out
    for INFO), a traceback's lines after it, each with its priority under systemd. The stream
    is looked up at each record: sys.stderr may be replaced meanwhile (tests)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record).removeprefix("eventpipe: ")  # some messages carry it
            if record.levelno >= logging.WARNING:
                text = f"{record.levelname.lower()}: {text}"
            err(text, priority=_priority(record.levelno))
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def logging_to_stderr(level: int = logging.INFO) -> Iterator[None]:
    """While in the block, the ``eventpipe`` loggers' records of ``level`` and above go to
    stderr (the library configures no handler of its own: the command line does)."""
    logger = logging.getLogger("eventpipe")
    handler = _StderrHandler(level)
    previous = logger.level
    logger.addHandler(handler)
    if previous == logging.NOTSET or previous > level:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def stdout() -> BinaryIO:
    """The binary stdout that events and JSON documents are written to."""
    return sys.stdout.buffer


def write_json(doc: Any, *, indent: bool = False) -> None:
    """``doc`` as JSON and a newline on stdout: one line, or indented for the reports."""
    stdout().write(orjson.dumps(doc, option=orjson.OPT_INDENT_2 if indent else None) + b"\n")


def counter(stream: TextIO, what: str) -> Callable[[int], None]:
    """A running "N <what>" line, redrawn at most five times a second."""
    last = [0.0]

    def show(done: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.2:
            last[0] = now
            print(f"\r  {done:,} {what}", end="", file=stream, flush=True)

    return show


def progress_printer(stream: TextIO, unit: str = "segments", *,
                     end_line: bool = True) -> Callable[[int, int], None]:
    """The one progress line of long commands on a terminal (verify, compress, prune, consume
    --catch-up): "done/total <unit>, the rate, the time left at that rate", redrawn at most
    five times a second and when ``done`` reaches ``total`` (then ended with a newline unless
    ``end_line`` is False: a caller whose total moves ends the line itself). The rate counts
    from the first call, so a caller starting part-way (a consumer's checkpoint) is measured
    from there."""
    first: list[tuple[int, float]] = []
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if not first:
            first.append((done, now))
        finished = done >= total
        if now - last[0] < 0.2 and not finished:
            return
        last[0] = now
        text = f"\r  {done:,}/{total:,} {unit}"
        elapsed = now - first[0][1]
        rate = (done - first[0][0]) / elapsed if elapsed > 0 else 0.0
        if rate > 0:
            text += f", {rate:,.0f}/s" if rate >= 10 else f", {rate:.1f}/s"
            if not finished:
                text += f", {_duration((total - done) / rate)} left"
        end = "\n" if finished and end_line else ""
        print(text + "   ", end=end, file=stream, flush=True)

    return show


def _duration(seconds: float) -> str:
    """``seconds`` for a person: "42 s", "3 min 05 s", "2 h 07 min"."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
