"""Reading a stream the bridge wrote, as a log: what the stream consumer and the mirror share.

:class:`StreamSource` maps log offsets to stream sequences and hands out the stream's messages
as :class:`Entry` tuples in offset order, each checked to be exactly the next offset expected,
of the one log the reader follows. Positions are the reader's own (a checkpoint, a mirror's
head), never a server-side consumer's: each read goes through an ephemeral pull consumer
(acks off, in memory, one replica) created at the next sequence wanted and created again
after any failure, so what the server delivered but the reader never saw is simply fetched
again.

Offset -> sequence: the bridge stores one message per offset, in order, so the sequence of
offset ``o`` is ``first_seq + (o - first_offset)``, ``first_offset`` being what the stream's
first message carries. The message found there is read back to check the mapping. A message
that is not the next offset is looked up by the sequence expected: if that one is the offset
expected, a delivery was lost (the consumer is created again from there); otherwise the
stream has a gap, an overlap or a foreign message, and that is a typed error, never skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from .._runner import Runner, sleep_until_async
from ..errors import CheckpointMismatchError, ConfigError, EventPipeError
from ._wire import (
    ServerUnavailableError,
    StreamGapError,
    StreamMismatchError,
    StreamNotFoundError,
    parse_headers,
)

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js.client import JetStreamContext

__all__ = ["Entry", "MirrorMismatchError", "StreamReader", "StreamSource", "check_reader",
           "check_target", "connect", "describe", "retryable"]

log = logging.getLogger("eventpipe.jetstream")

_CONNECT_ATTEMPTS = 2  # per server, before the first connection counts as failed
_INACTIVE_THRESHOLD = 30.0  # seconds: the server drops a reader's consumer left behind
_RECONNECT_BACKOFF = (0.1, 5.0)  # first and longest pause before reading again after a failure


class MirrorMismatchError(StreamMismatchError):
    """A mirror log that does not continue the stream: it holds events of another log (it is
    not a mirror, or mirrors another stream), or more events than the stream."""


class Entry(NamedTuple):
    """One event read from the stream."""

    seq: int  # the stream sequence
    offset: int  # the offset in the source log
    time_ns: int | None  # its append time there (None when the log did not know it)
    data: bytes  # the stored JSON line, without its newline
    pending: int  # messages after this one in the stream when it was delivered


def check_target(servers: list[str] | str, stream: str) -> list[str]:
    """The servers as a list; ConfigError for no server or a bad stream name (the bridge's
    and the readers' check)."""
    listed = [servers] if isinstance(servers, str) else list(servers)
    if not listed or not all(isinstance(s, str) and s for s in listed):
        raise ConfigError("servers: give at least one NATS URL", option="servers")
    if not stream or any(c in stream for c in " \t.*>/\\"):
        raise ConfigError(f"stream name {stream!r} is invalid (no spaces, '.', '*', '>' or "
                          "slashes)", option="stream")
    return listed


def check_reader(servers: list[str] | str, stream: str, batch: int) -> list[str]:
    """A reader's servers as a list; ConfigError for no server, a bad stream name or batch."""
    listed = check_target(servers, stream)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch must be a positive integer, not {batch!r}", option="batch")
    return listed


def describe(exc: BaseException) -> str:
    """A NATS failure in words (the server's description for a refusal)."""
    from nats.js.errors import APIError

    if isinstance(exc, APIError) and exc.description is not None:
        return f"server refused: {exc.description} (code {exc.code}, err_code {exc.err_code})"
    if isinstance(exc, APIError):
        return f"{type(exc).__name__} (the server gave no reason: restarting or away?)"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def retryable(exc: BaseException) -> bool:
    """Whether a failure may mend by itself (the server away or restarting, no leader, a
    timeout, the reader's consumer lost): the reader then backs off and reads again from
    where it is. eventpipe's typed errors and anything else are not."""
    import nats.errors

    if isinstance(exc, EventPipeError):  # a StorageError is an OSError too: not the server's
        return False
    return isinstance(exc, nats.errors.Error | TimeoutError | ConnectionError | OSError)


async def connect(servers: list[str], who: str, timeout: float, *,
                  client_name: str | None = None, logger: logging.Logger = log) -> Client:
    """A connection to the first reachable of ``servers``; once connected the client
    reconnects for good. Raises :class:`ServerUnavailableError` (none reachable, or a
    refused login) after a couple of attempts each. ``who`` starts the warnings (to
    ``logger``) of failures meanwhile; the server knows the client as ``client_name``
    (default ``eventpipe <who>``)."""
    import nats
    from nats.errors import AuthorizationError, NoServersError

    seen: list[BaseException] = []

    async def on_error(exc: Exception) -> None:
        seen.append(exc)
        logger.warning("%s: NATS: %s", who, describe(exc))

    async def quiet(*_: Any) -> None:
        return None

    try:
        nc = await nats.connect(
            servers=servers, name=client_name or f"eventpipe {who}", connect_timeout=timeout,
            reconnect_time_wait=0.5, max_reconnect_attempts=_CONNECT_ATTEMPTS,
            allow_reconnect=True, error_cb=on_error, disconnected_cb=quiet,
            reconnected_cb=quiet, closed_cb=quiet)
    except (NoServersError, AuthorizationError, OSError, TimeoutError) as exc:
        cause = seen[-1] if seen else exc
        auth = any(isinstance(e, AuthorizationError)
                   or "authorization violation" in str(e).lower() for e in (*seen, exc))
        why = "authorization failed" if auth else "no server reachable"
        raise ServerUnavailableError(
            f"cannot connect to NATS at {', '.join(servers)}: {why} ({describe(cause)})",
            reason=describe(cause)) from None
    # Connected: from now on reconnect for good (the first connection gave up above, so a
    # wrong URL fails fast instead of retrying forever); nats-py reads this per attempt.
    nc.options["max_reconnect_attempts"] = -1
    return nc


class StreamSource:
    """Reads stream ``stream`` as log ``log_id`` (None: whichever log its messages are of,
    fixed by the first one seen) from a given offset; see the module for how.

    Call :meth:`locate` first, then :meth:`fetch` repeatedly; :meth:`reset` after a failure
    (the next fetch reads again from the next offset); :meth:`close` at the end.
    """

    def __init__(self, js: JetStreamContext, stream: str, log_id: str | None, *,
                 batch: int = 256, what: str = "the reader",
                 foreign: Callable[[str, int], Exception] | None = None) -> None:
        self.js = js
        self.stream = stream
        self.log_id = log_id
        self.batch = batch
        self.what = what  # for messages: "consumer x", "the mirror"
        # The error for messages of another log than ``log_id`` (given that log's id and the
        # sequence): StreamMismatchError unless the caller says otherwise.
        self._foreign = foreign
        self.next_offset: int | None = None  # None: whatever the stream's first message is
        self.next_seq = 1
        self._sub: Any = None
        self._consumer: str | None = None

    # ----------------------------------------------------------------------------- locating

    async def locate(self, offset: int | None) -> bytes | None:
        """Position the reader at ``offset`` (None: the stream's first message).

        Returns the stored line of the event before ``offset`` when the stream still holds
        it (so the caller can check it against what it handled), else None. Raises
        :class:`StreamNotFoundError`, :class:`StreamMismatchError` (another log's stream),
        :class:`StreamGapError` (the stream no longer holds ``offset``: retention removed it)
        and CheckpointMismatchError (``offset`` is beyond what the stream holds).
        """
        from nats.js.errors import NotFoundError

        for _ in range(5):  # the first message may go (retention) between the two reads
            try:
                info = await self.js.stream_info(self.stream)
            except NotFoundError:
                raise StreamNotFoundError(f"stream {self.stream} does not exist",
                                          stream=self.stream) from None
            state = info.state
            if not state.messages:
                # Empty (never written, or everything expired): the next message tells.
                self.next_seq = state.last_seq + 1
                self.next_offset = offset
                return None
            try:
                first = await self.js.get_msg(self.stream, state.first_seq)
            except NotFoundError:
                continue
            break
        else:
            raise StreamMismatchError(f"stream {self.stream}: its first message keeps "
                                      "disappearing while read", stream=self.stream)
        lid, first_offset, _ = parse_headers(first.headers, stream=self.stream,
                                             seq=state.first_seq)
        self._check_log(lid, state.first_seq)
        if offset is None:
            offset = first_offset
        if offset < first_offset:
            raise StreamGapError(
                f"stream {self.stream} starts at offset {first_offset} (retention removed "
                f"the messages before it) but {self.what} is at offset {offset}: offsets "
                f"{offset}..{first_offset - 1} are lost to it",
                stream=self.stream, offset=offset)
        seq = state.first_seq + (offset - first_offset)
        if seq > state.last_seq + 1:
            raise CheckpointMismatchError(
                f"{self.what} is at offset {offset} but stream {self.stream} holds offsets "
                f"{first_offset}..{first_offset + state.messages - 1} only: the stream was "
                "purged or recreated, or this position belongs to another stream",
                offset=offset)
        self.next_seq, self.next_offset = seq, offset
        if seq <= state.last_seq:
            await self._expect_at(seq, offset)
        if offset > first_offset:
            return await self._expect_at(seq - 1, offset - 1)
        return None

    def _check_log(self, log_id: str, seq: int) -> None:
        if self.log_id is None:
            self.log_id = log_id
        elif log_id != self.log_id:
            if self._foreign is not None:
                raise self._foreign(log_id, seq)
            raise StreamMismatchError(
                f"stream {self.stream} holds events of log {log_id} (sequence {seq}), but "
                f"{self.what} follows log {self.log_id}: another log's stream",
                stream=self.stream)

    async def _expect_at(self, seq: int, offset: int) -> bytes:
        """The data of the message at ``seq``, which must carry ``offset`` of our log."""
        from nats.js.errors import NotFoundError

        try:
            msg = await self.js.get_msg(self.stream, seq)
        except NotFoundError:
            raise StreamGapError(
                f"stream {self.stream} has no message at sequence {seq}, where offset "
                f"{offset} belongs (messages were deleted from it): offset {offset} is lost",
                stream=self.stream, offset=offset) from None
        lid, found, _ = parse_headers(msg.headers, stream=self.stream, seq=seq)
        self._check_log(lid, seq)
        if found != offset:
            raise self._out_of_order(found, offset, seq)
        return msg.data or b""

    def _out_of_order(self, found: int, expected: int, seq: int) -> StreamMismatchError:
        if found > expected:
            return StreamGapError(
                f"stream {self.stream} has a gap: offset {found} at sequence {seq} where "
                f"offset {expected} was expected (offsets {expected}..{found - 1} are "
                "missing)", stream=self.stream, offset=expected)
        return StreamMismatchError(
            f"stream {self.stream} goes back: offset {found} at sequence {seq} where offset "
            f"{expected} was expected (an overlap: events would be handled twice)",
            stream=self.stream, offset=expected)

    # ------------------------------------------------------------------------------ reading

    async def fetch(self, wait: float) -> list[Entry]:
        """The next messages (up to ``batch``), in offset order; [] when none came within
        ``wait`` seconds. Raises nats-py's errors for a failure (see :func:`retryable`: call
        :meth:`reset` then fetch again) and eventpipe's typed ones for a stream that does not
        continue."""
        import nats.errors

        if self._sub is None:
            await self._subscribe()
        try:
            msgs = await self._sub.fetch(self.batch, timeout=wait)
        except nats.errors.TimeoutError:
            if await self.last_seq() >= self.next_seq:
                # The stream holds what we want and nothing came: our consumer is gone (its
                # node died, a restart lost it) or stuck. A new one reads on from here.
                log.info("%s: no messages from stream %s though it holds sequence %d: "
                         "reading again from there", self.what, self.stream, self.next_seq)
                await self.reset()
            return []
        out: list[Entry] = []
        expected = self.next_offset
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            try:
                lid, offset, time_ns = parse_headers(msg.headers, stream=self.stream, seq=seq)
                self._check_log(lid, seq)
            except Exception:
                if out:
                    break  # hand out what is sound first; the next fetch raises this
                raise
            if expected is None:
                expected = offset
            if offset != expected or seq < self.next_seq:
                if out:
                    break  # hand out what is sound first; the next fetch looks at this one
                # A delivery lost (or one left over): the message at the sequence wanted
                # says whether the stream itself is out of order.
                await self._expect_at(self.next_seq, expected)
                log.info("%s: stream %s delivered sequence %d (offset %d) where %d was "
                         "wanted: reading again from there", self.what, self.stream, seq,
                         offset, self.next_seq)
                break
            out.append(Entry(seq, offset, time_ns, msg.data, msg.metadata.num_pending))
            expected += 1
            self.next_seq = seq + 1
            self.next_offset = expected
        if len(out) < len(msgs):
            await self.reset()  # what came after the last sound one is fetched again
        return out

    async def last_seq(self) -> int:
        """The stream's last sequence now."""
        from nats.js.errors import NotFoundError

        try:
            info = await self.js.stream_info(self.stream)
        except NotFoundError:
            raise StreamNotFoundError(f"stream {self.stream} does not exist (any more)",
                                      stream=self.stream) from None
        return int(info.state.last_seq)

    async def _subscribe(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        config = ConsumerConfig(
            name=f"eventpipe-{uuid.uuid4().hex}", deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.next_seq, ack_policy=AckPolicy.NONE, mem_storage=True,
            num_replicas=1, inactive_threshold=_INACTIVE_THRESHOLD)
        try:
            info = await self.js.add_consumer(self.stream, config=config)
        except NotFoundError:
            raise StreamNotFoundError(f"stream {self.stream} does not exist (any more)",
                                      stream=self.stream) from None
        self._consumer = info.name
        self._sub = await self.js.pull_subscribe_bind(consumer=info.name, stream=self.stream)

    async def reset(self) -> None:
        """Drop the server-side consumer: the next fetch reads again from the next offset."""
        sub, consumer, self._sub, self._consumer = self._sub, self._consumer, None, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.js.delete_consumer(self.stream, consumer), 1.0)

    async def close(self) -> None:
        await self.reset()


class StreamReader(Runner):
    """What the stream consumer and the mirror share on top of :class:`~eventpipe._runner.Runner`:
    a run that connects, reads the stream through a :class:`StreamSource` (retrying failures
    that may mend, from where the reader is) and ends with systemd's STOPPING=1; fetches and
    pauses that stop() cuts short, systemd's watchdog fed meanwhile.

    A subclass sets the connection attributes, calls :meth:`Runner._open` in its constructor,
    and gives :meth:`_read` (the reading itself), :meth:`_source` and :meth:`_where`."""

    servers: list[str]
    stream: str
    batch: int
    connect_timeout: float
    api_timeout: float
    _logger: ClassVar[logging.Logger] = log
    _backoff: float = _RECONNECT_BACKOFF[0]

    def stop(self) -> None:
        """Ask the run to finish after the event being handled (from a handler, another
        thread or a signal handler); it checkpoints and returns."""
        self._request_stop()

    @property
    def stopping(self) -> bool:
        return self._stop_flag[0]

    def _run_blocking(self, follow: bool) -> None:
        """:meth:`_run` in an event loop of its own, SIGTERM and SIGINT stopping it."""
        self._check_usable()
        asyncio.run(self._with_signals(self._run(follow)))

    async def _run(self, follow: bool) -> None:
        """Read the stream (see :meth:`_read`) until stopped or, without ``follow``, caught
        up; :meth:`_begin` first, :meth:`_end` last, STOPPING=1 after."""
        self._loop = asyncio.get_running_loop()
        self._stop_async = asyncio.Event()
        if self._stop_flag[0]:
            self._stop_async.set()
        try:
            if not await self._begin():
                return
            who, what = self._where()
            nc = await connect(self.servers, who, self.connect_timeout)
            try:
                source = self._source(nc.jetstream(timeout=self.api_timeout), what)
                try:
                    await self._read(source, follow)
                finally:
                    await source.close()
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), self.api_timeout)
        finally:
            try:
                self._end()
            finally:
                self.systemd.stopping()
                self._loop = self._stop_async = None

    async def _begin(self) -> bool:
        """Before connecting: False ends the run (stopped first)."""
        return True

    def _end(self) -> None:
        """After the run, however it ended (before STOPPING=1)."""

    def _where(self) -> tuple[str, str]:
        """The reader in messages: who connects (``consumer x``), what the source reads for
        (``consumer x``, ``the mirror at p``)."""
        raise NotImplementedError

    def _source(self, js: JetStreamContext, what: str) -> StreamSource:
        raise NotImplementedError

    async def _read(self, source: StreamSource, follow: bool) -> None:
        raise NotImplementedError

    def _position(self) -> str:
        """Where the reader is, for a STATUS line (``offset 5``)."""
        raise NotImplementedError

    async def _retry_after(self, exc: Exception, source: StreamSource) -> None:
        """A failed read: raised unless it may mend (see :func:`retryable`); else said in the
        log and the STATUS line, the source reset, and a pause (doubling up to a limit,
        cut short by stop()) before the next read. :meth:`_read_again` ends the backoff."""
        if not retryable(exc):
            raise exc
        who, _ = self._where()
        backoff = self._backoff
        self._logger.warning("%s: %s; reading again in %.1f s", who, describe(exc), backoff)
        self.systemd.status(f"{who}: {self._position()}; retrying after: {describe(exc)}")
        await source.reset()
        await self._sleep(backoff)
        self._backoff = min(_RECONNECT_BACKOFF[1], backoff * 2)

    def _read_again(self) -> None:
        """A read went through: the next failure starts the backoff from the start."""
        self._backoff = _RECONNECT_BACKOFF[0]

    async def _fetch(self, source: StreamSource, wait: float) -> list[Entry] | None:
        """The next messages, or None when stop() came first (a fetch cut short loses
        nothing: the next read starts again from our offset)."""
        assert self._stop_async is not None
        due = self.systemd.watchdog_due_in()
        if due is not None:
            wait = max(0.01, min(wait, due))
        fetch = asyncio.ensure_future(source.fetch(wait))
        stopped = asyncio.ensure_future(self._stop_async.wait())
        try:
            await asyncio.wait((fetch, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if fetch.done() and not self._stop_flag[0]:
            return fetch.result()
        fetch.cancel()
        with contextlib.suppress(BaseException):
            await fetch
        await source.reset()
        return None

    async def _sleep(self, seconds: float) -> None:
        """Wait ``seconds`` or until stop(), pinging systemd's watchdog."""
        await sleep_until_async(time.monotonic() + seconds, self.systemd, self._stopped,
                                self._stop_async)
