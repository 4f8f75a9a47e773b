"""The ``eventpipe`` command line: the parser, the drop to a log's owner, errors to exit codes.

JSON lines in and out, messages on stderr. Each command group lives in a module of its own,
which declares its subcommands in ``add_commands``: ``_events`` (append, read), ``_consume``
(consume), ``_admin`` (status, verify, prune, consumers forget, compress), ``_demo`` (demo);
``_common`` holds what they share.

Exit codes: 0 success; 1 a check failed or some input was rejected (``verify``, ``append``);
2 bad usage or a bad option; 3 an eventpipe error (corrupt log, storage, busy consumer...);
130 interrupted by SIGINT; 143 ``append`` stopped by SIGTERM (after committing the complete
lines it had read).

Run by root on a log folder another user owns, every command but ``demo`` first becomes that
user (see :func:`eventpipe._ownership.drop_to_owner`) and says so on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import ConfigError, EventPipeError, OffsetOutOfRangeError
from . import _admin, _consume, _demo, _events
from ._common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, err

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
    for group in (_events, _consume, _admin, _demo):  # the order `eventpipe --help` lists
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
        err(str(exc))
        return EXIT_USAGE
    except OffsetOutOfRangeError as exc:
        err(str(exc))
        return EXIT_ERROR
    except EventPipeError as exc:
        err(f"{type(exc).__name__}: {exc}")
        return EXIT_ERROR
