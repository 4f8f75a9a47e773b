"""The ``demo`` command: run the writer/consumer pipeline of :mod:`eventpipe._demo`, check it."""

from __future__ import annotations

import argparse

from ._common import EXIT_FAILED, EXIT_OK


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``demo`` (it takes no log path, so it never drops to a log's owner)."""
    p = sub.add_parser("demo", help="run a writer/consumer pipeline demo and check it")
    p.add_argument("--dir", help="directory to use (default: a new temporary one)")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--writers", type=int, default=3)
    p.add_argument("--rate", type=float, default=20000.0, help="events/s, all writers")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from .._demo import run_demo

    result = run_demo(args.dir, seconds=args.seconds, writers=args.writers, rate=args.rate)
    return EXIT_OK if result.ok else EXIT_FAILED
