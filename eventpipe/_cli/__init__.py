"""The ``eventpipe`` command line: the parser, the drop to a log's owner, errors to exit codes.

JSON lines in and out, messages on stderr. Each command group lives in a module of its own,
which declares its subcommands in ``add_commands``: ``_events`` (append, read), ``_consume``
(consume), ``_admin`` (status, verify, prune, compress), ``_consumers`` (consumers, consumer
show|reset|delete|forget), ``_demo`` (demo), ``_nats`` (bridge, to NATS JetStream),
``_stream`` (consume-stream, mirror: reading a stream on any host); ``_common`` holds what
they share.

Exit codes: 0 success; 1 a check failed or some input was rejected (``verify``, ``append``);
2 bad usage or a bad option; 3 an eventpipe error (no log at PATH, corrupt log, storage, busy
consumer...); 130 interrupted by SIGINT (``consume`` too, after its final checkpoint); 143
``append`` stopped by SIGTERM (after committing the complete lines it had read). ``consume``
stopped by SIGTERM exits 0: that is how a service is stopped.

The ``eventpipe`` loggers go to stderr at INFO and above, each line under systemd with its
syslog priority (see :func:`._common.err`). A handler's failure prints its traceback.

Run by root on a log folder another user owns, every command but ``demo`` first becomes that
user (see :func:`eventpipe._ownership.drop_to_owner`) and says so on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
import traceback
from collections.abc import Sequence

from .. import __version__
from .._layout import HEAD_FILE, META_FILE, SEGMENTS_DIR
from ..errors import (
    ConfigError,
    EventPipeError,
    HandlerError,
    NotAnEventLogError,
    OffsetOutOfRangeError,
)
from . import _admin, _consume, _consumers, _demo, _doctor, _events, _nats, _stream
from ._common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PRIORITY_ERR,
    err,
    logging_to_stderr,
)

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``eventpipe`` parser; each parsed command's ``func`` runs it."""
    parser = argparse.ArgumentParser(
        prog="eventpipe",
        description="Durable multi-process event logs and consumers in a directory.",
        epilog="Exit codes: 0 ok, 1 check failed or input rejected, 2 usage, 3 eventpipe "
               "error, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"eventpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # the order `eventpipe --help` lists
    for group in (_events, _consume, _admin, _consumers, _doctor, _demo, _nats, _stream):
        group.add_commands(sub)
    return parser


def _as_owner(args: argparse.Namespace) -> None:
    """Root on a log folder another user owns: become that user before touching the log."""
    path = getattr(args, "path", None)
    if path is None or os.geteuid() != 0:
        return
    from .._ownership import drop_to_owner

    _preload()
    note = drop_to_owner(path)
    if note is not None:
        err(note)


def _preload() -> None:
    """Import, while still root, what the commands import later.

    After dropping to a log's owner, modules under a folder only root may read (a Python
    installed in /root, pyenv's default as root) can no longer be imported: a command would
    fail half-way. The handler of ``consume`` is loaded after the drop, as the owner.
    """
    from .. import _changes, _consumer, _log, _registry, _status, _verify  # noqa: F401

    # notify imports this lazily; off Linux it is missing and notify uses watchdog's Observer.
    with contextlib.suppress(ImportError):
        from watchdog.observers import inotify_c  # noqa: F401


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (see the module docstring).

    Run as root on a log another user owns, it makes the whole process that user for good:
    call it in a process of its own (as the ``eventpipe`` command does).
    """
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(_consumers.legacy_alias(list(argv)))
    with logging_to_stderr():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        _as_owner(args)
        _require_log(args)
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
    except EventPipeError as exc:
        err(_describe(exc), priority=PRIORITY_ERR)
        if isinstance(exc, HandlerError) or (isinstance(exc, ConfigError)
                                             and exc.option == "handler"):
            _cause_traceback(exc)  # the handler's failure, or its module's import: where
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_ERROR


def _describe(exc: EventPipeError) -> str:
    """An error as the command line says it: what a user of the command can act on."""
    if isinstance(exc, ConfigError):
        # On the command line, every option passed as a keyword argument came from the flag
        # of the same name.
        text = str(exc)
        if exc.option is not None:
            flag = "--" + exc.option.replace("_", "-")
            text = text.replace(f"option {exc.option!r} (keyword argument)", flag)
        return text
    if isinstance(exc, OffsetOutOfRangeError):
        return str(exc)
    if isinstance(exc, NotAnEventLogError) and exc.message.startswith("no eventpipe log here"):
        return f"no eventpipe log at {exc.path}"  # what opening a log with create=False says
    return f"{type(exc).__name__}: {exc}"


# Commands that look at a log's files without opening it as a log (verify reads a damaged one
# file by file): a PATH that holds nothing of a log is refused here, as opening it refuses it
# for the others.
_INSPECTS_FILES = frozenset({"verify"})
_LOG_ENTRIES = (META_FILE, HEAD_FILE, SEGMENTS_DIR)


def _require_log(args: argparse.Namespace) -> None:
    """NotAnEventLogError (exit 3) for ``verify`` on a PATH that is missing or holds none of
    a log's entries; a folder that holds some is verify's to judge (exit 1 if damaged)."""
    if args.command not in _INSPECTS_FILES:
        return
    path = os.fspath(args.path)
    try:
        names = set(os.listdir(path))
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            return  # permission and the like: the command says what it could not read
        names = set()
    if not names.intersection(_LOG_ENTRIES):
        raise NotAnEventLogError("no eventpipe log here", path=path)


def _cause_traceback(exc: BaseException) -> None:
    """The traceback of what caused ``exc`` (a handler's own exception), on stderr: the file
    and line where it failed, for the terminal and the journal."""
    cause = exc.__cause__
    if cause is not None:
        err("".join(traceback.format_exception(cause)).rstrip("\n"), priority=PRIORITY_ERR)
