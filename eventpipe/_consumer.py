"""Consumers: independent processes that fold a log into a state, exactly once.

A consumer reads the log from its own position, calls ``handler(state, event, offset)`` for
each event, and persists the returned state together with the next offset in one atomic
checkpoint (see :mod:`eventpipe._checkpoint`). Killed at any instant and restarted, it resumes
from the last checkpoint and replays the events after it, so the state it ends in is exactly
that of an uninterrupted run, provided the handler is a pure function of (state, event,
offset). One process holds a consumer name at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import zlib
from collections.abc import Callable, Generator, Iterator
from itertools import count
from typing import Any, NamedTuple, NoReturn

import orjson

from ._changes import ChangeNotifier
from ._checkpoint import (
    Checkpoint,
    checkpoint_file,
    encode_state,
    load_checkpoint,
    remove_temp_files,
    save_checkpoint,
    storage_context,
)
from ._config import CONSUMER_OPTIONS
from ._deadletter import DeadLettering
from ._fsutil import make_dirs
from ._layout import CONSUMERS_DIR, Folder
from ._log import EventLog
from ._record import Record
from ._registry import register_external
from ._runner import (
    Finished,
    Runner,
    Standby,
    advance,
    arm_faulthandler,
    poll_wait,
    sleep_until,
    sleep_until_async,
    start_offset,
    watch,
)
from ._segment import LineChunk
from ._signals import stop_on_signals
from .errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConfigError,
    CorruptLogError,
    EventPipeError,
    HandlerError,
    OffsetOutOfRangeError,
    StateNotStorableError,
)

__all__ = ["CONSUMER_OPTIONS", "Consumer", "Handler", "TimedHandler", "checkpoint_at"]

Handler = Callable[[Any, Any, int], Any]
TimedHandler = Callable[[Any, Any, int, "int | None"], Any]
Hook = Callable[["Consumer"], None]

_loads = orjson.loads
# Events are handled in sub-batches, with the clock, checkpoint counters, watchdog and stop
# requests looked at between them (never per event: the hot loop stays C-level). A sub-batch
# aims to take _SLICE seconds whatever the handler's speed: its size (the stride) follows the
# measured time per event, from 1 (a slow handler: checks after every event) up to _MAX_STRIDE
# (a fast one: the checks cost nothing per event). It shrinks at once and at most doubles per
# sub-batch, so a handler that slows down is noticed within one sub-batch.
_SLICE = 0.01
_MAX_STRIDE = 2048
_FIRST_STRIDE = 16
# run_async() hands the loop back at least this often while it works through a backlog.
_ASYNC_SLICE = 0.005
# Retry delays double up to this (seconds), whatever retry_backoff and max_retries say.
_MAX_BACKOFF = 3600.0

log = logging.getLogger("eventpipe.consumer")  # a name users configure


class _Sleep(NamedTuple):
    """A step's request to wait until ``deadline`` (time.monotonic) unless stopped."""

    deadline: float


# What the step generators yield to the driver (run(), run_async(), catch_up()): None, a chance
# for others to run (run_async awaits the loop once); a float, a wait of at most that many
# seconds for a notification (the driver sends back whether one came); a _Sleep, a retry
# backoff that only a stop request ends early.
_Request = float | _Sleep | None
_Steps = Generator[_Request, bool | None, Any]


class Consumer(Runner, DeadLettering):
    """Follows a log from its own persisted position, folding events into a state.

    ``handler(state, event, offset)`` returns the new state, which must be JSON-serialisable;
    with ``pass_time=True`` it is called as ``handler(state, event, offset, time)``, ``time``
    being the event's append time (ns since the epoch, UTC; None for events written before
    eventpipe kept times). ``initial_state`` is the state before the first event.
    ``options`` are those of :data:`CONSUMER_OPTIONS`, layered over ``EVENTPIPE_*`` environment
    variables.
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
        handler: Handler | TimedHandler,
        initial_state: Any = None,
        *,
        on_caught_up: Hook | None = None,
        on_idle: Hook | None = None,
        **options: Any,
    ) -> None:
        self._configure(name, handler, options, on_caught_up, on_idle)
        self._open(log_or_path)
        try:
            self._dead_letters = self._open_dead_letters()
            self._setup(initial_state)
        except BaseException:
            self._close_parts()
            raise

    def _setup(self, initial_state: Any) -> None:
        opts = self.options
        self._pass_time: bool = opts["pass_time"]
        try:
            self._initial_json = encode_state(initial_state)  # as a checkpoint would store it
            initial = _loads(self._initial_json)  # a private copy
        except ValueError as exc:
            raise ConfigError(f"initial_state cannot be stored as JSON: {exc}",
                              option="initial_state") from None
        # Every checkpoint, lock and owner file is reached relative to this folder, open for
        # the consumer's life, never through a link (see _layout): <log>/consumers/ is shared.
        self._folder = self._open_folder(opts["checkpoint_dir"])
        self._setup_in(self._folder, self.name, initial)

    def _open_folder(self, checkpoint_dir: str | os.PathLike[str] | None) -> Folder:
        """The checkpoint folder: ``<log>/consumers`` (created if missing; a link there is
        refused), or ``checkpoint_dir``, the operator's choice (a link there is followed;
        links inside it are not)."""
        if checkpoint_dir is None or os.path.abspath(checkpoint_dir) == os.path.join(
                self.log.path, CONSUMERS_DIR):
            return self._consumers_folder()
        make_dirs(checkpoint_dir, self.log.config.dir_mode)
        folder = Folder.open(checkpoint_dir)
        self._on_close(folder.close)
        return folder

    def _in_log(self, folder: Folder) -> bool:
        """Whether ``folder`` is the log's own consumers folder (also when a checkpoint_dir
        names it by another path)."""
        if folder.path == os.path.join(self.log.path, CONSUMERS_DIR):
            return True
        inside = self.log.folder.lstat(CONSUMERS_DIR)  # a link there is not the folder
        here = folder.stat()
        return inside is not None and (inside.st_dev, inside.st_ino) == (here.st_dev,
                                                                         here.st_ino)

    def _setup_in(self, folder: Folder, name: str, initial: Any) -> None:
        opts = self.options
        self.checkpoint_file = checkpoint_file(name)
        self.checkpoint_path = folder.path_of(self.checkpoint_file)  # for messages
        if not self._in_log(folder):
            # Retention must know what this consumer still needs (see _registry).
            register_external(self.log.folder, name, self.checkpoint_path,
                              self.log.config.file_mode, self.log.config.dir_mode)
        self.state: Any = initial
        self.offset = 0
        self._last: tuple[int, int, bytes] | None = None  # (segment, position, line) consumed
        self._verify: Checkpoint | None = None  # checked against the log before first read
        self._next_position: tuple[int, int] | None = None
        self._since_checkpoint = 0
        self._checkpointed_offset = -1
        self._checkpoint_due = time.monotonic() + opts["checkpoint_interval"]
        # False while ``state`` may hold more (or less) than the events before ``offset``: while
        # the handler works on it, after it raised, during a rebuild. Nothing is checkpointed
        # then; the state is rewound to the last checkpoint instead (see _rewind).
        self._consistent = True
        self._stride = _FIRST_STRIDE
        self._yielded_at = 0.0
        self._notifier: ChangeNotifier | None = None
        # Dead letters: the (offset, dead-letter head) of a checkpoint written just before a
        # dead-letter append; the offset whose entry a restart found already written (skipped,
        # not handled again); and whether to look through the whole dead-letter log instead
        # (after resuming from an older checkpoint, which records no such marks).
        self._pending_dead_letter: tuple[int, int] | None = None
        self._skip_offset: int | None = None
        self._scan_all_dead_letters = False
        self._caught_up_once = False
        self._log_gone = False  # the log was removed or replaced under us (see _check_log)
        # A <name>.error an earlier run left (see _note_failure): the first checkpoint removes it.
        self._failure_noted = True
        self._seen_segment = -1  # the active segment when we last looked (see _help_seal)
        self.last_checkpoint_at: float | None = None
        self._name_lock, acquired = self._lock_name(folder, opts["standby"])
        if acquired:
            self._load()

    # ------------------------------------------------------------------- name and checkpoint

    def _await_name(self) -> _Steps:
        """Standby: wait until the name is ours (True, checkpoint loaded) or stop() (False).

        Waits on an inotify watch of ``<name>.lock``: the holder's descriptor closing (on
        release, exit or death) is reported just before its flock goes, so the first attempt
        after the hint may still fail and a few more follow within a few milliseconds. The poll
        interval bounds the wait when hints are lost or unavailable. Under systemd a standby is
        healthy, not starting: it reports READY=1 and a STATUS naming the holder, and keeps
        pinging the watchdog.
        """
        standby = Standby(self, self._name_lock, log, self.options["poll_interval"])
        return (yield from self._stand_by(standby, self.options["notifications"], self._load))

    def _read_checkpoint(self) -> Checkpoint | None:
        """The checkpoint to resume from: ours, or (when ours is damaged) the previous one.

        A checkpoint is replaced atomically, so a damaged one was damaged afterwards (a disk
        error, an edit). The previous checkpoint is an older pair of state and offset that
        belong together: resuming from it handles the events since again, which gives the same
        state. The damaged file is kept aside as ``<name>.json.corrupt`` for inspection.
        """
        folder, file, path = self._folder, self.checkpoint_file, self.checkpoint_path
        try:
            return load_checkpoint(folder, file, self.name)
        except CheckpointError as damaged:
            try:
                prev = load_checkpoint(folder, file + ".prev", self.name)
            except CheckpointError as also:
                raise CheckpointError(f"{damaged.message}, which is damaged too: {also.message}",
                                      path=path) from None
            if prev is None:
                raise
            log.warning("%s; resuming from the previous checkpoint %s.prev (offset %d): the "
                        "events after it are handled again; the damaged file is kept as "
                        "%s.corrupt", damaged, os.path.basename(path), prev.offset,
                        os.path.basename(path))
            with storage_context("set aside a damaged checkpoint"):
                folder.rename(file, file + ".corrupt")  # a link named .corrupt is replaced
                # Put the previous checkpoint back in place: rebuilds after a handler error
                # replay from this file.
                folder.write_atomic(file, prev.to_bytes(), self.log.config.file_mode)
            self._scan_all_dead_letters = True
            return prev

    def _load(self) -> None:
        # We hold the name: these were left by killed writes.
        remove_temp_files(self._folder, self.checkpoint_file)
        self._pending_dead_letter = self._skip_offset = None
        cp = self._read_checkpoint()
        if cp is None:
            cp = self._start()
            if cp is None:
                return
        if cp.version < 2:
            self._scan_all_dead_letters = True  # written before dead-letter marks existed
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
        self._consistent = False
        self.state = cp.state
        self.offset = cp.offset
        self._checkpointed_offset = cp.offset
        self.last_checkpoint_at = cp.updated_at
        if cp.offset > 0:
            self._verify = cp
            assert cp.segment is not None and cp.position is not None
            self._next_position = (cp.segment, cp.position)
        if cp.dead_letter_from is not None:
            self._pending_dead_letter = (cp.offset, cp.dead_letter_from)
            if self._dead_lettered(cp.offset):
                self._skip_offset = cp.offset  # killed after the append: the event is done
        self._consistent = True

    def _start(self) -> Checkpoint | None:
        """No checkpoint yet: begin where the ``start`` option says. A checkpoint of the
        initial state there is written now, before any event, so the start is fixed once: a
        consumer restarted before its first checkpoint would otherwise resolve "latest" again
        and pass over the events appended meanwhile. Offset 0 from "earliest" or 0 needs
        none (a restart finds the same start)."""
        start = self.options["start"]
        offset = start_offset(self.log, start)
        if offset == 0 and start != "latest":
            return None
        if start == "earliest":
            log.warning("consumer %r has no checkpoint and starts at the first stored offset "
                        "%d: retention removed the events before it", self.name, offset)
        cp = checkpoint_at(self.log, self.name, offset, _loads(self._initial_json))
        save_checkpoint(self._folder, self.checkpoint_file, cp, self.log.config.file_mode)
        return cp

    def _rewind(self) -> None:
        """Go back to the last checkpoint (or the initial state): what a restart would do.

        For a state that may hold part of an event: the handler raised a BaseException
        (KeyboardInterrupt, SystemExit) or a rebuild failed. The events after the checkpoint
        are handled again by the next catch_up() or run().
        """
        self._consistent = False
        self.state = _loads(self._initial_json)
        self.offset = 0
        self._last = None
        self._verify = None
        self._next_position = None
        self._since_checkpoint = 0
        self._checkpointed_offset = -1
        self._load()
        self._consistent = True

    def _rewind_quietly(self) -> None:
        # On the way out of an exception: that exception says what went wrong; a failed rewind
        # leaves the state marked inconsistent, and the next use rewinds (and raises) again.
        with contextlib.suppress(Exception):
            self._rewind()

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

    def _skip_dead_lettered(self, chunk: LineChunk) -> LineChunk:
        """Pass over the chunk's first event: dead-lettered by a run killed before its next
        checkpoint (what that run would have done next)."""
        self._skip_offset = None
        after = self._advance(chunk.segment_base, chunk.position, chunk.lines[:1], 1,
                              self.state)
        self.checkpoint()
        return LineChunk(chunk.segment_base, chunk.first_offset + 1, after, chunk.lines[1:])

    def checkpoint(self) -> None:
        """Persist state and offset now, atomically together (no-op if nothing changed).

        Does nothing while the state may hold part of an event (called from inside the
        handler, or after a handler was interrupted by KeyboardInterrupt or SystemExit: run()
        and catch_up() then go back to the last checkpoint), and without the name (a standby
        still waiting, or after close()).
        """
        if not self._name_lock.held or not self._consistent:
            return  # only the name's holder writes this file, and only whole events
        if self.offset == self._checkpointed_offset:
            return
        self._save()

    def _save(self, dead_letter_from: int | None = None) -> None:
        seg = pos = crc = None
        if self._last is not None:
            seg, pos, line = self._last
            crc = zlib.crc32(line)
        stamp = time.time()
        try:
            save_checkpoint(
                self._folder, self.checkpoint_file,
                Checkpoint(self.name, self.log.log_id, self.offset, self.state, seg, pos, crc,
                           stamp, dead_letter_from, dead_letter=None if self._dead_letters
                           is None else self._dead_letters.where),
                self.log.config.file_mode,
            )
        except StateNotStorableError as exc:
            self._unstorable(exc)
        self._pending_dead_letter = (
            None if dead_letter_from is None else (self.offset, dead_letter_from))
        self._checkpointed_offset = self.offset
        if self._failure_noted:  # it goes on: the note of an earlier stop is history
            self._failure_noted = False
            with contextlib.suppress(EventPipeError, OSError):
                self._folder.unlink(f"{self.name}.error")
        self._since_checkpoint = 0
        self._checkpoint_due = time.monotonic() + self.options["checkpoint_interval"]
        self.last_checkpoint_at = stamp

    def _unstorable(self, exc: StateNotStorableError) -> NoReturn:
        """Name the event after which the state stopped being storable; rewind; raise.

        The state is checked when checkpointed, not after every event (that would cost a full
        encode per event). Finding the event replays the (deterministic) handler from the last
        checkpoint: a bisection, with one encode per step. The state goes back to the last
        checkpoint, as a restart would; nothing is written.
        """
        cp = load_checkpoint(self._folder, self.checkpoint_file, self.name)
        start = cp.offset if cp is not None else 0
        end = self.offset
        reason = exc.message.removeprefix("consumer state cannot be stored as JSON: ")

        def storable_after(stop: int) -> bool:
            state = cp.state if cp is not None else _loads(self._initial_json)
            if cp is not None and stop > start:
                state = _loads(orjson.dumps(state))  # cp.state may be changed in place
            for record in self.log.read(start, stop):
                state = self._call(state, record)
            try:
                encode_state(state)
            except ValueError as why:
                nonlocal reason
                reason = str(why)
                return False
            return True

        offset: int | None = None
        self._consistent = False
        try:
            lo, hi = start, end  # storable after lo events (the checkpoint), not after hi
            if not storable_after(hi):
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (mid, hi) if storable_after(mid) else (lo, mid)
                offset = hi - 1
        except Exception:
            offset = None  # the handler failed while replaying: the range is all we know
        self._rewind()
        at = (f"after the event at offset {offset}" if offset is not None
              else f"after one of offsets {start}..{end - 1}")
        raise StateNotStorableError(
            f"consumer {self.name!r}: the state {at} cannot be stored as JSON ({reason}). A state "
            "may hold only dicts with string keys, lists, strings, integers within 64 bits, "
            f"finite floats, booleans and None; nothing was checkpointed after offset {start}",
            path=self.checkpoint_path, offset=offset) from None

    # ---------------------------------------------------------------------------- processing

    def _call(self, state: Any, record: Record) -> Any:
        """The handler on one record, outside the hot loop (replays, checks)."""
        if self._pass_time:
            return self.handler(state, record.event, record.offset, record.time)
        return self.handler(state, record.event, record.offset)

    @property
    def lag(self) -> int:
        """Events committed to the log and not yet handled by this consumer."""
        return max(0, self.log.head - self.offset)

    @property
    def lag_seconds(self) -> float | None:
        """How long ago the next unhandled event was appended (0.0 when none is waiting);
        None when its time is unknown (written before eventpipe kept times) or it is no
        longer stored."""
        return self.log.lag_seconds(self.offset)

    def _process(self, stop: int | None, yields: bool) -> _Steps:
        """Handle events from ``offset`` up to ``stop`` (the head now if None).

        Returns early when stop() is called. With ``yields``, yields None whenever
        _ASYNC_SLICE has passed since the last yield (run_async hands the loop back there).
        """
        if not self._consistent:
            self._rewind()
        if self._verify is not None and self.offset - 1 < self.log.first_offset:
            # Retention removed the segment holding the event this checkpoint was taken after
            # (it never removes what the consumer still needs): nothing left to compare.
            self._verify = None
            self._next_position = None
        if stop is None:
            stop = self._head_at_least_offset()
        first = self.offset - 1 if self._verify is not None else self.offset
        position = self._next_position
        try:
            for stored in self.log.chunks(first, stop, position=position):
                chunk = self._verify_against(stored) if self._verify is not None else stored
                if chunk.first_offset == self._skip_offset and chunk.lines:
                    chunk = self._skip_dead_lettered(chunk)
                if not (yield from self._consume_chunk(chunk, yields)):
                    break
        except OffsetOutOfRangeError:
            # The reader reads the header again: a head cut back between the look above
            # and that read says "beyond the head". Say what happened, whichever read saw it.
            self._head_at_least_offset()
            raise

    def _consume_chunk(self, chunk: LineChunk, yields: bool) -> _Steps:
        """Fold one chunk's events; returns False when stop() was called."""
        # One function on purpose: the hot loop of every consumer, with the per-sub-batch
        # bookkeeping around it; split into calls, it costs a few % of a fast catch-up.
        lines = chunk.lines
        n = len(lines)
        i = 0
        position = chunk.position
        handler = self.handler
        stop_flag = self._stop_flag
        every = self.options["checkpoint_every"]
        sd = self.systemd
        clock = time.monotonic
        started = clock()
        while i < n:
            k = min(n - i, self._stride, max(1, every - self._since_checkpoint))
            sub = lines[i : i + k] if (i or k < n) else lines
            first = chunk.first_offset + i
            state = self.state
            o = first - 1
            failed: Exception | None = None
            self._consistent = False  # the handler may change self.state in place
            try:
                # The hot loop: C-level zip/count/map feed the handler with nothing else per
                # event than the stop check (so a handler or signal can stop precisely).
                # Decoding each event just before its call keeps one decoded event alive at a
                # time (a list of a sub-batch's events costs ~8% of a fast catch-up).
                if self._pass_time:
                    times = self.log.time_index.times(chunk.segment_base, first, len(sub))
                    for o, event, t in zip(count(first), map(_loads, sub), times,
                                           strict=False):
                        state = handler(state, event, o, t)
                        if stop_flag[0]:
                            break
                else:
                    for o, event in zip(count(first), map(_loads, sub), strict=False):
                        state = handler(state, event, o)
                        if stop_flag[0]:
                            break
                done = o - first + 1
            except Exception as exc:
                # Where did it come from? Decoding line `o - first + 1` (the handler returned
                # for every event before it), or the handler, on line `o - first`. Decoding
                # raises from C code called by this very frame, with the error that line
                # gives; a Python handler's error has its frame below this one.
                done = o - first + 1
                if (isinstance(exc, orjson.JSONDecodeError) and _raised_here(exc)
                        and done < len(sub) and _decode_error(sub[done]) == str(exc)):
                    self._advance(chunk.segment_base, position, sub, done, state)
                    self._consistent = True
                    self.checkpoint()
                    raise CorruptLogError(
                        f"stored event is not valid JSON ({exc})",
                        path=self.log.segments_dir, offset=first + done) from None
                failed, done = exc, o - first  # the handler's own error, whatever its type
            # A BaseException (KeyboardInterrupt, SystemExit) leaves _consistent False: the
            # state may hold part of an event, and is never checkpointed (see _rewind).
            position = self._advance(chunk.segment_base, position, sub, done, state)
            i += done
            if failed is None:
                self._consistent = True
                now = clock()
                if done:
                    spent = (now - started) / done
                    self._stride = max(1, min(_MAX_STRIDE, 2 * self._stride,
                                              int(_SLICE / spent) if spent > 0 else _MAX_STRIDE))
            else:
                end = yield from self._handle_failure(chunk.segment_base, position, sub[done],
                                                      _loads(sub[done]), first + done, failed,
                                                      yields)
                if end is None:
                    return False  # stopped before the failing event (state rebuilt)
                position = end
                i += 1
                now = clock()
            if self._since_checkpoint >= every or now >= self._checkpoint_due:
                self.checkpoint()
            # A long backlog must not starve systemd's watchdog (a no-op outside systemd).
            sd.maybe_ping_watchdog(now)
            if stop_flag[0]:
                return False
            if yields and now - self._yielded_at >= _ASYNC_SLICE:
                yield None
                self._yielded_at = clock()
            started = clock()
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

    def _handle_failure(self, segment: int, position: int, line: bytes, event: Any,
                        offset: int, exc: Exception, yields: bool) -> _Steps:
        """Apply on_error to the event at ``offset``.

        Returns the position after the event, or None when stop() came during the retries: the
        consumer then stops before the event (state rebuilt to the event before, nothing
        dead-lettered). Between tries it yields _Sleep (a backoff only stop() cuts short).
        """
        opts = self.options
        retries = opts["max_retries"] if opts["on_error"] != "stop" else 0
        delay = min(opts["retry_backoff"], _MAX_BACKOFF)
        for _ in range(retries):
            if not self._stop_flag[0]:
                yield _Sleep(time.monotonic() + delay)
            if self._stop_flag[0]:
                self.state = yield from self._state_before(offset, yields)
                self._consistent = True
                return None
            delay = min(2 * delay, _MAX_BACKOFF)
            try:
                before = yield from self._state_before(offset, yields)
            except HandlerError:
                continue  # the rebuild failed (a downstream outage?): counts as a failed try
            try:
                state = (self.handler(before, event, offset, self.log.time_of(offset))
                         if self._pass_time else self.handler(before, event, offset))
            except Exception as again:
                exc = again
                continue
            end = self._advance(segment, position, [line], 1, state)
            self._consistent = True
            return end
        # The failed call may have changed the state it was given before raising: what is
        # checkpointed (and carried on from) must be the state after the event before. If the
        # rebuild itself fails, HandlerError says so and nothing is checkpointed.
        self.state = yield from self._state_before(offset, yields)
        self._consistent = True
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

    def _state_before(self, offset: int, yields: bool) -> _Steps:
        """The state after every event before ``offset``, rebuilt from the last checkpoint.

        A handler that raised may have changed its state argument in place; replaying the
        (deterministic) handler from the checkpoint gives back the state it was given. Costs
        at most the events since the last checkpoint, and only when a handler fails. Raises
        HandlerError naming the offset if the handler fails during the replay: a partial
        replay is never used. With ``yields``, hands the loop back as _process does.
        """
        cp = load_checkpoint(self._folder, self.checkpoint_file, self.name)
        state, start = (cp.state, cp.offset) if cp is not None else (
            _loads(self._initial_json), 0)
        call = self._call
        sd = self.systemd
        clock = time.monotonic
        for record in self.log.read(start, offset):
            try:
                state = call(state, record)
            except Exception as exc:
                raise HandlerError(
                    f"handler of consumer {self.name!r} raised {type(exc).__name__}: {exc} "
                    f"at offset {record.offset} while rebuilding the state after its failure "
                    f"at offset {offset} (replaying offsets {start}..{offset - 1} from the last "
                    "checkpoint); nothing was checkpointed from the replay",
                    offset=record.offset, event=record.event, path=self.log.path,
                ) from exc
            now = clock()  # a replay is rare and short: a clock read per event is fine here
            sd.maybe_ping_watchdog(now)
            if yields and now - self._yielded_at >= _ASYNC_SLICE:
                yield None
                self._yielded_at = clock()
        return state

    # ------------------------------------------------------------------------------ running

    def catch_up(self) -> Any:
        """Handle every event up to the head as of this call, checkpoint, return the state.

        Raises HandlerError (state checkpointed up to the event before the failing one),
        CheckpointMismatchError, ConsumerBusyError when standby is off and the name is held.
        With standby, waits for the name first (stop() ends the wait).
        """
        self._check_usable()
        self._drive(self._catch_up_steps())
        return self.state

    def _catch_up_steps(self) -> _Steps:
        if not self._name_lock.held and not (yield from self._await_name()):
            return
        try:
            yield from self._process(self.log.head, False)
        except BaseException:
            if not self._consistent:
                self._rewind_quietly()
            raise
        self.checkpoint()

    def stop(self) -> None:
        """Ask :meth:`run` to finish (from a handler, another thread or a signal handler).

        The consumer stops after the event it is handling, checkpoints, and run() returns.
        A stop during a retry backoff ends it: the consumer stops before the failing event.
        A standby waiting for the name stops waiting.
        """
        self._request_stop()

    @property
    def stopping(self) -> bool:
        return self._stop_flag[0]

    def _status(self) -> str:
        return f"consumer {self.name}: offset {self.offset}, lag {self.lag}"

    def run(self) -> Any:
        """Catch up, then follow new events until stop(), SIGTERM or SIGINT; returns the state.

        Always ends with a checkpoint (of a state that holds whole events only). Under systemd
        (``NOTIFY_SOCKET``) reports READY=1 after the first catch-up (a standby: while it
        waits, with a STATUS saying so), STATUS with offset and lag, WATCHDOG=1 at half
        ``WATCHDOG_USEC`` (also during long handler runs and retry backoffs), and STOPPING=1;
        with the watchdog on, a watchdog abort (SIGABRT) dumps every thread's stack to stderr.
        """
        self._check_usable()
        restore = stop_on_signals(self.stop)
        disarm = arm_faulthandler(self.systemd)
        try:
            self._drive(self._steps(False))
        finally:
            disarm()
            restore()
        return self.state

    async def run_async(self) -> Any:
        """:meth:`run` for asyncio: waits never block the loop; cancelling stops cleanly.

        Hands the loop back at least every few milliseconds while working through a backlog
        (and during retry backoffs and standby waits). Signals are left to the application
        (call :meth:`stop`).
        """
        self._check_usable()
        disarm = arm_faulthandler(self.systemd)
        steps = self._steps(True)
        try:
            with self._noting_failures(steps):
                result: bool | None = None
                while not isinstance(request := advance(steps, result), Finished):
                    result = None
                    if request is None:
                        await asyncio.sleep(0)
                        self._yielded_at = time.monotonic()
                    elif isinstance(request, _Sleep):
                        await sleep_until_async(request.deadline, self.systemd,
                                                self._stopped, self._notifier)
                    else:
                        result = await self._watching().wait_async(request)
        finally:
            disarm()
        return self.state

    def _drive(self, steps: _Steps) -> None:
        """Run step generators to their end in this thread, blocking for their waits."""
        with self._noting_failures(steps):
            result: bool | None = None
            while not isinstance(request := advance(steps, result), Finished):
                result = None
                if isinstance(request, _Sleep):
                    sleep_until(request.deadline, self.systemd, self._stopped,
                                self._stop_event)
                elif request is not None:
                    result = self._watching().wait(request)

    @contextlib.contextmanager
    def _noting_failures(self, steps: _Steps) -> Iterator[None]:
        """Around a drive of ``steps``: what stopped the consumer is noted (see
        :meth:`_note_failure`); the steps are closed whatever ends the drive (e.g.
        KeyboardInterrupt in a wait: their cleanup still runs)."""
        try:
            yield
        except (HandlerError, StateNotStorableError) as exc:
            self._note_failure(exc)
            raise
        finally:
            steps.close()

    def _note_failure(self, exc: HandlerError | StateNotStorableError) -> None:
        """Leave ``<name>.error`` beside the checkpoint: what stopped this consumer, for
        ``eventpipe status`` and ``consumers`` (a stopped consumer shows why). The next
        checkpoint removes it. Best effort: the exception itself is what the caller gets."""
        note = orjson.dumps({"time": time.time(), "pid": os.getpid(), "offset": exc.offset,
                             "error": str(exc)[:2000]})
        with contextlib.suppress(EventPipeError, OSError):
            self._folder.write_atomic(f"{self.name}.error", note, self.log.config.file_mode,
                                      durable=False)
            self._failure_noted = True

    def _steps(self, yields: bool) -> _Steps:
        """The run loop as a generator of requests (see _Request) for run() or run_async()."""
        # Long on purpose: the run's states (standby, catch-up, follow, idle, stop) in the
        # order they happen, so its cleanup (one finally) sees them all.
        sd = self.systemd
        if not self._name_lock.held and not (yield from self._await_name()):
            sd.stopping()
            return
        # Before the catch-up read, so nothing appended meanwhile is missed.
        notifier = watch(self.log.path, "head", self.options["notifications"],
                         self.options["poll_interval"])
        self._notifier = notifier
        self._yielded_at = time.monotonic()
        try:
            target = self.log.head
            if self.offset < target and not self._stop_flag[0]:
                yield from self._process(target, yields)
            self.checkpoint()
            self._help_seal()
            first, self._caught_up_once = not self._caught_up_once, True
            self._caught_up(first)
            idle_reported = False
            poll = self.options["poll_interval"]
            while not self._stop_flag[0]:
                sd.maybe_ping_watchdog()
                before = self.offset
                yield from self._process(None, yields)
                if self.offset != before:
                    idle_reported = False
                    self._help_seal()
                    continue
                # Idle: everything known is handled. Checkpoint once the interval since the
                # last one has passed, not at once: at a trickle of events an immediate
                # checkpoint would cost a few fsyncs per event and delay the next one.
                if self.offset != self._checkpointed_offset and (
                        time.monotonic() >= self._checkpoint_due):
                    self.checkpoint()
                if not idle_reported:
                    idle_reported = True
                    self._went_idle()
                    continue  # the hook may have appended or stopped: look again first
                self._check_log()
                yield poll_wait(sd, poll, self._checkpoint_due
                                if self.offset != self._checkpointed_offset else None)
                self._yielded_at = time.monotonic()
        finally:
            try:
                # Whatever ended the run: checkpoint a state of whole events, never one a
                # handler was interrupted in (that one is rewound to the last checkpoint).
                if self._log_gone:
                    pass  # nowhere to write: the folder went, or is another log's now
                elif self._consistent:
                    self.checkpoint()
                else:
                    self._rewind_quietly()
            finally:
                sd.stopping()
                self._notifier = None
                notifier.close()

    def _check_log(self) -> None:
        """Stop with an error if the log is not the one we follow any more.

        Called whenever everything known is handled (a stat or two and a header read): a
        header replaced by a copy of the same log is followed (EventLog.check_replaced); a
        removed log, another log in its place, or a head cut back behind what we handled
        would otherwise stall us silently or fold another log's events into this state.
        """
        try:
            self.log.check_replaced()
        except EventPipeError:
            self._log_gone = True
            raise

    def _head_at_least_offset(self) -> int:
        """The head now; raises if it is behind what we handled (the log was cut back)."""
        head = self.log.head
        if head < self.offset:
            self._log_gone = True
            raise CheckpointMismatchError(
                f"the log's head went back to {head}, behind offset {self.offset} that consumer "
                f"{self.name!r} handled: the log was cut back or restored from an older copy",
                path=self.log.path, offset=self.offset)
        return head

    def _help_seal(self) -> None:
        """When segments rolled since we last looked, ask for their sealing work (checksums,
        compression, retention) in this process too: it then gets done even where every
        writer is short-lived. One header read; the work runs in a background thread."""
        base = self.log.committed_header().segment_base
        if base != self._seen_segment:
            self._seen_segment = base
            self.log.seal_soon()

    # ------------------------------------------------------------------------------ closing

    @property
    def _error_path(self) -> str:
        return self.checkpoint_path

    def close(self) -> None:
        """Release the name and close what the consumer opened. Idempotent.

        Does not checkpoint: run() and catch_up() already did; call checkpoint() first if
        you handled events some other way.
        """
        super().close()

    def __repr__(self) -> str:
        return f"Consumer({self.log.path!r}, {self.name!r}, offset={self.offset})"


def checkpoint_at(log: EventLog, name: str, offset: int, state: Any) -> Checkpoint:
    """A checkpoint that puts consumer ``name`` at ``offset`` with ``state``: a new consumer's
    ``start``, ``eventpipe consumer reset``.

    It is the checkpoint the consumer would have written after handling the event at ``offset
    - 1``: that event's segment, byte position and CRC, read from the log now, so the consumer
    resumes at ``offset`` and checks the log as after any checkpoint. When retention removed
    that event (``offset`` is the first stored offset), there is nothing to compare, as for
    any checkpoint retention has passed: the fields (required past offset 0) hold the first
    stored segment, 0 and 0, and neither the consumer nor ``verify`` compares them. Raises
    OffsetOutOfRangeError for an offset beyond the head or before the first stored one.
    """
    head, first = log.head, log.first_offset
    if offset > head:
        raise OffsetOutOfRangeError(f"offset is beyond the head ({head})", path=log.path,
                                    offset=offset)
    if offset < first or offset < 0:
        raise OffsetOutOfRangeError(f"offset is before the first stored offset {first} "
                                    "(retention removed older events)", path=log.path,
                                    offset=offset)
    seg = pos = crc = None
    if offset > first:
        for chunk in log.chunks(offset - 1, offset):
            seg, pos, crc = chunk.segment_base, chunk.position, zlib.crc32(chunk.lines[0])
            break
    elif offset > 0:
        seg, pos, crc = first, 0, 0
    return Checkpoint(name, log.log_id, offset, state, seg, pos, crc, time.time())


def _raised_here(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by C code called from the frame that caught it (no Python
    frame below that one: not by a Python handler, nor anything it called)."""
    tb = exc.__traceback__
    return tb is not None and tb.tb_next is None


def _decode_error(line: bytes) -> str | None:
    """The message decoding ``line`` fails with, or None if it decodes."""
    try:
        _loads(line)
    except orjson.JSONDecodeError as exc:
        return str(exc)
    return None
