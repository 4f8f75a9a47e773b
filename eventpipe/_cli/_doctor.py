"""The ``doctor`` command: check a consumer's deployment before systemd finds out what is wrong.

It looks at what a consumer unit will run with (the same ``EVENTPIPE_*`` variables, so
``systemd-run --property=EnvironmentFile=/etc/eventpipe/counter.env eventpipe doctor``, or
``set -a; . /etc/eventpipe/counter.env; eventpipe doctor`` checks a unit's env file): the
Python it runs on (a venv made from a pyenv Python under /root is hidden by the unit's
``ProtectHome=yes``), the log, the handler, the initial state, the options, and inotify room.
One line per check; exit status 1 when any check found a problem.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import orjson

from ..errors import EventPipeError
from ._common import EXIT_FAILED, EXIT_OK

_HIDDEN_BY_PROTECT_HOME = ("/root", "/home", "/run/user")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    env = os.environ
    p = sub.add_parser(
        "doctor", help="check what a consumer (unit) will run with",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    p.add_argument("path", nargs="?", default=env.get("EVENTPIPE_LOG_PATH"),
                   help="the log (default $EVENTPIPE_LOG_PATH)")
    p.add_argument("--handler", default=env.get("EVENTPIPE_HANDLER"),
                   help="MODULE:FUNCTION (default $EVENTPIPE_HANDLER)")
    p.add_argument("--initial-state", default=env.get("EVENTPIPE_INITIAL_STATE"))
    p.set_defaults(func=cmd_doctor)


def hidden_by_protect_home(path: str) -> bool:
    """Whether systemd's ``ProtectHome=yes`` hides ``path`` from a service."""
    real = os.path.realpath(path)
    return any(real == top or real.startswith(top + "/") for top in _HIDDEN_BY_PROTECT_HOME)


def cmd_doctor(args: argparse.Namespace) -> int:
    problems = 0

    def report(ok: bool, what: str, detail: str) -> None:
        nonlocal problems
        problems += not ok
        print(f"{'ok     ' if ok else 'PROBLEM'}  {what}: {detail}")

    python = os.path.realpath(sys.executable)
    report(not hidden_by_protect_home(python), "python",
           python if not hidden_by_protect_home(python) else
           f"{python} lies under a home folder, which a unit's ProtectHome=yes hides: make "
           "the venv from the system's python (/usr/bin/python3 -m venv ...)")
    _check_log(args.path, report)
    _check_handler(args.handler, report)
    _check_state(args.initial_state, report)
    _check_options(report)
    _check_inotify(report)
    return EXIT_FAILED if problems else EXIT_OK


def _check_log(path: str | None, report: Any) -> None:
    from .._log import EventLog

    if not path:
        report(False, "log", "no PATH and no EVENTPIPE_LOG_PATH")
        return
    try:
        with EventLog(path, create=False) as log:
            report(True, "log", f"{log.path}: {log.head:,} events")
    except EventPipeError as exc:
        report(False, "log", str(exc))


def _check_handler(spec: str | None, report: Any) -> None:
    from ._consume import load_handler

    if not spec:
        report(False, "handler", "no --handler and no EVENTPIPE_HANDLER")
        return
    try:
        load_handler(spec)
    except EventPipeError as exc:
        report(False, "handler", f"{spec}: {exc}")
    else:
        report(True, "handler", spec)


def _check_state(text: str | None, report: Any) -> None:
    from .._checkpoint import encode_state

    if text is None:
        report(True, "initial state", "null (no EVENTPIPE_INITIAL_STATE)")
        return
    try:
        encode_state(orjson.loads(text))
    except orjson.JSONDecodeError as exc:
        report(False, "initial state", f"not JSON ({exc.msg} at column {exc.colno})")
    except ValueError as exc:
        report(False, "initial state", f"cannot be stored: {exc}")
    else:
        report(True, "initial state", text)


def _check_options(report: Any) -> None:
    from .._config import CONSUMER_OPTIONS, LOG_OPTIONS, resolve

    try:
        resolve(LOG_OPTIONS, {})
        resolve(CONSUMER_OPTIONS, {})
    except EventPipeError as exc:
        report(False, "options", str(exc))
    else:
        given = sorted(k for k in os.environ if k.startswith("EVENTPIPE_"))
        report(True, "options", ", ".join(given) or "defaults")


def _check_inotify(report: Any) -> None:
    from .._inotify import inotify_usage

    usage = inotify_usage()
    warning = usage.warning
    report(warning is None, "inotify",
           warning or f"{usage.instances_in_use} of {usage.max_user_instances} instances in use")
