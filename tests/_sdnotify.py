"""A stand-in for systemd's notify socket, for child processes that speak sd_notify."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from .conftest import ROOT


@contextlib.contextmanager
def fake_systemd(folder: Path,
                 watchdog_usec: int) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A bound datagram socket in ``folder`` and the environment that sends a child's messages
    to it, as systemd would (NOTIFY_SOCKET, WATCHDOG_USEC, and a PYTHONPATH reaching this
    checkout). Receiving waits at most 30 s, so a child that never sends fails the test."""
    path = str(folder / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(30)
        yield sock, dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC=str(watchdog_usec),
                         PYTHONPATH=str(ROOT))
