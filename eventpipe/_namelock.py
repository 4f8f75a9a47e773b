"""One process per consumer name: a flock plus a note of who holds it.

The lock file is ``<name>.lock`` beside the checkpoint. Every :class:`NameLock` opens it once,
read-write, and keeps that descriptor for its life: an attempt is one ``flock(LOCK_EX |
LOCK_NB)`` on it, which opens and closes nothing, so a standby retrying makes no filesystem
events. The holder keeps the flock on that descriptor; the kernel drops it when the descriptor
is closed, by :meth:`NameLock.release` or by the holder's death (``kill -9`` included).

Closing a descriptor opened for writing makes inotify report ``IN_CLOSE_WRITE`` for the file,
queued just before the kernel drops the flock (both happen as the file is released): that is
what a standby waits for (``ChangeNotifier(folder, "<name>.lock")``), then retries the flock for
a few milliseconds. The notification is a hint: standbys also retry at their poll interval.

The holder writes ``<name>.owner`` (pid, host, since) so a refused second process, and a
standby's status line, can say who has the name. Raw ``flock`` excludes filelock's ``flock`` on
the same file, so older versions (which took the name through filelock) still exclude this one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time

import orjson

from ._fsutil import atomic_write, remove_stale_temps
from .errors import StorageError

__all__ = ["NameLock"]


class NameLock:
    """One process per consumer name: a flock on ``<name>.lock`` plus a note of who holds it."""

    def __init__(self, folder: str, name: str, mode: int) -> None:
        self.path = os.path.join(folder, f"{name}.lock")
        self.folder = folder
        self.filename = f"{name}.lock"
        self._owner = os.path.join(folder, f"{name}.owner")
        self._mode = mode
        self._fd: int | None = None
        self._held = False

    def _descriptor(self) -> int:
        if self._fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self._mode)
            except OSError as exc:
                raise StorageError.from_os_error(exc, "open consumer name lock",
                                                 path=self.path) from exc
            # The umask may have stripped group bits; a lock file of another user stays as is.
            with contextlib.suppress(PermissionError):
                os.fchmod(fd, self._mode)
            self._fd = fd
        return self._fd

    def try_acquire(self) -> bool:
        """Take the name if nobody holds it (True); never waits. Idempotent once held."""
        if self._held:
            return True
        fd = self._descriptor()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise StorageError.from_os_error(exc, "lock consumer name", path=self.path) from exc
        self._held = True
        try:
            remove_stale_temps(self._owner)  # left by holders killed while writing it
            note = orjson.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            atomic_write(self._owner, note, self._mode, durable=False)
        except BaseException:
            self.release()
            raise
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
        return self._held

    def release(self) -> None:
        """Give the name up (if held) and close the descriptor. Idempotent.

        The flock goes first, then the close: a standby woken by the close finds it free.
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._held:
            self._held = False
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __del__(self) -> None:
        # A consumer dropped without close() must not keep its name until the process exits.
        with contextlib.suppress(Exception):
            self.release()
