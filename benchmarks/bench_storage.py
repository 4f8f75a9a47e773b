"""Storage benchmarks: eventpipe's EventLog against a naive JSON-lines file and SQLite.

Regenerate the results (the first form creates the venv and installs what is needed)::

    python3 dev.py bench bench_storage.py
    .venv/bin/python benchmarks/bench_storage.py [--runs N] [--quick] [--dir DIR] [--big N]
                                                 [--only 1,2,...] [--json]

It prints an environment line, then one table row per measurement. Every number is the median
of ``--runs`` runs (default 5; 3 with ``--quick``), each run in a fresh temporary directory under
``--dir`` (default: the system temp dir). Baselines run in the same process, in the same runs,
interleaved with ours, on the same events ``{"ts": <int>, "name": "event<i>"}``. Ratios are
throughput ours / baseline unless the row says otherwise. Targets are a report, not a gate:
the script exits 0 whatever they say (non-zero only if it crashed, e.g. a failed check).

Rows:
  1  append_many 100k, one call (compression None, and default gzip) vs naive file writes
  2  append 100k, one call each: rate, and vs SQLite autocommit inserts (WAL, NORMAL)
  3  buffered writer (log.writer()) 100k
  4  append_many 100k vs SQLite executemany in one transaction (WAL, NORMAL)
  5  sync="always" 2k appends vs SQLite autocommit with synchronous=FULL
  6  full read of 300k events: decoded vs naive ``for line in f: loads(line)`` and vs SQLite;
     read_raw (undecoded) vs naive raw lines
  7  4 processes appending N/4 each, concurrently, vs 1 process appending N
  8  latency of single appends while 1 MiB segments roll and gzip in the background
  9  open + read the last event: log of --big events (default 10M) vs 10k events
 10  the writer lock: a raw flock pair vs filelock's acquire+release
 11  offset_at (issue 10's time lookup): log of --big events vs 10k events, the first lookup
     on a fresh reader (caches empty) and lookups on a warm one

``--quick`` shrinks every size (a smoke test can run ``bench_storage.py --quick --runs 1
--json``, a few seconds); ``--json`` prints the results as JSON on stdout instead of the table
(progress always goes to stderr). ``--only 1,9`` runs some rows. Default runtime is about two
minutes on a 2-cpu VM, most of it rows 2, 7 and 8 (single appends) and building the big logs of
rows 9 and 11.
"""

from __future__ import annotations

import fcntl
import functools
import multiprocessing
import os
import queue
import random
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

import filelock
import orjson
from _bench import (
    Options,
    Row,
    at_least,
    bench_main,
    build_logs,
    fmt_rate,
    fmt_seconds,
    fresh_dir,
    make_events,
    median,
    percentile,
    progress,
    scale_row,
    segment_files,
    short_count,
    timed,
)

from eventpipe import EventLog

SQL_CREATE = "CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)"
SQL_INSERT = "INSERT INTO t (body) VALUES (?)"
Events = list[dict[str, Any]]


@dataclass(frozen=True)
class Sizes:
    write: int  # rows 1-4
    fsync: int  # row 5
    read: int  # row 6
    procs_total: int  # row 7
    procs: int  # row 7
    latency: int  # row 8
    big: int  # row 9
    small: int  # row 9
    open_repeats: int  # rows 9 and 11
    latency_segment_bytes: int  # row 8
    lookups: int  # row 11: times looked up per reader (plus one before all, one after all)


FULL = Sizes(write=100_000, fsync=2_000, read=300_000, procs_total=100_000, procs=4,
             latency=200_000, big=10_000_000, small=10_000, open_repeats=20,
             latency_segment_bytes=1 << 20, lookups=20)
QUICK = Sizes(write=10_000, fsync=200, read=30_000, procs_total=20_000, procs=4,
              latency=20_000, big=1_000_000, small=10_000, open_repeats=20,
              latency_segment_bytes=64 << 10,  # so that quick runs roll segments too
              lookups=5)


def size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 1 << 20 else f"{n / 2**10:g} KiB"


def sqlite_open(path: str, synchronous: str) -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None)  # autocommit: one transaction per insert
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(f"PRAGMA synchronous={synchronous}")
    con.execute(SQL_CREATE)
    return con


def append_each(log: EventLog, events: Events) -> None:
    """One ``log.append`` call per event."""
    append = log.append
    for e in events:
        append(e)


def sql_insert_each(con: sqlite3.Connection, events: Events) -> None:
    """One INSERT per event (a transaction each on an autocommit connection)."""
    execute, dumps = con.execute, orjson.dumps
    for e in events:
        execute(SQL_INSERT, (dumps(e).decode(),))


def sqlite_full_inserts(base: str | None, events: Events) -> float:
    """Seconds for one autocommit INSERT per event into a new SQLite database (WAL,
    ``synchronous=FULL``: the baseline for ``sync="always"``) in a fresh folder under ``base``."""
    with fresh_dir(base) as tmp:
        con = sqlite_open(os.path.join(tmp, "full.db"), "FULL")
        try:
            return timed(functools.partial(sql_insert_each, con, events))
        finally:
            con.close()


def fdatasync_cost(base: str | None, count: int = 200) -> float:
    """Median seconds of one small pwrite + fdatasync in ``base``: what durability costs here."""
    samples = []
    with fresh_dir(base) as tmp:
        fd = os.open(os.path.join(tmp, "probe"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for i in range(count):
                start = time.perf_counter()
                os.pwrite(fd, b"x" * 64, i * 64)
                os.fdatasync(fd)
                samples.append(time.perf_counter() - start)
        finally:
            os.close(fd)
    return median(samples)


# ------------------------------------------------------------------------ rows 1 and 4: batch


def bench_batch(opts: Options[Sizes]) -> tuple[list[Row], list[Row]]:
    n = opts.sizes.write
    events = make_events(0, n)
    plain: list[float] = []
    gzip: list[float] = []
    naive: list[float] = []
    sql: list[float] = []
    with fresh_dir(opts.dir) as tmp, EventLog(os.path.join(tmp, "warm-up")) as log:
        log.append_many(events)  # untimed: the first big batch of a process pays for fresh memory
    for run in range(opts.runs):
        progress(f"rows 1+4: batch append of {n:,} events, run {run + 1}/{opts.runs}")
        with fresh_dir(opts.dir) as tmp:
            order: list[tuple[str | None, list[float]]] = [(None, plain), ("gzip", gzip)]
            for compression, samples in order[:: 1 if run % 2 else -1]:
                log = EventLog(os.path.join(tmp, f"log-{compression}"), compression=compression)

                def batch(log: EventLog = log) -> None:
                    log.append_many(events)

                samples.append(timed(batch))
                assert log.head == n
                log.close()

            path = os.path.join(tmp, "naive.jsonl")

            def naive_write(path: str = path) -> None:
                dumps = orjson.dumps
                with open(path, "wb") as f:
                    for i in range(0, n, 1000):
                        f.write(b"\n".join(map(dumps, events[i : i + 1000])) + b"\n")

            naive.append(timed(naive_write))

            con = sqlite_open(os.path.join(tmp, "batch.db"), "NORMAL")

            def sql_batch(con: sqlite3.Connection = con) -> None:
                dumps = orjson.dumps
                con.execute("BEGIN")
                con.executemany(SQL_INSERT, ((dumps(e).decode(),) for e in events))
                con.execute("COMMIT")

            sql.append(timed(sql_batch))
            con.close()

    ours_plain, ours_gzip = median(plain), median(gzip)
    rows1 = [
        Row(f"append_many {short_count(n)}, compression=None", n, ours_plain, plain,
            "naive file, write/1000 ev", median(naive), naive,
            ratio=median(naive) / ours_plain, target=">= 0.8x",
            passed=at_least(median(naive) / ours_plain, 0.8)),
        Row(f"append_many {short_count(n)}, default (gzip)", n, ours_gzip, gzip,
            "naive file, write/1000 ev", median(naive), naive,
            ratio=median(naive) / ours_gzip, target=">= 0.8x",
            passed=at_least(median(naive) / ours_gzip, 0.8),
            note="one segment (16 MiB) holds the whole batch, so nothing is compressed here;"
                 " compression is exercised by row 8"),
    ]
    rows4 = [
        Row(f"append_many {short_count(n)} vs SQLite batch", n, ours_gzip, gzip,
            "sqlite executemany, 1 txn", median(sql), sql,
            ratio=median(sql) / ours_gzip, target=">= 2x",
            passed=at_least(median(sql) / ours_gzip, 2.0),
            note="ours with default options; SQLite in WAL mode, synchronous=NORMAL, "
                 "body TEXT from orjson"),
    ]
    return rows1, rows4


# --------------------------------------------------------------------- row 2: single appends


def bench_append(opts: Options[Sizes]) -> list[Row]:
    n = opts.sizes.write
    events = make_events(0, n)
    ours: list[float] = []
    sql: list[float] = []
    for run in range(opts.runs):
        progress(f"row 2: {n:,} single appends vs SQLite autocommit, run {run + 1}/{opts.runs}")
        with fresh_dir(opts.dir) as tmp:
            log = EventLog(os.path.join(tmp, "log"))  # defaults: sync="interval", gzip
            ours.append(timed(functools.partial(append_each, log, events)))
            assert log.head == n
            log.close()

            con = sqlite_open(os.path.join(tmp, "auto.db"), "NORMAL")
            sql.append(timed(functools.partial(sql_insert_each, con, events)))
            con.close()
    t, b = median(ours), median(sql)
    return [
        Row(f"append {short_count(n)}, one call each", n, t, ours, target=">= 150k/s",
            passed=n / t >= 150_000, note="default options (sync=\"interval\", gzip)"),
        Row(f"append {short_count(n)} vs SQLite autocommit", n, t, ours,
            "sqlite insert/txn (WAL,NORMAL)", b, sql, ratio=b / t, target=">= 2x",
            passed=b / t >= 2.0),
    ]


# --------------------------------------------------------------------- row 3: buffered writer


def bench_buffered(opts: Options[Sizes]) -> list[Row]:
    n = opts.sizes.write
    events = make_events(0, n)
    ours: list[float] = []
    for run in range(opts.runs):
        progress(f"row 3: buffered writer, {n:,} events, run {run + 1}/{opts.runs}")
        with fresh_dir(opts.dir) as tmp:
            log = EventLog(os.path.join(tmp, "log"))

            def buffered(log: EventLog = log) -> None:
                w = log.writer()
                append = w.append
                for e in events:
                    append(e)
                w.close()

            ours.append(timed(buffered))
            assert log.head == n
            log.close()
    t = median(ours)
    return [Row(f"writer() {short_count(n)}, append+close", n, t, ours, target=">= 500k/s",
                passed=n / t >= 500_000, note="log.writer() defaults: max_events=1000, "
                "linger=0.05 s; timed from writer() to close()")]


# ----------------------------------------------------------------------- row 5: fsync always


def bench_fsync(opts: Options[Sizes]) -> list[Row]:
    n = opts.sizes.fsync
    events = make_events(0, n)
    ours: list[float] = []
    sql: list[float] = []
    for run in range(opts.runs):
        progress(f"row 5: sync=\"always\", {n:,} appends vs SQLite FULL, run {run + 1}/{opts.runs}")
        with fresh_dir(opts.dir) as tmp:
            log = EventLog(os.path.join(tmp, "log"), sync="always")
            ours.append(timed(functools.partial(append_each, log, events)))
            log.close()

            con = sqlite_open(os.path.join(tmp, "full.db"), "FULL")
            sql.append(timed(functools.partial(sql_insert_each, con, events)))
            con.close()
    cost = fdatasync_cost(opts.dir)
    t, b = median(ours), median(sql)
    return [Row(f"append sync=always {short_count(n)}", n, t, ours,
                "sqlite autocommit, FULL", b, sql, ratio=b / t, target=">= 2x",
                passed=b / t >= 2.0,
                note=f"one pwrite+fdatasync costs {cost * 1e6:.0f} µs on this disk (a VM disk "
                     "with a write-back cache; a real disk flush costs far more), so this row "
                     f"measures syscalls more than the device. ours {t / n * 1e6:.0f} µs/append, "
                     f"SQLite {b / n * 1e6:.0f} µs/insert")]


# ------------------------------------------------------------------------------ row 6: read


def bench_read(opts: Options[Sizes]) -> list[Row]:
    n = opts.sizes.read
    dec: list[float] = []
    raw: list[float] = []
    naive: list[float] = []
    naive_raw: list[float] = []
    sql: list[float] = []
    for run in range(opts.runs):
        progress(f"row 6: full read of {n:,} events, run {run + 1}/{opts.runs} (building...)")
        with fresh_dir(opts.dir) as tmp:
            log_path = os.path.join(tmp, "log")
            plain_path = os.path.join(tmp, "naive.jsonl")
            db_path = os.path.join(tmp, "read.db")
            with EventLog(log_path) as w, open(plain_path, "wb") as f:
                con = sqlite_open(db_path, "NORMAL")
                con.execute("BEGIN")
                for start in range(0, n, 100_000):
                    events = make_events(start, min(100_000, n - start))
                    w.append_many(events)
                    lines = [orjson.dumps(e) for e in events]
                    f.write(b"\n".join(lines) + b"\n")
                    con.executemany(SQL_INSERT, ((ln.decode(),) for ln in lines))
                con.execute("COMMIT")
                con.close()
            log = EventLog(log_path)  # a fresh reader, as another process would open it

            def ours(log: EventLog = log) -> None:
                count = 0
                for _ in log.read():
                    count += 1
                assert count == n

            def ours_raw(log: EventLog = log) -> None:
                count = 0
                for _ in log.read_raw():
                    count += 1
                assert count == n

            def naive_loop(plain_path: str = plain_path) -> None:
                count = 0
                loads = orjson.loads
                with open(plain_path, "rb") as f:
                    for line in f:
                        loads(line)
                        count += 1
                assert count == n

            def naive_lines(plain_path: str = plain_path) -> None:
                count = 0
                with open(plain_path, "rb") as f:
                    for _ in f:
                        count += 1
                assert count == n

            def sql_select(db_path: str = db_path) -> None:
                count = 0
                loads = orjson.loads
                con = sqlite3.connect(db_path)
                for (body,) in con.execute("SELECT body FROM t ORDER BY id"):
                    loads(body)
                    count += 1
                con.close()
                assert count == n

            for fn, samples in ((ours, dec), (naive_loop, naive), (sql_select, sql),
                                (ours_raw, raw), (naive_lines, naive_raw)):
                samples.append(timed(fn))
            log.close()
    t, r = median(dec), median(raw)
    return [
        Row(f"read() {short_count(n)}, decoded Records", n, t, dec,
            "naive: for line in f: loads", median(naive), naive,
            ratio=median(naive) / t, target=">= 0.6x",
            passed=median(naive) / t >= 0.6,
            note="reads run from the page cache (the files were just written); all sides "
                 "count events in a Python for loop"),
        Row(f"read() {short_count(n)} vs SQLite", n, t, dec,
            "sqlite SELECT ORDER BY id+loads", median(sql), sql,
            ratio=median(sql) / t, target=">= 1.2x", passed=median(sql) / t >= 1.2),
        Row(f"read_raw() {short_count(n)}, undecoded", n, r, raw,
            "naive: for line in f", median(naive_raw), naive_raw,
            ratio=median(naive_raw) / r, target="info"),
    ]


# ---------------------------------------------------------------------- row 7: processes


def writer_process(path: str, first: int, count: int, barrier: Barrier,
                   results: Queue[tuple[int, float, float]]) -> None:
    """Append ``count`` events one call at a time once every writer is ready."""
    events = make_events(first, count)
    log = EventLog(path)
    barrier.wait(timeout=120)
    start = time.perf_counter()  # CLOCK_MONOTONIC: comparable between processes
    append_each(log, events)
    end = time.perf_counter()
    log.close()
    results.put((first, start, end))


def run_writers(path: str, total: int, procs: int) -> float:
    """Seconds from the first writer's start to the last writer's end."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(procs)
    results: Queue[tuple[int, float, float]] = ctx.Queue()
    per = total // procs
    workers = [
        ctx.Process(target=writer_process, name=f"bench-writer-{k}",
                    args=(path, k * per, per if k < procs - 1 else total - k * per,
                          barrier, results))
        for k in range(procs)
    ]
    for p in workers:
        p.start()
    got: list[tuple[int, float, float]] = []
    deadline = time.monotonic() + 600
    try:
        while len(got) < procs:
            try:
                got.append(results.get(timeout=0.5))
            except queue.Empty:
                dead = [p for p in workers if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    what = ", ".join(f"{p.name} exited with {p.exitcode}" for p in dead)
                    raise RuntimeError(f"writer processes failed: {what or 'timed out'}") from None
        for p in workers:
            p.join(timeout=60)
            if p.exitcode != 0:
                raise RuntimeError(f"{p.name} exited with {p.exitcode}")
    finally:
        for p in workers:
            if p.is_alive():
                p.terminate()  # only our own children, e.g. ones stuck at the barrier
                p.join(timeout=10)
    return max(e for _, _, e in got) - min(s for _, s, _ in got)


def check_log(path: str, total: int) -> None:
    """Assert the log holds exactly events 0..total-1, each once, at dense offsets."""
    with EventLog(path) as log:
        assert log.head == total, f"log has {log.head} events, expected {total}"
        seen = set()
        for k, rec in enumerate(log.read()):
            assert rec.offset == k, (rec.offset, k)
            seen.add(rec.event["name"])
        assert seen == {f"event{i}" for i in range(total)}, "events lost or duplicated"


def bench_processes(opts: Options[Sizes]) -> list[Row]:
    n, k = opts.sizes.procs_total, opts.sizes.procs
    multi: list[float] = []
    single: list[float] = []
    for run in range(opts.runs):
        progress(f"row 7: {k} writer processes x {n // k:,} appends vs 1 x {n:,}, "
                 f"run {run + 1}/{opts.runs}")
        order = ((k, multi), (1, single)) if run % 2 == 0 else ((1, single), (k, multi))
        for procs, samples in order:
            with fresh_dir(opts.dir) as tmp:
                path = os.path.join(tmp, "log")
                EventLog(path).close()  # created up front: workers only open it
                samples.append(run_writers(path, n, procs))
                check_log(path, n)
    t, b = median(multi), median(single)
    return [Row(f"{k} procs x {short_count(n // k)} append", n, t, multi,
                f"1 process x {short_count(n)} append", b, single, ratio=b / t, target=">= 1.0x",
                passed=b / t >= 1.0,
                note=f"aggregate rate over {os.cpu_count()} cpus, start together at a barrier "
                     "(spawned processes); every run checked: head == N, each event once")]


# ---------------------------------------------------------------------- row 8: latency


def bench_latency(opts: Options[Sizes]) -> list[Row]:
    n = opts.sizes.latency
    seg = opts.sizes.latency_segment_bytes
    events = make_events(0, n)
    totals: list[float] = []
    stats: dict[str, list[float]] = {"p50": [], "p99": [], "p99.9": [], "max": []}
    compressed: list[int] = []
    for run in range(opts.runs):
        progress(f"row 8: latency of {n:,} appends with {size(seg)} gzip segments, "
                 f"run {run + 1}/{opts.runs}")
        with fresh_dir(opts.dir) as tmp:
            log = EventLog(os.path.join(tmp, "log"), segment_max_bytes=seg,
                           compression="gzip")
            lat = [0] * n
            clock = time.perf_counter_ns
            append = log.append
            start = time.perf_counter()
            for i, e in enumerate(events):
                t0 = clock()
                append(e)
                lat[i] = clock() - t0
            totals.append(time.perf_counter() - start)
            compressed.append(sum(name.endswith(".gz") for name in os.listdir(log.segments_dir)))
            log.close()
        lat.sort()
        for key, pct in (("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9), ("max", 100.0)):
            stats[key].append(percentile(lat, pct) / 1e9)
    med = {key: median(v) for key, v in stats.items()}
    t = median(totals)
    parts = ", ".join(f"{key} {fmt_seconds(v)}" for key, v in med.items())
    return [Row(f"append latency, {size(seg)} gzip segs", n, t, totals,
                ratio=None, target="p99 < 5 ms", passed=med["p99"] < 5e-3,
                extra={f"{key}_s": v for key, v in med.items()}
                | {"worst_max_s": max(stats["max"])},
                note=f"per-call latency (median over runs): {parts}; worst max over runs "
                     f"{fmt_seconds(max(stats['max']))}; ~{median(compressed):.0f} segments "
                     "gzip'd by the background thread during a run")]


# ------------------------------------------------------------------ row 9: open + read last


def open_and_read_last(path: str, total: int) -> float:
    start = time.perf_counter()
    log = EventLog(path, compression=None)
    records = log.read(log.head - 1)
    rec = next(records)
    elapsed = time.perf_counter() - start
    del records  # drops the generator: its segment file is closed
    log.close()
    assert rec.offset == total - 1 and rec.event["name"] == f"event{total - 1}"
    return elapsed


def bench_open(opts: Options[Sizes]) -> list[Row]:
    big, small, reps = opts.sizes.big, opts.sizes.small, opts.sizes.open_repeats
    big_s: list[float] = []
    small_s: list[float] = []
    with fresh_dir(opts.dir) as tmp:
        big_path, small_path = os.path.join(tmp, "big"), os.path.join(tmp, "small")
        progress(f"row 9: building a {big:,}-event log (append_many, batches of 100k)")
        build = build_logs(big, [(big_path, {"compression": None})],
                           label="row 9: building big log")
        build_logs(small, [(small_path, {"compression": None})],
                   label="row 9: building small log")
        segments, _, size = segment_files(big_path)
        for run in range(opts.runs):
            progress(f"row 9: open + read last, {reps} repeats each, run {run + 1}/{opts.runs}")
            b: list[float] = []
            s: list[float] = []
            for _ in range(reps):
                b.append(open_and_read_last(big_path, big))
                s.append(open_and_read_last(small_path, small))
            big_s.append(median(b))
            small_s.append(median(s))
    return [scale_row(f"open+read last, {short_count(big)}-event log", big_s,
                      f"same on a {short_count(small)}-event log", small_s,
                      note=f"fresh EventLog each time, median of {reps} repeats per run; the "
                           f"big log ({segments} segments, {size / 2**20:.0f} MiB, built once "
                           f"in {build:.1f} s = {fmt_rate(big / build)} via append_many) is "
                           "read from the page cache")]


# ----------------------------------------------------------------------- row 10: the lock


def bench_lock(opts: Options[Sizes]) -> list[Row]:
    """Row 10: why the append path takes flock itself rather than through filelock."""
    n = 20_000 if not opts.quick else 2_000
    raw: list[float] = []
    wrapped: list[float] = []
    for run in range(opts.runs):
        progress(f"row 10: lock acquire+release x {n:,}, run {run + 1}/{opts.runs}")
        with fresh_dir(opts.dir) as tmp:
            path = os.path.join(tmp, "writer.lock")
            lock = filelock.FileLock(path, thread_local=False, is_singleton=False)
            fd = os.open(path, os.O_RDWR | os.O_CREAT)
            try:

                def with_filelock(lock: filelock.FileLock = lock) -> None:
                    for _ in range(n):
                        lock.acquire()
                        lock.release()

                def with_flock(fd: int = fd) -> None:
                    flock, ex, un = fcntl.flock, fcntl.LOCK_EX, fcntl.LOCK_UN
                    for _ in range(n):
                        flock(fd, ex)
                        flock(fd, un)

                wrapped.append(timed(with_filelock))
                raw.append(timed(with_flock))
            finally:
                os.close(fd)
    ours, base = median(raw), median(wrapped)
    return [Row("lock: raw flock on a kept-open fd", n, ours, raw,
                "filelock FileLock acquire+release", base, wrapped, ratio=base / ours,
                target="info",
                note=f"per acquire+release: flock {ours / n * 1e6:.2f} us, filelock "
                     f"{base / n * 1e6:.1f} us (it opens, locks, unlocks and closes the file "
                     "each time); at ~6 us per append, filelock alone would cap append() "
                     f"near {n / base / 1000:.0f}k/s. Both take flock on the same file, so "
                     "they exclude each other; the appender uses the raw one")]


# ------------------------------------------------------------------------ row 11: offset_at

OFFSET_AT_TARGET = 2.0  # issue 10: offset_at on 10M events at most 2x its cost on 10k


def index_entries(log_path: str) -> int:
    """Entries in a log's time indexes (``segments/*.times``, 16 bytes each)."""
    return sum(e.stat().st_size // 16 for e in os.scandir(os.path.join(log_path, "segments"))
               if e.name.endswith(".times"))


def lookup_times(path: str, count: int, seed: int) -> list[int]:
    """The times to look up in a log: those of ``count`` events at random offsets, one before
    every event and one after every event (ns since the epoch)."""
    rng = random.Random(seed)
    with EventLog(path, compression=None) as log:
        head = log.head
        times = [log.time_of(rng.randrange(head)) for _ in range(count)]
        first = log.time_of(0)
    assert first is not None and all(t is not None for t in times), "events without times"
    return [t for t in times if t is not None] + [first - 1_000_000_000,
                                                  time.time_ns() + 3600 * 1_000_000_000]


def check_offset_at(path: str, lookups: list[int]) -> None:
    """Assert every lookup's answer is the first offset appended at or after its time."""
    with EventLog(path, compression=None) as log:
        head = log.head
        for t in lookups:
            got = log.offset_at(t)
            if got < head:
                found = log.time_of(got)
                assert found is not None and found >= t, (t, got, found)
            if got > 0:
                before = log.time_of(got - 1)
                assert before is not None and before < t, (t, got, before)
        assert log.offset_at(lookups[-2]) == 0 and log.offset_at(lookups[-1]) == head


def offset_at_costs(path: str, lookups: list[int], reps: int) -> tuple[float, float]:
    """``(first, warm)``: over ``reps`` freshly opened EventLogs (opening is not timed), the
    median seconds of the first ``offset_at`` on each (its caches empty), and of each lookup
    once every time was looked up before on the same EventLog (its caches filled)."""
    clock = time.perf_counter
    first: list[float] = []
    warm: list[float] = []
    for r in range(reps):
        log = EventLog(path, compression=None)
        offset_at = log.offset_at
        t = lookups[r % len(lookups)]
        start = clock()
        offset_at(t)
        first.append(clock() - start)
        for t in lookups:
            offset_at(t)  # untimed: fills the caches of the segments these times are in
        for t in lookups:
            start = clock()
            offset_at(t)
            warm.append(clock() - start)
        log.close()
    return median(first), median(warm)


def bench_offset_at(opts: Options[Sizes]) -> list[Row]:
    big, small, reps = opts.sizes.big, opts.sizes.small, opts.sizes.open_repeats
    count = opts.sizes.lookups
    cold: dict[str, list[float]] = {"big": [], "small": []}
    warm: dict[str, list[float]] = {"big": [], "small": []}
    with fresh_dir(opts.dir) as tmp:
        paths = {"big": os.path.join(tmp, "big"), "small": os.path.join(tmp, "small")}
        # Appended over real time, in batches, so the time indexes are like a live log's: the
        # big one as fast as append_many of 1000 events goes (an entry per batch that took
        # >= 1 ms since the last entry), the small one a batch of 100 every millisecond or so.
        progress(f"row 11: building a {big:,}-event log (append_many, batches of 1000)")
        build = build_logs(big, [(paths["big"], {"compression": None})],
                           label="row 11: building big log", batch=1000)
        build_logs(small, [(paths["small"], {"compression": None})], batch=100, pause=0.001)
        lookups = {k: lookup_times(p, count, seed=11) for k, p in paths.items()}
        for k, p in paths.items():
            check_offset_at(p, lookups[k])
        entries = {k: index_entries(p) for k, p in paths.items()}
        segments = segment_files(paths["big"])[0]
        for run in range(opts.runs):
            progress(f"row 11: offset_at, {reps} fresh readers x {len(lookups['big'])} "
                     f"lookups each, run {run + 1}/{opts.runs}")
            order = ("big", "small") if run % 2 == 0 else ("small", "big")
            for k in order:
                c, w = offset_at_costs(paths[k], lookups[k], reps)
                cold[k].append(c)
                warm[k].append(w)
    what = (f"{len(lookups['big'])} times (those of {count} events at random offsets, one "
            "before all, one after all)")
    plural = "s" if segments != 1 else ""
    logs = (f"big log: {segments} segment{plural}, {entries['big']:,} time index entries, "
            f"built in {build:.1f} s; small log: 1 segment, {entries['small']:,} entries; both "
            "read from the page cache")
    return [
        scale_row(f"offset_at, {short_count(big)}-event log, fresh reader", cold["big"],
                  f"same on a {short_count(small)}-event log", cold["small"],
                  target=OFFSET_AT_TARGET,
                  extra={"entries_big": entries["big"], "entries_small": entries["small"]},
                  note=f"the first offset_at on a just opened EventLog (its segment listing "
                       f"and time index caches empty), median of {reps} readers per run, "
                       f"looking up one of {what}; {logs}"),
        scale_row(f"offset_at, {short_count(big)}-event log, warm reader", warm["big"],
                  f"same on a {short_count(small)}-event log", warm["small"],
                  target=OFFSET_AT_TARGET,
                  note=f"each of the {what} looked up again on an EventLog that looked them "
                       f"all up once (its caches hold those segments' entries), median over "
                       f"{reps} readers per run"),
    ]


# ---------------------------------------------------------------------------------- main


def run(opts: Options[Sizes], only: set[int]) -> dict[int, list[Row]]:
    """Run the selected rows; returns the rows of each row number."""
    out: dict[int, list[Row]] = {}
    if only & {1, 4}:
        out[1], out[4] = bench_batch(opts)
    single: list[tuple[int, Callable[[Options[Sizes]], list[Row]]]] = [
        (2, bench_append), (3, bench_buffered), (5, bench_fsync), (6, bench_read),
        (7, bench_processes), (8, bench_latency), (9, bench_open), (10, bench_lock),
        (11, bench_offset_at),
    ]
    for number, fn in single:
        if number in only:
            out[number] = fn(opts)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(argv, __doc__, FULL, QUICK, rows=11, quick_runs=3,
                      big_help="events in the big logs of rows 9 and 11 (default 10_000_000, "
                               "quick 1_000_000)",
                      run=run, title="eventpipe storage benchmarks",
                      ratios="ratio = ours/baseline throughput unless noted")


if __name__ == "__main__":
    sys.exit(main())
