"""Small filesystem helpers shared by the log, the compressor and checkpoints.

Every helper turns ``OSError`` into a typed :class:`~eventpipe.errors.StorageError` that names the
path, so callers never have to.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from .errors import StorageError

__all__ = [
    "atomic_write",
    "fsync_dir",
    "make_dirs",
    "open_shared",
    "os_errors",
    "remove_stale_temps",
    "set_folder_mode",
    "write_all",
]


@contextmanager
def os_errors(what: str, path: str | os.PathLike[str] | None = None) -> Iterator[None]:
    """Re-raise any OSError inside the block as a StorageError saying what failed, and where."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError.from_os_error(exc, what, path=path) from exc


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, making creates, renames and unlinks inside it durable."""
    with os_errors("fsync of directory", path):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_dirs(path: str | os.PathLike[str], mode: int) -> None:
    """Create ``path`` (and parents) with exactly ``mode``, whatever the umask."""
    with os_errors("create directory", path):
        missing = []
        p = os.path.abspath(path)
        while not os.path.isdir(p):
            missing.append(p)
            p = os.path.dirname(p)
        for d in reversed(missing):
            try:
                os.mkdir(d, mode)
            except FileExistsError:
                continue
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                set_folder_mode(fd, mode)
            finally:
                os.close(fd)


def set_folder_mode(fd: int, mode: int) -> None:
    """Give the folder open as ``fd`` exactly ``mode``, whatever the umask did at creation.

    A shared log needs its group bits as configured. A setgid bit inherited from the parent
    folder is kept: it gives files created here the shared group rather than each creator's
    own. Nothing is done when the bits are right already: under systemd's RestrictSUIDSGID=
    any chmod naming the setgid bit fails, even one that leaves it as it is.
    """
    current = os.fstat(fd).st_mode
    if current & 0o777 != mode & 0o777:
        try:
            os.fchmod(fd, mode | (current & stat.S_ISGID))
        except PermissionError:
            os.fchmod(fd, mode)


def open_shared(path: str, mode: int) -> int:
    """Open ``path`` read-write, creating it with exactly ``mode`` (umask ignored) if missing.

    Only the creator sets the mode: the file may belong to another user of the group.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    os.fchmod(fd, mode)
    return fd


def write_all(fd: int, data: bytes | memoryview, position: int) -> None:
    """pwrite all of ``data`` at ``position``, looping over short writes; OSError propagates."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, position)
        if n == 0:  # pragma: no cover - the kernel reports errors, not zero, for regular files
            raise OSError(28, "short write")
        view = view[n:]
        position += n


def atomic_write(path: str, data: bytes, mode: int, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically: temp file, fsync, rename, fsync of folder.

    Readers see the old content or the new, never a mix. With ``durable`` the new content
    survives power loss once this returns.
    """
    folder = os.path.dirname(path) or "."
    tmp = f"{path}.tmp.{os.getpid()}"
    with os_errors("atomic write", path):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)
            write_all(fd, data, 0)
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        os.close(fd)
        try:
            os.rename(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise
    if durable:
        fsync_dir(folder)


def remove_stale_temps(path: str) -> int:
    """Remove ``<path>.tmp.<pid>`` files that atomic_write left when its process was killed.

    Only for a file that one process at a time writes, called by that process (the holder of
    a lock): then none of them is in use. Returns how many were removed.
    """
    folder, prefix = os.path.split(path)
    prefix += ".tmp."
    removed = 0
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return 0
    for name in names:
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            with suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))
                removed += 1
    return removed


def _unlink_quietly(path: str) -> None:
    with suppress(OSError):
        os.unlink(path)
