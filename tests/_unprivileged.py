"""Code run as a user without privileges, for the tests where permission bits must apply."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

NOBODY = 65534  # the uid and gid an unprivileged child takes when the tests run as root


def _as_unprivileged(conn: Connection, fn: Callable[[], dict[str, Any]]) -> None:
    try:
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        conn.send(fn())
    except BaseException as exc:
        conn.send({"crashed": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def run_unprivileged(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn`` in a forked child that has no privileges (uid 65534 when we are root).

    Fork rather than exec: the interpreter may live where the unprivileged user cannot reach.
    The files ``fn`` uses must be reachable by that user: see the ``shared_tmp`` fixture.
    """
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_as_unprivileged, args=(child, fn))
    proc.start()
    child.close()
    try:
        result: dict[str, Any] = parent.recv()
    finally:
        proc.join()
        parent.close()
    assert proc.exitcode == 0
    assert "crashed" not in result, result.get("crashed", "")
    return result
