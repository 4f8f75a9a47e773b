"""Consumer benchmarks: catch-up, follow latency, resume and memory, with baselines.

Regenerate the results (the first form creates the venv and installs what is needed)::

    python3 dev.py bench bench_consumer.py
    .venv/bin/python benchmarks/bench_consumer.py [--runs N] [--quick] [--dir DIR] [--big N]
                                                  [--only 1,2,...] [--json]

It prints an environment line, then one table row per measurement. Every number is the median
of ``--runs`` runs (default 5; 1 with ``--quick``), baselines measured in the same process and
the same runs, interleaved with ours, on the events ``{"ts": <int>, "name": "event<i>"}``.
Targets are a report, not a gate: the script exits 0 whatever they say (non-zero only if it
crashed, e.g. a failed check).

Rows:
  1  catch-up over 1M events, ``Consumer(log, name, lambda s, e, o: s + 1, 0).catch_up()``
     with a fresh name each run (so from offset 0, default options), against a naive loop
     over one plain JSON-lines file (``for i, line in enumerate(f): s = h(s, loads(line), i)``);
     throughput ours/naive, target >= 0.7x. Also on gzip'd segments (after ``log.compress()``)
     and, to show where the time goes, with checkpoint_every out of the way (info rows).
  2  follow latency: one process appends ~1k events/s for ~3 s, a consumer process in
     ``Consumer.run()`` handles them; send timestamp (CLOCK_MONOTONIC, system-wide) taken just
     before ``log.append``, receive timestamp in the handler. p50, p99 and max, against Redis
     Streams on loopback (XADD at the same pace, a consumer process in an ``XREAD BLOCK 0``
     loop); ratios ours/redis, target <= 1.0x. Skipped, with the reason, without redis-server
     or the redis client.
  3  resume from a checkpoint at the head: ``Consumer(path, name, h, 0)`` + ``catch_up()`` with
     nothing new (load checkpoint, verify the fingerprint, read to the head), on a --big-event
     log (default 10M) vs a 10k-event log, median of 20 repeats per run; time big/small, target
     <= 1.5x. Bonus row: the one catch-up over the big log that made its checkpoint.
  4  peak RSS growth of a consumer process catching up over the big log: the process's peak
     RSS after importing eventpipe and opening the log, and after the catch-up (the same run
     as row 3's bonus row); target <= 40 MB. The growth is taken from VmHWM: ``ru_maxrss`` is
     printed too, but a spawned child starts with its parent's (fork+exec keeps it). Also on a
     log of gzip'd segments (row 1's size, default options).

``--quick`` shrinks every size (--big to 1M) and makes one run: a smoke test can run
``bench_consumer.py --quick --json`` in about 15 s, most of it rows 3-4's 1M-event catch-up.
``--json`` prints the results as JSON on stdout instead of the table (progress always goes to
stderr). ``--only 2`` runs some rows. Default runtime is about four minutes on a 2-cpu VM, most
of it building the 10M-event log and catching up over it.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event
from typing import Any

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
    median,
    peak_rss_mb,
    percentile,
    progress,
    scale_row,
    segment_files,
    short_count,
    timed,
)

from eventpipe import Consumer, EventLog
from eventpipe._consumer import CONSUMER_OPTIONS

RSS_TARGET_MB = 40.0


@dataclass(frozen=True)
class Sizes:
    catchup: int  # row 1
    follow: int  # row 2: events per run
    follow_rate: int  # row 2: events per second
    big: int  # rows 3 and 4
    small: int  # row 3
    resume_repeats: int  # row 3


FULL = Sizes(catchup=1_000_000, follow=3_000, follow_rate=1_000, big=10_000_000, small=10_000,
             resume_repeats=20)
QUICK = Sizes(catchup=100_000, follow=300, follow_rate=1_000, big=1_000_000, small=10_000,
              resume_repeats=20)


CONSUMER_DEFAULT_EVERY: int = next(o.default for o in CONSUMER_OPTIONS
                                   if o.name == "checkpoint_every")


def count_handler(state: int, event: Any, offset: int) -> int:
    """The trivial fold of every row: count events."""
    return state + 1


def gzip_options(quick: bool) -> dict[str, Any]:
    """Options of the gzip'd logs: quick runs are too small to fill a default 16 MiB segment,
    so smaller segments there, or nothing would be compressed at all."""
    return {"segment_max_bytes": 1 << 20} if quick else {}


def compress_all(path: str, options: dict[str, Any]) -> None:
    """Compress every sealed segment of the log at ``path`` now."""
    with EventLog(path, **options) as log:
        if segment_files(path)[0] > 1:
            # Nothing to compress without a sealed segment; and up to commit 3a91f10
            # compress() raised ValueError then (compress.py _pass: zip(..., strict=True)).
            log.compress()


# ------------------------------------------------------------------------ row 1: catch-up


def bench_catchup(opts: Options[Sizes]) -> list[Row]:
    n = opts.sizes.catchup
    default: list[float] = []
    gz: list[float] = []
    interval_only: list[float] = []
    naive: list[float] = []
    with fresh_dir(opts.dir) as tmp:
        plain_log, gzip_log = os.path.join(tmp, "plain-log"), os.path.join(tmp, "gzip-log")
        plain_file = os.path.join(tmp, "naive.jsonl")
        progress(f"row 1: building two {n:,}-event logs (compression None and gzip) and a "
                 "plain file")
        build_logs(n, [(plain_log, {"compression": None}),
                       (gzip_log, gzip_options(opts.quick))], plain_file)
        compress_all(gzip_log, gzip_options(opts.quick))
        segs, gz_segs, _ = segment_files(gzip_log)
        plain_segs, _, plain_bytes = segment_files(plain_log)
        log_none = EventLog(plain_log, compression=None)
        log_gzip = EventLog(gzip_log)
        try:
            for run in range(opts.runs):
                progress(f"row 1: catch-up over {n:,} events, run {run + 1}/{opts.runs}")

                def ours(log: EventLog = log_none, name: str = f"default-{run}") -> None:
                    with Consumer(log, name, count_handler, 0) as c:
                        assert c.catch_up() == n

                def ours_gzip(log: EventLog = log_gzip, name: str = f"gzip-{run}") -> None:
                    with Consumer(log, name, count_handler, 0) as c:
                        assert c.catch_up() == n

                def ours_interval(log: EventLog = log_none, name: str = f"rare-{run}") -> None:
                    with Consumer(log, name, count_handler, 0, checkpoint_every=10**9) as c:
                        assert c.catch_up() == n

                def naive_fold(path: str = plain_file) -> None:
                    handler, loads = count_handler, orjson.loads
                    state = 0
                    with open(path, "rb") as f:
                        for i, line in enumerate(f):
                            state = handler(state, loads(line), i)
                    assert state == n

                order: list[tuple[Callable[[], None], list[float]]] = [
                    (ours, default), (naive_fold, naive), (ours_gzip, gz),
                    (ours_interval, interval_only)]
                if run % 2:
                    order.reverse()
                for fn, samples in order:
                    samples.append(timed(fn))
        finally:
            log_none.close()
            log_gzip.close()
    t, b, g, r = median(default), median(naive), median(gz), median(interval_only)
    every = CONSUMER_DEFAULT_EVERY
    checkpoints = n // every
    per_checkpoint = max(0.0, t - r) / checkpoints if checkpoints else 0.0
    label = short_count(n)
    base = "naive: 1 file, loads+fold"
    return [
        Row(f"catch-up {label}, compression=None", n, t, default, base, b, naive,
            ratio=b / t, target=">= 0.7x", passed=at_least(b / t, 0.7),
            note=f"default consumer options: checkpoint_every={every} (or 1 s) makes "
                 f"~{checkpoints:,} durable checkpoints (temp file + fsync + rename + dir fsync), ~"
                 f"{fmt_seconds(per_checkpoint)} each = {max(0.0, t - r) / t:.0%} of the time "
                 f"(compare row c); log: {plain_segs} segments, {plain_bytes / 2**20:.0f} MiB, "
                 "page cache"),
        Row(f"catch-up {label}, gzip segments", n, g, gz, base, b, naive, ratio=b / g,
            target="info", note=f"default options, after log.compress(): {gz_segs} of {segs} "
                                "segments gzip'd (the active one stays plain)"),
        Row(f"catch-up {label}, checkpoint_every=1e9", n, r, interval_only, base, b, naive,
            ratio=b / r, target="info",
            note="same as row a but checkpoints only by time (checkpoint_interval=1 s): "
                 "what the fold itself costs"),
    ]


# ------------------------------------------------------------------ row 2: follow latency


def _follow_child(path: str, name: str, out: str, ready: Event) -> None:
    """Consumer process: Consumer.run() recording receive - send for each event."""
    latencies: list[int] = []
    clock = time.monotonic_ns
    box: list[Consumer] = []

    def handler(state: int, event: dict[str, Any], offset: int) -> int:
        now = clock()
        if "end" in event:
            box[0].stop()
            return state
        latencies.append(now - event["t"])
        return state + 1

    with Consumer(path, name, handler, 0, on_caught_up=lambda c: ready.set()) as consumer:
        box.append(consumer)
        consumer.run()
    with open(out, "wb") as f:
        f.write(orjson.dumps(latencies))


def _redis_child(port: int, key: str, out: str, ready: Event) -> None:
    """Consumer process: an XREAD BLOCK 0 loop recording receive - send for each entry."""
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    r.ping()
    latencies: list[int] = []
    clock = time.monotonic_ns
    # The stream is new and empty: reading after 0-0 is "$" without the race of an entry
    # added between ready.set() and the first XREAD.
    last: bytes | str = "0-0"
    ready.set()
    done = False
    while not done:
        reply: Any = r.xread({key: last}, block=0)
        for _stream, entries in reply:
            for entry_id, fields in entries:
                now = clock()
                last = entry_id
                if b"end" in fields:
                    done = True
                    break
                latencies.append(now - int(fields[b"t"]))
    r.close()
    with open(out, "wb") as f:
        f.write(orjson.dumps(latencies))


def paced(n: int, rate: int, send: Callable[[int, int], object]) -> float:
    """Call ``send(i, monotonic_ns)`` n times on a fixed schedule of ``rate``/s; achieved rate."""
    period = 1.0 / rate
    clock = time.monotonic
    start = clock()
    for i in range(n):
        delay = start + i * period - clock()
        if delay > 0:
            time.sleep(delay)
        send(i, time.monotonic_ns())
    return n / (clock() - start)


def run_trial(target: Callable[..., None], args: tuple[Any, ...], out: str,
              produce: Callable[[], float], n: int) -> tuple[list[int], float]:
    """Start the consumer process, wait until it is ready, produce, collect its latencies."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc: SpawnProcess = ctx.Process(target=target, args=(*args, out, ready),
                                     name="bench-consumer")
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.wait(0.2):
            if proc.exitcode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"consumer process not ready (exit code {proc.exitcode})")
        rate = produce()
        proc.join(60)
        if proc.exitcode != 0:
            raise RuntimeError(f"consumer process exited with {proc.exitcode}")
    finally:
        if proc.is_alive():
            proc.terminate()  # our own child only: SIGTERM stops Consumer.run() cleanly
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(10)
    with open(out, "rb") as f:
        latencies: list[int] = orjson.loads(f.read())
    if len(latencies) != n:
        raise RuntimeError(f"consumer saw {len(latencies)} events, expected {n}")
    return latencies, rate


def eventpipe_trial(tmp: str, n: int, rate: int) -> tuple[list[int], float]:
    path = os.path.join(tmp, "follow-log")
    with EventLog(path) as log:  # default options: sync="interval", gzip
        append = log.append

        def send(i: int, t: int) -> None:
            append({"t": t, "seq": i})

        def produce() -> float:
            achieved = paced(n, rate, send)
            append({"end": True})
            return achieved

        return run_trial(_follow_child, (path, "follow"), os.path.join(tmp, "ep.json"),
                         produce, n)


def redis_trial(tmp: str, port: int, key: str, n: int, rate: int) -> tuple[list[int], float]:
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    try:
        def send(i: int, t: int) -> None:
            r.xadd(key, {"t": t, "seq": i})

        def produce() -> float:
            achieved = paced(n, rate, send)
            r.xadd(key, {"end": 1})
            return achieved

        return run_trial(_redis_child, (port, key), os.path.join(tmp, "redis.json"),
                         produce, n)
    finally:
        r.delete(key)
        r.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server(tmp: str) -> Iterator[tuple[int | None, str]]:
    """A throwaway redis-server on 127.0.0.1: yields (port, version), or (None, why not)."""
    exe = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None)
    if exe is None:
        yield None, "redis-server not found"
        return
    try:
        import redis
    except ImportError:
        yield None, "redis client not installed (pip install eventpipe[bench])"
        return
    version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                             check=False).stdout.strip()
    version = next((w[2:] for w in version.split() if w.startswith("v=")), "?")
    port = free_port()
    log_path = os.path.join(tmp, "redis.log")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", tmp, "--daemonize", "no"],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 15
        failure = None
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    with open(log_path, "rb") as f:
                        tail = f.read()[-300:].decode(errors="replace").strip()
                    failure = f"redis-server did not start ({tail or 'no output'})"
                    break
                time.sleep(0.05)
        client.close()
        yield (None, failure) if failure is not None else (port, version)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def bench_follow(opts: Options[Sizes]) -> list[Row]:
    n, rate = opts.sizes.follow, opts.sizes.follow_rate
    keys = ("p50", "p99", "max")
    ours: dict[str, list[float]] = {k: [] for k in keys}
    theirs: dict[str, list[float]] = {k: [] for k in keys}
    rates: list[float] = []
    with fresh_dir(opts.dir) as tmp, redis_server(tmp) as (port, redis_info):
        if port is None:
            progress(f"row 2: redis baseline skipped: {redis_info}")
        for run in range(opts.runs):
            progress(f"row 2: follow latency, {n:,} events at {rate}/s, eventpipe"
                     f"{'' if port is None else ' and redis'}, run {run + 1}/{opts.runs}")
            trials: list[tuple[Callable[[], tuple[list[int], float]], dict[str, list[float]]]]
            with fresh_dir(tmp, "run-") as run_dir:
                trials = [(functools.partial(eventpipe_trial, run_dir, n, rate), ours)]
                if port is not None:
                    trials.append((functools.partial(redis_trial, run_dir, port, f"s{run}", n,
                                                     rate), theirs))
                if run % 2:
                    trials.reverse()
                for trial, stats in trials:
                    lat, achieved = trial()
                    if stats is ours:
                        rates.append(achieved)
                    lat.sort()
                    for key, pct in (("p50", 50.0), ("p99", 99.0), ("max", 100.0)):
                        stats[key].append(percentile(lat, pct) / 1e9)
    med = {k: median(v) for k, v in ours.items()}
    rmed = {k: median(v) for k, v in theirs.items()} if port is not None else None
    common = (f"{n:,} events per run at ~{rate}/s (achieved {median(rates):.0f}/s), appended "
              "one log.append each in this process, handled in a spawned process in "
              "Consumer.run() (default options: notifications on, poll_interval 1 s)")
    ours_max = (f"ours max {fmt_seconds(med['max'])} (worst run "
                f"{fmt_seconds(max(ours['max']))})")
    rows = []
    for key, label in (("p50", "a"), ("p99", "b")):
        if rmed is None:
            rows.append(Row(f"follow latency {key}, {short_count(n)} ev", 0, med[key],
                            ours[key], f"redis: skipped ({redis_info})", target="info",
                            extra={f"{k}_s": v for k, v in med.items()},
                            note=(f"{common}; {ours_max}" if label == "a" else "")))
            continue
        ratio = med[key] / rmed[key]
        note = ""
        if label == "a":
            note = (f"{common}; {ours_max}; redis {redis_info} on 127.0.0.1 (--save '' "
                    f"--appendonly no): XADD at the same pace, XREAD BLOCK 0 loop in a spawned "
                    f"process, max {fmt_seconds(rmed['max'])}; ratio = latency ours/redis")
        rows.append(Row(f"follow latency {key}, {short_count(n)} ev", 0, med[key], ours[key],
                        "redis streams XADD/XREAD", rmed[key], theirs[key], ratio=ratio,
                        target="<= 1.0x", passed=ratio <= 1.0,
                        extra={f"ours_{k}_s": v for k, v in med.items()}
                        | {f"redis_{k}_s": v for k, v in rmed.items()},
                        note=note))
    return rows


# ---------------------------------------------------------- rows 3 and 4: resume and RSS


@dataclass(frozen=True)
class CatchUp:
    """A catch-up in its own process: peak RSS (MiB) before and after, and its duration."""

    hwm_before: float | None  # VmHWM: this process's own high-water mark
    hwm_after: float | None
    maxrss_before: float  # ru_maxrss: starts at the parent's size (see peak_rss_mb)
    maxrss_after: float
    seconds: float

    @property
    def growth(self) -> float:
        if self.hwm_before is not None and self.hwm_after is not None:
            return self.hwm_after - self.hwm_before
        return self.maxrss_after - self.maxrss_before

    def describe(self) -> str:
        hwm = ("" if self.hwm_before is None else
               f"VmHWM {self.hwm_before:.1f} MB after importing eventpipe and opening the log, "
               f"{self.hwm_after:.1f} MB after the catch-up; ")
        return (f"{hwm}ru_maxrss {self.maxrss_before:.1f} -> {self.maxrss_after:.1f} MB (it "
                "starts at the parent's size: fork+exec keeps the high-water mark, so the "
                "growth is taken from VmHWM)")


def _rss_child(path: str, name: str, compression: str | None, conn: Connection) -> None:
    """Catch up over the log at ``path``; send (peaks before, peaks after, seconds, state)."""
    log = EventLog(path, compression=compression)
    before = peak_rss_mb()
    start = time.perf_counter()
    with Consumer(log, name, count_handler, 0) as consumer:
        state = consumer.catch_up()
    elapsed = time.perf_counter() - start
    after = peak_rss_mb()
    log.close()
    conn.send((before, after, elapsed, state))
    conn.close()


def catch_up_in_child(path: str, name: str, total: int,
                      compression: str | None = None) -> CatchUp:
    """Catch up from offset 0 (default consumer options) in a spawned process."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_rss_child, args=(path, name, compression, child),
                       name="bench-rss")
    proc.start()
    child.close()
    try:
        if not parent.poll(1800):
            raise RuntimeError("catch-up process timed out")
        before, after, elapsed, state = parent.recv()
        proc.join(60)
        if proc.exitcode != 0:
            raise RuntimeError(f"catch-up process exited with {proc.exitcode}")
    except EOFError:
        proc.join(10)
        raise RuntimeError(f"catch-up process died (exit code {proc.exitcode})") from None
    finally:
        parent.close()
        if proc.is_alive():
            proc.terminate()
            proc.join(10)
    assert state == total, (state, total)
    return CatchUp(before[0], after[0], before[1], after[1], elapsed)


def resume_once(path: str, name: str, total: int) -> float:
    """Seconds to construct the consumer and catch up with nothing new."""
    start = time.perf_counter()
    consumer = Consumer(path, name, count_handler, 0)
    state = consumer.catch_up()
    elapsed = time.perf_counter() - start
    offset = consumer.offset
    consumer.close()
    assert state == total and offset == total, (state, offset, total)
    return elapsed


def bench_resume(opts: Options[Sizes]) -> tuple[list[Row], list[Row]]:
    big, small, reps = opts.sizes.big, opts.sizes.small, opts.sizes.resume_repeats
    gz_n = opts.sizes.catchup
    name = "resume"
    big_s: list[float] = []
    small_s: list[float] = []
    with fresh_dir(opts.dir) as tmp:
        big_path, small_path = os.path.join(tmp, "big"), os.path.join(tmp, "small")
        gz_path = os.path.join(tmp, "gzip")
        progress(f"rows 3+4: building a {big:,}-event log (append_many, batches of 100k, "
                 "compression=None)")
        build = build_logs(big, [(big_path, {"compression": None})],
                           label="rows 3+4: building big log")
        build_logs(small, [(small_path, {"compression": None})])
        segs, _, nbytes = segment_files(big_path)
        progress(f"rows 3+4: catch-up over {big:,} events in a spawned process "
                 "(peak RSS; makes the checkpoint)")
        plain = catch_up_in_child(big_path, name, big)
        progress(f"row 4: catch-up over {gz_n:,} events in gzip'd segments in a spawned process")
        build_logs(gz_n, [(gz_path, gzip_options(opts.quick))])
        compress_all(gz_path, gzip_options(opts.quick))
        gz_segs, gz_done, _ = segment_files(gz_path)
        gz = catch_up_in_child(gz_path, name, gz_n, compression="gzip")
        with Consumer(small_path, name, count_handler, 0) as c:
            assert c.catch_up() == small
        for run in range(opts.runs):
            progress(f"row 3: resume at the head, {reps} repeats each, run {run + 1}/{opts.runs}")
            b: list[float] = []
            s: list[float] = []
            for _ in range(reps):
                b.append(resume_once(big_path, name, big))
                s.append(resume_once(small_path, name, small))
            big_s.append(median(b))
            small_s.append(median(s))
    checkpoints = big // CONSUMER_DEFAULT_EVERY
    rows3 = [
        scale_row(
            f"resume at head, {short_count(big)}-event log", big_s,
            f"same, {short_count(small)}-event log", small_s,
            note=f"Consumer(path, name, h, 0) + catch_up() with nothing new: open the log, take "
                 f"the name lock, load the checkpoint, read back and verify its last event; "
                 f"median of {reps} repeats per run; big log: {segs} segments, "
                 f"{nbytes / 2**20:.0f} MiB (built once in {build:.1f} s = "
                 f"{fmt_rate(big / build)} via append_many), page cache"),
        Row(f"catch-up {short_count(big)}, from offset 0", big, plain.seconds, [plain.seconds],
            target="info",
            note=f"one run (it makes row a's checkpoint), in a spawned process, default "
                 f"options: ~{checkpoints:,} durable checkpoints "
                 f"(checkpoint_every={CONSUMER_DEFAULT_EVERY}, or 1 s)"),
    ]

    def rss_row(what: str, n: int, r: CatchUp, note: str) -> Row:
        return Row(f"peak RSS +{r.growth:.1f} MB, catch-up {short_count(n)} {what}", n,
                   r.seconds, [r.seconds], target=f"<= {RSS_TARGET_MB:g} MB",
                   passed=r.growth <= RSS_TARGET_MB,
                   extra={"rss_growth_mb": r.growth, "vmhwm_before_mb": r.hwm_before or 0.0,
                          "vmhwm_after_mb": r.hwm_after or 0.0,
                          "ru_maxrss_before_mb": r.maxrss_before,
                          "ru_maxrss_after_mb": r.maxrss_after},
                   note=f"{note}; {r.describe()}; MB = 2^20 bytes")

    rows4 = [
        rss_row("plain", big, plain, "the catch-up process of row 3b (same run, same time)"),
        rss_row("gzip", gz_n, gz, f"default options, a log of {gz_n:,} events with {gz_done} of "
                                   f"{gz_segs} segments gzip'd, in a spawned process"),
    ]
    return rows3, rows4


# ---------------------------------------------------------------------------------- main


def run(opts: Options[Sizes], only: set[int]) -> dict[int, list[Row]]:
    """Run the selected rows; returns the rows of each row number."""
    out: dict[int, list[Row]] = {}
    if 1 in only:
        out[1] = bench_catchup(opts)
    if 2 in only:
        out[2] = bench_follow(opts)
    if only & {3, 4}:
        out[3], out[4] = bench_resume(opts)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(argv, __doc__, FULL, QUICK, rows=4, quick_runs=1,
                      big_help="events in the big log of rows 3-4 (default 10_000_000, quick "
                               "1_000_000)",
                      run=run, title="eventpipe consumer benchmarks",
                      ratios="ratio = throughput ours/baseline in row 1, latency ours/redis "
                             "in row 2, time big/small in row 3")


if __name__ == "__main__":
    sys.exit(main())
