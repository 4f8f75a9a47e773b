"""Folders inside a log, opened without following links: the one way eventpipe touches them.

A log folder is shared: whoever may write in it (a member of its group, a compromised handler
running as the service user) can plant a symbolic link, or a hard link, where eventpipe expects
a file or a folder. Opening by path follows such a link out of the log: a root process that
appends through ``segments/<active>.jsonl -> /etc/shadow`` writes into ``/etc/shadow``. So no
file or folder inside a log is opened by path. A :class:`Folder` is an open directory
descriptor; its subfolders are opened relative to it with ``O_DIRECTORY | O_NOFOLLOW`` and its
files with ``O_NOFOLLOW`` (``openat``), renames, links and removals name entries relative to
descriptors, and listings read the descriptor. Once open, a folder descriptor pins the real
directory, so swapping a path component for a link between two operations changes nothing. A
link where a file or folder is expected raises :class:`~eventpipe.errors.UnsafePathError`
naming it; a file written in place must be a regular file with exactly one link.

Only the folder a log is opened *at* may be reached through a link (``/srv/events ->
/data/events`` is the operator's choice); every link inside it is refused.

The names of everything in a log folder are defined here and nowhere else.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from typing import Self

from ._fsutil import set_folder_mode
from .errors import StorageError, UnsafePathError

__all__ = [
    "COMPRESS_LOCK",
    "COMPRESS_STATE",
    "CONSUMERS_DIR",
    "EXTERNAL_DIR",
    "HEAD_FILE",
    "META_FILE",
    "QUARANTINE_DIR",
    "SEGMENTS_DIR",
    "SEGMENT_CATALOG",
    "SYNC_STATE",
    "WRITER_LOCK",
    "FlockFile",
    "Folder",
    "folder_of",
]

META_FILE = "eventpipe.json"  # format marker, version and log id
HEAD_FILE = "head"  # the commit point (see _header)
WRITER_LOCK = "writer.lock"  # flock'd by the appending process
COMPRESS_LOCK = "compress.lock"  # held by the process that seals (checksums, compresses)
COMPRESS_STATE = "compress.state"  # the sealing watermark
SYNC_STATE = "sync.state"  # sync="always": the durable mark, flock'd to read or move it
SEGMENT_CATALOG = "segments.idx"  # sealed segments' bounds and first times (see _catalog)
SEGMENTS_DIR = "segments"  # <first offset>.jsonl[.gz] (+ .sum)
QUARANTINE_DIR = "quarantine"  # bytes cut from a torn tail, kept
CONSUMERS_DIR = "consumers"  # <name>.json checkpoints, .lock, .owner, .error
EXTERNAL_DIR = "external"  # inside consumers/: registrations of checkpoints kept elsewhere

_WRITES = os.O_WRONLY | os.O_RDWR


class Folder:
    """An open directory: every operation names an entry relative to it, never via a link.

    Raises UnsafePathError for a link (or anything but a regular file where one is written),
    StorageError for other OS errors, each naming the path. Close it (or use ``with``) to
    release the descriptor; subfolders are separate objects with their own descriptors.
    """

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    # ------------------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Folder:
        """Open the folder at ``path``. A link there is followed: this is the folder the
        operator named (links *inside* it are what is refused)."""
        p = os.path.abspath(os.fspath(path))
        try:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise StorageError.from_os_error(exc, "open folder", path=p) from exc
        return cls(fd, p)

    def sub(self, name: str, *, create_mode: int | None = None) -> Folder:
        """The subfolder ``name``, created with exactly ``create_mode`` when given and missing.

        Raises UnsafePathError if ``name`` is a link or not a folder, FileNotFoundError (a
        StorageError) if missing and not to be created.
        """
        if create_mode is not None:
            self.mkdir(name, create_mode)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=self.fd)
        except OSError as exc:
            raise self._error(exc, "open folder", name) from exc
        return Folder(fd, self.path_of(name))

    def mkdir(self, name: str, mode: int) -> bool:
        """Create subfolder ``name`` with exactly ``mode`` (umask ignored; a setgid bit
        inherited from this folder is kept). False if it exists already."""
        try:
            os.mkdir(name, mode, dir_fd=self.fd)
        except FileExistsError:
            return False
        except OSError as exc:
            raise self._error(exc, "create folder", name) from exc
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=self.fd)
        except OSError as exc:
            raise self._error(exc, "open folder", name) from exc
        try:
            set_folder_mode(fd, mode)
        except OSError as exc:
            raise self._error(exc, "set mode of folder", name) from exc
        finally:
            os.close(fd)
        return True

    def open_file(self, name: str, flags: int, mode: int = 0o600) -> int:
        """``os.open`` of ``name`` in this folder, never through a link; returns the fd.

        A file opened for writing without ``O_EXCL`` must be a regular file with one link
        (a hard link planted to a file elsewhere would otherwise be written through). A file
        this call creates with ``O_EXCL`` gets exactly ``mode`` (see :meth:`open_shared`).
        """
        try:
            # O_NONBLOCK: a FIFO planted where a file should be would block open() until a
            # writer came; it is refused below instead (regular files ignore the flag).
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode,
                         dir_fd=self.fd)
        except OSError as exc:
            raise self._error(exc, "open", name) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePathError("is not a regular file; refusing", path=self.path_of(name))
            if flags & _WRITES and not flags & os.O_EXCL and st.st_nlink > 1:
                raise UnsafePathError(
                    f"has {st.st_nlink} hard links; refusing to write through it",
                    path=self.path_of(name))
            if flags & os.O_CREAT and flags & os.O_EXCL:
                os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask: we created it
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_existing(self, name: str, flags: int) -> int | None:
        """:meth:`open_file`, or None when there is no entry ``name`` (never creates it)."""
        try:
            return self.open_file(name, flags)
        except StorageError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    def open_shared(self, name: str, mode: int) -> int:
        """Open ``name`` read-write, creating it with exactly ``mode`` if missing (lock files).

        Only the creator sets the mode: the file may belong to another user of the group.
        """
        try:
            return self.open_file(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        except StorageError as exc:
            if exc.errno != errno.EEXIST:
                raise
        return self.open_file(name, os.O_RDWR)

    # ---------------------------------------------------------------------------- contents

    def read_bytes(self, name: str) -> bytes | None:
        """The content of file ``name``; None if there is no such entry."""
        fd = self.open_existing(name, os.O_RDONLY)
        if fd is None:
            return None
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read()
        except OSError as exc:
            raise self._error(exc, "read", name) from exc
        finally:
            os.close(fd)

    def write_atomic(self, name: str, data: bytes, mode: int, *, durable: bool = True) -> None:
        """Replace ``name`` with ``data`` atomically (temp file, fsync, rename, fsync of the
        folder). The temp name, ``<name>.tmp.<pid>``, is created exclusively (a leftover of
        a killed process of the same pid is removed first)."""
        tmp = f"{name}.tmp.{os.getpid()}"
        self.unlink(tmp)
        fd = self.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            self.unlink(tmp)
            raise self._error(exc, "write", tmp) from exc
        except BaseException:
            os.close(fd)
            self.unlink(tmp)
            raise
        os.close(fd)
        try:
            self.rename(tmp, name)
        except BaseException:
            self.unlink(tmp)
            raise
        if durable:
            self.fsync()

    # ----------------------------------------------------------------------------- entries

    def rename(self, src: str, dst: str, dst_folder: Folder | None = None) -> None:
        """Rename entry ``src`` to ``dst`` (in ``dst_folder``, default this one). A link
        named ``dst`` is replaced, never followed."""
        to = self if dst_folder is None else dst_folder
        try:
            os.rename(src, dst, src_dir_fd=self.fd, dst_dir_fd=to.fd)
        except OSError as exc:
            raise self._error(exc, f"rename to {to.path_of(dst)}", src) from exc

    def link(self, src: str, dst: str) -> None:
        """Hard-link entry ``src`` as ``dst``; a link named ``src`` is linked, not followed."""
        try:
            os.link(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)
        except OSError as exc:
            raise self._error(exc, f"link as {self.path_of(dst)}", src) from exc

    def unlink(self, name: str) -> bool:
        """Remove entry ``name`` (a link is removed, not its target); False if missing."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._error(exc, "remove", name) from exc
        return True

    def rmdir(self, name: str) -> None:
        try:
            os.rmdir(name, dir_fd=self.fd)
        except OSError as exc:
            raise self._error(exc, "remove folder", name) from exc

    def lstat(self, name: str) -> os.stat_result | None:
        """The entry's own status (a link's, not its target's); None if missing."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error(exc, "stat", name) from exc

    def exists(self, name: str) -> bool:
        return self.lstat(name) is not None

    def remove_stale_temps(self, name: str) -> int:
        """Remove the ``<name>.tmp.<pid>`` files that :meth:`write_atomic` of ``name`` left
        when its process was killed; returns how many.

        Only for a file that one process at a time writes, called by that process (the holder
        of a lock): then none of them is in use.
        """
        prefix = f"{name}.tmp."
        try:
            names = self.names()
        except StorageError:
            return 0
        return sum(1 for entry in names
                   if entry.startswith(prefix) and entry[len(prefix):].isdigit()
                   and self.unlink(entry))

    def names(self) -> list[str]:
        """The entries of this folder (what is there now, read through the descriptor)."""
        try:
            # A fresh open file description for each listing: os.listdir(fd) reads through a
            # dup() of the descriptor, which shares the directory offset with every other
            # listing of it, so two threads listing at once would each miss entries.
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
            try:
                return os.listdir(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StorageError.from_os_error(exc, "list folder", path=self.path) from exc

    def fsync(self) -> None:
        """Make creates, renames and removals in this folder durable."""
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise StorageError.from_os_error(exc, "fsync of folder", path=self.path) from exc

    def stat(self) -> os.stat_result:
        return os.fstat(self.fd)

    # ------------------------------------------------------------------------------ helpers

    def path_of(self, name: str) -> str:
        """The path of entry ``name``, for messages (never opened by it)."""
        return os.path.join(self.path, name)

    def _error(self, exc: OSError, what: str, name: str) -> StorageError | UnsafePathError:
        where = self.path_of(name)
        if exc.errno == errno.ELOOP or (
                exc.errno in (errno.ENOTDIR, errno.EEXIST) and self._is_link(name)):
            return UnsafePathError("is a symbolic link; refusing to follow it", path=where)
        return StorageError.from_os_error(exc, what, path=where)

    def _is_link(self, name: str) -> bool:
        try:
            return stat.S_ISLNK(os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode)
        except OSError:
            return False

    def close(self) -> None:
        """Release the descriptor. Idempotent."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Folder({self.path!r}, fd={self.fd})"


@contextlib.contextmanager
def folder_of(where: Folder | str | os.PathLike[str]) -> Iterator[Folder]:
    """``where`` if it is a Folder; else the folder at that path, open for the block (for
    callers outside the library that name a folder by path: tools, tests)."""
    if isinstance(where, Folder):
        yield where
    else:
        with Folder.open(where) as folder:
            yield folder


class FlockFile:
    """An exclusive ``flock`` on lock file ``name`` of ``folder``, created with ``mode`` if
    missing; the file is opened at each acquire and closed at release (so a forked child never
    shares a held lock). Compatible with filelock's Unix locks, which also use flock. Not
    reentrant; guard it with a thread lock where threads of one process may race for it."""

    def __init__(self, folder: Folder, name: str, mode: int) -> None:
        self.folder = folder
        self.name = name
        self.mode = mode
        self._fd = -1

    @property
    def path(self) -> str:
        return self.folder.path_of(self.name)

    def acquire(self, *, blocking: bool) -> bool:
        """Take the lock (waiting if ``blocking``); False if another process holds it."""
        fd = self.folder.open_shared(self.name, self.mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            raise StorageError.from_os_error(exc, "take lock", path=self.path) from exc
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
