"""The stream consumer: a consumer that folds a stream the bridge wrote instead of a local log.

Same handler, same checkpoint, same on_error policies as :class:`eventpipe.Consumer`, on a host
that has no copy of the log's files: exactly-once state holds because the state and the
position (the next log offset) are checkpointed together, atomically, in a local folder, by
eventpipe's own checkpoint code. Positions are log offsets; the stream sequences they map to
are worked out on each start (see :mod:`._source`), and every message is checked to be exactly
the next offset of the same log.

What a stream checkpoint records besides state and offset: ``log_id`` is the source log's (from
the message headers), so a checkpoint of another log is refused as Consumer refuses one;
``segment`` is the stream sequence of the last event handled, ``position`` 0, and
``fingerprint`` the CRC-32 of its stored line: on resume that message is read back from the
stream and compared (a stream rewritten underneath the consumer is refused).
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from .._checkpoint import (
    Checkpoint,
    checkpoint_file,
    encode_state,
    load_checkpoint,
    remove_temp_files,
    save_checkpoint,
)
from .._config import CONSUMER_OPTIONS, LogConfig, resolve
from .._deadletter import DeadLettering
from .._fsutil import make_dirs
from .._layout import Folder
from .._runner import Standby, consumer_options
from ..errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConfigError,
    HandlerError,
    StateNotStorableError,
)
from ._source import Entry, StreamReader, StreamSource, check_reader
from ._wire import ForeignMessageError

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

__all__ = ["StreamConsumer"]

log = logging.getLogger("eventpipe.consumer")  # the same logger as a local consumer's

# Options of Consumer that have no meaning here: a stream consumer starts at the stream's
# first message and is woken by the server, not by the filesystem.
_NOT_HERE = ("start", "notifications")
_MAX_BACKOFF = 3600.0  # retry delays double up to this (as Consumer's)
# Events handled since the last checkpoint are kept (their stored lines) so a failing handler's
# state can be rebuilt by replaying them; past this many bytes a checkpoint is taken sooner.
_REPLAY_BYTES = 8 << 20
_TAKEOVER_RETRIES = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1)

Hook = Callable[["StreamConsumer"], None]


class _StreamAsLog:
    """What a dead-letter log needs of the consumed log: a name for its entries and the
    source log's id (known from the checkpoint or the first message)."""

    def __init__(self, stream: str) -> None:
        self.path = f"nats-stream:{stream}"
        self.log_id = ""


def _resolve(options: dict[str, Any]) -> dict[str, Any]:
    """Consumer's options, checked, for a stream consumer (see StreamConsumer)."""
    for key in _NOT_HERE:
        if key in options:
            raise ConfigError(f"option {key!r} does not apply to a stream consumer (it "
                              "starts at the stream's first message)", option=key)
    opts = resolve(CONSUMER_OPTIONS, options)
    if opts["checkpoint_dir"] is None:
        raise ConfigError("a stream consumer needs checkpoint_dir (a local folder for its "
                          "checkpoint)", option="checkpoint_dir")
    return consumer_options(opts)


class StreamConsumer(StreamReader, DeadLettering):
    """Folds the events of a JetStream stream written by :class:`~eventpipe.jetstream.Bridge`
    into a state, exactly once, like :class:`eventpipe.Consumer` folds a local log.

    ``servers``: NATS URLs; ``stream``: the stream's name; ``name``: the consumer's name (one
    process holds it, through ``<checkpoint_dir>/<name>.lock``; another raises
    ConsumerBusyError unless ``standby``). ``handler(state, event, offset)`` (with
    ``pass_time=True``: ``handler(state, event, offset, time)``, the time from the message's
    ``Eventpipe-Time``) returns the new state. ``options`` are Consumer's
    (:data:`eventpipe.CONSUMER_OPTIONS`, also from ``EVENTPIPE_*``): ``checkpoint_dir`` is
    required; ``dead_letter`` is a local log path; ``poll_interval`` is how long one fetch
    waits for new messages; ``start`` and ``notifications`` do not apply (a consumer without a
    checkpoint starts at the stream's first message).

    Construction takes the name and loads the checkpoint (CheckpointError for a damaged one,
    as Consumer). The stream is first read by :meth:`run`, :meth:`run_async` or
    :meth:`catch_up`, which raise :class:`~eventpipe.jetstream.ServerUnavailableError`,
    :class:`~eventpipe.jetstream.StreamNotFoundError`, CheckpointMismatchError (a checkpoint
    of another log, or ahead of the stream), :class:`~eventpipe.jetstream.StreamGapError` and
    :class:`~eventpipe.jetstream.StreamMismatchError` (a stream that does not continue:
    nothing is applied past what is sound), HandlerError as Consumer does.
    """

    _logger = log

    def __init__(
        self,
        servers: list[str] | str,
        stream: str,
        name: str,
        handler: Callable[..., Any],
        initial_state: Any = None,
        *,
        on_caught_up: Hook | None = None,
        on_idle: Hook | None = None,
        batch: int = 256,
        connect_timeout: float = 2.0,
        api_timeout: float = 5.0,
        **options: Any,
    ) -> None:
        opts = _resolve(options)
        self.servers = check_reader(servers, stream, batch)
        self.stream = stream
        self._configure(name, handler, opts, on_caught_up, on_idle)
        self.batch = batch
        self.connect_timeout = connect_timeout
        self.api_timeout = api_timeout
        self._pass_time: bool = opts["pass_time"]
        try:
            self._initial_json = encode_state(initial_state)
        except ValueError as exc:
            raise ConfigError(f"initial_state cannot be stored as JSON: {exc}",
                              option="initial_state") from None
        self.stopped_by: int | None = None
        """The signal that stopped :meth:`run` (SIGTERM or SIGINT), if one did."""
        self._open(None)
        try:
            self._open_files(stream, opts["checkpoint_dir"])
            self._init_position()
            # The stream stands in for the consumed log: it has the path and log_id fields.
            self._dead_letters = self._open_dead_letters(self._source_log)
            self._lock, ours = self._lock_name(self._folder, opts["standby"], self._mode)
            if ours:
                self._load()
        except BaseException:
            self._close_parts()
            raise

    def _open_files(self, stream: str, checkpoint_dir: str) -> None:
        """The checkpoint folder (created if missing), open until :meth:`close`."""
        config = LogConfig.from_options({})
        self._mode = config.file_mode
        make_dirs(checkpoint_dir, config.dir_mode)
        self._folder = Folder.open(checkpoint_dir)
        self._on_close(self._folder.close)
        self._file = checkpoint_file(self.name)
        self.checkpoint_path = self._folder.path_of(self._file)
        self._source_log = _StreamAsLog(stream)
        self._dead_letters = None

    def _init_position(self) -> None:
        self.state: Any = orjson.loads(self._initial_json)
        self.offset: int | None = None  # the next offset to handle (None: the stream's first)
        self.log_id: str | None = None  # the source log's id (None: not known yet)
        self._last: tuple[int, int] | None = None  # (sequence, crc) of the last event handled
        self._verify_crc: int | None = None  # the checkpoint's fingerprint, checked on start
        self._checkpointed: int | None = None
        self._since_checkpoint = 0
        self._checkpoint_due = time.monotonic() + self.options["checkpoint_interval"]
        self._replay: list[Entry] = []  # handled since the last checkpoint
        self._replay_bytes = 0
        self._consistent = True
        self._pending_dead_letter: tuple[int, int] | None = None
        self._skip_offset: int | None = None
        self._scan_all_dead_letters = False
        self._caught_up_once = False
        self.lag: int | None = None
        """Messages in the stream after the last one fetched (None: not known yet)."""

    # ------------------------------------------------------------------------- checkpoints

    def _read_checkpoint(self) -> Checkpoint | None:
        """Ours, or (when ours is damaged) the previous one, as Consumer does."""
        try:
            return load_checkpoint(self._folder, self._file, self.name)
        except CheckpointError as damaged:
            prev = load_checkpoint(self._folder, self._file + ".prev", self.name)
            if prev is None:
                raise
            log.warning("%s; resuming from the previous checkpoint (offset %d): the events "
                        "after it are handled again", damaged, prev.offset)
            self._folder.rename(self._file, self._file + ".corrupt")
            self._folder.write_atomic(self._file, prev.to_bytes(), self._mode)
            self._scan_all_dead_letters = True
            return prev

    def _load(self) -> None:
        """Start from the checkpoint (we hold the name)."""
        remove_temp_files(self._folder, self._file)
        self._init_position()
        cp = self._read_checkpoint()
        if cp is None:
            return
        self.state, self.offset, self.log_id = cp.state, cp.offset, cp.log_id
        self._source_log.log_id = cp.log_id
        self._checkpointed = cp.offset
        if cp.offset > 0 and cp.segment is not None and cp.fingerprint is not None:
            self._last = (cp.segment, cp.fingerprint)
            self._verify_crc = cp.fingerprint
        if cp.version < 2:
            self._scan_all_dead_letters = True
        if cp.dead_letter_from is not None:
            self._pending_dead_letter = (cp.offset, cp.dead_letter_from)
            if self._dead_lettered(cp.offset):
                self._skip_offset = cp.offset  # killed after the append: the event is done

    def checkpoint(self) -> None:
        """Persist state and offset now, atomically together (no-op if nothing changed, or
        while the state may hold part of an event)."""
        if (not self._lock.held or not self._consistent or self.offset is None
                or self.offset == self._checkpointed):
            return
        self._save()

    def _save(self, dead_letter_from: int | None = None) -> None:
        assert self.offset is not None and self.log_id is not None
        seq, crc = self._last if self._last is not None else (None, None)
        where = self._dead_letters.where if self._dead_letters is not None else None
        cp = Checkpoint(self.name, self.log_id, self.offset, self.state, seq,
                        None if seq is None else 0, crc, time.time(), dead_letter_from,
                        dead_letter=where)
        try:
            save_checkpoint(self._folder, self._file, cp, self._mode)
        except StateNotStorableError as exc:
            before = self._checkpointed
            self._load()  # back to the last checkpoint, as a restart would
            raise StateNotStorableError(
                f"consumer {self.name!r}: {exc.message}; nothing was checkpointed after "
                f"offset {before}", path=self.checkpoint_path) from None
        self._pending_dead_letter = (
            None if dead_letter_from is None else (self.offset, dead_letter_from))
        self._checkpointed = self.offset
        self._since_checkpoint = 0
        self._replay.clear()
        self._replay_bytes = 0
        self._checkpoint_due = time.monotonic() + self.options["checkpoint_interval"]

    # ---------------------------------------------------------------------------- folding

    def _call(self, state: Any, event: Any, entry: Entry) -> Any:
        if self._pass_time:
            return self.handler(state, event, entry.offset, entry.time_ns)
        return self.handler(state, event, entry.offset)

    def _advance(self, entry: Entry, state: Any, *, replay: bool = True) -> None:
        self.state = state
        self.offset = entry.offset + 1
        self._last = (entry.seq, zlib.crc32(entry.data))
        self._since_checkpoint += 1
        if replay:
            self._replay.append(entry)
            self._replay_bytes += len(entry.data)
        self._consistent = True

    async def _fold(self, entries: list[Entry]) -> None:
        """Handle fetched events in order until stop().

        A small duplicate of Consumer's fold loop rather than a share of it: Consumer's hot
        loop reads chunks of a local log (segment positions, C-level batches, sub-batch
        strides) and its failure path replays from the log's files; here events come one
        message at a time from the network and a failure replays what was kept since the
        last checkpoint. The rules are the same: the handler's state is never checkpointed
        while it may hold part of an event, and a failed event is retried, dead-lettered
        (exactly once) or stops the consumer with the state of the events before it.
        """
        every = self.options["checkpoint_every"]
        sd = self.systemd
        for entry in entries:
            if self._stop_flag[0]:
                return
            if entry.offset == self._skip_offset:
                self._skip_offset = None
                self._advance(entry, self.state, replay=False)
                self.checkpoint()
                continue
            try:
                event = orjson.loads(entry.data)
            except orjson.JSONDecodeError as exc:
                self.checkpoint()
                raise ForeignMessageError(
                    f"stream {self.stream}: the message at sequence {entry.seq} (offset "
                    f"{entry.offset}) is not a JSON event ({exc})", stream=self.stream,
                    offset=entry.offset) from None
            self._consistent = False  # the handler may change self.state in place
            try:
                state = self._call(self.state, event, entry)
            except Exception as exc:
                if not await self._handle_failure(entry, event, exc):
                    return  # stopped during the retries, before the event
            else:
                self._advance(entry, state)
            now = time.monotonic()
            if (self._since_checkpoint >= every or now >= self._checkpoint_due
                    or self._replay_bytes >= _REPLAY_BYTES):
                self.checkpoint()
            sd.maybe_ping_watchdog(now)

    async def _handle_failure(self, entry: Entry, event: Any, exc: Exception) -> bool:
        """Apply on_error to a failed event (as Consumer does): True once it is handled or
        dead-lettered, False when stop() came during the retries (the state is then that
        before the event)."""
        opts = self.options
        retries = opts["max_retries"] if opts["on_error"] != "stop" else 0
        delay = min(opts["retry_backoff"], _MAX_BACKOFF)
        for _ in range(retries):
            if not self._stop_flag[0]:
                await self._sleep(delay)
            if self._stop_flag[0]:
                self.state = self._state_before(entry.offset)
                self._consistent = True
                return False
            delay = min(2 * delay, _MAX_BACKOFF)
            try:
                before = self._state_before(entry.offset)
            except HandlerError:
                continue  # the rebuild failed: counts as a failed try
            try:
                state = self._call(before, event, entry)
            except Exception as again:
                exc = again
                continue
            self._advance(entry, state)
            return True
        self.state = self._state_before(entry.offset)
        self._consistent = True
        if opts["on_error"] == "dead_letter":
            self._dead_letter(entry.offset, event, exc)
            self._advance(entry, self.state, replay=False)
            self.checkpoint()  # keeps the dead-letter entry from being written twice
            return True
        self.checkpoint()
        raise HandlerError(
            f"handler of consumer {self.name!r} raised {type(exc).__name__}: {exc}",
            offset=entry.offset, event=event, path=self.checkpoint_path) from exc

    def _state_before(self, offset: int) -> Any:
        """The state after every event before ``offset``: the last checkpoint's, with the
        events kept since replayed (HandlerError if the handler fails during the replay)."""
        cp = load_checkpoint(self._folder, self._file, self.name)
        state = cp.state if cp is not None else orjson.loads(self._initial_json)
        start = cp.offset if cp is not None else -1
        for kept in self._replay:
            if kept.offset < start:
                continue
            if kept.offset >= offset:
                break
            try:
                state = self._call(state, orjson.loads(kept.data), kept)
            except Exception as exc:
                raise HandlerError(
                    f"handler of consumer {self.name!r} raised {type(exc).__name__}: {exc} "
                    f"at offset {kept.offset} while rebuilding the state after its failure "
                    f"at offset {offset}; nothing was checkpointed from the replay",
                    offset=kept.offset, event=None, path=self.checkpoint_path) from exc
        return state

    # ---------------------------------------------------------------------------- running

    def run(self) -> Any:
        """Catch up, then follow the stream until stop(), SIGTERM or SIGINT (which one is
        kept in :attr:`stopped_by`); returns the state. Ends with a checkpoint. Under systemd:
        READY=1 after the first catch-up, STATUS, WATCHDOG=1, STOPPING=1."""
        self._run_blocking(follow=True)
        return self.state

    async def run_async(self) -> Any:
        """:meth:`run` in an event loop (signals are the application's: call :meth:`stop`)."""
        self._check_usable()
        await self._run(follow=True)
        return self.state

    def catch_up(self) -> Any:
        """Handle every message the stream holds as of this call, checkpoint, return the
        state (stop() and SIGTERM/SIGINT end it early, after a checkpoint)."""
        self._run_blocking(follow=False)
        return self.state

    async def _begin(self) -> bool:
        """The name (standby: once its holder lets go; False if stopped first), and a state
        of whole events."""
        if not self._lock.held and not await self._await_name():
            return False
        if not self._consistent:
            self._load()  # an earlier run was interrupted inside the handler
        return True

    def _end(self) -> None:
        if self._consistent:
            self.checkpoint()

    def _where(self) -> tuple[str, str]:
        return f"consumer {self.name}", f"consumer {self.name}"

    def _position(self) -> str:
        return f"offset {self.offset}"

    def _source(self, js: JetStreamContext, what: str) -> StreamSource:
        return StreamSource(js, self.stream, self.log_id, batch=self.batch, what=what,
                            foreign=self._foreign if self.log_id is not None else None)

    def _foreign(self, log_id: str, seq: int) -> Exception:
        return CheckpointMismatchError(
            f"checkpoint belongs to another log (log id {self.log_id}, stream {self.stream} "
            f"holds log {log_id} at sequence {seq}): the stream was replaced, or this "
            "checkpoint folder is another stream's", path=self.checkpoint_path,
            offset=self.offset)

    async def _start(self, source: StreamSource) -> int:
        """Position the source at our offset, check the event the checkpoint was taken after,
        and return the stream's last sequence (what catching up means)."""
        prev = await source.locate(self.offset)
        if self._verify_crc is not None and prev is not None and (
                zlib.crc32(prev) != self._verify_crc):
            raise CheckpointMismatchError(
                f"the event at offset {(self.offset or 0) - 1} in stream {self.stream} differs "
                "from the one this checkpoint was taken after: the stream was rewritten",
                path=self.checkpoint_path, offset=(self.offset or 0) - 1)
        self._verify_crc = None
        if self.offset is None and source.next_offset:
            log.warning("consumer %r has no checkpoint and starts at the stream's first "
                        "message, offset %d: the stream no longer holds the events before it",
                        self.name, source.next_offset)
        return await source.last_seq()

    async def _read(self, source: StreamSource, follow: bool) -> None:
        """Fetch and fold until stopped (or, without ``follow``, caught up); failures that
        may mend are retried from where the consumer is."""
        sd = self.systemd
        wait = self.options["poll_interval"]
        target: int | None = None
        self._read_again()
        idle_reported = False
        while not self._stop_flag[0]:
            try:
                if target is None:
                    target = await self._start(source)
                    if self.log_id is None:
                        self.log_id = source.log_id
                        self._source_log.log_id = source.log_id or ""
                entries = await self._fetch(source, wait if follow else min(wait, 0.5))
                if entries is None:
                    break  # stopped
                end = target
                if not entries and source.next_seq <= target:
                    end = await source.last_seq()  # the stream may have lost its tail
                if entries and self.log_id is None:
                    self.log_id = source.log_id
                    self._source_log.log_id = source.log_id or ""
            except Exception as exc:
                await self._retry_after(exc, source)
                continue
            self._read_again()
            if entries:
                self.lag = entries[-1].pending
                idle_reported = False
                await self._fold(entries)
            caught_up = source.next_seq > min(target, end)
            if caught_up and not self._caught_up_once:
                self._caught_up_once = True
                self.checkpoint()
                if not follow:
                    return
                sd.ready()
                if self.on_caught_up is not None:
                    self.on_caught_up(self)
            elif caught_up and not follow:
                return
            if not entries:
                self.lag = 0 if caught_up else self.lag
                if time.monotonic() >= self._checkpoint_due:
                    self.checkpoint()
                if not idle_reported:
                    idle_reported = True
                    self._went_idle()
            sd.maybe_ping_watchdog()

    async def _await_name(self) -> bool:
        """Standby: wait for the name (True, checkpoint loaded) or stop() (False)."""
        standby = Standby(self, self._lock, log, self.options["poll_interval"],
                          retries=_TAKEOVER_RETRIES, catching_up=False)
        return await self._stand_by_async(standby, True, self._load)

    def _status(self) -> str:
        return (f"consumer {self.name} <- stream {self.stream}: offset {self.offset}, "
                f"lag {self.lag}")

    @property
    def _error_path(self) -> str:
        return self.checkpoint_path

    def __repr__(self) -> str:
        return f"StreamConsumer({self.stream!r}, {self.name!r}, offset={self.offset})"

