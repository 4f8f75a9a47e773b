"""Shared helpers for the benchmark scripts: options, logs to measure, timing, tables, reports.

Not a benchmark itself (no ``bench_`` prefix, so ``dev.py bench`` skips it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import math
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import orjson

from eventpipe import EventLog

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "BATCH",
    "Options",
    "Row",
    "alternate",
    "at_least",
    "bench_main",
    "build_logs",
    "environment",
    "environment_line",
    "fmt_rate",
    "fmt_seconds",
    "fresh_dir",
    "label_rows",
    "make_events",
    "median",
    "parse_args",
    "peak_rss_mb",
    "percentile",
    "progress",
    "render_table",
    "rows_to_json",
    "run_and_report",
    "scale_row",
    "segment_files",
    "short_count",
    "timed",
]

TS_BASE = 1_700_000_000_000  # a millisecond timestamp, so "ts" has a realistic width
BATCH = 100_000  # append_many batch when building logs
SCALE_TARGET = 1.5  # a cost on the big input may be at most this many times that on the small

S = TypeVar("S", bound="DataclassInstance")  # a script's frozen ``Sizes``, with a ``big`` field


def progress(message: str) -> None:
    """One progress line on stderr (stdout is kept for the table or the JSON)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (``pct`` in 0..100)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def make_events(start: int, count: int) -> list[dict[str, Any]]:
    """The benchmark events ``{"ts": <int>, "name": "event<i>"}`` for i in start..start+count."""
    return [{"ts": TS_BASE + i, "name": f"event{i}"} for i in range(start, start + count)]


def build_logs(total: int, targets: Sequence[tuple[str, dict[str, Any]]],
               plain: str | None = None, label: str = "", *, batch: int = BATCH,
               pause: float = 0.0) -> float:
    """Append ``total`` events with append_many (batches of ``batch``, default 100k) to each
    log in ``targets`` (``(path, log options)``) and, if given, to the plain JSON-lines file
    ``plain``, sleeping ``pause`` seconds after each batch (so that the batches are spread over
    real time, and the logs' time indexes hold an entry for each).

    Returns the seconds spent appending to the first log.
    """
    logs = [EventLog(path, **options) for path, options in targets]
    spent = 0.0
    try:
        with open(plain, "wb") if plain is not None else contextlib.nullcontext() as f:
            for first in range(0, total, batch):
                events = make_events(first, min(batch, total - first))
                start = time.perf_counter()
                logs[0].append_many(events)
                spent += time.perf_counter() - start
                for log in logs[1:]:
                    log.append_many(events)
                if f is not None:
                    # A slice at a time: 100k small bytes from orjson.dumps alive at once take
                    # ~450 MB of peak RSS (freed, but it inflates this process's high-water).
                    for i in range(0, len(events), 1000):
                        f.write(b"\n".join(map(orjson.dumps, events[i : i + 1000])) + b"\n")
                if label and first and first % 1_000_000 == 0:
                    progress(f"{label}: {first:,}/{total:,}")
                if pause:
                    time.sleep(pause)
        for log in logs:
            assert log.head == total, (log.path, log.head, total)
    finally:
        for log in logs:
            log.close()
    return spent


def segment_files(log_path: str) -> tuple[int, int, int]:
    """(segments, gzip'd segments, bytes on disk) of a log: its ``.jsonl`` and ``.jsonl.gz``
    files, not the checksum sidecars."""
    names = [e for e in os.scandir(os.path.join(log_path, "segments"))
             if e.name.endswith((".jsonl", ".jsonl.gz"))]
    return (len(names), sum(e.name.endswith(".gz") for e in names),
            sum(e.stat().st_size for e in names))


def peak_rss_mb() -> tuple[float | None, float]:
    """This process's peak resident set so far, in MiB: ``(VmHWM, ru_maxrss)``.

    ``VmHWM`` (``/proc/self/status``; None where there is none) is the high-water mark of the
    process's own memory, reset by exec. ``ru_maxrss`` is not: a child started by fork (or
    vfork) + exec, as ``subprocess`` and multiprocessing's spawn do, starts with its parent's
    resident size, so it cannot show how much a small child grew.
    """
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    hwm = None
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return hwm, maxrss


def short_count(n: int) -> str:
    """``n`` for a row name: 200, 10k, 2.5M."""
    if n >= 1_000_000:
        return f"{n / 1e6:g}M"
    if n >= 1000:
        return f"{n / 1e3:g}k"
    return str(n)


def at_least(value: float | None, target: float) -> bool | None:
    return None if value is None else value >= target


def alternate(runs: int, sides: Sequence[Callable[[], float]]) -> list[list[float]]:
    """Run each side once per run, the order reversed every other run; seconds per side."""
    samples: list[list[float]] = [[] for _ in sides]
    for run in range(runs):
        order = range(len(sides)) if run % 2 == 0 else reversed(range(len(sides)))
        for i in order:
            samples[i].append(sides[i]())
    return samples


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes, after a full garbage collection."""
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextlib.contextmanager
def fresh_dir(base: str | None, prefix: str = "eventpipe-bench-") -> Iterator[str]:
    """A new empty temporary directory under ``base`` (default: the system temp dir)."""
    path = tempfile.mkdtemp(prefix=prefix, dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def environment(bench_dir: str | None) -> dict[str, Any]:
    """Facts that make numbers comparable between machines and runs."""
    where = bench_dir or tempfile.gettempdir()
    fs = "?"
    with contextlib.suppress(OSError), open("/proc/mounts", encoding="utf-8") as f:
        best = ""
        real = os.path.realpath(where)
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and real.startswith(parts[1]) and len(parts[1]) >= len(best):
                best, fs = parts[1], f"{parts[2]} on {parts[0]}"
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "orjson": getattr(orjson, "__version__", "?"),
        "sqlite": sqlite3.sqlite_version,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "dir": where,
        "filesystem": fs,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def environment_line(env: dict[str, Any]) -> str:
    return (
        f"python {env['python']} ({env['implementation']}), orjson {env['orjson']}, "
        f"sqlite {env['sqlite']}, {env['cpus']} cpus, {env['platform']}, "
        f"dir {env['dir']} ({env['filesystem']}), {env['date']}"
    )


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_rate(rate: float | None) -> str:
    if rate is None:
        return "-"
    if rate >= 1e6:
        return f"{rate / 1e6:.2f}M/s"
    if rate >= 1e3:
        return f"{rate / 1e3:.0f}k/s"
    return f"{rate:.0f}/s"


@dataclass
class Row:
    """One line of a results table.

    ``seconds`` is the median over runs of the measured operation (``samples`` holds every run);
    ``events`` is how many events one run handles, so ``rate`` is events per second. ``ratio``
    is whatever the target is about (throughput ours/baseline, or latency big/small) and
    ``passed`` says whether the target was met (None: informational row).
    """

    name: str
    events: int
    seconds: float
    samples: list[float]
    baseline: str = ""
    baseline_seconds: float | None = None
    baseline_samples: list[float] = field(default_factory=list)
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float | None:
        return self.events / self.seconds if self.events and self.seconds > 0 else None

    @property
    def baseline_rate(self) -> float | None:
        if not self.events or not self.baseline_seconds:
            return None
        return self.events / self.baseline_seconds

    @property
    def verdict(self) -> str:
        return {None: "info", True: "PASS", False: "FAIL"}[self.passed]


def scale_row(name: str, big: list[float], baseline: str, small: list[float], *,
              note: str = "", extra: dict[str, float] | None = None,
              target: float = SCALE_TARGET) -> Row:
    """A row for a cost that must not grow with size: the same measurement on a big input
    (``big``, one sample per run) and on a small one, their medians, and the ratio big/small
    against the target (at most ``target``, default SCALE_TARGET)."""
    t, base = median(big), median(small)
    return Row(name, 0, t, big, baseline, base, small, ratio=t / base,
               target=f"<= {target:g}x (time big/small)",
               passed=t / base <= target, note=note, extra=extra or {})


_COLUMNS = ("#", "benchmark", "median", "events/s", "baseline", "base median", "base ev/s",
            "ratio", "target", "")


def render_table(rows: Sequence[tuple[str, Row]]) -> str:
    """Rows as a fixed-width text table, notes below it. ``rows`` pairs a label with a row."""
    cells = [list(_COLUMNS)]
    for label, r in rows:
        cells.append([
            label,
            r.name,
            fmt_seconds(r.seconds),
            fmt_rate(r.rate),
            r.baseline or "-",
            fmt_seconds(r.baseline_seconds),
            fmt_rate(r.baseline_rate),
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            r.target or "-",
            r.verdict,
        ])
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    right = {2, 3, 5, 6, 7}

    def line(row: list[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return " | ".join(parts).rstrip()

    out = [line(cells[0]), "-+-".join("-" * w for w in widths)]
    out += [line(row) for row in cells[1:]]
    notes = [f"  [{label}] {r.note}" for label, r in rows if r.note]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


def rows_to_json(env: dict[str, Any], rows: Sequence[tuple[str, Row]],
                 settings: dict[str, Any]) -> str:
    results = []
    for label, r in rows:
        d = asdict(r)
        d.update(label=label, rate=r.rate, baseline_rate=r.baseline_rate, verdict=r.verdict)
        results.append(d)
    doc = {"environment": env, "settings": settings, "results": results}
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()


@dataclass(frozen=True)
class Options(Generic[S]):
    runs: int
    sizes: S
    dir: str | None
    quick: bool


def parse_args(argv: Sequence[str] | None, doc: str | None, full: S, quick: S, *,
               rows: int, quick_runs: int, big_help: str) -> tuple[Options[S], set[int], bool]:
    """The options every benchmark script takes: ``(options, row numbers to run, --json)``.

    ``doc`` is the script's docstring (its first paragraph is the description), ``full`` and
    ``quick`` its sizes, ``rows`` how many rows it has, ``quick_runs`` the --runs default of
    --quick and ``big_help`` the help of --big.
    """
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    ap.add_argument("--runs", type=int, default=None,
                    help="runs per measurement, reported as their median "
                         f"(default 5, quick {quick_runs})")
    ap.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
    ap.add_argument("--dir", default=None, help="where to make the temporary directories")
    ap.add_argument("--big", type=lambda s: int(s.replace("_", "")), default=None,
                    help=big_help)
    ap.add_argument("--only", default="", help=f"comma-separated row numbers to run (1-{rows})")
    ap.add_argument("--json", action="store_true", help="print results as JSON on stdout")
    a = ap.parse_args(argv)
    sizes = quick if a.quick else full
    if a.big is not None:
        if a.big < 2:
            ap.error("--big must be >= 2")
        sizes = dataclasses.replace(sizes, big=a.big)
    runs = a.runs if a.runs is not None else (quick_runs if a.quick else 5)
    if runs < 1:
        ap.error("--runs must be >= 1")
    every = set(range(1, rows + 1))
    only = {int(x) for x in a.only.split(",") if x.strip()} or every
    if not only <= every:
        ap.error(f"--only takes row numbers 1-{rows}")
    if a.dir is not None:
        os.makedirs(a.dir, exist_ok=True)
    return Options(runs=runs, sizes=sizes, dir=a.dir, quick=a.quick), only, a.json


def label_rows(out: dict[int, list[Row]], only: set[int]) -> list[tuple[str, Row]]:
    """The rows of the numbers in ``only``, in table order, labelled "3" or "3a", "3b", ..."""
    labelled = []
    for number in sorted(only):
        rows = out[number]
        for k, row in enumerate(rows):
            labelled.append((f"{number}{'abc'[k]}" if len(rows) > 1 else str(number), row))
    return labelled


def run_and_report(opts: Options[S], only: set[int], as_json: bool,
                   run: Callable[[Options[S], set[int]], dict[int, list[Row]]],
                   title: str, ratios: str) -> int:
    """Run the rows and print the report: JSON with --json, else the header and the table.

    ``run`` returns the rows of each selected row number. The header reads
    ``<title> (<mode>; median of N runs; <ratios>; total N s)``.
    """
    env = environment(opts.dir)
    env["eventpipe_env"] = {k: v for k, v in os.environ.items() if k.startswith("EVENTPIPE_")}
    progress(environment_line(env))
    started = time.perf_counter()
    rows = label_rows(run(opts, only), only)
    elapsed = time.perf_counter() - started
    progress(f"done in {elapsed:.0f} s")
    settings = {"runs": opts.runs, "quick": opts.quick, "sizes": asdict(opts.sizes),
                "rows": sorted(only), "elapsed_s": elapsed}
    if as_json:
        print(rows_to_json(env, rows, settings))
        return 0
    mode = "quick" if opts.quick else "full"
    print(f"{title} ({mode}; median of {opts.runs} runs; {ratios}; total {elapsed:.0f} s)")
    print(environment_line(env))
    if env["eventpipe_env"]:
        print(f"EVENTPIPE_* environment in effect: {env['eventpipe_env']}")
    print()
    print(render_table(rows))
    failed = [label for label, r in rows if r.passed is False]
    print()
    if failed:
        print(f"targets missed: {', '.join(failed)}")
    elif any(r.passed for _, r in rows):
        print("all targets met")
    else:
        print("no targets: every row is a report")
    return 0


def bench_main(argv: Sequence[str] | None, doc: str | None, full: S, quick: S, *, rows: int,
               quick_runs: int, big_help: str,
               run: Callable[[Options[S], set[int]], dict[int, list[Row]]], title: str,
               ratios: str) -> int:
    """A benchmark script's ``main``: :func:`parse_args`, then :func:`run_and_report`."""
    opts, only, as_json = parse_args(argv, doc, full, quick, rows=rows, quick_runs=quick_runs,
                                     big_help=big_help)
    return run_and_report(opts, only, as_json, run, title, ratios)
