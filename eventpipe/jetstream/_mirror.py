"""The mirror: a local eventpipe log kept identical to a stream the bridge wrote (same events,
same offsets, same append times), so a host without the source's files runs its local
consumers, reads and tools on files.

The mirror's own head is the truth about how far it got: on every start it reads the stream
from the offset equal to its head, and each message must be exactly the next offset of the
source log it follows. Messages are appended with the source's append times
(``EventLog.append_lines(..., time_ns=)``), consecutive messages of one time as one batch, so
a mirror killed at any instant (an append is atomic) and started again continues exactly.

Which source log the mirror follows is recorded as the checkpoint of a consumer named
``mirror`` in the mirror's ``consumers/`` folder (state ``{"source_log_id", "stream"}``,
written before the first append and after each fetched group of batches): ``eventpipe
status`` shows it. A log that holds events but no such record is not a mirror and is refused,
as is a mirror of another log, one with more events than the stream, or one whose last event
differs from the stream's: nothing is appended then.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from typing import TYPE_CHECKING, Any

from .._checkpoint import checkpoint_file, load_checkpoint, save_checkpoint
from .._consumer import checkpoint_at
from .._namelock import NameLock
from ..errors import CheckpointMismatchError, ConfigError, ConsumerBusyError
from ._source import (
    Entry,
    MirrorMismatchError,
    StreamReader,
    StreamSource,
    check_reader,
    connect,
    retryable,
)
from ._wire import StreamNotFoundError

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

__all__ = ["MIRROR_NAME", "Mirror", "check_stream"]

log = logging.getLogger("eventpipe.mirror")

MIRROR_NAME = "mirror"
"""The consumer name whose checkpoint records what a mirror log follows."""


def _checked(servers: list[str] | str, stream: str, batch: int, *intervals: float) -> list[str]:
    """The servers as a list; ConfigError for no server, a bad stream name, batch, timeout or
    interval."""
    listed = check_reader(servers, stream, batch)
    for value in intervals:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"timeouts and intervals must be positive, not {value!r}")
    return listed


def check_stream(servers: list[str] | str, stream: str, *, batch: int = 1024,
                 poll_interval: float = 1.0, connect_timeout: float = 2.0,
                 api_timeout: float = 5.0) -> None:
    """What to ask before creating a mirror log that does not exist yet, so that a failure
    leaves nothing behind: the options (ConfigError, as :class:`Mirror` checks them), a
    server (:class:`~eventpipe.jetstream.ServerUnavailableError`) and the stream
    (:class:`~eventpipe.jetstream.StreamNotFoundError`). Any other failure (a timeout, the
    server restarting) is left to the mirror's run, which retries it."""
    listed = _checked(servers, stream, batch, poll_interval, connect_timeout, api_timeout)
    asyncio.run(_check_stream(listed, stream, connect_timeout, api_timeout))


async def _check_stream(servers: list[str], stream: str, connect_timeout: float,
                        api_timeout: float) -> None:
    from nats.js.errors import NotFoundError

    nc = await connect(servers, f"mirror of stream {stream}", connect_timeout)
    try:
        await nc.jetstream(timeout=api_timeout).stream_info(stream)
    except NotFoundError:
        raise StreamNotFoundError(f"stream {stream} does not exist", stream=stream) from None
    except Exception as exc:
        if not retryable(exc):
            raise
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), api_timeout)


class Mirror(StreamReader):
    """Keeps the log at ``path`` (created if missing) identical to stream ``stream``.

    ``servers`` are NATS URLs. ``log_options`` are the mirror log's (segment size,
    compression, sync...: its own, not the source's). One mirror process per log (the
    consumer name ``mirror``; a second raises ConsumerBusyError); no other process may
    append to a mirror log.

    :meth:`run` follows the stream until :meth:`stop`, SIGTERM or SIGINT; :meth:`catch_up`
    copies what the stream holds as of the call. Both raise
    :class:`~eventpipe.jetstream.MirrorMismatchError` for a log that does not continue the
    stream (not a mirror, a mirror of another log, ahead of the stream, a last event that
    differs), :class:`~eventpipe.jetstream.StreamGapError` when the stream no longer holds
    the mirror's next offset (or has a gap), and the other typed errors of
    :mod:`eventpipe.jetstream` as a stream consumer does; nothing is appended past what is
    sound.
    """

    kind = "mirror"
    _logger = log

    def __init__(self, path: str | os.PathLike[str], servers: list[str] | str, stream: str, *,
                 batch: int = 1024, poll_interval: float = 1.0, connect_timeout: float = 2.0,
                 api_timeout: float = 5.0, **log_options: Any) -> None:
        self.servers = _checked(servers, stream, batch, poll_interval, connect_timeout,
                                api_timeout)
        self.stream = stream
        self.batch = batch
        self.poll_interval = poll_interval
        self.connect_timeout = connect_timeout
        self.api_timeout = api_timeout
        self.stopped_by: int | None = None
        """The signal that stopped :meth:`run` (SIGTERM or SIGINT), if one did."""
        self.appended = 0
        """Events this process appended."""
        self._open(path, **log_options)
        try:
            self._folder = self._consumers_folder()
            self._file = checkpoint_file(MIRROR_NAME)
            self._lock = NameLock(self._folder, MIRROR_NAME, self.log.config.file_mode)
            self._on_close(self._lock.release)
            if not self._lock.try_acquire():
                holder = self._lock.holder()
                raise ConsumerBusyError(f"a mirror of {self.log.path} is already running "
                                        f"({holder})", holder=holder, path=self._lock.path)
            self.source_log_id: str | None = self._recorded_source()
            """The id of the log the mirror follows (None: nothing mirrored yet)."""
        except BaseException:
            self._close_parts()
            raise

    def _recorded_source(self) -> str | None:
        """The source log id the mirror's record names; MirrorMismatchError for a log that
        holds events without a record (not a mirror)."""
        cp = load_checkpoint(self._folder, self._file, MIRROR_NAME)
        state = cp.state if cp is not None else None
        source = state.get("source_log_id") if isinstance(state, dict) else None
        if isinstance(source, str) and source:
            return source
        head = self.log.head
        if head > 0:
            raise MirrorMismatchError(
                f"{self.log.path} holds a log of {head} events that is not a mirror (no "
                f"record of a mirrored log in consumers/{self._file}): mirror into an empty "
                "folder", stream=self.stream, path=self.log.path)
        return None

    @property
    def head(self) -> int:
        """The mirror log's head: the next offset it appends."""
        return self.log.head

    # ----------------------------------------------------------------------------- running

    def run(self) -> None:
        """Copy the stream and follow it until stop(), SIGTERM or SIGINT."""
        self._run_blocking(follow=True)

    async def run_async(self) -> None:
        """:meth:`run` in an event loop (signals are the application's: call :meth:`stop`)."""
        self._check_usable()
        await self._run(follow=True)

    def catch_up(self) -> int:
        """Copy what the stream holds as of this call; returns the mirror's head."""
        self._run_blocking(follow=False)
        return self.log.head

    def _where(self) -> tuple[str, str]:
        return f"mirror {self.log.path}", f"the mirror at {self.log.path}"

    def _position(self) -> str:
        return f"head {self.log.head}"

    def _source(self, js: JetStreamContext, what: str) -> StreamSource:
        return StreamSource(js, self.stream, self.source_log_id, batch=self.batch, what=what,
                            foreign=self._foreign)

    def _foreign(self, log_id: str, seq: int) -> Exception:
        return MirrorMismatchError(
            f"the mirror at {self.log.path} follows log {self.source_log_id}, but stream "
            f"{self.stream} holds log {log_id} (sequence {seq}): another log's stream",
            stream=self.stream, path=self.log.path)

    async def _start(self, source: StreamSource) -> int:
        """Position the source at our head, check our last event against the stream's, and
        return the stream's last sequence."""
        head = self.log.head
        try:
            prev = await source.locate(head)
        except CheckpointMismatchError as exc:
            raise MirrorMismatchError(f"{exc.message}: the mirror is ahead of the stream",
                                      stream=self.stream, path=self.log.path) from None
        if prev is not None and head - 1 >= self.log.first_offset:  # (retention may cut it)
            ours = next(iter(self.log.chunks(head - 1, head))).lines[0]
            if ours != prev:
                raise MirrorMismatchError(
                    f"the mirror's event at offset {head - 1} differs from the stream's: "
                    "the mirror log was written by something else", stream=self.stream,
                    path=self.log.path, offset=head - 1)
        return await source.last_seq()

    async def _read(self, source: StreamSource, follow: bool) -> None:
        sd = self.systemd
        target: int | None = None
        self._read_again()
        ready = False
        while not self._stop_flag[0]:
            try:
                if target is None:
                    target = await self._start(source)
                entries = await self._fetch(source, self.poll_interval if follow
                                            else min(self.poll_interval, 0.5))
                end = target
                if entries is not None and not entries and source.next_seq <= target:
                    end = await source.last_seq()  # the stream may have lost its tail
            except Exception as exc:
                await self._retry_after(exc, source)
                continue
            if entries is None:
                return  # stopped
            self._read_again()
            if entries:
                self._append(entries, source.log_id)
            caught_up = source.next_seq > min(target, end)
            if caught_up and not follow:
                return
            if caught_up and not ready:
                ready = True
                sd.ready()
            if not entries:
                sd.status(f"mirror {self.log.path} <- stream {self.stream}: head "
                          f"{self.log.head}")
            sd.maybe_ping_watchdog()

    def _append(self, entries: list[Entry], log_id: str | None) -> None:
        """Append fetched messages, a batch per append time, then record where we are."""
        assert log_id is not None
        if self.source_log_id is None:
            self.source_log_id = log_id
            self._record()  # before the first append: a log with events is then a mirror
        expected = self.log.head
        if entries[0].offset != expected:
            raise MirrorMismatchError(
                f"the mirror's head is {expected} but the stream's next message is offset "
                f"{entries[0].offset}: another process appended to the mirror log",
                stream=self.stream, path=self.log.path, offset=expected)
        for time_ns, group in itertools.groupby(entries, key=lambda e: e.time_ns):
            batch = list(group)
            got = self.log.append_lines(b"".join(e.data + b"\n" for e in batch), len(batch),
                                        time_ns=time_ns)
            if got.start != expected:
                raise MirrorMismatchError(
                    f"events {batch[0].offset}..{batch[-1].offset} of the stream were "
                    f"appended at offset {got.start}: another process appends to the mirror "
                    "log", stream=self.stream, path=self.log.path, offset=got.start)
            expected = got.stop
            self.appended += len(batch)
        self._record()

    def _record(self) -> None:
        """The ``mirror`` checkpoint at our head: which log and stream we follow."""
        state = {"source_log_id": self.source_log_id, "stream": self.stream}
        save_checkpoint(self._folder, self._file,
                        checkpoint_at(self.log, MIRROR_NAME, self.log.head, state),
                        self.log.config.file_mode)

    @property
    def _described(self) -> str:
        return f"mirror of {self.log.path}"

    def __repr__(self) -> str:
        return f"Mirror({self.log.path!r}, stream={self.stream!r}, head={self.head})"
