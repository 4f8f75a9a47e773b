"""Database-state consumer benchmarks (issue 13): catch-up into SQLite rows, commit cost against
table size, and a JSON-state consumer with a large state, with baselines in the same run.

Regenerate the results::

    python3 dev.py bench bench_dbstate.py
    .venv/bin/python benchmarks/bench_dbstate.py [--runs N] [--quick] [--dir DIR] [--big N]
                                                 [--only 1,2,3] [--json]

Every number is the median of ``--runs`` runs (default 5; 1 with ``--quick``); baselines run
in the same process and the same runs, interleaved with ours. SQLite is the stdlib's, in WAL
mode with ``synchronous=FULL`` (SqliteStore's default) for ours and the baselines alike.
Targets are a report, not a gate (exit 0 whatever they say).

Rows:
  1  catch-up of N events (default 1M) into SQLite rows: ``DbConsumer(..., store=SqliteStore,
     commit_every=1000).catch_up()`` with a handler doing one ``INSERT`` per event, against a
     naive loop over the same log (``read_raw``, ``orjson.loads``) doing the same inserts in
     transactions of 1000 events with no position kept; throughput ours/naive, target >= 0.7x.
     1b (info): the naive loop with one ``executemany`` per 1000 events instead.
  2  commit cost against table size: resuming and handling 1000 new events (one transaction
     with its position) on a database whose table holds --big rows (default 10M) against one
     holding 10k; time big/small, target <= 1.5x.
  3  a read model of K keys (default 1M, a ~50 MB JSON state) updated by each event: a
     ``Consumer`` with the JSON state (checkpoint_every=1000, so a 50 MB checkpoint per 1000
     events) against a DbConsumer upserting into a table of the same K rows (commit_every=1000);
     throughput db/json, target >= 1x (the point of issue 13).
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from _bench import (
    Options,
    Row,
    at_least,
    bench_main,
    build_logs,
    fresh_dir,
    make_events,
    median,
    progress,
    scale_row,
    timed,
)

from eventpipe import Consumer, DbConsumer, EventLog, SqliteStore


@dataclass(frozen=True)
class Sizes:
    catchup: int  # row 1
    big: int  # row 2: rows in the big table
    small: int  # row 2: rows in the small table
    keys: int  # row 3: keys in the read model (state size)
    updates: int  # row 3: events handled per run


FULL = Sizes(catchup=1_000_000, big=10_000_000, small=10_000, keys=1_000_000, updates=20_000)
QUICK = Sizes(catchup=20_000, big=200_000, small=10_000, keys=20_000, updates=5_000)

_TABLE = "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, name TEXT, ts INTEGER)"


def _insert(conn: sqlite3.Connection, event: dict[str, Any], offset: int) -> None:
    conn.execute("INSERT INTO t VALUES (?, ?, ?)", (offset, event["name"], event["ts"]))


def _connect(db: str) -> sqlite3.Connection:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(_TABLE)
    return conn


def _ours(log: EventLog, db: str) -> float:
    _connect(db).close()
    start = time.perf_counter()
    with DbConsumer(log, "bench", _insert, store=SqliteStore(db), commit_every=1000,
                    commit_interval=3600) as c:
        c.catch_up()
    return time.perf_counter() - start


def _naive(log: EventLog, db: str, many: bool) -> float:
    loads = orjson.loads
    start = time.perf_counter()
    conn = _connect(db)
    batch: list[tuple[int, str, int]] = []
    conn.execute("BEGIN")
    for i, line in enumerate(log.read_raw(0)):
        e = loads(line)
        if many:
            batch.append((i, e["name"], e["ts"]))
            if len(batch) == 1000:
                conn.executemany("INSERT INTO t VALUES (?, ?, ?)", batch)
                batch.clear()
                conn.execute("COMMIT")
                conn.execute("BEGIN")
        else:
            conn.execute("INSERT INTO t VALUES (?, ?, ?)", (i, e["name"], e["ts"]))
            if i % 1000 == 999:
                conn.execute("COMMIT")
                conn.execute("BEGIN")
    if batch:
        conn.executemany("INSERT INTO t VALUES (?, ?, ?)", batch)
    conn.execute("COMMIT")
    conn.close()
    return time.perf_counter() - start


def row_catchup(opts: Options[Sizes]) -> list[Row]:
    n = opts.sizes.catchup
    ours: list[float] = []
    naive: list[float] = []
    many: list[float] = []
    with fresh_dir(opts.dir) as d:
        path = os.path.join(d, "log")
        build_logs(n, [(path, {})])
        with EventLog(path) as log:
            for run in range(opts.runs):
                progress(f"row 1: run {run + 1}/{opts.runs}")
                for name, out in (("ours", ours), ("naive", naive), ("many", many)):
                    db = os.path.join(d, f"{name}{run}.db")
                    out.append(_ours(log, db) if name == "ours"
                               else _naive(log, db, many=name == "many"))
                    conn = sqlite3.connect(db)
                    count = conn.execute("SELECT count(*) FROM t").fetchone()[0]
                    conn.close()
                    assert count == n, (name, count)
                    for suffix in ("", "-wal", "-shm"):
                        if os.path.exists(db + suffix):
                            os.unlink(db + suffix)
    t, base, base_many = median(ours), median(naive), median(many)
    return [
        Row(f"catch-up into SQLite rows, commit_every=1000 ({n:,} events)", n, t, ours,
            "naive insert loop, 1000/txn", base, naive, ratio=base / t,
            target=">= 0.7x", passed=at_least(base / t, 0.7)),
        Row("the same, baseline with executemany", n, t, ours,
            "executemany, 1000/txn", base_many, many, ratio=base_many / t,
            note="info: executemany does the inserts in C"),
    ]


def _table_of(db: str, rows: int) -> None:
    conn = _connect(db)
    conn.execute("BEGIN")
    step = 100_000
    for first in range(0, rows, step):
        conn.executemany("INSERT INTO t VALUES (?, ?, ?)",
                         ((-1 - i, f"filler{i}", i) for i in range(first, min(rows, first + step))))
    conn.execute("COMMIT")
    conn.close()


def row_commit_scale(opts: Options[Sizes]) -> list[Row]:
    big_rows, small_rows = opts.sizes.big, opts.sizes.small
    big: list[float] = []
    small: list[float] = []
    with fresh_dir(opts.dir) as d:
        path = os.path.join(d, "log")
        dbs = {"big": os.path.join(d, "big.db"), "small": os.path.join(d, "small.db")}
        progress(f"row 2: a table of {big_rows:,} rows")
        _table_of(dbs["big"], big_rows)
        _table_of(dbs["small"], small_rows)
        with EventLog(path) as log:
            for run in range(opts.runs):
                progress(f"row 2: run {run + 1}/{opts.runs}")
                log.append_many(make_events(run * 1000, 1000))
                for name, out in (("big", big), ("small", small)):
                    with DbConsumer(log, "bench", _insert, store=SqliteStore(dbs[name]),
                                    commit_every=1000, commit_interval=3600) as c:
                        out.append(timed(c.catch_up))
                        assert c.offset == log.head
    return [scale_row(f"1000 events + commit, table of {big_rows:,} rows", big,
                      f"table of {small_rows:,} rows", small)]


def _kv(conn: sqlite3.Connection, event: dict[str, Any], offset: int) -> None:
    conn.execute("INSERT INTO kv VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                 (event["k"], event["v"]))


def _json_fold(state: dict[str, str], event: dict[str, Any], offset: int) -> dict[str, str]:
    state[event["k"]] = event["v"]
    return state


def row_large_state(opts: Options[Sizes]) -> list[Row]:
    keys, updates = opts.sizes.keys, opts.sizes.updates
    value = "v" * 36
    initial = {f"k{i}": value for i in range(keys)}
    size_mb = len(orjson.dumps(initial)) / 1e6
    db_times: list[float] = []
    json_times: list[float] = []
    events = [{"k": f"k{(i * 7919) % keys}", "v": f"u{i:035d}"} for i in range(updates)]
    with fresh_dir(opts.dir) as d:
        for run in range(opts.runs):
            progress(f"row 3: run {run + 1}/{opts.runs}")
            with EventLog(os.path.join(d, f"log{run}")) as log:
                log.append_many(events)
                db = os.path.join(d, f"kv{run}.db")
                conn = sqlite3.connect(db, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT)")
                conn.execute("BEGIN")
                conn.executemany("INSERT INTO kv VALUES (?, ?)", initial.items())
                conn.execute("COMMIT")
                conn.close()
                with DbConsumer(log, "db", _kv, store=SqliteStore(db), commit_every=1000,
                                commit_interval=3600) as c:
                    db_times.append(timed(c.catch_up))
                with Consumer(log, "json", _json_fold, initial, checkpoint_every=1000,
                              checkpoint_interval=3600) as j:
                    json_times.append(timed(j.catch_up))
    t, base = median(db_times), median(json_times)
    return [Row(f"{updates:,} updates of a {keys:,}-key read model, DbConsumer SQLite", updates,
                t, db_times, f"Consumer, JSON state {size_mb:.0f} MB", base, json_times,
                ratio=base / t, target=">= 1x", passed=at_least(base / t, 1.0),
                note=f"checkpoint/commit every 1000 events; JSON state {size_mb:.1f} MB")]


def run(opts: Options[Sizes], only: set[int]) -> dict[int, list[Row]]:
    rows = {1: row_catchup, 2: row_commit_scale, 3: row_large_state}
    return {n: rows[n](opts) for n in sorted(only)}


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(argv, __doc__, FULL, QUICK, rows=3, quick_runs=1,
                      big_help="rows in row 2's big table (default 10_000_000, quick 200_000)",
                      run=run, title="eventpipe database-state consumer benchmarks",
                      ratios="ratio = throughput ours/baseline in rows 1 and 3, time "
                             "big/small in row 2")


if __name__ == "__main__":
    sys.exit(main())
