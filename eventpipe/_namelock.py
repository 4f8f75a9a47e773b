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

Both files are reached relative to the checkpoint :class:`~eventpipe._layout.Folder`, never
through a link: a lock file planted as a link (or a hard link) to a file elsewhere would
otherwise be opened read-write, and its mode changed, by whoever takes the name (issue 15).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time

import orjson

from ._checkpoint import storage_context
from ._layout import Folder
from .errors import EventPipeError, StorageError

__all__ = ["NameLock"]


class NameLock:
    """One process per consumer name: a flock on ``<name>.lock`` plus a note of who holds it.

    ``folder`` is the checkpoint folder, open (the caller keeps it open while this lives and
    closes it).
    """

    def __init__(self, folder: Folder, name: str, mode: int) -> None:
        self.folder = folder
        self.filename = f"{name}.lock"
        self.path = folder.path_of(self.filename)  # for messages (never opened by it)
        self._owner = f"{name}.owner"
        self._mode = mode
        self._fd: int | None = None
        self._held = False

    def _descriptor(self) -> int:
        if self._fd is None:
            # Read-write, created with exactly our mode if missing, never truncated (only the
            # flock matters). UnsafePathError for a link, or for a file with other hard links:
            # it would be a file elsewhere, opened for writing by whoever takes the name.
            with storage_context("open consumer name lock"):
                self._fd = self.folder.open_shared(self.filename, self._mode)
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
            # Left by holders killed while writing it (a link of a temp name is removed).
            self.folder.remove_stale_temps(self._owner)
            note = orjson.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            with storage_context("write consumer owner note"):
                self.folder.write_atomic(self._owner, note, self._mode, durable=False)
        except BaseException:
            self.release()
            raise
        return True

    def holder(self) -> str:
        """Who holds the name, from ``<name>.owner`` ("an unknown process" when that cannot
        be read, or is a link: it is never followed)."""
        try:
            raw = self.folder.read_bytes(self._owner)
            if raw is None:
                return "an unknown process"
            info = orjson.loads(raw)
            return f"pid {info['pid']} on {info['host']} since {info['since']}"
        except (OSError, EventPipeError, ValueError, KeyError, TypeError):
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
