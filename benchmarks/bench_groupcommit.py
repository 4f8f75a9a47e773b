"""Group commit (issue 14): durable appends from many writers against one writer and SQLite.

Regenerate the results (the first form creates the venv and installs what is needed)::

    python3 dev.py bench bench_groupcommit.py
    .venv/bin/python benchmarks/bench_groupcommit.py [--runs N] [--quick] [--dir DIR]
                                                     [--only 1,2,...] [--json]

Every number is the median of ``--runs`` runs (default 5; 3 with ``--quick``), each in a fresh
temporary directory; the two sides of a row alternate which goes first. Ratios are aggregate
throughput ours / baseline. Targets are a report, not a gate (exit 0 whatever they say).

Rows:
  1  sync="always", one writer, append() one at a time vs SQLite autocommit, FULL, WAL
  2  sync="always", 4 writer processes appending N/4 each at once vs 1 process appending N
  3  sync="always", 8 threads of one process sharing an EventLog vs 1 thread appending N
  4  sync="interval" (the default), 4 writer processes vs 1 process (storage row 7's setup)

Writer processes are spawned, wait at a barrier, and take ``sync`` from ``EVENTPIPE_SYNC``;
every run's log is checked afterwards (head == N, each event once).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from _bench import (
    Options,
    Row,
    alternate,
    bench_main,
    fresh_dir,
    make_events,
    median,
    progress,
    timed,
)
from bench_storage import (
    append_each,
    check_log,
    run_writers,
    sqlite_full_inserts,
)

from eventpipe import EventLog


@dataclass(frozen=True)
class Sizes:
    always: int  # rows 1-3: durable appends per run
    interval: int  # row 4
    procs: int  # rows 2 and 4
    threads: int  # row 3
    big: int = 0  # unused (the --big option every benchmark script takes)


FULL = Sizes(always=2_000, interval=100_000, procs=4, threads=8)
QUICK = Sizes(always=400, interval=20_000, procs=4, threads=8)


@contextmanager
def sync_policy(policy: str) -> Iterator[None]:
    """``EVENTPIPE_SYNC`` set for this process and the writers it spawns."""
    before = os.environ.get("EVENTPIPE_SYNC")
    os.environ["EVENTPIPE_SYNC"] = policy
    try:
        yield
    finally:
        if before is None:
            del os.environ["EVENTPIPE_SYNC"]
        else:
            os.environ["EVENTPIPE_SYNC"] = before


# --------------------------------------------------------------------- row 1: one writer


def bench_one_writer(opts: Options[Sizes]) -> list[Row]:
    n = opts.sizes.always
    events = make_events(0, n)

    def ours() -> float:
        with fresh_dir(opts.dir) as tmp:
            log = EventLog(os.path.join(tmp, "log"), sync="always")
            seconds = timed(functools.partial(append_each, log, events))
            log.close()
            check_log(os.path.join(tmp, "log"), n)
            return seconds

    sqlite = functools.partial(sqlite_full_inserts, opts.dir, events)

    progress(f"row 1: sync=always, 1 writer x {n:,} appends vs SQLite FULL, {opts.runs} runs")
    mine, base = alternate(opts.runs, [ours, sqlite])
    t, b = median(mine), median(base)
    return [Row(f"always, 1 writer x {n:,} append", n, t, mine,
                "sqlite autocommit, FULL", b, base, ratio=b / t, target=">= 2x",
                passed=b / t >= 2.0,
                note=f"ours {t / n * 1e6:.0f} us/append, SQLite {b / n * 1e6:.0f} us/insert; "
                     "one writer cannot share a flush: each append waits for its own")]


# ------------------------------------------------------------ rows 2 and 4: processes


def writers_row(opts: Options[Sizes], policy: str, n: int, target: float,
                label: str) -> Row:
    k = opts.sizes.procs

    def run_k(procs: int) -> float:
        with fresh_dir(opts.dir) as tmp, sync_policy(policy):
            path = os.path.join(tmp, "log")
            EventLog(path).close()  # created up front: the writers only open it
            seconds = run_writers(path, n, procs)
            check_log(path, n)
            return seconds

    progress(f"{label}: sync={policy}, {k} processes vs 1 x {n:,} appends, {opts.runs} runs")
    multi, single = alternate(opts.runs, [functools.partial(run_k, k),
                                          functools.partial(run_k, 1)])
    t, b = median(multi), median(single)
    return Row(f"{policy}, {k} procs x {n // k:,} append", n, t, multi,
               f"1 process x {n:,} append", b, single, ratio=b / t,
               target=f">= {target:g}x", passed=b / t >= target,
               note=f"aggregate rate on {os.cpu_count()} cpus, writers start together at a "
                    "barrier; every run checked: head == N, each event once")


def bench_always_processes(opts: Options[Sizes]) -> list[Row]:
    return [writers_row(opts, "always", opts.sizes.always, 3.0, "row 2")]


def bench_interval_processes(opts: Options[Sizes]) -> list[Row]:
    return [writers_row(opts, "interval", opts.sizes.interval, 1.0, "row 4")]


# ------------------------------------------------------------------------ row 3: threads


def threaded_appends(path: str, n: int, threads: int) -> float:
    """Seconds for ``threads`` threads sharing one EventLog to append ``n`` events."""
    per = n // threads
    log = EventLog(path, sync="always")
    log.append({"warm": True})  # open the writer outside the timing
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        events = make_events(k * per, per if k < threads - 1 else n - k * per)
        barrier.wait()
        try:
            append_each(log, events)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - start
    log.close()
    if errors:
        raise errors[0]
    return seconds


def bench_threads(opts: Options[Sizes]) -> list[Row]:
    n, k = opts.sizes.always, opts.sizes.threads

    def run_k(threads: int) -> float:
        with fresh_dir(opts.dir) as tmp:
            path = os.path.join(tmp, "log")
            seconds = threaded_appends(path, n, threads)
            with EventLog(path) as log:
                assert log.head == n + 1, (log.head, n + 1)
                names = [r.event.get("name") for r in log.read(1)]
            assert sorted(names) == sorted(f"event{i}" for i in range(n)), "lost or doubled"
            return seconds

    progress(f"row 3: sync=always, {k} threads vs 1 x {n:,} appends, {opts.runs} runs")
    multi, single = alternate(opts.runs, [functools.partial(run_k, k),
                                          functools.partial(run_k, 1)])
    t, b = median(multi), median(single)
    return [Row(f"always, {k} threads x {n // k:,} append", n, t, multi,
                f"1 thread x {n:,} append", b, single, ratio=b / t, target=">= 3x",
                passed=b / t >= 3.0,
                note="one EventLog shared by the threads; every run checked: each event once")]


# ---------------------------------------------------------------------------------- main


def run(opts: Options[Sizes], only: set[int]) -> dict[int, list[Row]]:
    rows: dict[int, Callable[[Options[Sizes]], list[Row]]] = {
        1: bench_one_writer, 2: bench_always_processes, 3: bench_threads,
        4: bench_interval_processes}
    return {number: fn(opts) for number, fn in rows.items() if number in only}


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(argv, __doc__, FULL, QUICK, rows=4, quick_runs=3,
                      big_help="unused", run=run, title="eventpipe group commit benchmarks",
                      ratios="ratio = ours/baseline aggregate throughput")


if __name__ == "__main__":
    sys.exit(main())
