"""The forward bridge: a local log's events, in offset order, into a JetStream stream, once each.

The stream is the truth about how far the bridge got. On start, and after every failure, the
bridge reads the stream's last message (:func:`~._wire.last_position`) and publishes from the
offset after it. Every message carries ``Nats-Msg-Id: <log_id>:<offset>`` (the server drops a
second copy within its duplicate window: a retry of a publish that timed out but was stored,
or a message a killed bridge still had on the wire) and, but for the stream's first,
``Nats-Expected-Last-Sequence`` naming its predecessor's stream sequence (the server refuses
a message that would leave a gap or reorder). So a bridge killed at any moment, or cut off
from the servers, and started again neither loses nor doubles an event.

Publishes are asynchronous, with at most ``window`` acks in flight, awaited in order. A failure
(a timeout, no leader, the server away, a refusal) drops what is in flight, backs off
(exponentially, capped) and resumes from the stream's last message.

Progress is kept where operators look for consumers: a regular checkpoint
``<log>/consumers/<name>.json`` at the offset after the last acked one (state ``{"stream",
"last_acked", "duplicates"}``), written only for offsets the stream acked, so ``eventpipe
status``, ``consumers`` and the metrics show the bridge's lag, and retention keeps every event
the stream does not hold yet. The checkpoint is never read to decide where to resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
import zlib
from collections import deque
from typing import TYPE_CHECKING, Any, NamedTuple

from .._changes import ChangeNotifier
from .._checkpoint import (
    Checkpoint,
    checkpoint_file,
    load_checkpoint,
    save_checkpoint,
    validate_name,
)
from .._consumer import checkpoint_at
from .._layout import HEAD_FILE
from .._log import EventLog
from .._runner import Runner, Standby, poll_wait, sleep_until_async, watch
from ..errors import CheckpointMismatchError, ConfigError, EventPipeError
from ._source import check_target, connect
from ._wire import (
    API_ERR_WRONG_LAST_MSG_ID,
    API_ERR_WRONG_LAST_SEQUENCE,
    PublishError,
    StreamGapError,
    StreamMismatchError,
    StreamNotFoundError,
    default_subject,
    last_entry,
    msg_headers,
)

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

    from .._segment import LineChunk

__all__ = ["Bridge"]

log = logging.getLogger("eventpipe.bridge")

_HDR_EXPECTED_STREAM = "Nats-Expected-Stream"  # the server refuses it elsewhere (10060)
_API_ERR_STREAM_NOT_FOUND = 10059
_API_ERR_WRONG_STREAM = 10060  # Nats-Expected-Stream names another stream
_FIRST_BACKOFF = 0.1
# The standby's attempts after a hint that the holder let go (as a consumer's).
_TAKEOVER_RETRIES = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


class _Ack(NamedTuple):
    """The server's acknowledgement of one publish."""

    stream: str
    seq: int
    duplicate: bool


class _Publisher:
    """Publishes with a reply subject of its own per message and hands back a future of the
    ack: a refusal becomes that future's exception. (nats-py's ``publish_async`` raises a
    refusal inside its reply callback, where it reaches the error callback and leaves the
    future pending for ever.)"""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._futures: dict[str, asyncio.Future[_Ack]] = {}
        self._count = 0

    async def start(self) -> None:
        await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)

    async def _on_reply(self, msg: Msg) -> None:
        from nats.js.errors import APIError, NoStreamResponseError

        future = self._futures.pop(msg.subject[len(self._prefix):], None)
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":  # no responders: no stream
            future.set_exception(NoStreamResponseError())
            return
        try:
            doc = json.loads(msg.data)
            error = doc.get("error")
            if error is not None:
                future.set_exception(APIError(code=error.get("code"), err_code=error.get(
                    "err_code"), description=error.get("description")))
            else:
                future.set_result(_Ack(doc["stream"], doc["seq"], bool(doc.get("duplicate"))))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            future.set_exception(ValueError(f"unreadable ack {msg.data[:200]!r}: {exc}"))

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]
                      ) -> asyncio.Future[_Ack]:
        self._count += 1
        token = str(self._count)
        future: asyncio.Future[_Ack] = asyncio.get_running_loop().create_future()
        self._futures[token] = future
        await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
        return future

    def forget(self) -> None:
        """Drop every publish awaiting its ack (its outcome is read back from the stream)."""
        futures, self._futures = self._futures, {}
        for future in futures.values():
            future.cancel()


class _AckTimeout(Exception):
    """No ack for a publish within ack_timeout (it may have been stored: a retry finds out)."""

    def __init__(self, offset: int, timeout: float) -> None:
        super().__init__(f"no ack for offset {offset} within {timeout:g} s")
        self.offset = offset


class Bridge(Runner):
    """Publishes a log's events, in offset order and exactly once, to a JetStream stream.

    ``log_or_path`` is an :class:`~eventpipe.EventLog` or the path of one (which must exist).
    ``servers`` are NATS URLs (``nats://user:pass@host:4222``; the client reconnects across
    them). ``subject`` defaults to ``eventpipe.<stream lowercased>``. With ``create_stream``
    a missing stream is created for that subject with ``replicas`` replicas; otherwise it is
    :class:`~._wire.StreamNotFoundError`.

    ``name`` (default ``bridge-<stream>``) is a consumer name in the log: one process holds it
    (``ConsumerBusyError`` for a second, unless ``standby``: it then waits to take over), and
    its checkpoint shows the bridge's progress. ``window`` acks may be in flight at once.
    ``from_first_stored`` lets a bridge start an empty stream at the log's first stored
    offset when retention removed the events before it (otherwise
    :class:`~._wire.StreamGapError`). ``ack_timeout`` bounds each ack and API request,
    ``max_backoff`` the pause between retries. ``poll_interval`` and ``notifications`` are
    as a consumer's; ``checkpoint_interval`` is how often progress is written while busy.

    :meth:`run` blocks until :meth:`stop`, SIGTERM or SIGINT; :meth:`run_async` is its form
    for an event loop. Errors that retrying cannot mend end the run: an unreachable server or
    a refused login at start (:class:`~._wire.ServerUnavailableError`), a stream of another
    log or holding messages eventpipe did not write (:class:`~._wire.StreamMismatchError`),
    a stream that does not meet the log (:class:`~._wire.StreamGapError`).
    """

    kind = "bridge"

    def __init__(
        self,
        log_or_path: EventLog | str | os.PathLike[str],
        servers: list[str] | str,
        stream: str,
        *,
        subject: str | None = None,
        create_stream: bool = False,
        replicas: int = 1,
        window: int = 256,
        name: str | None = None,
        standby: bool = False,
        from_first_stored: bool = False,
        ack_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        max_backoff: float = 5.0,
        checkpoint_interval: float = 1.0,
        poll_interval: float = 1.0,
        notifications: bool = True,
    ) -> None:
        self.servers = check_target(servers, stream)
        _check_options(subject, window, replicas, ack_timeout, connect_timeout, max_backoff,
                       checkpoint_interval, poll_interval)
        self.stream = stream
        self.subject = subject or default_subject(stream)
        self.name = validate_name(name if name is not None else f"bridge-{stream}")
        self.create_stream = create_stream
        self.replicas = replicas
        self.window = window
        self.standby = standby
        self.from_first_stored = from_first_stored
        self.ack_timeout = ack_timeout
        self.connect_timeout = connect_timeout
        self.max_backoff = max_backoff
        self.checkpoint_interval = checkpoint_interval
        self.poll_interval = poll_interval
        self.notifications = notifications
        self._init_progress()
        self._open(log_or_path, create=False)
        try:
            self._folder = self._consumers_folder()
            self._checkpoint_file = checkpoint_file(self.name)
            self._lock, _ = self._lock_name(self._folder, standby)
        except BaseException:
            self._close_parts()
            raise

    def _init_progress(self) -> None:
        """Where the bridge stands (nothing published yet) and what it counted."""
        self.next_offset = 0
        """The offset of the next event to publish."""
        self.last_acked: int | None = None
        """The last offset the stream holds (acked, or found there on resuming)."""
        self.published = 0
        """Messages published by this process (retries included)."""
        self.duplicates = 0
        """Acks saying the server already held the message (dropped as a duplicate), counted
        since the bridge's checkpoint was made (earlier runs' counts are read from it)."""
        self.retries = 0
        """Failures retried (each resumes from the stream's last message)."""
        self.stopped_by: int | None = None
        """The signal that stopped :meth:`run` (SIGTERM or SIGINT), if one did."""
        self._notifier: ChangeNotifier | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stream_first: int | None = None  # the offset the stream's first message carries
        self._seq_offset = 0  # stream sequence - log offset, for the messages from here on
        # Where next_offset's line starts (segment, byte position), when known: reading on
        # from there needs no scan of the segment. And the chunks published lately, to
        # checkpoint an acked offset with its position and CRC without reading it again.
        self._next_position: tuple[int, int] | None = None
        self._recent: deque[LineChunk] = deque()
        self._checkpointed = -1
        self._checkpoint_due = 0.0
        self._backoff = _FIRST_BACKOFF
        self._last_error: str | None = None

    # --------------------------------------------------------------------------- reporting

    @property
    def lag(self) -> int:
        """Events of the log the stream does not hold yet (as far as this bridge knows)."""
        done = 0 if self.last_acked is None else self.last_acked + 1
        return max(0, self.log.head - max(done, self._stream_first or 0))

    def _status(self) -> str:
        text = (f"bridge {self.name} -> {self.stream}: offset {self.next_offset}, "
                f"lag {self.lag}")
        if self.duplicates:
            text += f", {self.duplicates} duplicates dropped"
        if self._last_error is not None:
            text += f"; retrying after: {self._last_error}"
        return text

    # ----------------------------------------------------------------------------- running

    def stop(self) -> None:
        """Ask the run to finish (from any thread or a signal handler): it stops publishing,
        awaits the acks in flight (for up to ``ack_timeout``), checkpoints and returns."""
        self._request_stop()

    def run(self) -> None:
        """Publish until :meth:`stop`, SIGTERM or SIGINT (in the main thread: which one
        is kept in :attr:`stopped_by`). Raises what ends the run otherwise."""
        self._check_usable()
        asyncio.run(self._with_signals(self.run_async()))

    async def run_async(self) -> None:
        """:meth:`run` in an event loop (signals are the application's: call :meth:`stop`).

        Cancelling the task stops it at once (no final wait for acks; the stream stays the
        truth, and the next run resumes from it)."""
        self._check_usable()
        self._loop = asyncio.get_running_loop()
        # Watch first, read second: an append racing the first read hints.
        notifier = watch(self.log.path, HEAD_FILE, self.notifications, self.poll_interval)
        self._notifier = notifier
        sd = self.systemd
        try:
            if not await self._await_name():
                return
            nc = await connect(self.servers, f"bridge {self.name}", self.connect_timeout,
                               client_name=f"eventpipe {self.name}", logger=log)
            try:
                js = nc.jetstream(timeout=self.ack_timeout)
                publisher = _Publisher(nc)
                await publisher.start()
                await self._publish_loop(js, publisher)
            finally:
                sd.stopping()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), self.ack_timeout)
        finally:
            self._notifier = None
            notifier.close()
        log.info("bridge %s: stopped at offset %d (%d published, %d duplicates dropped, "
                 "%d retries)", self.name, self.next_offset, self.published, self.duplicates,
                 self.retries)

    def _took_name(self) -> bool:
        """Carry the duplicate count on from the last run's checkpoint (for operators;
        where to resume is never read from it). True."""
        with contextlib.suppress(EventPipeError, OSError):
            cp = load_checkpoint(self._folder, self._checkpoint_file, self.name)
            state = cp.state if cp is not None else None
            if isinstance(state, dict) and state.get("stream") == self.stream and isinstance(
                    state.get("duplicates"), int):
                self.duplicates += state["duplicates"]
        return True

    async def _await_name(self) -> bool:
        """The name, now or (standby) once its holder lets go; False if stopped first."""
        standby = Standby(self, self._lock, log, self.poll_interval, retries=_TAKEOVER_RETRIES,
                          catching_up=False)
        return await self._stand_by_async(standby, self.notifications, self._took_name)

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        from nats.js.errors import NotFoundError

        try:
            info = await js.stream_info(self.stream)
        except NotFoundError:
            if not self.create_stream:
                raise StreamNotFoundError(
                    f"stream {self.stream} does not exist (create it, or pass --create-stream "
                    "/ create_stream=True)", stream=self.stream) from None
            info = await js.add_stream(name=self.stream, subjects=[self.subject],
                                       num_replicas=self.replicas)
            log.info("bridge %s: created stream %s (subject %s, %d replicas)", self.name,
                     self.stream, self.subject, self.replicas)
        subjects = info.config.subjects or []
        if not any(subject_matches(pattern, self.subject) for pattern in subjects):
            raise StreamMismatchError(
                f"stream {self.stream} does not take subject {self.subject} (its subjects: "
                f"{', '.join(subjects) or 'none'}): pass --subject", stream=self.stream)

    async def _resume(self, js: JetStreamContext) -> None:
        """Find where the stream stands and set :attr:`next_offset` after it (see module)."""
        from nats.js.errors import NotFoundError

        try:
            entry = await last_entry(js, self.stream)
        except NotFoundError:
            raise StreamNotFoundError(f"stream {self.stream} does not exist (any more)",
                                      stream=self.stream) from None
        first, head = self.log.first_offset, self.log.head
        if entry is None:
            start = 0
            if first > 0:
                if not self.from_first_stored:
                    raise StreamGapError(
                        f"stream {self.stream} is empty and the log's first stored offset is "
                        f"{first} (retention removed the events before it): pass "
                        "--from-first-stored (from_first_stored=True) to start the stream "
                        "there", stream=self.stream, path=self.log.path, offset=0)
                start = first
            self._stream_first = start
            self._seq_offset = 1 - start  # the stream's first message is sequence 1
            last = None
        else:
            pos, seq = entry
            if pos.log_id != self.log.log_id:
                raise StreamMismatchError(
                    f"stream {self.stream} holds events of another log (log id {pos.log_id}, "
                    f"offset {pos.offset}), not of {self.log.log_id}: use another stream",
                    stream=self.stream, path=self.log.path)
            start, last = pos.offset + 1, pos.offset
            if start > head:
                raise CheckpointMismatchError(
                    f"stream {self.stream} holds this log's events up to offset {pos.offset} "
                    f"but the log's head is {head}: the log was cut back or restored from an "
                    "older copy", path=self.log.path, offset=head)
            if start < first:
                raise StreamGapError(
                    f"stream {self.stream} ends at offset {pos.offset} but retention removed "
                    f"the log's events before {first}: offsets {start}..{first - 1} are lost",
                    stream=self.stream, path=self.log.path, offset=start)
            self._stream_first = None
            self._seq_offset = seq - pos.offset
            if self.last_acked is not None and last < self.last_acked:
                log.warning("bridge %s: stream %s ends at offset %d, before %d it acked "
                            "(the stream lost messages): publishing them again", self.name,
                            self.stream, last, self.last_acked)
        self.last_acked = last
        self.next_offset = start
        self._next_position = None
        self._recent.clear()
        self._checkpoint(force=True)

    # ------------------------------------------------------------------------- publishing

    async def _publish_loop(self, js: JetStreamContext, publisher: _Publisher) -> None:
        """Find the stream and where it stands, then publish; on a failure that may mend
        (a cluster still electing its leaders at start included), back off and resume."""
        ready = False
        while not self._stop_flag[0]:
            inflight: deque[tuple[int, asyncio.Future[_Ack], float]] = deque()
            try:
                if not ready:
                    await self._ensure_stream(js)
                await self._resume(js)
                if not ready:
                    ready = True
                    self.systemd.ready()
                    log.info("bridge %s: publishing %s from offset %d to stream %s (subject "
                             "%s)", self.name, self.log.path, self.next_offset, self.stream,
                             self.subject)
                self.systemd.status(self._status())
                await self._pump(publisher, inflight)
                return
            except Exception as exc:
                where = inflight[0][0] if inflight else self.next_offset  # what failed
                _drop(inflight, publisher)
                if not self._retryable(exc):
                    if isinstance(exc, EventPipeError):
                        raise
                    raise PublishError(f"stream {self.stream}: {_describe(exc)}",
                                       path=self.log.path, offset=where) from exc
                self.retries += 1
                self._last_error = _describe(exc)
                log.warning("bridge %s: %s; resuming from the stream in %.1f s", self.name,
                            self._last_error, self._backoff)
                self.systemd.status(self._status())
                await sleep_until_async(  # appends hinted meanwhile just loop
                    time.monotonic() + self._backoff * random.uniform(0.8, 1.2),
                    self.systemd, self._stopped, self._notifier)
                self._backoff = min(self.max_backoff, self._backoff * 2)

    async def _pump(self, publisher: _Publisher,
                    inflight: deque[tuple[int, asyncio.Future[_Ack], float]]) -> None:
        """Publish from :attr:`next_offset` on, following the log; returns on stop."""
        notifier = self._notifier
        assert notifier is not None
        log_, sd = self.log, self.systemd
        while not self._stop_flag[0]:
            head = log_.head
            if head < self.next_offset:
                raise CheckpointMismatchError(
                    f"the log's head went back to {head}, behind offset {self.next_offset} the "
                    "bridge published: the log was cut back or restored from an older copy",
                    path=log_.path, offset=self.next_offset)
            if self.next_offset < head:
                await self._publish_to(head, publisher, inflight)
                continue  # appends may have come meanwhile: look at the head again
            while inflight:
                await self._ack_oldest(inflight)
            # Caught up. Not a checkpoint at every wake-up (two fsyncs on the loop, in the way
            # of the next event): at most one per checkpoint_interval, the last one when due.
            self._checkpoint()
            sd.status(self._status())
            log_.check_replaced()
            due = self._checkpoint_due if self._done() != self._checkpointed else None
            await notifier.wait_async(poll_wait(sd, self.poll_interval, due))
            sd.maybe_ping_watchdog()
        # Stopping: what was sent gets its ack (or the next run finds it in the stream).
        while inflight:
            await self._ack_oldest(inflight)
        self._checkpoint(force=True)

    async def _publish_to(self, head: int, publisher: _Publisher,
                          inflight: deque[tuple[int, asyncio.Future[_Ack], float]]) -> None:
        """Publish the events from :attr:`next_offset` up to ``head`` (or a stop), at most
        ``window`` unacked, checkpointing what is acked after each chunk."""
        loop = asyncio.get_running_loop()
        log_ = self.log
        log_id, subject, stream = log_.log_id, self.subject, self.stream
        window, timeout, sd = self.window, self.ack_timeout, self.systemd
        times_of = log_.time_index.times
        publish = publisher.publish
        seq_offset = self._seq_offset - 1  # the expected last sequence of offset o: o + this
        for chunk in log_.chunks(self.next_offset, head, position=self._next_position):
            self._next_position = None
            self._recent.append(chunk)
            first = chunk.first_offset
            times = times_of(chunk.segment_base, first, len(chunk.lines))
            for i, line in enumerate(chunk.lines):
                while len(inflight) >= window:
                    await self._ack_oldest(inflight)
                offset = first + i
                headers = msg_headers(log_id, offset, times[i], offset == self._stream_first,
                                      offset + seq_offset)
                headers[_HDR_EXPECTED_STREAM] = stream
                future = await publish(subject, line, headers)
                inflight.append((offset, future, loop.time() + timeout))
                self.published += 1
                self.next_offset = offset + 1
                if self._stop_flag[0]:
                    break
            else:  # the whole chunk is out: the next line starts right after it
                self._next_position = (chunk.segment_base, chunk.position + len(
                    chunk.lines) + sum(map(len, chunk.lines)))
            sd.maybe_ping_watchdog()
            self._checkpoint()
            if self._stop_flag[0]:
                break

    async def _ack_oldest(self, inflight: deque[tuple[int, asyncio.Future[_Ack], float]]
                          ) -> None:
        offset, future, deadline = inflight[0]
        if not future.done():
            left = deadline - asyncio.get_running_loop().time()
            await asyncio.wait((future,), timeout=max(0.0, left))
            if not future.done():
                raise _AckTimeout(offset, self.ack_timeout)
        ack = future.result()  # raises the server's refusal (the offset stays first)
        inflight.popleft()
        if ack.duplicate:
            self.duplicates += 1
        self.last_acked = offset
        if self._last_error is not None:  # going again after a failure
            self._last_error = None
            self._backoff = _FIRST_BACKOFF
            log.info("bridge %s: publishing again from offset %d", self.name, offset)
            self.systemd.status(self._status())

    def _retryable(self, exc: BaseException) -> bool:
        """Whether a failure may mend by itself (the server away, no leader, a timeout, a
        gap the server refused); otherwise it is raised as a typed error or as is."""
        import nats.errors
        from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

        if isinstance(exc, _AckTimeout | TimeoutError | NoStreamResponseError
                      | nats.errors.NoRespondersError | nats.errors.StaleConnectionError
                      | nats.errors.OutboundBufferLimitError
                      | nats.errors.ConnectionReconnectingError | ConnectionError):
            return True
        if isinstance(exc, NotFoundError) or (isinstance(exc, APIError)
                                              and exc.err_code == _API_ERR_STREAM_NOT_FOUND):
            raise StreamNotFoundError(f"stream {self.stream} does not exist (any more)",
                                      stream=self.stream) from exc
        if isinstance(exc, APIError):
            if exc.err_code == _API_ERR_WRONG_STREAM:
                raise StreamMismatchError(
                    f"subject {self.subject} belongs to another stream than {self.stream} "
                    f"({exc.description})", stream=self.stream) from exc
            # 10071 (wrong last sequence) follows a message lost in flight: resuming from
            # the stream mends it. 5xx: no leader, storage unavailable.
            return exc.err_code in (API_ERR_WRONG_LAST_SEQUENCE, API_ERR_WRONG_LAST_MSG_ID) \
                or (exc.code or 500) >= 500
        return False

    # ------------------------------------------------------------------------ checkpoints

    def _done(self) -> int:
        """The offset after the last one the stream holds: the checkpoint's offset."""
        if self.last_acked is not None:
            return self.last_acked + 1
        # Nothing in the stream yet: it starts at _stream_first.
        return self._stream_first if self._stream_first is not None else self.next_offset

    def _checkpoint(self, *, force: bool = False) -> None:
        """Write the bridge's progress (the offset after the last acked) if it moved, at most
        every ``checkpoint_interval`` seconds unless ``force``."""
        done = self._done()
        if done == self._checkpointed or not self._lock.held:
            return
        now = time.monotonic()
        if not force and now < self._checkpoint_due:
            return
        state = {"stream": self.stream, "last_acked": self.last_acked,
                 "duplicates": self.duplicates}
        save_checkpoint(self._folder, self._checkpoint_file, self._checkpoint_for(done, state),
                        self.log.config.file_mode)
        self._checkpointed = done
        self._checkpoint_due = now + self.checkpoint_interval
        self.systemd.status(self._status())  # with a backlog too, once per checkpoint

    def _checkpoint_for(self, done: int, state: dict[str, Any]) -> Checkpoint:
        """The checkpoint at offset ``done``: the event before it (its segment, byte position
        and CRC, which a reader of the checkpoint checks) from the chunks published lately,
        else read from the log (once, after a resume)."""
        recent = self._recent
        while recent and recent[0].first_offset + len(recent[0].lines) < done:
            recent.popleft()  # wholly acked and checkpointed past
        last = done - 1
        for chunk in recent:
            i = last - chunk.first_offset
            if 0 <= i < len(chunk.lines):
                lines = chunk.lines
                position = chunk.position + i + sum(map(len, lines[:i]))
                return Checkpoint(self.name, self.log.log_id, done, state, chunk.segment_base,
                                  position, zlib.crc32(lines[i]), time.time())
        return checkpoint_at(self.log, self.name, done, state)

    def __repr__(self) -> str:
        return (f"Bridge({self.log.path!r}, stream={self.stream!r}, "
                f"offset={self.next_offset})")


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether NATS subject ``subject`` matches ``pattern`` (``*`` one token, ``>`` the rest)."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def _drop(inflight: deque[tuple[int, asyncio.Future[_Ack], float]],
          publisher: _Publisher) -> None:
    """Forget the publishes in flight (their outcome is read back from the stream); the
    refusals already in are marked seen, so asyncio does not report them."""
    for _, future, _ in inflight:
        if future.done() and not future.cancelled():
            future.exception()
    inflight.clear()
    publisher.forget()


def _describe(exc: BaseException) -> str:
    from nats.js.errors import APIError

    if isinstance(exc, APIError):
        return f"server refused: {exc.description} (code {exc.code}, err_code {exc.err_code})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_options(subject: str | None, window: int, replicas: int, *seconds: float) -> None:
    if subject is not None and (not subject or " " in subject):
        raise ConfigError(f"subject {subject!r} is invalid", option="subject")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"window must be a positive integer, not {window!r}",
                          option="window")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 5:
        raise ConfigError(f"replicas must be 1 to 5, not {replicas!r}", option="replicas")
    for value in seconds:
        if not isinstance(value, int | float) or not value > 0:
            raise ConfigError(f"timeouts and intervals must be positive, not {value!r}")

