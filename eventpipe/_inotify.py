"""The kernel side of change hints: one inotify instance per process, and the user's limits.

fs.inotify.max_user_instances (128 by default) counts inotify instances per user, so one
instance and one reader thread serve every notifier of a process (:func:`subscribe`), with one
watch per directory shared by the notifiers that use it; the thread stops when the last one
goes. A forked child never uses its parent's instance (fork hooks give it a fresh state and
close its copies of the parent's descriptors). :func:`explain_failure` says why a watch could
not be made and how to fix it; :func:`inotify_usage` counts a user's instances and watches.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import resource
import select
import struct
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = ["InotifyUsage", "Subscription", "explain_failure", "inotify_usage", "subscribe"]

# The per-user limits: inotify_init fails with EMFILE past max_user_instances (128 by default)
# and inotify_add_watch with ENOSPC past max_user_watches.
_PROC_INOTIFY: Final = "/proc/sys/fs/inotify"
_NEAR_LIMIT: Final = 0.9  # status warns from this share of max_user_instances on


def _sysctl(name: str) -> int | None:
    """``/proc/sys/fs/inotify/<name>`` as a number, or None where it cannot be read."""
    try:
        with open(os.path.join(_PROC_INOTIFY, name)) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _out_of_fds() -> bool:
    """Whether this process is at its open-file limit (inotify_init's other EMFILE)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        return len(os.listdir("/proc/self/fd")) >= soft - 1  # listdir holds one fd itself
    except OSError as exc:
        return exc.errno == errno.EMFILE


def _raise_limit(name: str, current: int | None, floor: int) -> str:
    target = max(floor, 2 * current) if current else floor
    return (f"raise it, e.g. `sysctl -w fs.inotify.{name}={target}` (as root; add the line "
            f"fs.inotify.{name}={target} to /etc/sysctl.d/ to keep it); `eventpipe status` "
            "shows how many are in use")


def explain_failure(exc: BaseException, directory: str) -> tuple[str, str | None]:
    """(why a watch failed, in one line; how to fix it, if the user can) for ``exc``."""
    err = exc.errno if isinstance(exc, OSError) else None
    if err == errno.EMFILE:
        if _out_of_fds():
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            return (f"this process has no file descriptor left (RLIMIT_NOFILE {soft})",
                    "raise the open-file limit (`ulimit -n`, LimitNOFILE= in a systemd unit)")
        limit = _sysctl("max_user_instances")
        return (f"uid {os.geteuid()} has used up its inotify instances "
                f"(fs.inotify.max_user_instances = {limit})",
                _raise_limit("max_user_instances", limit, 1024))
    if err == errno.ENOSPC:
        limit = _sysctl("max_user_watches")
        return (f"uid {os.geteuid()} has used up its inotify watches "
                f"(fs.inotify.max_user_watches = {limit})",
                _raise_limit("max_user_watches", limit, 524288))
    if isinstance(exc, OSError) and err is not None:
        name = errno.errorcode.get(err, str(err))
        return f"{directory}: {exc.strerror} ({name})", None
    return f"{type(exc).__name__}: {exc}", None


@dataclass(frozen=True)
class InotifyUsage:
    """inotify instances and watches held by one user's processes, against the limits.

    Counted from ``/proc/<pid>/fd`` of the processes owned by ``uid``: an instance inherited
    across fork and still open in both processes counts twice, and processes whose fds
    cannot be read (``unreadable_processes``; other users' when not root) count none.
    """

    uid: int
    instances_in_use: int
    max_user_instances: int | None  # None: /proc/sys/fs/inotify cannot be read
    watches_in_use: int
    max_user_watches: int | None
    unreadable_processes: int

    @property
    def warning(self) -> str | None:
        """What to tell the user when new notifiers of ``uid`` will (soon) fall back."""
        used, limit = self.instances_in_use, self.max_user_instances
        if limit is None or used < _NEAR_LIMIT * limit:
            return None
        what = "at" if used >= limit else "close to"
        return (f"uid {self.uid} holds {used} of {limit} inotify instances, {what} the limit: "
                "new consumers and followers of this user will fall back to polling (up to "
                "their poll interval of latency); raise fs.inotify.max_user_instances with "
                "sysctl")


def inotify_usage(uid: int | None = None) -> InotifyUsage:
    """Count the inotify instances and watches of ``uid`` (default: this process's euid).

    Never raises: processes that end or deny access while being scanned are skipped. Costs
    one readlink per open fd of the user's processes (a few ms for thousands of fds).
    """
    uid = os.geteuid() if uid is None else uid
    instances = watches = unreadable = 0
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        pids = []
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            # The kernel charges an instance to the euid that created it; /proc/<pid> is owned
            # by the process's euid.
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            fds = os.listdir(fd_dir)
        except PermissionError:
            unreadable += 1
            continue
        except OSError:
            continue  # the process ended meanwhile
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != "anon_inode:inotify":
                    continue
                instances += 1
                with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as info:
                    watches += sum(1 for line in info if line.startswith(b"inotify wd:"))
            except OSError:
                continue  # the fd or the process is gone
    return InotifyUsage(uid, instances, _sysctl("max_user_instances"), watches,
                        _sysctl("max_user_watches"), unreadable)


class Subscription:
    """One notifier's interest in a file name of a directory that :class:`_SharedInotify`
    watches."""

    __slots__ = ("callback", "gone", "inotify", "name", "wd")

    def __init__(self, inotify: _SharedInotify, wd: int, name: bytes,
                 callback: Callable[[], None]) -> None:
        self.inotify = inotify
        self.wd = wd
        self.name = name
        self.callback = callback
        self.gone = False  # the directory was deleted or moved away: no more hints

    @property
    def alive(self) -> bool:
        return not self.gone and self.inotify.alive

    def close(self) -> None:
        unsubscribe(self)


class _SharedInotify:
    """The process's one inotify instance, read by one thread that serves every notifier.

    fs.inotify.max_user_instances (128 by default) counts instances per user, so one instance
    per notifier capped a process (a server following a log per client, several consumers in
    one event loop) and the user's other processes. Notifiers of this process share this one
    instance instead: one watch per directory, whatever the number of notifiers on it (the
    kernel returns the same watch descriptor for the same directory; its subscriptions are the
    refcount), and the reader thread stops when the last notifier closes. The watch table is
    only touched under ``_registry_lock`` (by the reader, :func:`_subscribe`,
    :func:`_unsubscribe`).

    watchdog's Observer hands each event through three threads (its inotify reader, the
    emitter, the dispatcher), about 0.15 ms here; this uses watchdog's own inotify binding
    (``watchdog.observers.inotify_c``) and a single reader thread, so a hint reaches a waiter
    in one hop. Linux only: elsewhere the import fails and the Observer is used instead. An
    inotify queue overflow (events lost) counts as a hint for every notifier: it means "read
    to the end".
    """

    _HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len, name[len]

    def __init__(self) -> None:
        """Open the instance; the reader thread starts with :meth:`start`. Raises OSError."""
        from watchdog.observers import inotify_c

        self._inotify_c = inotify_c
        consts = inotify_c.InotifyConstants
        self._gone_mask = consts.IN_IGNORED | consts.IN_DELETE_SELF | consts.IN_MOVE_SELF
        self._ignored = consts.IN_IGNORED
        self._overflow = consts.IN_Q_OVERFLOW
        self._mask = (consts.IN_MODIFY | consts.IN_CLOSE_WRITE | consts.IN_CREATE
                      | consts.IN_MOVED_TO | consts.IN_DELETE_SELF | consts.IN_MOVE_SELF)
        fd = inotify_c.inotify_init()
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init: {os.strerror(err)}")
        # watchdog's binding predates inotify_init1: keep the fd out of exec'd children.
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
        self._fd = fd
        self._kill_r, self._kill_w = os.pipe2(os.O_CLOEXEC)
        self.pid = os.getpid()
        self.open = True  # False once the fds are closed (by the reader, or after a fork)
        self.closing = False  # set (under the lock) when the last subscription left
        self.watches: dict[int, set[Subscription]] = {}  # wd -> who listens on it
        self._thread = threading.Thread(target=self._run, name="eventpipe-inotify", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def subscribe(self, directory: str, name: str, callback: Callable[[], None]) -> Subscription:
        """Watch ``directory`` (once for all its subscribers); call under ``_registry_lock``."""
        wd = self._inotify_c.inotify_add_watch(self._fd, os.fsencode(directory), self._mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch: {os.strerror(err)}", directory)
        sub = Subscription(self, wd, os.fsencode(name), callback)
        self.watches.setdefault(wd, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Drop ``sub``; the last one on a directory removes its watch. Under the lock."""
        subs = self.watches.get(sub.wd)
        if subs is None or sub not in subs:
            return  # the kernel removed the watch already (IN_IGNORED)
        subs.discard(sub)
        if not subs:
            del self.watches[sub.wd]
            # Its IN_IGNORED, still to come, then finds no entry; watch descriptors are
            # allocated cyclically, so the number is not reused meanwhile.
            self._inotify_c.inotify_rm_watch(self._fd, self._inotify_c.WatchDescriptor(sub.wd))

    @property
    def alive(self) -> bool:
        # A forked child has no reader thread: is_alive() is False there.
        return self._thread.is_alive()

    def stop(self) -> None:
        """End the reader thread and close the fds (the reader closes them on its way out)."""
        with _registry_lock:
            if self.open:
                os.write(self._kill_w, b"x")
        if threading.current_thread() is not self._thread:  # not a callback closing a notifier
            self._thread.join()

    def close_fds_locked(self) -> None:
        """Close the fds once; the caller holds ``_registry_lock``."""
        if self.open:
            self.open = False
            for fd in (self._fd, self._kill_r, self._kill_w):
                os.close(fd)

    def _run(self) -> None:
        try:
            self._read()
        finally:
            global _shared
            with _registry_lock:
                self.closing = True
                if _shared is self:  # died early (it should not): later notifiers start afresh
                    _shared = None
                self.close_fds_locked()

    def _read(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._kill_r, select.POLLIN)
        unpack = self._HEADER.unpack_from
        size = self._HEADER.size
        while True:
            if any(fd == self._kill_r for fd, _ in poller.poll()):
                return
            buf = os.read(self._fd, 65536)
            hit: set[Subscription] = set()
            with _registry_lock:
                i = 0
                while i + size <= len(buf):
                    wd, mask, _, length = unpack(buf, i)
                    name = buf[i + size : i + size + length].rstrip(b"\0")
                    i += size + length
                    if mask & self._overflow:
                        for subs in self.watches.values():
                            hit.update(subs)
                        continue
                    listeners = self.watches.get(wd)
                    if not listeners:
                        continue  # a watch removed meanwhile
                    if mask & self._gone_mask:
                        # Only those watching now lose the directory: a notifier that
                        # subscribes later to the moved directory watches it afresh.
                        for sub in listeners:
                            sub.gone = True
                        hit.update(listeners)
                        if mask & self._ignored:  # the kernel dropped the watch
                            del self.watches[wd]
                        continue
                    hit.update(sub for sub in listeners if sub.name == name)
            for sub in hit:
                sub.callback()


# The process's shared instance (None while no notifier watches), and the lock over it and
# over its watch table. A forked child starts with none of it: the parent's instance is the
# same open file description in both, so a child reading it would steal the parent's events
# and a child removing a watch would remove the parent's. Reentrant, so that a signal handler
# starting or closing a notifier (or forking) while its thread holds the lock cannot deadlock.
_registry_lock = threading.RLock()
_shared: _SharedInotify | None = None
_instances: weakref.WeakSet[_SharedInotify] = weakref.WeakSet()


def subscribe(directory: str, name: str, callback: Callable[[], None]) -> Subscription:
    """Watch ``directory/name`` through the shared instance, opening it if needed.

    Raises ImportError (not Linux), OSError (no instance or watch left, no directory) or
    RuntimeError (no thread can start).
    """
    global _shared
    with _registry_lock:
        inotify = _shared
        if inotify is not None and inotify.pid == os.getpid():  # the at-fork hook resets it too
            return inotify.subscribe(directory, name, callback)
        inotify = _SharedInotify()
        try:
            sub = inotify.subscribe(directory, name, callback)
            inotify.start()
        except BaseException:
            inotify.close_fds_locked()
            raise
        _instances.add(inotify)
        _shared = inotify
        return sub


def unsubscribe(sub: Subscription) -> None:
    global _shared
    inotify = sub.inotify
    with _registry_lock:
        if inotify.pid != os.getpid() or inotify.closing:
            return  # inherited across fork, or stopped already: not ours to touch
        inotify.unsubscribe(sub)
        if inotify.watches:
            return
        inotify.closing = True
        if _shared is inotify:
            _shared = None
    inotify.stop()


def _before_fork() -> None:
    _registry_lock.acquire()


def _after_fork_in_parent() -> None:
    _registry_lock.release()


def _after_fork_in_child() -> None:
    global _registry_lock, _shared
    _registry_lock = threading.RLock()  # the parent's copy may be held by a thread gone here
    _shared = None
    # The child's copies of the parent's fds would keep the parent's instance (and its
    # count against the user's limit) alive as long as the child runs: close them.
    for inotify in list(_instances):
        with contextlib.suppress(OSError):  # an exception here would only be printed
            inotify.close_fds_locked()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)
