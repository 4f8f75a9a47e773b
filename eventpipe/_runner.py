"""What every runner shares: name, standby, waits, close().

A runner (Consumer, DbConsumer, Bridge, StreamConsumer, Mirror) follows a source and keeps its
progress under a name; these are the pieces all of them run with, written once.

* :class:`Runner`: the life cycle. What construction opens is closed by :meth:`Runner.close`
  (or by a failed construction), last opened first, once; a closed runner refuses work;
  ``with`` closes it. Hooks a folding runner calls when it caught up or went idle. A stop
  from anywhere; in an event loop, SIGTERM and SIGINT (kept in ``stopped_by``).
* :func:`take_name` and :class:`Standby`: the name (``<name>.lock``, one process per name on
  this host): taken at construction, or waited for by a standby, which reports itself to
  systemd as ready and names the holder in its STATUS line while it waits.
* :func:`watch`: a started change watch (of the head, or of the name's lock file).
* :func:`poll_wait`, :func:`sleep_until`, :func:`sleep_until_async`: the waits between polls
  and retries, never longer than systemd's watchdog allows and always cut short by a stop.
* :func:`arm_faulthandler`: stack dumps on a watchdog abort.
* :func:`start_offset`: where the ``start`` option puts a runner without a position.
* :func:`consumer_options`, :meth:`Runner._configure`, :meth:`Runner._open_dead_letters`:
  the consumer option plumbing.

Signals are :mod:`eventpipe._signals`' job; the watchdog's clock is
:meth:`~eventpipe._systemd.SystemdNotifier.wait_at_most`.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Iterator
from datetime import datetime
from typing import Any, ClassVar, NamedTuple, Self, TypeVar

from ._changes import ChangeNotifier
from ._checkpoint import validate_name
from ._config import CONSUMER_OPTIONS, resolve
from ._deadletter import DeadLetters
from ._layout import CONSUMERS_DIR, Folder
from ._log import EventLog
from ._namelock import NameLock
from ._signals import stop_on_loop_signals
from ._systemd import SystemdNotifier
from .errors import ConfigError, ConsumerBusyError, LogClosedError

__all__ = ["MAIN_THREAD_SLICE", "TAKEOVER_RETRIES", "Finished", "Runner", "Standby", "advance",
           "arm_faulthandler", "consumer_options", "poll_wait", "sleep_until",
           "sleep_until_async", "start_offset", "take_name", "watch"]

# On the main thread, a signal handler's stop() cannot cut short a wait that began just before
# it ran: waits there are sliced (as ChangeNotifier's are) so a stop is seen within this.
MAIN_THREAD_SLICE = 0.1
# A standby woken by the holder's close retries the name at these delays (seconds): the close
# is reported just before the kernel drops the flock. Past them, it waits for the next hint or
# its poll interval.
TAKEOVER_RETRIES = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128)

Hook = Callable[[Any], None]
_Y = TypeVar("_Y")
_S = TypeVar("_S")


class Runner:
    """The life cycle of a runner. A subclass sets :attr:`kind` (the word its messages use),
    calls :meth:`_open` first in its constructor, hands each further thing it opens to
    :meth:`_on_close` (or opens it with :meth:`_consumers_folder`, :meth:`_lock_name`), and
    on a failed construction calls :meth:`_close_parts`."""

    kind: ClassVar[str] = "consumer"
    name: str
    log: EventLog
    systemd: SystemdNotifier
    options: dict[str, Any]
    handler: Callable[..., Any]
    on_caught_up: Hook | None = None
    on_idle: Hook | None = None
    # The signal that stopped run() (see _on_signal): set (to None) by the constructor of a
    # runner whose run() takes signals in an event loop (Bridge, StreamConsumer, Mirror).
    stopped_by: int | None
    _closed: bool
    _parts: contextlib.ExitStack
    _notifier: ChangeNotifier | None = None
    _stop_flag: list[bool]  # a list: a hot loop holds it in a local and still sees a stop
    _stop_event: threading.Event
    # A run in an event loop that waits on an asyncio.Event: the loop, and that event.
    _loop: asyncio.AbstractEventLoop | None = None
    _stop_async: asyncio.Event | None = None

    def _open(self, log_or_path: EventLog | str | os.PathLike[str] | None,
              **log_options: Any) -> None:
        """Start the parts: the log (``log_or_path`` itself, or opened here and then closed by
        :meth:`close`; None for a runner without a local log) and the systemd notifier. Not
        stopped yet."""
        self._closed = False
        self._parts = contextlib.ExitStack()
        self._stop_flag = [False]
        self._stop_event = threading.Event()
        if isinstance(log_or_path, EventLog):
            self.log = log_or_path
        elif log_or_path is not None:
            self.log = EventLog(log_or_path, **log_options)
            self._parts.callback(self.log.close)
        self.systemd = SystemdNotifier()
        self._parts.callback(self.systemd.close)

    def _consumers_folder(self) -> Folder:
        """``<log>/consumers`` (created if missing), open until :meth:`close`."""
        folder = self.log.folder.sub(CONSUMERS_DIR, create_mode=self.log.config.dir_mode)
        self._parts.callback(folder.close)
        return folder

    def _lock_name(self, folder: Folder, standby: bool,
                   file_mode: int | None = None) -> tuple[NameLock, bool]:
        """The name's lock in ``folder`` (its file made with ``file_mode``, default the log's),
        released by :meth:`close`, and whether it is ours now (see :func:`take_name`)."""
        mode = self.log.config.file_mode if file_mode is None else file_mode
        lock = NameLock(folder, self.name, mode)
        self._parts.callback(lock.release)
        return lock, take_name(lock, self.kind, self.name, standby)

    def _configure(self, name: str, handler: Callable[..., Any], options: dict[str, Any],
                   on_caught_up: Hook | None, on_idle: Hook | None) -> dict[str, Any]:
        """A folding runner's consumer options (see :func:`consumer_options`), name
        (validated), handler and hooks; returns the options."""
        self.options = consumer_options(options)
        self.name = validate_name(name)
        self.handler = handler
        self.on_caught_up = on_caught_up
        self.on_idle = on_idle
        return self.options

    def _open_dead_letters(self, consumed: Any = None) -> DeadLetters | None:
        """The dead-letter log this consumer appends to (None unless on_error='dead_letter'),
        open until :meth:`close`. Its entries name ``consumed`` (default :attr:`log`: any
        object with its ``path`` and ``log_id``)."""
        if self.options["on_error"] != "dead_letter":
            return None
        dead = DeadLetters(self.options["dead_letter"],
                           self.log if consumed is None else consumed, self.name)
        self._parts.callback(dead.close)
        return dead

    def _on_close(self, close: Callable[[], object]) -> None:
        """Have :meth:`close` call ``close()``, before whatever was handed over earlier."""
        self._parts.callback(close)

    def _close_parts(self) -> None:
        self._parts.close()

    @property
    def _error_path(self) -> str:
        """The path a closed runner's error names."""
        return self.log.path

    @property
    def _described(self) -> str:
        """The runner in a closed runner's error."""
        return f"{self.kind} {self.name!r}"

    def _check_usable(self) -> None:
        if self._closed:
            raise LogClosedError(f"{self._described} is closed", path=self._error_path)

    def close(self) -> None:
        """Release the name and close what the runner opened. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._close_parts()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _status(self) -> str:
        raise NotImplementedError

    def _caught_up(self, first: bool) -> None:
        """A run's first catch-up is done (``first``: this runner's first ever): the
        on_caught_up hook, then READY=1 and the STATUS line."""
        if first and self.on_caught_up is not None:
            self.on_caught_up(self)
        self.systemd.ready()
        self.systemd.status(self._status())

    def _went_idle(self) -> None:
        """Everything known is handled: the STATUS line, then the on_idle hook."""
        self.systemd.status(self._status())
        if self.on_idle is not None:
            self.on_idle(self)

    def _request_stop(self) -> None:
        """stop(): the flag, then the sleeps and waits woken (thread- and signal-safe)."""
        self._stop_flag[0] = True
        self._stop_event.set()
        notifier = self._notifier
        if notifier is not None:
            notifier.wake()
        loop, event = self._loop, self._stop_async
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(event.set)

    def _on_signal(self, sig: int) -> None:
        """SIGTERM or SIGINT in a run: kept in :attr:`stopped_by` (the first), then stop()."""
        if self.stopped_by is None:
            self.stopped_by = sig
        self._request_stop()

    async def _with_signals(self, work: Awaitable[object]) -> None:
        """Await ``work`` with SIGTERM and SIGINT stopping the runner (see :meth:`_on_signal`;
        in the main thread only)."""
        with stop_on_loop_signals(self._on_signal):
            await work

    def _stopped(self) -> bool:
        return self._stop_flag[0]

    def _watching(self) -> ChangeNotifier:
        notifier = self._notifier
        assert notifier is not None  # every wait happens with one in place
        return notifier

    def _stand_by(self, standby: Standby, notifications: bool, took: Callable[[], object]
                  ) -> Generator[float, bool | None, bool]:
        """Take the name, now or (a standby) once its holder lets go (see
        :meth:`Standby.steps`), then call ``took()``; False when stopped first. Meanwhile the
        lock file's watch is :attr:`_notifier`: what stop() wakes and the waits wait on."""
        if standby.lock.try_acquire():
            took()
            return True
        # Watched before the next attempt: a release after it leaves a hint. (The watch only
        # reads events, it opens no file, so it may name the folder by path.)
        lock_watch = standby.watch(notifications)
        self._notifier, before = lock_watch, self._notifier
        try:
            if not (yield from standby.steps(self._stopped)):
                return False
            took()
            return True
        finally:
            self._notifier = before
            lock_watch.close()

    def _stand_by_blocking(self, standby: Standby, notifications: bool,
                           took: Callable[[], object]) -> bool:
        """:meth:`_stand_by` blocking on the watch."""
        steps = self._stand_by(standby, notifications, took)
        hinted: bool | None = None
        while not isinstance(wait := advance(steps, hinted), Finished):
            hinted = self._watching().wait(wait)
        return bool(wait.value)

    async def _stand_by_async(self, standby: Standby, notifications: bool,
                              took: Callable[[], object]) -> bool:
        """:meth:`_stand_by` in an event loop: retries are plain pauses."""
        steps = self._stand_by(standby, notifications, took)
        hinted: bool | None = None
        while not isinstance(wait := advance(steps, hinted), Finished):
            hinted = None
            if standby.retrying:
                await asyncio.sleep(wait)
            else:
                hinted = await self._watching().wait_async(wait)
        return bool(wait.value)


class Finished(NamedTuple):
    """What :func:`advance` returns when the steps ran to their end."""

    value: Any


def advance(steps: Generator[_Y, _S, Any], sent: _S) -> _Y | Finished:
    """The next thing a step generator yields, given what to send it (None first);
    :class:`Finished` with its return value once it ran to its end."""
    try:
        return steps.send(sent)
    except StopIteration as end:
        return Finished(end.value)


def take_name(lock: NameLock, kind: str, name: str, standby: bool) -> bool:
    """Take the name now (True); a standby may find it held (False: it waits for it later),
    anyone else gets ConsumerBusyError naming the holder."""
    if lock.try_acquire():
        return True
    if standby:
        return False
    holder = lock.holder()
    raise ConsumerBusyError(f"{kind} {name!r} is already running ({holder}); use standby to "
                            "wait for it", holder=holder, path=lock.path)


def watch(folder_path: str, filename: str, notifications: bool,
          poll_interval: float) -> ChangeNotifier:
    """A started change watch of ``filename`` in ``folder_path``. Started before the read it
    guards: whatever changes after that read leaves a hint."""
    notifier = ChangeNotifier(folder_path, filename, notifications=notifications,
                              poll_interval=poll_interval)
    notifier.start()
    return notifier


class Standby:
    """A standby's wait for its name, driven by the runner with its own kind of wait (see
    :meth:`Runner._stand_by`).

    Waits on a watch of ``<name>.lock`` (see :meth:`watch`): the holder's descriptor closing
    (on release, exit or death) is reported just before its flock goes, so the first attempt
    after the hint may still fail and a few more follow at ``retries`` delays. The poll
    interval bounds the wait when hints are lost or unavailable. Under systemd a standby is
    healthy, not starting: it reports READY=1 and a STATUS naming the holder, and keeps
    pinging the watchdog.
    """

    def __init__(self, runner: Runner, lock: NameLock, logger: logging.Logger,
                 poll_interval: float, *, retries: tuple[float, ...] = TAKEOVER_RETRIES,
                 catching_up: bool = True) -> None:
        self.lock = lock
        self.systemd = runner.systemd
        self.logger = logger
        self.kind = runner.kind
        self.name = runner.name
        self.poll_interval = poll_interval
        self.retrying = False
        """Whether the wait asked for last is a retry after a hint (not a poll)."""
        self._delays = retries
        self._catching_up = catching_up  # the takeover says so in a STATUS line and the log
        self._retries: list[float] = []
        self._shown: str | None = None

    def watch(self, notifications: bool) -> ChangeNotifier:
        """The started watch of the lock file (the hints the waits end on)."""
        return watch(self.lock.folder.path, self.lock.filename, notifications,
                     self.poll_interval)

    def steps(self, stopping: Callable[[], bool]) -> Generator[float, bool | None, bool]:
        """Try the name until it is ours (returns True) or ``stopping()`` (False), yielding
        the time to wait for a hint before the next try; send back whether one came."""
        while not stopping():
            wait = self._look()
            if wait is None:
                return True
            hinted = yield wait
            if hinted and not self.retrying:
                self._retries = list(self._delays)
        return False

    def _look(self) -> float | None:
        """One try: None when the name is ours now; else how long to wait before the next
        (a retry's delay, or the poll interval, cut to the next watchdog ping)."""
        lock, sd, kind = self.lock, self.systemd, self.kind
        if lock.try_acquire():
            if self._catching_up:
                sd.status(f"{kind} {self.name}: took the name over, catching up")
                self.logger.info(f"{kind} %s: took the name over (pid %d), catching up",
                                 self.name, os.getpid())
            else:
                self.logger.info(f"{kind} %s: took the name over (pid %d)", self.name,
                                 os.getpid())
            return None
        self.retrying = bool(self._retries)
        if self._retries:
            return self._retries.pop(0)
        holder = lock.holder()
        if holder != self._shown:
            sd.status(f"{kind} {self.name}: standing by, the name is held by {holder}")
            self.logger.info(f"{kind} %s: standing by, the name is held by %s", self.name,
                             holder)
            if self._shown is None:
                sd.ready()  # a waiting standby is up and healthy
            self._shown = holder
        sd.maybe_ping_watchdog()
        return sd.wait_at_most(self.poll_interval)


def start_offset(log: EventLog, start: Any) -> int:
    """Where the ``start`` option puts a consumer without a position: ``"earliest"`` (the
    first stored offset), ``"latest"`` (the head), an offset, or the first event appended
    at or after a time."""
    first = log.first_offset
    if isinstance(start, datetime):
        return max(first, log.offset_at(start))
    if start == "earliest":
        return first
    if start == "latest":
        return log.head
    offset: int = start  # an offset (the option was checked)
    return offset


def poll_wait(systemd: SystemdNotifier, poll_interval: float, due: float | None) -> float:
    """How long a caught-up runner may wait for news: ``poll_interval``, cut to the next
    watchdog ping and to ``due`` (monotonic: when progress not yet stored must be; None when
    everything is stored)."""
    timeout = systemd.wait_at_most(poll_interval)
    if due is not None:
        timeout = min(timeout, max(0.0, due - time.monotonic()))
    return timeout


def _sleep_steps(deadline: float, systemd: SystemdNotifier,
                 stopping: Callable[[], bool]) -> Iterator[float]:
    """The waits of a sleep until ``deadline`` (monotonic) or ``stopping()``, each as long as
    systemd's watchdog allows, pinged before each."""
    while not stopping():
        systemd.maybe_ping_watchdog()
        left = deadline - time.monotonic()
        if left <= 0:
            return
        yield systemd.wait_at_most(left)


def sleep_until(deadline: float, systemd: SystemdNotifier, stopping: Callable[[], bool],
                stop_event: threading.Event) -> None:
    """Wait until ``deadline`` (monotonic) or a stop (``stopping()``, ``stop_event`` set),
    pinging systemd's watchdog."""
    main = threading.current_thread() is threading.main_thread()
    for step in _sleep_steps(deadline, systemd, stopping):
        stop_event.wait(min(step, MAIN_THREAD_SLICE) if main else step)


async def sleep_until_async(deadline: float, systemd: SystemdNotifier,
                            stopping: Callable[[], bool],
                            notifier: ChangeNotifier | asyncio.Event | None) -> None:
    """:func:`sleep_until` without blocking the loop: on ``notifier``, which a stop wakes (a
    change watch: a hint, an append, just loops; or an event a stop sets); without one, in
    slices."""
    for step in _sleep_steps(deadline, systemd, stopping):
        if isinstance(notifier, asyncio.Event):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(notifier.wait(), step)
        elif notifier is not None:
            await notifier.wait_async(step)
        else:
            await asyncio.sleep(min(step, MAIN_THREAD_SLICE))


def arm_faulthandler(systemd: SystemdNotifier) -> Callable[[], None]:
    """Under systemd's watchdog: dump every thread's stack if it aborts us (SIGABRT); returns
    what disarms it.

    systemd sends SIGABRT (by default) to a service that stopped pinging, such as one whose
    handler hangs: the journal then shows where.
    """
    if systemd.watchdog_interval is None or faulthandler.is_enabled():
        return lambda: None
    try:
        faulthandler.enable(all_threads=True)
    except (AttributeError, ValueError, RuntimeError, OSError):
        return lambda: None  # no usable stderr
    return faulthandler.disable


def consumer_options(options: dict[str, Any]) -> dict[str, Any]:
    """:data:`~eventpipe._config.CONSUMER_OPTIONS` resolved over ``EVENTPIPE_*`` variables;
    ConfigError for on_error='dead_letter' without a dead_letter log."""
    opts = resolve(CONSUMER_OPTIONS, options)
    if opts["on_error"] == "dead_letter" and opts["dead_letter"] is None:
        raise ConfigError("on_error='dead_letter' needs the dead_letter option (a log path)",
                          option="dead_letter")
    return opts
