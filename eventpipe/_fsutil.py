"""Small filesystem helpers: OSError to StorageError, writing whole buffers, folder modes.

Every helper turns ``OSError`` into a typed :class:`~eventpipe.errors.StorageError` that names the
path, so callers never have to.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import StorageError

__all__ = [
    "make_dirs",
    "os_errors",
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


def write_all(fd: int, data: bytes | memoryview, position: int) -> None:
    """pwrite all of ``data`` at ``position``, looping over short writes; OSError propagates."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, position)
        if n == 0:  # pragma: no cover - the kernel reports errors, not zero, for regular files
            raise OSError(28, "short write")
        view = view[n:]
        position += n


