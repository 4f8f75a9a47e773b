"""Change hints for a log's ``head`` file: wake a waiting consumer soon after an append.

A :class:`ChangeNotifier` turns filesystem events (inotify through watchdog on Linux) into a
level-triggered "something changed, read to the end" flag. It is only ever a hint: consumers
still poll with a bounded timeout, so a missed, late or spurious hint costs latency, never
correctness. When watchdog cannot watch (no inotify instances or watches left, directory
missing, ``notifications=False``) the notifier degrades to a plain timed wait that
:meth:`~ChangeNotifier.wake` can still cut short, and (unless asked to poll) logs one warning
saying so and how to fix it. All notifiers of a process share one inotify instance and one
reader thread (see :mod:`eventpipe._inotify`, which also counts a user's instances).

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
import logging
import os
import threading
import time
from collections.abc import Callable
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

from ._inotify import Subscription, explain_failure, subscribe

__all__ = ["ChangeNotifier"]

_log = logging.getLogger("eventpipe.notify")  # a name users configure: kept across moves

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
      False, ``fallback_reason`` says why and one warning on the ``eventpipe._changes`` logger
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
        notifications: bool = True,
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
        self._use_watchdog = notifications
        self._poll_interval = poll_interval
        #: Why no watch is in use (one readable line), or None while one is (or before
        #: :meth:`start`).
        self.fallback_reason: str | None = None if notifications else "notifications=False"

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
        self._direct: Subscription | None = None
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
                self._direct = subscribe(self._directory, self._filename, self._signal)
                return
            except OSError as exc:
                # No inotify instance or watch left, no directory, no permission: watchdog's
                # Observer (inotify again, on Linux) would fail the same way.
                self._fall_back(explain_failure(exc, self._directory))
                return
            except (ImportError, RuntimeError):
                pass  # not Linux, or no thread left: let watchdog's Observer try its backends
            try:
                # InotifyObserver opens its inotify instance and reader thread right here.
                observer = Observer()
            except (OSError, RuntimeError) as exc:
                self._fall_back(explain_failure(exc, self._directory))
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
                self._fall_back(explain_failure(exc, self._directory))
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

    @property
    def pending(self) -> bool:
        """True while a hint is posted that no wait has taken yet (the next wait returns True
        at once). Reading it does not take the hint."""
        with self._lock:
            return self._pending

    def waiting(self) -> tuple[int, int]:
        """How many waits are blocked on this notifier now: ``(threads in wait(), coroutines
        in wait_async())``. For diagnostics; the counts may change as soon as they are read."""
        with self._lock:
            return len(self._sync_waiters), len(self._async_waiters)

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
