"""Consumers whose state lives in a database: exactly-once projections (issue 13).

A :class:`DbConsumer` calls ``handler(conn, event, offset)`` for each event, ``conn`` being a
connection to the user's database with a transaction open. The consumer's position (the next
offset, the log id it belongs to, the CRC of the last handled event) is a row of a position
table in the same database, written in the same transaction: the projection's writes and the
position commit together or not at all (the tracking record of the ``eventsourcing`` library).
Killed at any instant, the database holds the writes of exactly the events before the stored
position, and the consumer resumes there. A transaction covers ``commit_every`` events or
``commit_interval`` seconds, whichever comes first: batching is what makes it fast.

A failing handler rolls back its batch; the events of the batch before the failing one are
applied again in a fresh transaction, which commits the position of the failing event; then
the error policy applies to that one event as in :class:`~eventpipe.Consumer` (stop, retry
with backoff, dead-letter). Re-applying costs nothing until a handler fails; a savepoint per
event (the alternative) costs a statement per event, on PostgreSQL a round trip, always.
A dead-letter append is preceded by a commit of the position marked with the dead-letter log's
head, so a run killed after the append finds its entry and passes over the event (each failed
event is dead-lettered once, as ``eventpipe._deadletter`` describes for JSON states).

A :class:`StateStore` is the one small interface a database needs: connect, begin, load and
save a position, commit, roll back. :class:`SqliteStore` (standard library) is here;
``eventpipe.postgres.PostgresStore`` (psycopg 3, the ``eventpipe[postgres]`` extra) is
imported only by whoever uses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import orjson

from ._changes import ChangeNotifier
from ._checkpoint import Checkpoint, checkpoint_file, validate_name
from ._consumer import checkpoint_at
from ._layout import CONSUMERS_DIR, Folder
from ._log import EventLog
from ._namelock import NameLock
from ._runner import Runner, Standby, poll_wait, sleep_until, start_offset, watch
from ._segment import LineChunk
from ._signals import stop_on_signals
from .errors import (
    CheckpointMismatchError,
    ConfigError,
    ConsumerBusyError,
    CorruptLogError,
    EventPipeError,
    HandlerError,
    OffsetOutOfRangeError,
    StorageError,
)

__all__ = ["DbConsumer", "DbHandler", "Position", "PositionConflictError", "ResetHook",
           "SqliteStore", "StateStore", "db_position", "reset_db_consumer"]

log_ = logging.getLogger("eventpipe.consumer")
log = log_

DbHandler = Callable[..., Any]
"""``handler(conn, event, offset)`` (or ``(conn, event, offset, time)`` with pass_time)."""
ResetHook = Callable[[Any, str, int], Any]
"""``reset(conn, consumer, offset)``: make the tables what they were before ``offset``, inside
the transaction that then moves the position there."""

DEFAULT_TABLE = "eventpipe_positions"
_MAX_BACKOFF = 3600.0
# A database consumer's hold checkpoint (retention's and status's view of it) is rewritten at
# most this often while it works through events (seconds); always when it catches up or stops.
_HOLD_INTERVAL = 1.0
# The clock is read every this many events between commits (the per-event loop stays lean).
_CLOCK_EVERY = 64
_loads = orjson.loads


class Position(NamedTuple):
    """A consumer's row in the position table."""

    consumer: str
    log_id: str
    next_offset: int
    fingerprint: int | None  # CRC-32 of the stored line at next_offset - 1 (None: unknown)
    dead_letter_from: int | None  # the dead-letter log's head before an append (see above)
    updated_at: float  # seconds since the epoch


@contextlib.contextmanager
def database_errors(store: StateStore, doing: str) -> Iterator[None]:
    """A database driver's error (sqlite3.Error, psycopg.Error, a lost connection) while the
    consumer itself talks to the database, as StorageError naming the database (CLI exit 3).
    A handler's errors are not wrapped: on_error applies to them."""
    try:
        yield
    except EventPipeError:
        raise
    except Exception as exc:
        raise StorageError(f"{store.where}: {doing} failed: {type(exc).__name__}: "
                           f"{str(exc).strip()}") from exc


HOLD_KEY = "eventpipe_db_consumer"
"""The key of the marker state a database consumer's hold checkpoint carries."""


def write_hold(log: EventLog, folder: Folder, name: str, store: StateStore, offset: int,
               last: tuple[int, int, int] | None = None) -> None:
    """Write ``<log>/consumers/<name>.json``: a checkpoint at ``offset`` whose state only says
    where the real state lives. It is what retention, ``status`` and ``consumers`` read for
    every consumer, so they hold back, and show, a database consumer like any other.

    ``last`` is (segment, byte position, CRC) of the event at ``offset - 1`` when the caller
    knows it; otherwise it is read from the log (a read of a gzip'd segment costs a
    decompression up to it). Written after the database commit (never ahead of the stored
    position: behind after a crash, which only keeps more), without fsync, best effort: the
    database is the truth and the consumer never reads this file. A warning when it cannot be
    written.
    """
    try:
        marker = {HOLD_KEY: {"store": store.kind, "database": store.where,
                             "table": store.table}}
        if last is not None and offset > log.first_offset:
            seg, pos, crc = last
            cp = Checkpoint(name, log.log_id, offset, marker, seg, pos, crc, time.time())
        else:
            cp = dataclasses.replace(
                checkpoint_at(log, name, max(offset, log.first_offset), marker), offset=offset)
        folder.write_atomic(checkpoint_file(name), cp.to_bytes(), log.config.file_mode,
                            durable=False)
    except (EventPipeError, OSError) as exc:
        log_.warning("consumer %s: could not write its retention hold %s: %s", name,
                     checkpoint_file(name), exc)


class PositionConflictError(ConsumerBusyError):
    """The stored position is not the one this process committed last: another process (on
    another host: the name lock is per host) moved it. Nothing of this transaction is kept."""


class StateStore:
    """A database holding projections and the position table. Subclasses supply ``connect``
    and their SQL dialect; one store serves one consumer (it holds one connection).

    The table is created if missing. ``conn`` (after :meth:`open`) is what handlers get.
    """

    param = "?"
    kind = "database"
    _create_sql = ""

    def __init__(self, table: str = DEFAULT_TABLE) -> None:
        if not table.replace("_", "").isalnum() or table[0].isdigit():
            raise ConfigError(f"position table name {table!r} must be a plain SQL identifier",
                              option="table")
        self.table = table
        self.conn: Any = None

    # -- what a database supplies
    def connect(self) -> Any:
        raise NotImplementedError

    def begin(self) -> None:
        """Start a transaction (handlers write inside it)."""
        raise NotImplementedError

    @property
    def where(self) -> str:
        """The database, for messages (no password)."""
        raise NotImplementedError

    # -- common SQL
    def open(self) -> None:
        if self.conn is None:
            self.conn = self.connect()
            self.begin()
            self.conn.execute(self._create_sql.format(table=self.table))
            self.commit()

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()

    def load(self, consumer: str) -> Position | None:
        """The consumer's stored position (inside the open transaction)."""
        p = self.param
        row = self.conn.execute(
            f"SELECT consumer, log_id, next_offset, fingerprint, dead_letter_from, updated_at "
            f"FROM {self.table} WHERE consumer = {p}", (consumer,)).fetchone()
        return None if row is None else Position(*row)

    def save(self, pos: Position, expected: int | None) -> None:
        """Write ``pos`` in the open transaction; ``expected`` is the next offset the row holds
        now (None: no row). Raises PositionConflictError if it holds something else."""
        p = self.param
        if expected is None:
            if self.load(pos.consumer) is not None:
                raise PositionConflictError(self._conflict(pos.consumer))
            self.conn.execute(
                f"INSERT INTO {self.table} (consumer, log_id, next_offset, fingerprint, "
                f"dead_letter_from, updated_at) VALUES ({p}, {p}, {p}, {p}, {p}, {p})", pos)
            return
        cur = self.conn.execute(
            f"UPDATE {self.table} SET log_id = {p}, next_offset = {p}, fingerprint = {p}, "
            f"dead_letter_from = {p}, updated_at = {p} WHERE consumer = {p} AND "
            f"next_offset = {p}",
            (pos.log_id, pos.next_offset, pos.fingerprint, pos.dead_letter_from,
             pos.updated_at, pos.consumer, expected))
        if cur.rowcount != 1:
            raise PositionConflictError(self._conflict(pos.consumer))

    def delete(self, consumer: str) -> None:
        self.conn.execute(f"DELETE FROM {self.table} WHERE consumer = {self.param}",
                          (consumer,))

    def _conflict(self, consumer: str) -> str:
        return (f"the position of consumer {consumer!r} in {self.where} ({self.table}) was "
                "moved by another process (another host running the same name?); this "
                "transaction is rolled back")

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.rollback()
            except Exception:
                log.debug("rollback on close failed", exc_info=True)
            conn.close()


class SqliteStore(StateStore):
    """A SQLite database file (standard library ``sqlite3``), in WAL mode, so readers in other
    processes query it while the consumer writes.

    ``synchronous`` is SQLite's: ``"FULL"`` (default) makes every commit durable at once;
    ``"NORMAL"`` is faster, and a power loss may then undo the last commits, position and
    rows alike (still consistent: the consumer handles those events again). ``busy_timeout``
    (seconds) bounds waits for other writers of the file.
    """

    kind = "sqlite"
    _create_sql = (
        "CREATE TABLE IF NOT EXISTS {table} (consumer TEXT PRIMARY KEY, log_id TEXT NOT NULL, "
        "next_offset INTEGER NOT NULL, fingerprint INTEGER, dead_letter_from INTEGER, "
        "updated_at REAL NOT NULL)")

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL",
                 busy_timeout: float = 30.0, table: str = DEFAULT_TABLE) -> None:
        super().__init__(table)
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ConfigError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}",
                              option="synchronous")
        self.path = os.path.abspath(os.fspath(path))
        self.synchronous = synchronous.upper()
        self.busy_timeout = busy_timeout

    @property
    def where(self) -> str:
        return f"SQLite database {self.path}"

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        return conn

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")  # the write lock now, not at the first write

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


class DbConsumer(Runner):
    """Follows a log, applying each event to a database through ``handler(conn, event,
    offset)``, with the position committed in the handler's transaction (see the module).

    ``store`` is a :class:`StateStore` (``SqliteStore(path)``, ``PostgresStore(dsn)``); the
    consumer opens and closes it. ``commit_every`` events (default 1000) or ``commit_interval``
    seconds (default 1.0) make a transaction. The other options are :class:`~eventpipe.Consumer`'s
    (on_error, max_retries, retry_backoff, dead_letter, standby, start, poll_interval,
    notifications, pass_time; ``EVENTPIPE_*`` variables too). The handler must be a function
    of (database, event, offset) only: after a failure the events before it in the batch are
    applied again. ``reset`` is the hook :func:`reset_db_consumer` calls.

    Construction takes the name (``<log>/consumers/<name>.lock``: one process per name on this
    host; ConsumerBusyError unless standby), opens the store and checks its position:
    CheckpointMismatchError for a position of another log, ahead of the head, or after an
    event that differs from the one stored now.
    """

    def __init__(
        self,
        log_or_path: EventLog | str | os.PathLike[str],
        name: str,
        handler: DbHandler,
        *,
        store: StateStore,
        commit_every: int | None = None,
        commit_interval: float | None = None,
        on_caught_up: Callable[[DbConsumer], None] | None = None,
        on_idle: Callable[[DbConsumer], None] | None = None,
        reset: ResetHook | None = None,
        **options: Any,
    ) -> None:
        opts = self._configure(name, handler, _commit_options(options, commit_every,
                                                                commit_interval),
                               on_caught_up, on_idle)
        self.store = store
        self.reset_hook = reset
        self._init_position()
        self._open(log_or_path)
        self._folder: Folder | None = None
        self._lock: NameLock | None = None
        try:
            self._dead_letters = self._open_dead_letters()
            self._folder = self._consumers_folder()
            self._lock, acquired = self._lock_name(self._folder, opts["standby"])
            if acquired:
                self._load()
        except BaseException:
            self.close()
            raise

    def _init_position(self) -> None:
        """Nowhere yet (the position is loaded once the name is ours)."""
        self.offset = 0  # the next event to handle (in the open transaction, if any)
        self._committed: int | None = None  # the stored next offset (None: no row yet)
        self._committed_fp: int | None = None
        self._last_line: bytes | None = None  # the line at offset - 1, when read this run
        self._txn = False  # a transaction is open
        self._since = 0  # events in the open transaction
        self._due = 0.0
        self._skip_offset: int | None = None
        self._chunk: LineChunk | None = None  # the chunk being handled (for the hold)
        self._hold_due = 0.0
        self._notifier: ChangeNotifier | None = None
        self._caught_up_once = False
        self.last_commit_at: float | None = None

    # ------------------------------------------------------------------------ the position

    def _load(self) -> None:
        store = self.store
        with database_errors(store, "reading the position"):
            store.open()
            store.begin()
        try:
            with database_errors(store, "reading the position"):
                pos = store.load(self.name)
                if pos is None:
                    pos = self._start()
            self._check(pos)
            with database_errors(store, "committing the start position"):
                store.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                store.rollback()
            raise
        self.offset = pos.next_offset
        self._committed = pos.next_offset if pos.updated_at >= 0 else None
        self._committed_fp = pos.fingerprint
        self._last_line = None
        self.last_commit_at = pos.updated_at if pos.updated_at >= 0 else None
        if self._folder is not None:
            write_hold(self.log, self._folder, self.name, self.store, pos.next_offset)
        self._skip_offset = None
        dead = self._dead_letters
        if pos.dead_letter_from is not None and dead is not None and dead.holds(
                pos.next_offset, pos.dead_letter_from):
            self._skip_offset = pos.next_offset  # killed after the append: the event is done
        self._due = time.monotonic() + self.options["checkpoint_interval"]

    def _start(self) -> Position:
        """No row yet: where the ``start`` option says. Any start but offset 0 is stored at
        once (a restart must not resolve "latest" again)."""
        start = self.options["start"]
        offset = start_offset(self.log, start)
        if offset == 0 and start != "latest":
            return Position(self.name, self.log.log_id, 0, None, None, -1.0)
        pos = Position(self.name, self.log.log_id, offset, self._crc_before(offset), None,
                       time.time())
        self.store.save(pos, None)
        return pos

    def _crc_before(self, offset: int) -> int | None:
        """The CRC of the stored line at ``offset - 1`` (None when none is stored)."""
        if offset <= self.log.first_offset:
            return None
        for chunk in self.log.chunks(offset - 1, offset):
            return zlib.crc32(chunk.lines[0])
        return None

    def _check(self, pos: Position) -> None:
        where = f"{self.store.where} ({self.store.table})"
        if pos.log_id != self.log.log_id:
            raise CheckpointMismatchError(
                f"consumer {self.name!r}'s position in {where} belongs to another log (log id "
                f"{pos.log_id}, this log is {self.log.log_id}): the log was replaced",
                path=self.log.path, offset=pos.next_offset)
        head = self.log.head
        if pos.next_offset > head:
            raise CheckpointMismatchError(
                f"consumer {self.name!r}'s position in {where} is ahead of the log (offset "
                f"{pos.next_offset}, head {head}): the log was cut back or restored from an "
                "older copy", path=self.log.path, offset=pos.next_offset)
        if pos.fingerprint is not None:
            crc = self._crc_before(pos.next_offset)
            if crc is not None and crc != pos.fingerprint:
                raise CheckpointMismatchError(
                    f"the event at offset {pos.next_offset - 1} differs from the one consumer "
                    f"{self.name!r}'s position in {where} was committed after: the log was "
                    "replaced or rewritten", path=self.log.path, offset=pos.next_offset - 1)

    def _position(self, offset: int, fingerprint: int | None,
                  dead_letter_from: int | None = None) -> Position:
        return Position(self.name, self.log.log_id, offset, fingerprint, dead_letter_from,
                        time.time())

    def _begin(self) -> None:
        with database_errors(self.store, "beginning a transaction"):
            self.store.begin()
        self._txn = True
        self._since = 0

    def commit(self) -> None:
        """Commit the open transaction with the position (no-op when none is open)."""
        if not self._txn:
            return
        fp = zlib.crc32(self._last_line) if self._last_line is not None else self._committed_fp
        self._save(self._position(self.offset, fp))

    def _save(self, pos: Position) -> None:
        """Save ``pos`` in the open transaction (begun if none) and commit."""
        store = self.store
        if not self._txn:
            self._begin()
        try:
            with database_errors(store, f"committing position {pos.next_offset}"):
                store.save(pos, self._committed)
                store.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                self._abort()
            raise
        self._txn = False
        self._since = 0
        self._committed = pos.next_offset
        self._committed_fp = pos.fingerprint
        self.offset = pos.next_offset
        self.last_commit_at = pos.updated_at
        now = time.monotonic()
        self._due = now + self.options["checkpoint_interval"]
        if now >= self._hold_due:
            self._write_hold()

    def _write_hold(self) -> None:
        """The hold checkpoint at the committed offset (see :func:`write_hold`): after a
        commit at most every _HOLD_INTERVAL seconds (a rename per commit costs more than the
        commit), and whenever the consumer catches up, goes idle or stops."""
        self._hold_due = time.monotonic() + _HOLD_INTERVAL
        if self._folder is not None and self._committed is not None:
            write_hold(self.log, self._folder, self.name, self.store, self._committed,
                       self._last_event(self._committed))

    def _last_event(self, offset: int) -> tuple[int, int, int] | None:
        """(segment, byte position, CRC) of the event at ``offset - 1`` when it is in the
        chunk being handled (no read of the log), else None."""
        chunk = self._chunk
        if chunk is None:
            return None
        i = offset - 1 - chunk.first_offset
        if not 0 <= i < len(chunk.lines):
            return None
        lines = chunk.lines
        position = chunk.position + sum(map(len, lines[:i])) + i
        return chunk.segment_base, position, zlib.crc32(lines[i])

    def _abort(self) -> None:
        """Roll the open transaction back: back to the stored position."""
        self._txn = False
        self._since = 0
        try:
            with database_errors(self.store, "rolling back"):
                self.store.rollback()
        finally:
            self.offset = self._committed or 0
            self._last_line = None

    # ---------------------------------------------------------------------------- handling

    def _process(self, stop: int | None) -> None:
        """Handle events from ``offset`` up to ``stop`` (the head now if None)."""
        head = self.log.head
        if head < self.offset:
            raise CheckpointMismatchError(
                f"the log's head went back to {head}, behind offset {self.offset} that "
                f"consumer {self.name!r} handled", path=self.log.path, offset=self.offset)
        stop = head if stop is None else stop
        if self.offset >= stop:
            return
        try:
            for chunk in self.log.chunks(self.offset, stop):
                if not self._handle(chunk):
                    return
        except OffsetOutOfRangeError:
            if self.log.head < self.offset:
                raise CheckpointMismatchError(
                    f"the log's head went back behind offset {self.offset} that consumer "
                    f"{self.name!r} handled", path=self.log.path, offset=self.offset) from None
            raise
        except BaseException:
            if self._txn:
                self._abort()  # an interrupted handler: nothing of the batch is kept
            raise
        if self._txn and time.monotonic() >= self._due:
            self.commit()

    def _handle(self, chunk: LineChunk) -> bool:
        """Handle the events of ``chunk`` from ``offset`` on; False when stopped."""
        # One function on purpose: the per-event loop, with nothing but a counter and a
        # stop check per event between the calls of the handler.
        handler = self.handler
        every = self.options["checkpoint_every"]
        sd = self.systemd
        clock = time.monotonic
        self._chunk = chunk
        times = (self.log.time_index.times(chunk.segment_base, chunk.first_offset,
                                           len(chunk.lines))
                 if self.options["pass_time"] else None)
        for i, line in enumerate(chunk.lines):
            o = chunk.first_offset + i
            if o != self.offset:
                continue  # already handled (a retry path re-read this chunk)
            if o == self._skip_offset:
                self._skip_offset = None
                self.commit()
                self._save(self._position(o + 1, zlib.crc32(line)))
                continue
            try:
                event = _loads(line)
            except orjson.JSONDecodeError as exc:
                self.commit()
                raise CorruptLogError(f"stored event is not valid JSON ({exc})",
                                      path=self.log.segments_dir, offset=o) from None
            if not self._txn:
                self._begin()
            try:
                if times is not None:
                    handler(self.store.conn, event, o, times[i])
                else:
                    handler(self.store.conn, event, o)
            except Exception as exc:
                if not self._failed(o, line, event, exc):
                    return False  # stopped during retries
            else:
                self.offset = o + 1
                self._last_line = line
                self._since += 1
                if self._since >= every:
                    self.commit()
                elif self._since % _CLOCK_EVERY == 0:
                    now = clock()
                    sd.maybe_ping_watchdog(now)
                    if now >= self._due:
                        self.commit()
            if self._stop_flag[0]:
                return False
        return True

    def _failed(self, offset: int, line: bytes, event: Any, exc: Exception) -> bool:
        """Apply on_error to the event at ``offset``; False when stopped during the retries
        (the position is then ``offset``)."""
        self._abort()  # the batch's writes and whatever the handler did go
        self._reapply(offset)
        opts = self.options
        retries = opts["max_retries"] if opts["on_error"] != "stop" else 0
        delay = min(opts["retry_backoff"], _MAX_BACKOFF)
        t = self.log.time_of(offset) if opts["pass_time"] else None
        args = (event, offset, t) if opts["pass_time"] else (event, offset)
        for _ in range(retries):
            sleep_until(time.monotonic() + delay, self.systemd, self._stopped,
                        self._stop_event)
            if self._stop_flag[0]:
                return False
            delay = min(2 * delay, _MAX_BACKOFF)
            self._begin()
            try:
                self.handler(self.store.conn, *args)
            except Exception as again:
                self._abort()
                exc = again
                continue
            self._save(self._position(offset + 1, zlib.crc32(line)))
            return True
        dead = self._dead_letters
        if opts["on_error"] == "dead_letter" and dead is not None:
            # A position marked with the dead-letter head first: a run killed after the append
            # finds the entry from there and passes over the event (see _load).
            self._save(self._position(offset, self._committed_fp, dead.head))
            dead.append(offset, event, exc)
            self._save(self._position(offset + 1, zlib.crc32(line)))
            return True
        raise HandlerError(
            f"handler of consumer {self.name!r} raised {type(exc).__name__}: {exc}",
            offset=offset, event=event, path=self.log.path) from exc

    def _reapply(self, offset: int) -> None:
        """Apply the events from the stored position up to ``offset`` again, in one fresh
        transaction, and commit the position ``offset``."""
        start = self._committed or 0
        if start >= offset:
            return
        pass_time = self.options["pass_time"]
        self._begin()
        o = start
        try:
            for chunk in self.log.chunks(start, offset):
                for i, line in enumerate(chunk.lines):
                    o = chunk.first_offset + i
                    args = ((_loads(line), o, self.log.time_of(o)) if pass_time
                            else (_loads(line), o))
                    self.handler(self.store.conn, *args)
                    self._last_line = line
        except Exception as exc:
            self._abort()
            raise HandlerError(
                f"handler of consumer {self.name!r} raised {type(exc).__name__}: {exc} at "
                f"offset {o} while applying offsets {start}..{offset - 1} again after its "
                f"failure at offset {offset}; nothing of them was committed",
                offset=o, event=None, path=self.log.path) from exc
        self.offset = offset
        self.commit()

    # ------------------------------------------------------------------------------ running

    def catch_up(self) -> int:
        """Handle every event up to the head as of this call, commit; returns the offset.
        With standby, waits for the name first (stop() ends the wait)."""
        self._check_usable()
        if not self._held() and not self._await_name():
            return self.offset
        self._process(self.log.head)
        self.commit()
        self._write_hold()
        return self.offset

    def run(self) -> int:
        """Catch up, then follow new events until stop(), SIGTERM or SIGINT (on the main
        thread); returns the offset. Ends with a commit of whole events. Under systemd:
        READY=1 after the first catch-up (a standby: while it waits), STATUS, WATCHDOG=1,
        STOPPING=1."""
        self._check_usable()
        restore = stop_on_signals(self.stop)
        try:
            self._run()
        finally:
            restore()
        return self.offset

    def _run(self) -> None:
        sd = self.systemd
        if not self._held() and not self._await_name():
            sd.stopping()
            return
        opts = self.options
        # Before the catch-up read: nothing appended meanwhile is missed.
        notifier = watch(self.log.path, "head", opts["notifications"], opts["poll_interval"])
        self._notifier = notifier
        try:
            if not self._stop_flag[0]:
                self._process(self.log.head)
            self.commit()
            self._write_hold()
            first, self._caught_up_once = not self._caught_up_once, True
            self._caught_up(first)
            idle_reported = False
            while not self._stop_flag[0]:
                sd.maybe_ping_watchdog()
                before = self.offset
                self._process(None)
                if self.offset != before:
                    idle_reported = False
                    continue
                if self._txn and time.monotonic() >= self._due:
                    self.commit()
                if not idle_reported:
                    idle_reported = True
                    self._write_hold()
                    self._went_idle()
                    continue
                self.log.check_replaced()
                notifier.wait(poll_wait(sd, opts["poll_interval"],
                                        self._due if self._txn else None))
        finally:
            try:
                if self._txn:
                    self.commit()
                self._write_hold()
            finally:
                sd.stopping()
                self._notifier = None
                notifier.close()

    def reset_to(self, offset: int) -> None:
        """Move this consumer (holding its name, not running) to ``offset`` through its
        ``reset`` hook, in one transaction with the position (see :func:`reset_db_consumer`);
        ConfigError without a hook."""
        self._check_usable()
        if not self._held():
            raise ConsumerBusyError(f"consumer {self.name!r} does not hold its name yet",
                                    path=self.log.path)
        self.commit()
        _reset_position(self.log, self.name, self.store, offset, self.reset_hook,
                        self._folder)
        self._load()

    def _status(self) -> str:
        return f"consumer {self.name}: offset {self.offset}, lag {self.lag}"

    @property
    def lag(self) -> int:
        return max(0, self.log.head - self.offset)

    def _held(self) -> bool:
        return self._lock is not None and self._lock.held

    def _await_name(self) -> bool:
        """Standby: wait until the name is ours (True, position loaded) or stop() (False)."""
        assert self._lock is not None
        standby = Standby(self, self._lock, log, self.options["poll_interval"])
        return self._stand_by_blocking(standby, self.options["notifications"], self._load)

    def stop(self) -> None:
        """Ask run() to finish after the event it is handling (thread- and signal-safe)."""
        self._request_stop()

    @property
    def stopping(self) -> bool:
        return self._stop_flag[0]

    def close(self) -> None:
        """Roll back anything uncommitted, close the store, release the name. Idempotent."""
        super().close()

    def _close_parts(self) -> None:
        try:
            self.store.close()
        except Exception:
            log.debug("closing the store failed", exc_info=True)
        super()._close_parts()

    def __repr__(self) -> str:
        return f"DbConsumer({self.log.path!r}, {self.name!r}, {self.store.where}, " \
               f"offset={self.offset})"


def _commit_options(options: dict[str, Any], commit_every: int | None,
                    commit_interval: float | None) -> dict[str, Any]:
    """A database consumer's options as a consumer's: commit_every and commit_interval are
    checkpoint_every (1000 by default) and checkpoint_interval; checkpoint_dir is refused."""
    if "checkpoint_dir" in options:
        raise ConfigError("a database consumer's position lives in its database, not in "
                          "checkpoint_dir", option="checkpoint_dir")
    if commit_every is not None:
        options["checkpoint_every"] = commit_every
    elif "EVENTPIPE_CHECKPOINT_EVERY" not in os.environ:
        options["checkpoint_every"] = 1000
    if commit_interval is not None:
        options["checkpoint_interval"] = commit_interval
    return options


def db_position(store: StateStore, name: str) -> Position | None:
    """Consumer ``name``'s stored position in ``store`` (opened and left open)."""
    with database_errors(store, "reading the position"):
        store.open()
        store.begin()
        try:
            return store.load(name)
        finally:
            store.rollback()


def reset_db_consumer(log: EventLog, name: str, store: StateStore, offset: int,
                      reset: ResetHook | None) -> Position:
    """Move consumer ``name``'s position in ``store`` to ``offset``, holding its name (refused
    with ConsumerBusyError while it runs).

    The tables hold the writes of every event before the stored position; only the user knows
    how to make them those of the events before ``offset``: ``reset(conn, name, offset)`` does
    it, in the transaction that moves the position, so both or neither happen. Without a hook
    the reset is refused (ConfigError) and nothing changes (unless ``offset`` is where the
    consumer is already). OffsetOutOfRangeError for an offset beyond the head or before the
    first stored one.
    """
    validate_name(name)
    with log.folder.sub(CONSUMERS_DIR, create_mode=log.config.dir_mode) as folder:
        lock = NameLock(folder, name, log.config.file_mode)
        try:
            if not lock.try_acquire():
                raise ConsumerBusyError(
                    f"consumer {name!r} is running ({lock.holder()}): stop it first",
                    holder=lock.holder(), path=lock.path)
            return _reset_position(log, name, store, offset, reset, folder)
        finally:
            lock.release()


def _reset_position(log: EventLog, name: str, store: StateStore, offset: int,
                    reset: ResetHook | None, folder: Folder | None) -> Position:
    """reset_db_consumer's work, the name held by the caller."""
    head, first = log.head, log.first_offset
    if offset > head or offset < 0:
        raise OffsetOutOfRangeError(f"offset is beyond the head ({head})" if offset >= 0
                                    else "offsets start at 0", path=log.path, offset=offset)
    if offset < first:
        raise OffsetOutOfRangeError(f"offset is before the first stored offset {first} "
                                    "(retention removed older events)", path=log.path,
                                    offset=offset)
    with database_errors(store, "reading the position"):
        store.open()
        store.begin()
    try:
        with database_errors(store, "reading the position"):
            current = store.load(name)
        if current is not None and current.next_offset == offset:
            store.rollback()
            return current  # nothing to move
        if reset is None:
            have = ("no stored position" if current is None else
                    f"the writes of offsets 0..{current.next_offset - 1}")
            effect = ("skip" if current is None or offset > current.next_offset
                      else "apply again")
            raise ConfigError(
                f"consumer {name!r} keeps its state in {store.where}: its tables hold "
                f"{have}. Moving its position to {offset} without changing them would "
                f"{effect} events in them, so the reset is refused and nothing was changed. "
                "Give a reset hook (reset(conn, consumer, offset), run in the same "
                f"transaction) that makes the tables those of the events before {offset}, "
                f"or rebuild them yourself and delete the row of {name!r} in {store.table}",
                option="reset")
        reset(store.conn, name, offset)
        fp = None
        if offset > first:
            for chunk in log.chunks(offset - 1, offset):
                fp = zlib.crc32(chunk.lines[0])
        pos = Position(name, log.log_id, offset, fp, None, time.time())
        if folder is not None and current is not None and offset < current.next_offset:
            write_hold(log, folder, name, store, offset)  # back first: never ahead of the row
        with database_errors(store, f"committing position {offset}"):
            store.save(pos, None if current is None else current.next_offset)
            store.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            store.rollback()
        raise
    if folder is not None:
        write_hold(log, folder, name, store, offset)
    return pos
