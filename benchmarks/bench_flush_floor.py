"""What this machine allows the group-commit rows (issue 14), measured with no eventpipe code.

Regenerate the results (the first form creates the venv and installs what is needed)::

    python3 dev.py bench bench_flush_floor.py
    .venv/bin/python benchmarks/bench_flush_floor.py [--runs N] [--quick] [--dir DIR]
                                                     [--only 1,2,...] [--json]

Each row does the bare system calls an append needs, in a loop of plain Python, against the
same baseline as the ``bench_groupcommit.py`` row it bounds, in the same run. So it says how
far a row could go on this disk and these cores if the library cost nothing. Every number is
the median of ``--runs`` runs (default 5; 3 with ``--quick``); the two sides of a row alternate
which goes first. Rows are reports, not gates (exit 0 whatever they say).

Rows:
  1  today's format, 1 writer: event pwrite to the segment, header pwrite, fdatasync of both
     (two files: two device flushes), vs SQLite autocommit, FULL, WAL (group-commit row 1)
  2  one file, 1 writer: append and fdatasync the file it grew (a format whose commit record
     is in the data file), vs SQLite FULL
  3  one file, overwritten: pwrite into a file filled with zeros and flushed beforehand, then
     fdatasync (no size change, so no journal commit), vs SQLite FULL
  4  today's format, 4 processes: each writes under a flock, releases it, fdatasyncs both
     files itself (the kernel merges flushes in flight), vs 1 process (group-commit row 2)
  5  no flush, 4 processes: flock, header pread, event pwrite, header pwrite, unlock, the
     event encoded outside the lock, vs 1 process (group-commit row 4, ``interval``)
  6  today's format, 8 threads of one process, each as in row 4 through descriptors of its
     own, vs 1 thread (group-commit row 3)
"""

from __future__ import annotations

import fcntl
import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson
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
from bench_storage import sqlite_full_inserts

Events = list[dict[str, object]]


@dataclass(frozen=True)
class Sizes:
    flushed: int  # rows 1-4 and 6: appends per run
    unflushed: int  # row 5
    procs: int  # rows 4 and 5
    threads: int  # row 6
    big: int = 0  # unused (the --big option every benchmark script takes)


FULL = Sizes(flushed=2_000, unflushed=100_000, procs=4, threads=8)
QUICK = Sizes(flushed=400, unflushed=20_000, procs=4, threads=8)


def create(path: str, size: int = 0) -> None:
    """A file of ``size`` zero bytes, on disk (flushed) before anything is timed."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if size:
            os.pwrite(fd, bytes(size), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ the loops measured


def two_files(tmp: str, blobs: list[bytes], lock: bool) -> None:
    """Per append: (flock,) segment pwrite, header pwrite, (unlock,) fdatasync both."""
    seg = os.open(os.path.join(tmp, "segment"), os.O_RDWR)
    head = os.open(os.path.join(tmp, "head"), os.O_RDWR)
    lock_fd = os.open(os.path.join(tmp, "lock"), os.O_RDWR)
    flock, pread, pwrite, fdatasync = fcntl.flock, os.pread, os.pwrite, os.fdatasync
    try:
        for blob in blobs:
            if lock:
                flock(lock_fd, fcntl.LOCK_EX)
            end = int.from_bytes(pread(head, 8, 0), "little")
            pwrite(seg, blob, end)
            pwrite(head, (end + len(blob)).to_bytes(8, "little"), 0)
            if lock:
                flock(lock_fd, fcntl.LOCK_UN)
            fdatasync(seg)
            fdatasync(head)
    finally:
        for fd in (seg, head, lock_fd):
            os.close(fd)


def one_file(tmp: str, blobs: list[bytes], prezeroed: bool) -> None:
    """Per append: one pwrite, one fdatasync, into a growing or an already written file."""
    fd = os.open(os.path.join(tmp, "zeroed" if prezeroed else "segment"), os.O_RDWR)
    pwrite, fdatasync = os.pwrite, os.fdatasync
    try:
        position = 0
        for blob in blobs:
            pwrite(fd, blob, position)
            position += len(blob)
            fdatasync(fd)
    finally:
        os.close(fd)


def unflushed(tmp: str, events: Events) -> None:
    """Per append: encode, then flock, header pread, segment pwrite, header pwrite, unlock."""
    seg = os.open(os.path.join(tmp, "segment"), os.O_RDWR)
    head = os.open(os.path.join(tmp, "head"), os.O_RDWR)
    lock_fd = os.open(os.path.join(tmp, "lock"), os.O_RDWR)
    flock, pread, pwrite, dumps = fcntl.flock, os.pread, os.pwrite, orjson.dumps
    ex, un = fcntl.LOCK_EX, fcntl.LOCK_UN
    try:
        for event in events:
            blob = dumps(event, option=orjson.OPT_APPEND_NEWLINE)
            flock(lock_fd, ex)
            end = int.from_bytes(pread(head, 8, 0), "little")
            pwrite(seg, blob, end)
            pwrite(head, (end + len(blob)).to_bytes(8, "little"), 0)
            flock(lock_fd, un)
    finally:
        for fd in (seg, head, lock_fd):
            os.close(fd)


def in_processes(procs: int, work: Callable[[int], None]) -> float:
    """Seconds for ``procs`` forked processes to each run ``work(k)``, started together."""
    read_end, write_end = os.pipe()
    children = []
    for k in range(procs):
        pid = os.fork()
        if pid == 0:  # the child: wait for the start, work, leave without cleanup
            status = 1
            try:
                os.close(write_end)
                os.read(read_end, 1)
                work(k)
                status = 0
            finally:
                os._exit(status)
        children.append(pid)
    os.close(read_end)
    start = time.perf_counter()
    os.write(write_end, bytes(procs))
    os.close(write_end)
    failed = [pid for pid in children if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])]
    seconds = time.perf_counter() - start
    if failed:
        raise RuntimeError(f"{len(failed)} of {procs} writer processes failed")
    return seconds


def prepared(base: str | None, zeroed: int, fn: Callable[[str], float]) -> float:
    with fresh_dir(base) as tmp:
        for name in ("segment", "head", "lock"):
            create(os.path.join(tmp, name), 8 if name == "head" else 0)
        if zeroed:
            create(os.path.join(tmp, "zeroed"), zeroed)
        return fn(tmp)


# --------------------------------------------------------------------------- the rows


def versus_sqlite(opts: Options[Sizes], number: int, label: str,
                  loop: Callable[[str, list[bytes]], None], zeroed: bool, note: str) -> Row:
    n = opts.sizes.flushed
    events = make_events(0, n)
    blobs = [orjson.dumps(e, option=orjson.OPT_APPEND_NEWLINE) for e in events]
    room = sum(map(len, blobs)) + 4096 if zeroed else 0

    def raw() -> float:
        return prepared(opts.dir, room, lambda tmp: timed(functools.partial(loop, tmp, blobs)))

    sqlite = functools.partial(sqlite_full_inserts, opts.dir, events)

    progress(f"row {number}: {label} x {n:,} vs SQLite FULL, {opts.runs} runs")
    mine, base = alternate(opts.runs, [raw, sqlite])
    t, b = median(mine), median(base)
    return Row(f"{label} x {n:,}", n, t, mine, "sqlite autocommit, FULL", b, base,
               ratio=b / t, target="report", passed=None,
               note=f"{t / n * 1e6:.0f} us per append, SQLite {b / n * 1e6:.0f} us; {note}")


def bench_two_files(opts: Options[Sizes]) -> list[Row]:
    return [versus_sqlite(opts, 1, "raw, two files, 2 fdatasyncs",
                          lambda tmp, blobs: two_files(tmp, blobs, lock=False), False,
                          "the most group-commit row 1 can reach with today's format")]


def bench_one_file(opts: Options[Sizes]) -> list[Row]:
    return [versus_sqlite(opts, 2, "raw, one growing file",
                          lambda tmp, blobs: one_file(tmp, blobs, prezeroed=False), False,
                          "commit record in the data file")]


def bench_overwrite(opts: Options[Sizes]) -> list[Row]:
    return [versus_sqlite(opts, 3, "raw, one pre-zeroed file",
                          lambda tmp, blobs: one_file(tmp, blobs, prezeroed=True), True,
                          "commit record in the data file and segments written ahead")]


def processes_row(opts: Options[Sizes], number: int, n: int, label: str,
                  work: Callable[[str, int, int], None], note: str) -> Row:
    k = opts.sizes.procs

    def run(procs: int) -> float:
        return prepared(opts.dir, 0, lambda tmp: in_processes(
            procs, lambda index: work(tmp, index, n // procs)))

    progress(f"row {number}: {label}, {k} processes vs 1 x {n:,}, {opts.runs} runs")
    multi, single = alternate(opts.runs, [functools.partial(run, k), functools.partial(run, 1)])
    t, b = median(multi), median(single)
    return Row(f"{label}, {k} procs x {n // k:,}", n, t, multi, f"1 process x {n:,}", b, single,
               ratio=b / t, target="report", passed=None, note=note)


def bench_flushing_processes(opts: Options[Sizes]) -> list[Row]:
    n = opts.sizes.flushed

    def work(tmp: str, index: int, count: int) -> None:
        blobs = [orjson.dumps(e, option=orjson.OPT_APPEND_NEWLINE)
                 for e in make_events(index * count, count)]
        two_files(tmp, blobs, lock=True)

    return [processes_row(opts, 4, n, "raw, each flushes itself", work,
                          "every process flushes both files after each append; the most "
                          "group-commit row 2 can reach without sharing more than the kernel")]


def bench_unflushed_processes(opts: Options[Sizes]) -> list[Row]:
    n = opts.sizes.unflushed

    def work(tmp: str, index: int, count: int) -> None:
        unflushed(tmp, make_events(index * count, count))

    return [processes_row(opts, 5, n, "raw, locked writes, no flush", work,
                          "4 processes on the cores there are, one flock: what group-commit "
                          "row 4 (interval) can reach")]


def in_threads(threads: int, work: Callable[[int], None]) -> float:
    """Seconds for ``threads`` threads to each run ``work(k)``, started together."""
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)

    def run(k: int) -> None:
        start.wait()
        try:
            work(k)
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - began
    if errors:
        raise errors[0]
    return seconds


def bench_flushing_threads(opts: Options[Sizes]) -> list[Row]:
    n, k = opts.sizes.flushed, opts.sizes.threads

    def run(threads: int) -> float:
        count = n // threads
        blobs = [[orjson.dumps(e, option=orjson.OPT_APPEND_NEWLINE)
                  for e in make_events(index * count, count)] for index in range(threads)]
        return prepared(opts.dir, 0, lambda tmp: in_threads(
            threads, lambda index: two_files(tmp, blobs[index], lock=True)))

    progress(f"row 6: raw, {k} threads vs 1 x {n:,}, {opts.runs} runs")
    multi, single = alternate(opts.runs, [functools.partial(run, k), functools.partial(run, 1)])
    t, b = median(multi), median(single)
    return [Row(f"raw, each thread flushes, {k} threads x {n // k:,}", n, t, multi,
                f"1 thread x {n:,}", b, single, ratio=b / t, target="report", passed=None,
                note="each thread its own descriptors and flock; the most group-commit row 3 "
                     "can reach with every thread flushing for itself")]


# ---------------------------------------------------------------------------------- main


def run(opts: Options[Sizes], only: set[int]) -> dict[int, list[Row]]:
    rows: dict[int, Callable[[Options[Sizes]], list[Row]]] = {
        1: bench_two_files, 2: bench_one_file, 3: bench_overwrite,
        4: bench_flushing_processes, 5: bench_unflushed_processes, 6: bench_flushing_threads}
    return {number: fn(opts) for number, fn in rows.items() if number in only}


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(argv, __doc__, FULL, QUICK, rows=6, quick_runs=3,
                      big_help="unused", run=run, title="flush floors (no eventpipe code)",
                      ratios="ratio = raw/baseline throughput")


if __name__ == "__main__":
    sys.exit(main())
