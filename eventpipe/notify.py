"""Change hints for a log's ``head`` file: wake a waiting consumer soon after an append.

A :class:`ChangeNotifier` turns filesystem events (inotify through watchdog on Linux) into a
level-triggered "something changed, read to the end" flag. It is only ever a hint: consumers
still poll with a bounded timeout, so a missed, late or spurious hint costs latency, never
correctness. When watchdog cannot watch (no inotify instances or watches left, directory
missing, ``use_watchdog=False``) the notifier degrades to a plain timed wait that
:meth:`~ChangeNotifier.wake` can still cut short, and (unless asked to poll) logs one warning
saying so and how to fix it. All notifiers of a process share one inotify instance and one
reader thread; :func:`inotify_usage` counts a user's instances against the per-user limit.

Wake-up protocol (shared by threads, asyncio tasks and signal handlers):

* ``_signal()`` sets ``_pending`` and hands every registered waiter a one-shot release: a
  private ``threading.Lock`` for a thread, ``loop.call_soon_threadsafe`` for a task.
* A waiter registers *before* it looks at ``_pending`` and clears the flag when it returns
  True. Registering first means a signal landing between the check and the block still
  releases the waiter, even when that signal is a Python signal handler running on the
  waiting thread itself; the state lock is an ``RLock`` so such a handler cannot deadlock.
* Python signal handlers run on the main thread, and only between bytecodes, so a signal
  landing just before the main thread goes to sleep cannot cut that sleep short. The main
  thread therefore sleeps in slices of at most ``_MAIN_THREAD_SLICE`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import resource
import select
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

__all__ = ["ChangeNotifier", "InotifyUsage", "inotify_usage"]

_log = logging.getLogger(__name__)

# Event types that can mean "the file now holds new data": in-place writes (modified, and
# closed-after-write for writers that open per append), creation, and an atomic rename into
# place. Passing them as watchdog's event_filter also narrows the inotify mask, so readers
# opening and closing the file (IN_OPEN / IN_CLOSE_NOWRITE) never wake anyone.
_EVENT_TYPES: Final[list[type[FileSystemEvent]]] = [
    FileModifiedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileClosedEvent,
]

# See _block(): the longest a signal handler's wake() can be delayed on the main thread.
_MAIN_THREAD_SLICE: Final = 0.1

# Stopping an InotifyEmitter while an event is in flight makes watchdog log this at ERROR
# level, although nothing is wrong (the emitter is being stopped on purpose). close() can
# always race with appends, so without this filter closing a busy notifier would print an
# alarming line on stderr. The filter drops that one message and nothing else.
_SHUTDOWN_RACE_MESSAGE: Final = "InotifyEmitter.queue_events() called when the thread is inactive"


class _DropShutdownRace(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _SHUTDOWN_RACE_MESSAGE


logging.getLogger("watchdog.observers.inotify").addFilter(_DropShutdownRace())

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


def _explain(exc: BaseException, directory: str) -> tuple[str, str | None]:
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


def _basename(path: bytes | str) -> str:
    return os.path.basename(os.fsdecode(path))


def _resolve(fut: asyncio.Future[None]) -> None:
    # Runs on the waiter's loop; the future may already be done (timed out or cancelled).
    if not fut.done():
        fut.set_result(None)


def _block(waiter: threading.Lock, timeout: float | None) -> bool:
    """Acquire ``waiter`` within ``timeout`` seconds (None: no limit); False on timeout."""
    if threading.current_thread() is not threading.main_thread():
        return waiter.acquire(
            timeout=-1 if timeout is None else min(timeout, threading.TIMEOUT_MAX)
        )
    # A Python signal handler runs only once the main thread is back in the interpreter. A
    # signal landing just before acquire() starts sleeping does not interrupt that sleep, so
    # a wake() from the handler would wait out the whole timeout; sleeping in slices bounds
    # that delay to one slice.
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = _MAIN_THREAD_SLICE if deadline is None else deadline - time.monotonic()
        if step <= 0:
            return False
        if waiter.acquire(timeout=min(step, _MAIN_THREAD_SLICE)):
            return True


def _stop_observer(observer: BaseObserver) -> None:
    # stop() also stops and joins the emitter and inotify reader threads.
    observer.stop()
    if observer.ident is not None:  # a thread that never started cannot be joined
        observer.join()


class _Subscription:
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
        _unsubscribe(self)


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
        self.watches: dict[int, set[_Subscription]] = {}  # wd -> who listens on it
        self._thread = threading.Thread(target=self._run, name="eventpipe-inotify", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def subscribe(self, directory: str, name: str, callback: Callable[[], None]) -> _Subscription:
        """Watch ``directory`` (once for all its subscribers); call under ``_registry_lock``."""
        wd = self._inotify_c.inotify_add_watch(self._fd, os.fsencode(directory), self._mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch: {os.strerror(err)}", directory)
        sub = _Subscription(self, wd, os.fsencode(name), callback)
        self.watches.setdefault(wd, set()).add(sub)
        return sub

    def unsubscribe(self, sub: _Subscription) -> None:
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
            hit: set[_Subscription] = set()
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


def _subscribe(directory: str, name: str, callback: Callable[[], None]) -> _Subscription:
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


def _unsubscribe(sub: _Subscription) -> None:
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


class _NameHandler(FileSystemEventHandler):
    """Calls ``callback`` for events naming ``filename`` directly inside the watched directory."""

    def __init__(self, filename: str, callback: Callable[[], None]) -> None:
        super().__init__()
        self._filename = filename
        self._callback = callback

    def dispatch(self, event: FileSystemEvent) -> None:
        # Overriding dispatch skips watchdog's per-type method lookup: this is the latency path.
        if _basename(event.src_path) == self._filename or (
            event.dest_path and _basename(event.dest_path) == self._filename
        ):
            self._callback()


class ChangeNotifier:
    """Wakes waiters when a watched file changes; a hint, never a guarantee.

    Guarantees:

    * Level-triggered: a change or :meth:`wake` that happens while nobody waits is kept and
      reported by the next :meth:`wait` / :meth:`wait_async`, which clears it. Several hints
      before a wait coalesce into one.
    * Every waiter blocked when a hint arrives is released and returns True.
    * :meth:`wake` is safe from any thread, from coroutines and from signal handlers.
    * Watch failures never raise: the notifier falls back to timed waits, ``watching`` is
      False, ``fallback_reason`` says why and one warning on the ``eventpipe.notify`` logger
      says so with the fix (e.g. raising ``fs.inotify.max_user_instances``).
    * :meth:`close` stops and joins every thread :meth:`start` created, except the process's
      shared inotify reader while other notifiers still use it.
    * All notifiers of a process share one inotify instance (the per-user limit,
      ``fs.inotify.max_user_instances``, is 128 by default). A forked child never uses its
      parent's: its notifiers start their own.

    Call :meth:`start` *before* the catch-up read, so that an append racing with that read is
    either seen by the read or leaves a hint behind.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        filename: str = "head",
        *,
        use_watchdog: bool = True,
        poll_interval: float | None = None,
    ) -> None:
        """Prepare to watch ``directory/filename``; nothing is watched until :meth:`start`.

        ``filename`` must be a plain name inside ``directory`` (the watch is not recursive).
        ``poll_interval`` is only told to the user: the waiter's timeout that replaces hints
        when the notifier falls back (the warning names it; None: "its poll interval").
        """
        if (
            not filename
            or filename in (".", "..")
            or os.sep in filename
            or (os.altsep is not None and os.altsep in filename)
        ):
            raise ValueError(f"filename must be a plain file name, got {filename!r}")
        self._directory = os.fspath(directory)
        self._filename = filename
        self._use_watchdog = use_watchdog
        self._poll_interval = poll_interval
        #: Why no watch is in use (one readable line), or None while one is (or before
        #: :meth:`start`).
        self.fallback_reason: str | None = None if use_watchdog else "use_watchdog=False"

        # Waiter state. Reentrant so that wake() from a signal handler interrupting this
        # thread inside wait()'s critical section does not deadlock.
        self._lock = threading.RLock()
        self._pending = False
        self._sync_waiters: set[threading.Lock] = set()
        self._async_waiters: dict[asyncio.Future[None], asyncio.AbstractEventLoop] = {}

        # Lifecycle state, separate from _lock so that starting or joining the observer never
        # delays a hint.
        self._lifecycle = threading.Lock()
        self._observer: BaseObserver | None = None
        self._direct: _Subscription | None = None
        self._started = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Set the watch; idempotent.

        Returns once the watch is in place (or the fallback is chosen), so any change made
        after start() returns leaves a hint. Raises RuntimeError after :meth:`close`.
        """
        with self._lifecycle:
            if self._closed:
                raise RuntimeError("ChangeNotifier is closed")
            if self._started:
                return
            self._started = True
            if not self._use_watchdog:
                return
            try:
                self._direct = _subscribe(self._directory, self._filename, self._signal)
                return
            except OSError as exc:
                # No inotify instance or watch left, no directory, no permission: watchdog's
                # Observer (inotify again, on Linux) would fail the same way.
                self._fall_back(_explain(exc, self._directory))
                return
            except (ImportError, RuntimeError):
                pass  # not Linux, or no thread left: let watchdog's Observer try its backends
            try:
                # InotifyObserver opens its inotify instance and reader thread right here.
                observer = Observer()
            except (OSError, RuntimeError) as exc:
                self._fall_back(_explain(exc, self._directory))
                return
            try:
                observer.schedule(
                    _NameHandler(self._filename, self._signal),
                    self._directory,
                    recursive=False,
                    event_filter=_EVENT_TYPES,
                )
                observer.start()
            except (OSError, RuntimeError) as exc:
                # OSError: inotify watch limit (ENOSPC), missing directory, permissions.
                # RuntimeError: the interpreter cannot start another thread.
                _stop_observer(observer)
                self._fall_back(_explain(exc, self._directory))
                return
            self._observer = observer

    def _fall_back(self, why: tuple[str, str | None]) -> None:
        """Record why hints are unavailable and say so, once per start: nothing else would
        tell that every wait now lasts the poll interval."""
        reason, remedy = why
        self.fallback_reason = reason
        every = ("at its poll interval" if self._poll_interval is None
                 else f"every {self._poll_interval:g} s")
        _log.warning(
            "eventpipe: cannot watch %s for changes (%s); change hints are replaced by polling "
            "%s, so new data can wait that long to be noticed.%s",
            os.path.join(self._directory, self._filename), reason, every,
            f" To fix: {remedy}." if remedy else "")

    @property
    def watching(self) -> bool:
        """True when a watch is active, i.e. hints arrive without polling."""
        with self._lifecycle:
            if self._direct is not None:
                return self._direct.alive
            observer = self._observer
            # An emitter stops by itself when the watched directory is deleted.
            return (
                observer is not None
                and observer.is_alive()
                and any(emitter.is_alive() for emitter in list(observer.emitters))
            )

    def close(self) -> None:
        """Stop watching, then wake all waiters; idempotent.

        After close() returns, no thread this notifier needed is alive unless another
        notifier of the process still needs it (the shared inotify reader stops with the last
        one). Waiting still works afterwards, as a plain timed wait.
        """
        with self._lifecycle:
            if self._closed:
                return
            self._closed = True
            direct, self._direct = self._direct, None
            if direct is not None:
                direct.close()
            observer, self._observer = self._observer, None
            if observer is not None:
                _stop_observer(observer)
        # Blocked waiters get a (harmless) hint so they can notice the shutdown promptly.
        self._signal()

    def __enter__(self) -> Self:
        """Start watching (see :meth:`start`) and return self."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- hints -------------------------------------------------------------------------------

    def wake(self) -> None:
        """Post a hint: release every current waiter, or the next one if none waits.

        Thread-safe, callable from a coroutine (never blocks beyond a short lock) and from a
        signal handler, including one interrupting a wait() on the same thread. A wait() on
        the main thread sees a signal handler's wake() within 0.1 s even in the worst case.
        """
        self._signal()

    def _signal(self) -> None:
        # Called from the watchdog observer thread for every matching event: keep it short.
        with self._lock:
            self._pending = True
            # Swap rather than clear: each waiter is released exactly once, by whoever took it.
            sync_waiters, self._sync_waiters = self._sync_waiters, set()
            async_waiters, self._async_waiters = self._async_waiters, {}
        for waiter in sync_waiters:
            waiter.release()
        for fut, loop in async_waiters.items():
            # RuntimeError: the loop is closed, and its waiter with it.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, fut)

    def _consume(self, released: bool) -> bool:
        # A released waiter reports True even if another waiter already cleared the flag;
        # hints that arrived meanwhile coalesce, as the caller reads after we return.
        with self._lock:
            fired = released or self._pending
            if fired:
                self._pending = False
            return fired

    def wait(self, timeout: float | None) -> bool:
        """Block until a hint is pending or ``timeout`` seconds pass (None: no limit).

        Returns True, clearing the hint, if one was pending or arrived; False on timeout.
        A hint posted before the call is reported immediately.
        """
        if timeout is not None and timeout <= 0:
            return self._consume(False)
        waiter = threading.Lock()
        waiter.acquire()
        with self._lock:
            # Register before checking: see the module docstring.
            self._sync_waiters.add(waiter)
            if self._pending:
                self._pending = False
                self._sync_waiters.discard(waiter)
                return True
        try:
            released = _block(waiter, timeout)
        finally:
            with self._lock:
                self._sync_waiters.discard(waiter)
        return self._consume(released)

    async def wait_async(self, timeout: float | None) -> bool:
        """Await a hint without blocking the event loop; same results as :meth:`wait`.

        Cancellation propagates as CancelledError, unregisters the waiter and leaves any
        pending hint for the next wait.
        """
        if timeout is not None and timeout <= 0:
            return self._consume(False)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._async_waiters[fut] = loop
            if self._pending:
                self._pending = False
                self._async_waiters.pop(fut, None)
                return True
        released = False
        try:
            async with asyncio.timeout(timeout):
                await fut
            released = True
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._async_waiters.pop(fut, None)
        return self._consume(released)

    def __repr__(self) -> str:
        mode = ("inotify" if self._direct is not None
                else "watchdog" if self._observer is not None else "polling")
        path = os.path.join(self._directory, self._filename)
        return f"<ChangeNotifier {path!r} {mode}{' closed' if self._closed else ''}>"
