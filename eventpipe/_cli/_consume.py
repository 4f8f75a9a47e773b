"""The ``consume`` command: load a handler and run a consumer (what the systemd unit starts)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

import orjson

from ..errors import ConfigError
from ._common import EXIT_OK, err, write_json


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``consume``; its defaults come from the environment a systemd unit sets."""
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
    from .._consumer import Consumer

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
            write_json(state)
        err(f"consumer {args.name}: stopped at offset {consumer.offset}")
    return EXIT_OK
