"""Consumers whose state lives in a database (issue 13): SQLite and PostgreSQL stores, the
position committed in the projection's transaction, error policies per event, standby, kill -9
soaks, the CLI (consume --sqlite/--postgres, consumer show/reset)."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from eventpipe import (
    CheckpointMismatchError,
    ConfigError,
    ConsumerBusyError,
    DbConsumer,
    EventLog,
    HandlerError,
    Position,
    PositionConflictError,
    SqliteStore,
    StateStore,
)
from eventpipe._dbstate import db_position, reset_db_consumer

from . import _dbhandler
from ._dbhandler import apply, fold, wipe
from ._main import Cli
from ._postgres import pg_dsn, postgres_cluster  # noqa: F401  (fixtures)
from ._sdnotify import fake_systemd
from ._wait import wait_until
from .conftest import ROOT, Children

HANDLER = str(Path(_dbhandler.__file__))


class Db:
    """One database of a test, SQLite or PostgreSQL, seen from outside the consumer."""

    def __init__(self, kind: str, where: str) -> None:
        self.kind = kind
        self.where = where
        with self._connect() as conn:
            _dbhandler.create_schema(conn)
        if kind == "sqlite":
            conn.close()

    def _connect(self) -> Any:
        if self.kind == "sqlite":
            return sqlite3.connect(self.where)
        import psycopg

        return psycopg.connect(self.where)

    def store(self) -> StateStore:
        if self.kind == "sqlite":
            return SqliteStore(self.where)
        from eventpipe.postgres import PostgresStore

        return PostgresStore(self.where)

    def flag(self) -> list[str]:
        return ["--sqlite" if self.kind == "sqlite" else "--postgres", self.where]

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        conn = self._connect()
        try:
            return list(conn.execute(sql).fetchall())
        finally:
            conn.close()

    def totals(self) -> dict[str, tuple[int, int, int]]:
        return {k: (t, n, last) for k, t, n, last in self.query(
            "SELECT k, total, n, last FROM totals")}

    def applied(self) -> list[int]:
        return sorted(o for (o,) in self.query("SELECT o FROM applied"))

    def position(self, name: str = "p") -> Position | None:
        store = self.store()
        try:
            return db_position(store, name)
        finally:
            store.close()

    def check_fold(self, log: EventLog, name: str = "p",
                   dead: set[int] | None = None) -> None:
        """The tables equal a fold of the log; the position is the last event's; every event
        applied once."""
        events = [r.event for r in log.read(0)]
        assert self.totals() == fold(events)
        pos = self.position(name)
        assert pos is not None and pos.next_offset == len(events)
        skipped = dead or set()
        assert self.applied() == [o for o in range(len(events)) if o not in skipped]


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Db:
    if request.param == "sqlite":
        return Db("sqlite", str(tmp_path / "read.db"))
    return Db("postgres", request.getfixturevalue("pg_dsn"))


def _events(n: int, start: int = 0, fail: set[int] | None = None) -> list[dict[str, Any]]:
    bad = fail or set()
    return [{"k": f"k{i % 7}", "v": i, **({"fail": True} if i in bad else {})}
            for i in range(start, start + n)]


def _log(path: Path, events: list[dict[str, Any]]) -> EventLog:
    log = EventLog(path)
    log.append_many(events)
    return log


def test_catch_up_commits_rows_and_position_together(db: Db, log_path: Path) -> None:
    with _log(log_path, _events(2500)) as log:
        with DbConsumer(log, "p", apply, store=db.store(), commit_every=1000) as c:
            assert c.catch_up() == 2500
        db.check_fold(log)
        log.append_many(_events(10, 2500))
        with DbConsumer(log, "p", apply, store=db.store()) as c:
            assert c.offset == 2500  # resumes at the stored position
            c.catch_up()
        db.check_fold(log)


def test_an_uncommitted_batch_leaves_nothing(db: Db, log_path: Path) -> None:
    """Interrupted (a BaseException in the handler), the open transaction is rolled back:
    neither the rows nor the position of its events stay."""
    def handler(conn: Any, event: Any, offset: int) -> None:
        if offset == 1500:
            raise KeyboardInterrupt
        apply(conn, event, offset)

    with _log(log_path, _events(2000)) as log:
        with DbConsumer(log, "p", handler, store=db.store(), commit_every=1000,
                        commit_interval=600) as c, \
                pytest.raises(KeyboardInterrupt):
            c.catch_up()
        pos = db.position()
        assert pos is not None and pos.next_offset == 1000
        assert db.applied() == list(range(1000))
        with DbConsumer(log, "p", apply, store=db.store()) as c:
            c.catch_up()
        db.check_fold(log)


@pytest.mark.parametrize("policy", ["stop", "retry", "dead_letter"])
def test_error_policies_apply_per_event(db: Db, log_path: Path, tmp_path: Path,
                                        policy: str) -> None:
    """A failure in the middle of a batch: the events before it are committed (applied once),
    then stop raises at it, retry succeeds on a later try, dead_letter records it once and
    goes on."""
    calls: list[int] = []

    def flaky(conn: Any, event: Any, offset: int) -> None:
        if offset == 700:
            calls.append(offset)
            if policy != "retry" or len(calls) < 3:
                raise ValueError("downstream says no")
        apply(conn, event, offset)

    dead = tmp_path / "dead"
    opts: dict[str, Any] = {"on_error": policy, "retry_backoff": 0.01, "max_retries": 3}
    if policy == "dead_letter":
        opts["dead_letter"] = str(dead)
    with _log(log_path, _events(1200)) as log:
        with DbConsumer(log, "p", flaky, store=db.store(), commit_every=1000, **opts) as c:
            if policy == "stop":
                with pytest.raises(HandlerError) as err:
                    c.catch_up()
                assert err.value.offset == 700
                pos = db.position()
                assert pos is not None and pos.next_offset == 700
                assert db.applied() == list(range(700))
                return
            c.catch_up()
        if policy == "retry":
            assert len(calls) == 3
            db.check_fold(log)
        else:
            assert len(calls) == 4  # the first call and max_retries more
            events = [r.event for r in log.read(0)]
            events[700] = {**events[700], "fail": True}
            assert db.totals() == fold(events)
            assert db.applied() == [o for o in range(1200) if o != 700]
            with EventLog(dead) as d:
                entries = [r.event for r in d.read(0)]
            assert [(e["offset"], e["consumer"]) for e in entries] == [(700, "p")]


def test_dead_letter_once_across_a_kill_after_the_append(db: Db, log_path: Path,
                                                         tmp_path: Path) -> None:
    """A run killed between the dead-letter append and the position after it: the next run
    finds the entry (from the marked position) and passes over the event."""
    dead = tmp_path / "dead"

    class Killed(BaseException):
        pass

    with _log(log_path, _events(50, fail={20})) as log:
        with DbConsumer(log, "p", apply, store=db.store(), on_error="dead_letter",
                        dead_letter=str(dead), max_retries=0) as c:
            real = c._save  # the second save after the append is where the kill lands

            def save(pos: Position) -> None:
                if pos.next_offset == 21:
                    raise Killed
                real(pos)

            c._save = save  # type: ignore[method-assign]
            with pytest.raises(Killed):
                c.catch_up()
        pos = db.position()
        assert pos is not None and pos.next_offset == 20 and pos.dead_letter_from is not None
        with DbConsumer(log, "p", apply, store=db.store(), on_error="dead_letter",
                        dead_letter=str(dead)) as c:
            c.catch_up()
        db.check_fold(log, dead={20})
        with EventLog(dead) as d:
            assert [r.event["offset"] for r in d.read(0)] == [20]


def test_standby_takes_over(db: Db, log_path: Path) -> None:
    with _log(log_path, _events(100)) as log:
        first = DbConsumer(log, "p", apply, store=db.store(), poll_interval=0.05)
        with pytest.raises(ConsumerBusyError):
            DbConsumer(log, "p", apply, store=db.store())
        first.catch_up()
        second = DbConsumer(log, "p", apply, store=db.store(), standby=True,
                            poll_interval=0.05)
        done = threading.Event()

        def run() -> None:
            second.run()
            done.set()

        thread = threading.Thread(target=run)
        thread.start()
        try:
            time.sleep(0.2)
            log.append_many(_events(50, 100))
            assert not done.is_set()
            first.close()  # the standby takes the name and catches up
            wait_until(lambda: second.offset == 150, "the standby to catch up")
        finally:
            second.stop()
            thread.join(30)
            second.close()
        db.check_fold(log)


def test_a_position_of_another_log_is_refused(db: Db, tmp_path: Path) -> None:
    with _log(tmp_path / "a", _events(10)) as a, _log(tmp_path / "b", _events(10)) as b:
        with DbConsumer(a, "p", apply, store=db.store()) as c:
            c.catch_up()
        with pytest.raises(CheckpointMismatchError, match="another log"):
            DbConsumer(b, "p", apply, store=db.store())


def test_run_follows_and_stops(db: Db, log_path: Path) -> None:
    with _log(log_path, _events(10)) as log, DbConsumer(
            log, "p", apply, store=db.store(), commit_interval=0.05, poll_interval=0.05) as c:
        thread = threading.Thread(target=c.run)
        thread.start()
        try:
            for i in range(5):
                log.append_many(_events(20, 10 + 20 * i))
            wait_until(lambda: (db.position() or Position("", "", 0, 0, 0, 0)).next_offset
                       == 110, "the position to reach the head (commit_interval)")
        finally:
            c.stop()
            thread.join(30)
        db.check_fold(log)


def test_reset_needs_the_hook(db: Db, log_path: Path) -> None:
    with _log(log_path, _events(30)) as log:
        with DbConsumer(log, "p", apply, store=db.store()) as c:
            c.catch_up()
        store = db.store()
        try:
            with pytest.raises(ConfigError, match="refused and nothing was changed"):
                reset_db_consumer(log, "p", store, 0, None)

            assert reset_db_consumer(log, "p", store, 0, wipe).next_offset == 0
        finally:
            store.close()
        with DbConsumer(log, "p", apply, store=db.store(), reset=wipe) as c:
            c.catch_up()
            c.reset_to(0)
            assert c.offset == 0 and db.totals() == {}
            with pytest.raises(ValueError, match="only be rebuilt from offset 0"):
                c.reset_to(5)
            assert c.offset == 0
        with DbConsumer(log, "p", apply, store=db.store()) as c:
            c.catch_up()
        db.check_fold(log)


def _consume(children: Children, log_path: Path, db: Db, *extra: str) -> subprocess.Popen[bytes]:
    return children.popen([sys.executable, "-m", "eventpipe", "consume", str(log_path),
                           "--name", "p", "--handler", f"{HANDLER}:apply", *db.flag(),
                           "--poll-interval", "0.05", *extra], stderr=subprocess.PIPE)


def _next_offset(db: Db) -> int:
    """The stored position, read as any reader would (no lock taken, nothing created)."""
    try:
        rows = db.query("SELECT next_offset FROM eventpipe_positions WHERE consumer = 'p'")
    except Exception:  # no table yet
        return 0
    return int(rows[0][0]) if rows else 0


def _soak(db: Db, log_path: Path, children: Children, rounds: int,
          extra: tuple[str, ...] = (), fail: set[int] | None = None) -> None:
    """Kill -9 a CLI consumer at random instants while a writer appends; then the tables equal
    a fold of the log, the position is the last event's, nothing applied twice or skipped."""
    rng = random.Random(13)
    bad = fail or set()
    with _log(log_path, _events(3000, fail=bad)) as log:
        stop = threading.Event()

        def write() -> None:
            n = 3000
            while not stop.is_set():
                log.append_many(_events(50, n, fail=bad))
                n += 50
                time.sleep(0.05)

        writer = threading.Thread(target=write)
        writer.start()
        positions: list[int] = []
        try:
            for _ in range(rounds):
                before = positions[-1] if positions else 0
                proc = _consume(children, log_path, db, "--checkpoint-every", "300", *extra)
                # Once it has committed (started up: a busy machine takes its time), kill it
                # at a random instant: mostly inside a batch, sometimes inside a commit.
                wait_until(lambda b=before: _next_offset(db) > b,  # type: ignore[misc]
                           "the consumer to commit", timeout=60, interval=0.005)
                time.sleep(rng.uniform(0, 0.3))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                positions.append(_next_offset(db))
        finally:
            stop.set()
            writer.join()
        assert positions == sorted(positions), positions  # never back
        proc = _consume(children, log_path, db, "--catch-up", *extra)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        db.check_fold(log, dead={o for o in range(log.head) if o % 997 == 5} if bad else None)
        print(f"soak {db.kind}: {rounds} kills at positions {positions}, {log.head} events")


def test_kill9_soak(db: Db, log_path: Path, children: Children) -> None:
    _soak(db, log_path, children, 10)


def test_kill9_soak_dead_letter(db: Db, log_path: Path, children: Children,
                                tmp_path: Path) -> None:
    fail = {o for o in range(100_000) if o % 997 == 5}
    _soak(db, log_path, children, 6, ("--on-error", "dead_letter", "--max-retries", "0",
                                      "--dead-letter", str(tmp_path / "dead")), fail)
    with EventLog(tmp_path / "dead") as d:
        offsets = [r.event["offset"] for r in d.read(0)]
    assert sorted(offsets) == sorted(set(offsets))  # each failed event dead-lettered once
    assert offsets and all(o % 997 == 5 for o in offsets)


@pytest.mark.slow
def test_kill9_soak_long(db: Db, log_path: Path, children: Children) -> None:
    _soak(db, log_path, children, 40)


def test_cli_consume_show_reset(db: Db, log_path: Path, cli: Cli) -> None:
    with _log(log_path, _events(40)):
        pass
    r = cli("consume", log_path, "--name", "p", "--handler", f"{HANDLER}:apply", *db.flag(),
            "--catch-up")
    assert r.code == 0, r.err
    r = cli("consumer", "show", log_path, "p", *db.flag(), "--json")
    assert r.code == 0, r.err
    shown = r.json()
    assert shown["offset"] == 40 and shown["lag"] == 0 and shown["store"] == db.kind
    r = cli("consumer", "reset", log_path, "p", "--to-offset", "0", *db.flag())
    assert r.code == 2 and "refused and nothing was changed" in r.err
    r = cli("consumer", "reset", log_path, "p", "--to-offset", "0", *db.flag(),
            "--reset-hook", f"{HANDLER}:wipe")
    assert r.code == 0, r.err
    assert db.position() is not None and db.totals() == {}
    r = cli("consume", log_path, "--name", "p", "--handler", f"{HANDLER}:apply", *db.flag(),
            "--catch-up")
    assert r.code == 0, r.err
    with EventLog(log_path) as log:
        db.check_fold(log)
    r = cli("consume", log_path, "--name", "p", "--handler", f"{HANDLER}:apply", *db.flag(),
            "--catch-up", "--print-state")
    assert r.code == 2 and "--print-state" in r.err


def test_pg_core_does_not_import_psycopg() -> None:
    code = ("import sys, eventpipe, eventpipe._cli; "
            "assert 'psycopg' not in sys.modules, 'psycopg imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)




@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_cli_under_systemd_stops_on_signals(tmp_path: Path, log_path: Path,
                                            children: Children, sig: int, code: int) -> None:
    """consume --sqlite speaks sd_notify (READY after the catch-up, STATUS with the offset,
    STOPPING) and ends on SIGTERM (exit 0) or SIGINT (130) with everything committed."""
    db = Db("sqlite", str(tmp_path / "read.db"))
    with _log(log_path, _events(500)) as log, fake_systemd(tmp_path, 10_000_000) as (sock, env):
        proc = children.popen([sys.executable, "-m", "eventpipe", "consume", str(log_path),
                               "--name", "p", "--handler", f"{HANDLER}:apply", *db.flag(),
                               "--poll-interval", "0.05"], env=env, stderr=subprocess.PIPE)
        seen: list[str] = []
        while not any("STATUS=consumer p: offset 500" in m for m in seen):
            seen.append(sock.recv(4096).decode())
        assert any("READY=1" in m for m in seen), seen
        log.append_many(_events(20, 500))
        wait_until(lambda: _next_offset(db) == 520, "the new events to be committed")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err.decode()
        while not any("STOPPING=1" in m for m in seen):
            seen.append(sock.recv(4096).decode())
        db.check_fold(log)


def test_an_unreachable_database_is_a_storage_error(tmp_path: Path, log_path: Path,
                                                    cli: Cli) -> None:
    """A database that cannot be opened is named in a StorageError (CLI exit 3), for SQLite
    and PostgreSQL alike (no server on that socket)."""
    with _log(log_path, _events(3)):
        pass
    for flag, where in (("--sqlite", str(tmp_path / "no" / "such" / "folder.db")),
                        ("--postgres", f"host={tmp_path} dbname=x user=x connect_timeout=2")):
        r = cli("consume", log_path, "--name", "p", "--handler", f"{HANDLER}:apply", flag,
                where, "--catch-up")
        assert r.code == 3, r.err
        assert "failed" in r.err and ("SQLite" in r.err or "PostgreSQL" in r.err), r.err
        assert "Traceback" not in r.err


def test_a_position_moved_by_another_process_is_a_conflict(db: Db, log_path: Path) -> None:
    """Another process (another host: the name lock is per host) moved the row: the next
    commit fails and is rolled back, nothing of its batch kept."""
    with _log(log_path, _events(100)) as log, DbConsumer(log, "p", apply,
                                                         store=db.store()) as c:
        c.catch_up()
        conn = db._connect()
        conn.execute("UPDATE eventpipe_positions SET next_offset = 60 WHERE consumer = 'p'")
        conn.commit()
        conn.close()
        log.append_many(_events(10, 100))
        with pytest.raises(PositionConflictError, match="moved by another process"):
            c.catch_up()
        assert db.applied() == list(range(100))


def test_pass_time_hands_the_append_time(tmp_path: Path, log_path: Path) -> None:
    seen: list[tuple[int, int | None]] = []

    def handler(conn: Any, event: Any, offset: int, t: int | None) -> None:
        seen.append((offset, t))

    before = time.time_ns()
    with _log(log_path, _events(30)) as log, DbConsumer(
            log, "p", handler, store=SqliteStore(tmp_path / "t.db"), pass_time=True) as c:
        c.catch_up()
        assert [o for o, _ in seen] == list(range(30))
        assert all(t is not None and before <= t <= time.time_ns() for _, t in seen)
        assert [t for _, t in seen] == [log.time_of(o) for o in range(30)]


def test_retention_status_and_consumers_know_a_database_consumer(db: Db, log_path: Path,
                                                                 cli: Cli) -> None:
    """Its place is held in <log>/consumers/<name>.json (a checkpoint whose state says where
    the state lives): retention keeps what it has not handled, consumers shows its lag, and a
    plain consumer reset is refused."""
    with EventLog(log_path, segment_max_events=100) as log:
        log.append_many(_events(550))
        with DbConsumer(log, "p", apply, store=db.store(), commit_every=250) as c:
            c.catch_up()
        log.append_many(_events(450, 550))
        report = log.prune(before=1000)
        assert log.first_offset <= 550 < log.first_offset + 100, report
        r = cli("consumers", log_path, "--json")
        assert r.code == 0, r.err
        (entry,) = [e for e in r.json()["consumers"] if e["name"] == "p"]
        assert entry["offset"] == 550 and entry["lag"] == 450
        r = cli("consumer", "reset", log_path, "p", "--to-offset", "600", "--keep-state")
        assert r.code == 2 and "--sqlite/--postgres" in r.err, r.err
        with DbConsumer(log, "p", apply, store=db.store()) as c:
            c.catch_up()
        assert db.totals() == fold(_events(1000))  # the pruned events included
        pos = db.position()
        assert pos is not None and pos.next_offset == 1000


def test_the_hold_checkpoint_passes_verify(tmp_path: Path, log_path: Path) -> None:
    """The hold names the real segment, byte position and CRC of the last committed event, as
    any checkpoint does: verify finds nothing wrong with it, across segments."""
    from eventpipe import verify_log

    with EventLog(log_path, segment_max_events=64) as log:
        log.append_many(_events(1000))
        db = Db("sqlite", str(tmp_path / "v.db"))
        with DbConsumer(log, "p", apply, store=db.store(), commit_every=77) as c:
            c.catch_up()
    problems, _ = verify_log(log_path)
    assert problems == []
