"""Scale with segment count: what one roll costs at 10 sealed segments and at 10k.

Regenerate the results (the first form creates the venv and installs what is needed)::

    python3 dev.py bench bench_segments.py
    .venv/bin/python benchmarks/bench_segments.py [--runs N] [--quick] [--dir DIR] [--big N]
                                                  [--only 1,2] [--json]

Every number is the median of ``--runs`` runs (default 5; 3 with ``--quick``). Two logs are
built once, in a temporary directory under ``--dir``: one with ``--big`` sealed segments
(default 10k; 1k with ``--quick``) and one with 10, each segment one event, every sealed one
already checksummed and gzip'd (the files are written directly, then one explicit
``compress()`` records the compressor's watermark). Each run then appends, one event at a time,
``rolls`` events to each log (300; 30 with ``--quick``), every one of which seals a segment,
with ``segment_max_events=1``, ``sync="none"``, default gzip, and ``retention_max_bytes`` set to
the log's size, so that each roll's sealing work also prunes about one segment. After each
append the run waits until the background compressor has checksummed and gzip'd the segment it
sealed, so the rolls never pile up. The ratio is big / small (lower is better; 1.0 means the
cost does not grow with the number of segments).

Rows:
  1  compressor CPU per roll: the compressor thread's own CPU time (its thread CPU clock)
     over the run, per roll: checksum, gzip, watermark, retention. Also the wall time from
     the append's return to its segment being gzip'd (in the note).
  2  roll latency: p50 of the ``append`` calls that seal a segment (the appender's side).

``--json`` prints the results as JSON on stdout instead of the table (progress always goes to
stderr). Default runtime is about a minute on a 2-cpu VM, most of it building the big log.
"""

from __future__ import annotations

import gzip
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
    bench_main,
    fmt_seconds,
    fresh_dir,
    make_events,
    median,
    percentile,
    progress,
    scale_row,
    segment_files,
    short_count,
)

from eventpipe import EventLog
from eventpipe._checksum import BLOCK_BYTES, SUM_FORMAT, sum_blocks
from eventpipe._compress import load_state
from eventpipe._header import HEADER_SIZE, decode_header


@dataclass(frozen=True)
class Sizes:
    big: int  # sealed segments of the big log
    small: int  # ... of the small one
    rolls: int  # rolls measured per run


FULL = Sizes(big=10_000, small=10, rolls=300)
QUICK = Sizes(big=1_000, small=10, rolls=30)


def segment_base(path: str) -> int:
    with open(os.path.join(path, "head"), "rb") as f:
        h = decode_header(f.read(HEADER_SIZE))
    assert h is not None
    return h.segment_base


def build(path: str, sealed: int) -> float:
    """A log of ``sealed`` sealed one-event segments, all checksummed and gzip'd, and its
    compressor's watermark recorded; returns the seconds it took."""
    start = time.perf_counter()
    with EventLog(path, segment_max_events=1, compression=None, sync="none") as log:
        log.append_many(make_events(0, sealed + 1))
        log._compression().close()  # the files are sealed below, without an fsync each
    folder = os.path.join(path, "segments")
    for base in range(segment_base(path)):
        plain = os.path.join(folder, f"{base:020d}.jsonl")
        with open(plain, "rb") as f:
            content = f.read()
        lines, size, crcs = sum_blocks([content])
        doc = {"format": SUM_FORMAT, "version": 1, "base": base, "events": lines,
               "bytes": size, "block_bytes": BLOCK_BYTES, "block_crc32": crcs}
        with open(os.path.join(folder, f"{base:020d}.sum"), "wb") as f:
            f.write(orjson.dumps(doc))
        with open(plain + ".gz", "wb") as f:
            f.write(gzip.compress(content, mtime=0))
        os.unlink(plain)
    with EventLog(path) as log:
        log.compress()  # nothing left to do: records the watermark, from one listing
    state = load_state(path)
    assert state is not None and state.summed_below == state.gzipped_below == sealed
    return time.perf_counter() - start


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.0002)


class RollRun:
    """One run of ``rolls`` rolls on the log at ``path``: per-roll latencies and CPU."""

    def __init__(self, path: str, rolls: int, first: int) -> None:
        self.roll_latency: list[float] = []
        self.sealed_after: list[float] = []
        folder = os.path.join(path, "segments")

        def gzipped(base: int) -> Callable[[], bool]:
            return lambda: os.path.exists(os.path.join(folder, f"{base:020d}.jsonl.gz"))

        log = EventLog(path, segment_max_events=1, sync="none",
                       retention_max_bytes=segment_files(path)[2])
        try:
            log.append({"warm": first})  # opens the writer (its compressor starts a pass)
            compressor = log._compression()
            wait_until(lambda: not compressor.pending(), "the first pass")
            thread = compressor._thread
            assert isinstance(thread, threading.Thread) and thread.ident is not None
            clock = time.pthread_getcpuclockid(thread.ident)
            cpu = time.clock_gettime(clock)
            for event in make_events(first, rolls):
                sealing = log.head - 1  # segments hold one event: the active one's base
                t0 = time.perf_counter()
                log.append(event)
                t1 = time.perf_counter()
                wait_until(gzipped(sealing), "the sealing work")
                self.roll_latency.append(t1 - t0)
                self.sealed_after.append(time.perf_counter() - t1)
            wait_until(lambda: not compressor.pending(), "the last pass")
            self.cpu_per_roll = (time.clock_gettime(clock) - cpu) / rolls
        finally:
            log.close()


def run(opts: Options[Sizes], only: set[int]) -> dict[int, list[Row]]:
    sizes = opts.sizes
    cpu: dict[str, list[float]] = {"big": [], "small": []}
    sealed: dict[str, list[float]] = {"big": [], "small": []}
    p50: dict[str, list[float]] = {"big": [], "small": []}
    with fresh_dir(opts.dir) as tmp:
        paths = {"big": os.path.join(tmp, "big"), "small": os.path.join(tmp, "small")}
        progress(f"building a log of {sizes.big:,} sealed segments")
        built = build(paths["big"], sizes.big)
        build(paths["small"], sizes.small)
        first = sizes.big + 1
        for run in range(opts.runs):
            progress(f"{sizes.rolls} rolls at {sizes.small} and at {sizes.big:,} segments, "
                     f"run {run + 1}/{opts.runs}")
            for key in ("small", "big"):
                r = RollRun(paths[key], sizes.rolls, first)
                cpu[key].append(r.cpu_per_roll)
                sealed[key].append(median(r.sealed_after))
                p50[key].append(percentile(sorted(r.roll_latency), 50))
            first += sizes.rolls + 1
        left = segment_files(paths["big"])[0]
    big, small = short_count(sizes.big), short_count(sizes.small)
    out: dict[int, list[Row]] = {}
    out[1] = [scale_row(
        f"compressor CPU per roll, {big} segments", cpu["big"],
        f"same at {small} segments", cpu["small"],
        extra={"sealed_after_big_s": median(sealed["big"]),
               "sealed_after_small_s": median(sealed["small"])},
        note=f"the compressor thread's CPU per roll (checksum, gzip, watermark, retention "
             f"of about one segment); roll to gzip'd, wall, median: "
             f"{fmt_seconds(median(sealed['big']))} at {big}, "
             f"{fmt_seconds(median(sealed['small']))} at {small}; the big log (built in "
             f"{built:.1f} s) still had {left:,} segments at the end")]
    out[2] = [scale_row(
        f"roll latency p50, {big} segments", p50["big"], f"same at {small} segments",
        p50["small"],
        note="an append that seals a segment, sync=\"none\": the appender's side of a roll")]
    return {k: v for k, v in out.items() if k in only}


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(argv, __doc__, FULL, QUICK, rows=2, quick_runs=3,
                      big_help="sealed segments of the big log (default 10_000, quick 1_000)",
                      run=run, title="eventpipe segment-count benchmarks",
                      ratios="ratio = big/small time (lower is better)")


if __name__ == "__main__":
    sys.exit(main())
