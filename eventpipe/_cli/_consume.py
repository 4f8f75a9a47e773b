"""The ``consume`` command: load a handler and run a consumer (what the systemd unit starts)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import orjson

from ..errors import ConfigError
from ._common import EXIT_INTERRUPTED, EXIT_OK, err, progress_printer, write_json


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``consume``; its defaults come from the environment a systemd unit sets."""
    env = os.environ
    p = sub.add_parser(
        "consume", help="run a consumer (what the systemd unit starts)",
        description="Run a consumer until SIGTERM/SIGINT. PATH, --handler and "
                    "--initial-state default to $EVENTPIPE_LOG_PATH, $EVENTPIPE_HANDLER and "
                    "$EVENTPIPE_INITIAL_STATE, --name to $EVENTPIPE_CONSUMER_NAME (as set by a "
                    "systemd EnvironmentFile); other "
                    "options also read EVENTPIPE_<OPTION> variables. Exits 0 when stopped by "
                    "SIGTERM, 130 by SIGINT (both after a final checkpoint).")
    p.add_argument("path", nargs="?" if env.get("EVENTPIPE_LOG_PATH") else None,
                   default=env.get("EVENTPIPE_LOG_PATH"))
    add_consumer_arguments(p, "--name", "--handler", "--initial-state")
    p.add_argument("--create", action="store_true",
                   help="create the log if PATH holds none (otherwise a missing log is an "
                        "error: a mistyped path would consume an empty log forever)")
    add_consumer_arguments(p, "--standby")
    p.add_argument("--catch-up", action="store_true",
                   help="stop once caught up instead of following")
    add_consumer_arguments(p, "--print-state", "--checkpoint-every", "--checkpoint-interval")
    p.add_argument("--poll-interval", type=float)
    p.add_argument("--no-notifications", action="store_true")
    add_consumer_arguments(p, "--on-error", "--max-retries", "--dead-letter")
    p.add_argument("--checkpoint-dir")
    p.add_argument("--start", help='where a consumer without a checkpoint begins: "earliest" '
                                   '(default), "latest", an offset, or a time: the first '
                                   'event appended at or after it (ISO 8601, local time '
                                   'without a zone; --start=-15m ago; @EPOCH)')
    add_consumer_arguments(p, "--pass-time")
    db = p.add_mutually_exclusive_group()
    db.add_argument("--sqlite", metavar="DB", default=env.get("EVENTPIPE_SQLITE"),
                    help="keep the state in this SQLite database: the handler is called as "
                         "handler(conn, event, offset) and the position is committed in its "
                         "transaction (--checkpoint-every/--checkpoint-interval: events and "
                         "seconds per transaction)")
    db.add_argument("--postgres", metavar="DSN", default=env.get("EVENTPIPE_POSTGRES"),
                    help="the same in PostgreSQL (libpq connection text or URI; needs "
                         "eventpipe[postgres])")
    p.add_argument("--sqlite-synchronous", choices=("FULL", "NORMAL"), default="FULL",
                   help="SQLite's synchronous setting (NORMAL: faster, a power loss may undo "
                        "the last commits, rows and position together)")
    p.set_defaults(func=cmd_consume)


def add_consumer_arguments(p: argparse.ArgumentParser, *flags: str,
                           helps: dict[str, str] | None = None) -> None:
    """Declare on ``p`` the options of ``consume`` named by ``flags``, in that order, as
    ``consume`` declares them (``helps``: other help texts, by flag). Shared with the
    commands that run a consumer elsewhere (``consume-stream``)."""
    env = os.environ
    declared: dict[str, dict[str, Any]] = {
        "--name": {"required": "EVENTPIPE_CONSUMER_NAME" not in env,
                   "default": env.get("EVENTPIPE_CONSUMER_NAME"),
                   "help": "the consumer name (processes sharing it take turns: see "
                           "--standby)"},
        "--handler": {"required": "EVENTPIPE_HANDLER" not in env,
                      "default": env.get("EVENTPIPE_HANDLER"),
                      "help": "MODULE:FUNCTION (MODULE is looked for in the current folder "
                              "first, then on PYTHONPATH) or FILE.py:FUNCTION"},
        "--initial-state": {"default": env.get("EVENTPIPE_INITIAL_STATE"),
                            "help": "JSON for the state before the first event"},
        "--standby": {"action": "store_true",
                      "help": "wait for the name if another process holds it"},
        "--print-state": {"action": "store_true", "help": "print the final state as JSON"},
        "--checkpoint-every": {"type": int},
        "--checkpoint-interval": {"type": float},
        "--on-error": {"choices": ("stop", "retry", "dead_letter")},
        "--max-retries": {"type": int},
        "--retry-backoff": {"type": float},
        "--dead-letter": {"help": "log path for events the handler fails on"},
        "--pass-time": {"action": "store_true",
                        "help": "call the handler as handler(state, event, offset, time), time "
                                "in ns since the epoch (None if unknown)"},
    }
    for flag in flags:
        kwargs = declared[flag]
        if helps is not None and flag in helps:
            kwargs["help"] = helps[flag]
        p.add_argument(flag, **kwargs)


def consumer_options(args: argparse.Namespace, keys: tuple[str, ...]) -> dict[str, Any]:
    """The consumer options the command line gives: those of ``keys`` it sets, and
    ``standby`` and ``pass_time`` when asked for."""
    options: dict[str, Any] = {}
    for key in keys:
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    if args.standby:
        options["standby"] = True
    if args.pass_time:
        options["pass_time"] = True
    return options


def initial_state(args: argparse.Namespace) -> Any:
    """--initial-state, parsed (None when not given); ConfigError if it is not JSON."""
    try:
        return orjson.loads(args.initial_state) if args.initial_state is not None else None
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"--initial-state is not JSON: {exc.msg} at column {exc.colno}",
                          option="initial_state") from None


def stopped(args: argparse.Namespace, state: Any, offset: int | None,
            interrupted: bool) -> int:
    """A consumer's run is over: the state printed with --print-state, where it stopped
    said on stderr; the exit status (130 when SIGINT stopped it)."""
    if args.print_state:
        write_json(state)
    if interrupted:
        err(f"consumer {args.name}: interrupted (SIGINT), stopped at offset {offset}")
        return EXIT_INTERRUPTED
    err(f"consumer {args.name}: stopped at offset {offset}")
    return EXIT_OK


def load_handler(spec: str) -> Callable[[Any, Any, int], Any]:
    """``module:function`` or ``path/to/file.py:function`` to a callable; ConfigError if not.

    A module is looked for in the current folder first, as ``python -m eventpipe`` does (its
    sys.path[0] is the current folder; the ``eventpipe`` script's is the script's own folder):
    the folder stays on sys.path, for the handler's own imports. ConfigError's cause is what
    importing the module raised (its traceback says where).
    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(f"handler {spec!r} must look like MODULE:FUNCTION", option="handler")
    is_file = target.endswith(".py") or os.sep in target
    try:
        if is_file:
            if not os.path.isfile(target):
                raise ConfigError(f"cannot load handler {spec!r}: No such file or directory: "
                                  f"{target}",
                                  option="handler")
            # A name of our own (a file's stem may clash with an installed module); kept out
            # of every message.
            name = "eventpipe_handler_" + os.path.basename(target).removesuffix(".py")
            module_spec = importlib.util.spec_from_file_location(name, target)
            if module_spec is None or module_spec.loader is None:
                raise ConfigError(f"cannot load handler {spec!r}: {target} is not a Python "
                                  "file", option="handler")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            _cwd_on_path()
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name is not None and (target == exc.name or target.startswith(exc.name + ".")):
            # the handler's module itself (or its package), not something it imports
            raise ConfigError(f"cannot load handler {spec!r}: No module named {exc.name!r} in "
                              "the current folder or on PYTHONPATH", option="handler") from None
        raise ConfigError(f"cannot load handler {spec!r}: {type(exc).__name__}: {exc}",
                          option="handler") from exc
    except Exception as exc:  # whatever importing the module raised (SyntaxError too)
        # A SyntaxError's own text names the file and line; anything else gets a traceback.
        raise ConfigError(f"cannot load handler {spec!r}: {type(exc).__name__}: {exc}",
                          option="handler") from (None if isinstance(exc, SyntaxError) else exc)
    where = target if is_file else f"module {target!r}"
    if not hasattr(module, attr):
        raise ConfigError(f"cannot load handler {spec!r}: {where} has no attribute {attr!r}",
                          option="handler")
    func = getattr(module, attr)
    if not callable(func):
        raise ConfigError(f"handler {spec!r} is not callable", option="handler")
    return func  # type: ignore[no-any-return]


def _cwd_on_path() -> None:
    """The current folder first on sys.path (where ``python -m`` puts it), once."""
    cwd = os.getcwd()
    if sys.path[:1] != [cwd] and sys.path[:1] != [""]:
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()


@contextlib.contextmanager
def _noting_sigint() -> Iterator[Callable[[], bool]]:
    """Yields a function saying whether SIGINT arrived in the block.

    Consumer.run() installs its own SIGTERM/SIGINT handlers (both stop it cleanly) and does
    not say which signal came; the C-level signal handler writes each signal's number to the
    wakeup fd, so a pipe there tells (nothing else in a consume process uses that fd).
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    read_end, write_end = os.pipe()  # not inherited by children (PEP 446)
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)  # set_wakeup_fd requires it
    seen = bytearray()
    try:
        previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        try:

            def interrupted() -> bool:
                with contextlib.suppress(BlockingIOError):
                    while chunk := os.read(read_end, 512):
                        seen.extend(chunk)
                return signal.SIGINT in seen

            yield interrupted
        finally:
            signal.set_wakeup_fd(previous)
    finally:
        os.close(read_end)
        os.close(write_end)


def cmd_consume(args: argparse.Namespace) -> int:
    from .._checkpoint import validate_name
    from .._config import CONSUMER_OPTIONS, resolve
    from .._consumer import Consumer
    from .._log import EventLog

    handler = load_handler(args.handler)
    initial = initial_state(args)
    options = consumer_options(args, ("checkpoint_every", "checkpoint_interval",
                                      "poll_interval", "on_error", "max_retries",
                                      "dead_letter", "checkpoint_dir"))
    if args.no_notifications:
        options["notifications"] = False
    if args.start is not None:
        start = next(o for o in CONSUMER_OPTIONS if o.name == "start")
        try:
            options["start"] = start.parse(args.start)
        except ValueError as exc:
            raise ConfigError(f"--start {args.start!r}: {exc}", option="start") from None
    # The command line first (exit 2 whatever PATH holds), then the log.
    resolve(CONSUMER_OPTIONS, options)
    validate_name(args.name)
    if args.sqlite or args.postgres:
        from ._dbconsume import consume_into_database

        return consume_into_database(args, handler, options)
    # Opened here, not by the Consumer: without --create a missing log is refused
    # (NotAnEventLogError, exit 3) instead of created empty and consumed forever.
    with EventLog(args.path, create=args.create) as log, \
            Consumer(log, args.name, handler, initial, **options) as consumer, \
            _noting_sigint() as interrupted:
        if args.catch_up:
            with _catch_up_progress(consumer, sys.stderr):
                state = consumer.catch_up()
        else:
            state = consumer.run()
        return stopped(args, state, consumer.offset, interrupted())


@contextlib.contextmanager
def _catch_up_progress(consumer: Any, stream: TextIO) -> Iterator[None]:
    """On a terminal, a line redrawn twice a second while ``--catch-up`` works through a long
    log: events handled of the head, the rate, and the time left at that rate. Read from
    another thread (the consumer's offset is a plain int; nothing else is touched)."""
    if not stream.isatty():
        yield
        return
    done = threading.Event()
    show = progress_printer(stream, "events", end_line=False)

    def draw() -> None:
        show(consumer.offset, consumer.log.head)  # the rate counts from here
        while not done.wait(0.5):
            show(consumer.offset, consumer.log.head)

    thread = threading.Thread(target=draw, name="eventpipe-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        print("", file=stream, flush=True)
