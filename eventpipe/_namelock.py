"""One process per consumer name: a flock (through filelock) plus a note of who holds it.

The lock file is ``<name>.lock`` beside the checkpoint; flock is released by the kernel when its
holder exits or dies, so a standby waiting for the name takes over at once after a crash. The
holder writes ``<name>.owner`` (pid, host, since) so a refused second process can say who has it.
"""

from __future__ import annotations

import os
import socket
import time

import filelock
import orjson

from ._fsutil import atomic_write

__all__ = ["NameLock"]


class NameLock:
    """One process per consumer name: a flock (via filelock) plus a note of who holds it."""

    def __init__(self, folder: str, name: str, mode: int) -> None:
        self.path = os.path.join(folder, f"{name}.lock")
        self._owner = os.path.join(folder, f"{name}.owner")
        self._mode = mode
        self._lock = filelock.FileLock(self.path, mode=mode, thread_local=False,
                                       is_singleton=False)

    def try_acquire(self) -> bool:
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            return False
        note = orjson.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        atomic_write(self._owner, note, self._mode, durable=False)
        return True

    def holder(self) -> str:
        try:
            with open(self._owner, "rb") as f:
                info = orjson.loads(f.read())
            return f"pid {info['pid']} on {info['host']} since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "an unknown process"

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release(force=True)
