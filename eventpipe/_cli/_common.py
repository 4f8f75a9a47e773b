"""What every command shares: exit codes, messages on stderr, stdout and JSON, progress lines."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, BinaryIO, TextIO

import orjson

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_TERMINATED = 143


def err(msg: str) -> None:
    """``msg`` on stderr, prefixed ``eventpipe:``."""
    print(f"eventpipe: {msg}", file=sys.stderr)


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


def progress_printer(stream: TextIO) -> Callable[[int, int], None]:
    """A "done/total segments" line, redrawn at most five times a second and at the end."""
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.2 or done == total:
            last[0] = now
            end = "\n" if done == total else ""
            print(f"\r  {done}/{total} segments", end=end, file=stream, flush=True)

    return show
