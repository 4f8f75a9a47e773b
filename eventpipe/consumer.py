"""Consumers: independent processes that fold a log into a state, exactly once.

A consumer reads the log from its own position, calls ``handler(state, event, offset)`` for
each event, and persists the returned state together with the next offset in one atomic
checkpoint (see :mod:`eventpipe.checkpoint`). Killed at any instant and restarted, it resumes
from the last checkpoint and replays the events after it, so the state it ends in is exactly
that of an uninterrupted run, provided the handler is a pure function of (state, event,
offset). One process holds a consumer name at a time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import traceback
import zlib
from collections.abc import Callable
from itertools import count
from types import FrameType
from typing import Any, Self

import orjson

from ._fsutil import make_dirs
from ._namelock import NameLock
from .checkpoint import (
    Checkpoint,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
    validate_name,
)
from .config import CONSUMER_OPTIONS, resolve
from .errors import (
    CheckpointMismatchError,
    ConfigError,
    ConsumerBusyError,
    CorruptLogError,
    HandlerError,
    LogClosedError,
)
from .log import EventLog
from .notify import ChangeNotifier
from .sdnotify import SystemdNotifier
from .segment import LineChunk

__all__ = ["CONSUMER_OPTIONS", "Consumer", "Handler"]

Handler = Callable[[Any, Any, int], Any]
Hook = Callable[["Consumer"], None]

_loads = orjson.loads
# Events handled between checks of the clock and checkpoint counters: large enough that the
# checks cost nothing per event, small enough that a time-based checkpoint is never late.
_SUB_BATCH = 2048
CONSUMERS_DIR = "consumers"


class Consumer:
    """Follows a log from its own persisted position, folding events into a state.

    ``handler(state, event, offset)`` returns the new state, which must be JSON-serialisable.
    ``initial_state`` is the state before the first event. ``options`` are those of
    :data:`CONSUMER_OPTIONS`, layered over ``EVENTPIPE_*`` environment variables.
    ``on_caught_up`` runs once the first catch-up is done, ``on_idle`` each time everything
    known has been handled.

    Construction takes the consumer name (raises ConsumerBusyError naming the holder, unless
    ``standby``) and loads and checks the checkpoint (raises CheckpointError for a corrupt one,
    CheckpointMismatchError for one that does not match the log; the file is left untouched).
    """

    def __init__(
        self,
        log_or_path: EventLog | str | os.PathLike[str],
        name: str,
        handler: Handler,
        initial_state: Any = None,
        *,
        on_caught_up: Hook | None = None,
        on_idle: Hook | None = None,
        **options: Any,
    ) -> None:
        self.options = resolve(CONSUMER_OPTIONS, options)
        opts = self.options
        if opts["on_error"] == "dead_letter" and opts["dead_letter"] is None:
            raise ConfigError("on_error='dead_letter' needs the dead_letter option (a log path)",
                              option="dead_letter")
        validate_name(name)
        self._owns_log = not isinstance(log_or_path, EventLog)
        self.log = EventLog(log_or_path) if not isinstance(log_or_path, EventLog) \
            else log_or_path
        try:
            self._setup(name, handler, initial_state, on_caught_up, on_idle)
        except BaseException:
            if self._owns_log:
                self.log.close()
            raise

    def _setup(self, name: str, handler: Handler, initial_state: Any,
               on_caught_up: Hook | None, on_idle: Hook | None) -> None:
        opts = self.options
        self.name = name
        self.handler = handler
        self.on_caught_up = on_caught_up
        self.on_idle = on_idle
        try:
            self._initial_json = orjson.dumps(initial_state)  # checks it encodes
            initial = _loads(self._initial_json)  # a private copy
        except orjson.JSONEncodeError as exc:
            raise ConfigError(f"initial_state is not JSON-serialisable: {exc}",
                              option="initial_state") from None
        folder = os.fspath(opts["checkpoint_dir"] or os.path.join(self.log.path, CONSUMERS_DIR))
        make_dirs(folder, self.log.config.dir_mode)
        self.checkpoint_path = checkpoint_path(folder, name)
        self._name_lock = NameLock(folder, name, self.log.config.file_mode)
        self.state: Any = initial
        self.offset = 0
        self._last: tuple[int, int, bytes] | None = None  # (segment, position, line) consumed
        self._verify: Checkpoint | None = None  # checked against the log before first read
        self._next_position: tuple[int, int] | None = None
        self._since_checkpoint = 0
        self._checkpointed_offset = -1
        self._checkpoint_due = time.monotonic() + opts["checkpoint_interval"]
        self._stop_flag = [False]
        self._stop_event = threading.Event()
        self._notifier: ChangeNotifier | None = None
        self._dead_letter_log: EventLog | None = None
        self._caught_up_once = False
        self.last_checkpoint_at: float | None = None
        self.systemd = SystemdNotifier()
        self._closed = False
        if not self._name_lock.try_acquire():
            if not opts["standby"]:
                self.systemd.close()
                raise ConsumerBusyError(
                    f"consumer {name!r} is already running ({self._name_lock.holder()}); "
                    "use standby to wait for it",
                    holder=self._name_lock.holder(), path=self._name_lock.path,
                )
        else:
            try:
                self._load()
            except BaseException:
                self._name_lock.release()
                self.systemd.close()
                raise

    # ------------------------------------------------------------------- name and checkpoint

    def _wait_for_name(self) -> bool:
        """Standby: wait until the name is free (True) or stop() was called (False)."""
        while not self._name_lock.held:
            if self._name_lock.try_acquire():
                self._load()
                return True
            if self._stop_event.wait(min(0.2, self.options["poll_interval"])):
                return False
        return True

    def _load(self) -> None:
        cp = load_checkpoint(self.checkpoint_path)
        if cp is None:
            return
        h = self.log.head
        where = self.checkpoint_path
        if cp.log_id != self.log.log_id:
            raise CheckpointMismatchError(
                f"checkpoint belongs to another log (log id {cp.log_id}, this log is "
                f"{self.log.log_id}): the log was replaced", path=where, offset=cp.offset)
        if cp.offset > h:
            raise CheckpointMismatchError(
                f"checkpoint is ahead of the log (offset {cp.offset}, head {h}): the log was "
                "cut back or restored from an older copy", path=where, offset=cp.offset)
        self.state = cp.state
        self.offset = cp.offset
        self._checkpointed_offset = cp.offset
        self.last_checkpoint_at = cp.updated_at
        if cp.offset > 0:
            self._verify = cp
            assert cp.segment is not None and cp.position is not None
            self._next_position = (cp.segment, cp.position)

    def _verify_against(self, chunk: LineChunk) -> LineChunk:
        """Check the checkpoint's last event against the log; drop it from the chunk."""
        cp = self._verify
        assert cp is not None
        line = chunk.lines[0]
        if zlib.crc32(line) != cp.fingerprint:
            raise CheckpointMismatchError(
                f"the event at offset {cp.offset - 1} differs from the one this checkpoint "
                "was taken after: the log was replaced or rewritten",
                path=self.checkpoint_path, offset=cp.offset - 1)
        self._verify = None
        self._last = (chunk.segment_base, chunk.position, line)
        after = chunk.position + len(line) + 1
        self._next_position = (chunk.segment_base, after)
        return LineChunk(chunk.segment_base, chunk.first_offset + 1, after, chunk.lines[1:])

    def checkpoint(self) -> None:
        """Persist state and offset now, atomically together (no-op if nothing changed)."""
        if self.offset == self._checkpointed_offset:
            return
        seg = pos = crc = None
        if self._last is not None:
            seg, pos, line = self._last
            crc = zlib.crc32(line)
        stamp = time.time()
        save_checkpoint(
            self.checkpoint_path,
            Checkpoint(self.name, self.log.log_id, self.offset, self.state, seg, pos, crc, stamp),
            self.log.config.file_mode,
        )
        self._checkpointed_offset = self.offset
        self._since_checkpoint = 0
        self._checkpoint_due = time.monotonic() + self.options["checkpoint_interval"]
        self.last_checkpoint_at = stamp

    # ---------------------------------------------------------------------------- processing

    @property
    def lag(self) -> int:
        """Events committed to the log and not yet handled by this consumer."""
        return max(0, self.log.head - self.offset)

    def _process(self, stop: int | None, budget: int | None = None) -> int:
        """Handle events from ``offset`` up to ``stop`` (the head now if None); returns count.

        Returns early after ``budget`` events or when stop() is called.
        """
        start_offset = self.offset
        if self._verify is not None and self.offset - 1 < self.log.first_offset:
            # Retention removed the segment holding the event this checkpoint was taken after
            # (it never removes what the consumer still needs): nothing left to compare.
            self._verify = None
            self._next_position = None
        first = self.offset - 1 if self._verify is not None else self.offset
        position = self._next_position
        for stored in self.log.chunks(first, stop, position=position):
            chunk = self._verify_against(stored) if self._verify is not None else stored
            if not self._consume_chunk(chunk):
                break
            if budget is not None and self.offset - start_offset >= budget:
                break
        return self.offset - start_offset

    def _consume_chunk(self, chunk: LineChunk) -> bool:
        """Fold one chunk's events; False when stop() was called."""
        lines = chunk.lines
        n = len(lines)
        i = 0
        position = chunk.position
        handler = self.handler
        stop_flag = self._stop_flag
        every = self.options["checkpoint_every"]
        while i < n:
            k = min(n - i, _SUB_BATCH, max(1, every - self._since_checkpoint))
            sub = lines[i : i + k] if (i or k < n) else lines
            first = chunk.first_offset + i
            state = self.state
            o = first - 1
            failed: BaseException | None = None
            try:
                # The hot loop: C-level zip/count/map feed the handler with nothing else
                # per event than the stop check (so a handler or signal can stop precisely).
                for o, event in zip(count(first), map(_loads, sub), strict=False):
                    state = handler(state, event, o)
                    if stop_flag[0]:
                        break
                done = o - first + 1
            except orjson.JSONDecodeError as exc:
                bad = o - first + 1
                try:
                    _loads(sub[bad])
                except orjson.JSONDecodeError:
                    self._advance(chunk.segment_base, position, sub, bad, state)
                    self.checkpoint()
                    raise CorruptLogError(
                        f"stored event is not valid JSON ({exc})",
                        path=self.log.segments_dir, offset=first + bad) from None
                failed, done = exc, o - first  # the handler raised a JSONDecodeError itself
            except Exception as exc:
                failed, done = exc, o - first
            position = self._advance(chunk.segment_base, position, sub, done, state)
            i += done
            if failed is not None:
                position = self._handle_failure(chunk.segment_base, position, lines[i],
                                                first + done, failed)
                i += 1
            if self._since_checkpoint >= every or time.monotonic() >= self._checkpoint_due:
                self.checkpoint()
            # A long backlog must not starve systemd's watchdog (a no-op outside systemd).
            self.systemd.maybe_ping_watchdog()
            if stop_flag[0]:
                return False
        return True

    def _advance(self, segment: int, position: int, sub: list[bytes], done: int,
                 state: Any) -> int:
        """Record that the first ``done`` lines of ``sub`` (from ``position``) are handled."""
        if done <= 0:
            return position
        last_start = position + sum(map(len, sub[: done - 1])) + done - 1
        self._last = (segment, last_start, sub[done - 1])
        end = last_start + len(sub[done - 1]) + 1
        self.state = state
        self.offset += done
        self._since_checkpoint += done
        self._next_position = (segment, end)
        return end

    def _handle_failure(self, segment: int, position: int, line: bytes, offset: int,
                        exc: BaseException) -> int:
        """Apply on_error to the event at ``offset``; returns the position after it."""
        opts = self.options
        event = _loads(line)
        retries = opts["max_retries"] if opts["on_error"] != "stop" else 0
        delay = opts["retry_backoff"]
        for _ in range(retries):
            if self._stop_event.wait(delay):
                break
            delay *= 2
            try:
                state = self.handler(self._state_before(offset), event, offset)
            except Exception as again:
                exc = again
                continue
            return self._advance(segment, position, [line], 1, state)
        # The failed call may have changed the state it was given before raising: what is
        # checkpointed (and carried on from) must be the state after the event before.
        self.state = self._state_before(offset)
        if opts["on_error"] == "dead_letter":
            self._dead_letter(offset, event, exc)
            end = self._advance(segment, position, [line], 1, self.state)
            self.checkpoint()  # keeps the dead-letter entry from being written twice
            return end
        self.checkpoint()
        raise HandlerError(
            f"handler of consumer {self.name!r} raised {type(exc).__name__}: {exc}",
            offset=offset, event=event, path=self.log.path,
        ) from exc

    def _state_before(self, offset: int) -> Any:
        """The state after every event before ``offset``, rebuilt from the last checkpoint.

        A handler that raised may have changed its state argument in place; replaying the
        (deterministic) handler from the checkpoint gives back the state it was given. Costs
        at most the events since the last checkpoint, and only when a handler fails.
        """
        cp = load_checkpoint(self.checkpoint_path)
        state, start = (cp.state, cp.offset) if cp is not None else (
            _loads(self._initial_json), 0)
        for record in self.log.read(start, offset):
            state = self.handler(state, record.event, record.offset)
        return state

    def _dead_letter(self, offset: int, event: Any, exc: BaseException) -> None:
        if self._dead_letter_log is None:
            self._dead_letter_log = EventLog(self.options["dead_letter"])
        dlq = self._dead_letter_log
        # A crash between this append and the checkpoint after it replays the event; find
        # the entry already written instead of writing a second one.
        for record in dlq.read(max(0, dlq.head - 100)):
            e = record.event
            if (isinstance(e, dict) and e.get("consumer") == self.name
                    and e.get("offset") == offset and e.get("log_id") == self.log.log_id):
                return
        dlq.append({
            "consumer": self.name,
            "log": self.log.path,
            "log_id": self.log.log_id,
            "offset": offset,
            "event": event,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": "".join(traceback.format_exception(exc)),
            "at": time.time(),
        })

    # ------------------------------------------------------------------------------ running

    def catch_up(self) -> Any:
        """Handle every event up to the head as of this call, checkpoint, return the state.

        Raises HandlerError (state checkpointed up to the event before the failing one),
        CheckpointMismatchError, ConsumerBusyError when standby is off and the name is held.
        """
        self._check_usable()
        if not self._name_lock.held and not self._wait_for_name():
            return self.state
        self._process(self.log.head)
        self.checkpoint()
        return self.state

    def stop(self) -> None:
        """Ask :meth:`run` to finish (from a handler, another thread or a signal handler).

        The consumer stops after the event it is handling, checkpoints, and run() returns.
        """
        self._stop_flag[0] = True
        self._stop_event.set()
        notifier = self._notifier
        if notifier is not None:
            notifier.wake()

    @property
    def stopping(self) -> bool:
        return self._stop_flag[0]

    def _status(self) -> str:
        return f"consumer {self.name}: offset {self.offset}, lag {self.lag}"

    def run(self) -> Any:
        """Catch up, then follow new events until stop(), SIGTERM or SIGINT; returns the state.

        Always ends with a checkpoint. Under systemd (``NOTIFY_SOCKET``) reports READY=1 after
        the first catch-up, STATUS with offset and lag, WATCHDOG=1 at half ``WATCHDOG_USEC``,
        and STOPPING=1.
        """
        self._check_usable()
        restore = self._install_signal_handlers()
        try:
            for waited in self._steps():
                if waited is not None:
                    self._notifier_wait(waited)
        finally:
            restore()
        return self.state

    async def run_async(self) -> Any:
        """:meth:`run` for asyncio: waits never block the loop; cancelling stops cleanly.

        Catch-up yields to the loop between batches of events. Signals are left to the
        application (call :meth:`stop`).
        """
        self._check_usable()
        notifier_steps = self._steps(budget=_SUB_BATCH)
        try:
            for waited in notifier_steps:
                if waited is None:
                    await asyncio.sleep(0)
                else:
                    assert self._notifier is not None
                    await self._notifier.wait_async(waited)
        finally:
            notifier_steps.close()
        return self.state

    def _notifier_wait(self, timeout: float) -> None:
        assert self._notifier is not None
        self._notifier.wait(timeout)

    def _steps(self, budget: int | None = None) -> Any:
        """The run loop as a generator: yields None to let others run, or a timeout to wait.

        Shared by run() (which blocks on the notifier) and run_async() (which awaits it).
        """
        sd = self.systemd
        if not self._name_lock.held:
            sd.status(f"consumer {self.name}: standby, waiting for {self._name_lock.holder()}")
            while not self._name_lock.held:
                if self._stop_flag[0]:
                    return
                if self._name_lock.try_acquire():
                    self._load()
                    break
                yield min(0.2, self.options["poll_interval"])
        notifier = ChangeNotifier(self.log.path, "head",
                                  use_watchdog=self.options["notifications"])
        notifier.start()  # before the catch-up read, so nothing appended meanwhile is missed
        self._notifier = notifier
        try:
            target = self.log.head
            while self.offset < target and not self._stop_flag[0]:
                if self._process(target, budget) == 0:
                    break
                if budget is not None:
                    yield None
            self.checkpoint()
            if not self._caught_up_once:
                self._caught_up_once = True
                if self.on_caught_up is not None:
                    self.on_caught_up(self)
            sd.ready()
            sd.status(self._status())
            idle_reported = False
            poll = self.options["poll_interval"]
            watchdog = sd.watchdog_interval
            while not self._stop_flag[0]:
                sd.maybe_ping_watchdog()
                if self._process(None, budget):
                    idle_reported = False
                    if budget is not None:
                        yield None
                    continue
                # Idle: everything known is handled. Checkpoint once the interval since the
                # last one has passed, not at once: at a trickle of events an immediate
                # checkpoint would cost a few fsyncs per event and delay the next one.
                if self.offset != self._checkpointed_offset and (
                        time.monotonic() >= self._checkpoint_due):
                    self.checkpoint()
                if not idle_reported:
                    idle_reported = True
                    sd.status(self._status())
                    if self.on_idle is not None:
                        self.on_idle(self)
                    continue  # the hook may have appended or stopped: look again first
                timeout = poll if watchdog is None else min(poll, watchdog)
                if self.offset != self._checkpointed_offset:
                    timeout = min(timeout, max(0.0, self._checkpoint_due - time.monotonic()))
                yield timeout
        finally:
            try:
                self.checkpoint()
            finally:
                sd.stopping()
                self._notifier = None
                notifier.close()

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous: dict[int, Any] = {}

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    # ------------------------------------------------------------------------------ closing

    def _check_usable(self) -> None:
        if self._closed:
            raise LogClosedError(f"consumer {self.name!r} is closed", path=self.checkpoint_path)

    def close(self) -> None:
        """Release the name and close what the consumer opened. Idempotent.

        Does not checkpoint: run() and catch_up() already did; call checkpoint() first if
        you handled events some other way.
        """
        if self._closed:
            return
        self._closed = True
        self._name_lock.release()
        self.systemd.close()
        if self._dead_letter_log is not None:
            self._dead_letter_log.close()
        if self._owns_log:
            self.log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Consumer({self.log.path!r}, {self.name!r}, offset={self.offset})"
