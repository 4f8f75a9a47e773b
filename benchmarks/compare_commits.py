"""Append speed of two commits measured in the same run: old against new, interleaved.

Usage::

    .venv/bin/python benchmarks/compare_commits.py OLD [NEW] [--runs N] [--events N]
                                                   [--dir DIR] [--json]

NEW defaults to HEAD. The script checks both commits out with ``git worktree add --detach`` in
a temporary folder (removed afterwards, ``git worktree prune`` included; nothing in the work
tree, index or branches is touched), then runs a small measuring program in a fresh subprocess
per measurement with ``PYTHONPATH`` pointing at one checkout, alternating old and new (old first
on even runs, new first on odd ones). One subprocess per measurement, not per run: what one
measurement leaves in a process (100k ``append()`` calls) moved the next one (``append_many``)
by 15-20%. Each subprocess is this interpreter (run it with the repo's
venv: same Python, same orjson) and measures, in a fresh log with default options:

- ``append()`` of ``--events`` events (default 100k), one call each (storage row 2);
- ``append_many`` of the same events in one call (storage row 1), after an untimed warm-up
  batch in another log, as row 1 does.

It prints each side's median over ``--runs`` runs (default 7), the ratio new/old of the medians
(time: above 1 is slower), the median of the per-run ratios (each new run against the old run
next to it: steadier when the machine's speed drifts) and whether the new commit stays within
10% of the old one. A report, not a gate: exit 0 whatever the numbers; 2 when the checkouts
cannot be made (not a git checkout, an unknown commit, no git).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 1.10  # "within 10%": new time / old time at most this
KINDS = ("append", "append_many")
TITLES = {"append": "append() one call each", "append_many": "append_many, one call"}

# Runs in the subprocess, with PYTHONPATH at one checkout. argv: events, data dir, kinds in
# the order to measure them. Prints one JSON object: the eventpipe it imported and seconds per
# kind.
MEASURE = r"""
import gc, json, os, shutil, sys, tempfile, time
import eventpipe
from eventpipe import EventLog

n, base, kinds = int(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
events = [{"ts": 1_700_000_000_000 + i, "name": f"event{i}"} for i in range(n)]
tmp = tempfile.mkdtemp(prefix="compare-", dir=base)
out = {"eventpipe": eventpipe.__file__}
try:
    with EventLog(os.path.join(tmp, "warm-up")) as log:
        log.append_many(events)  # the first big batch of a process pays for fresh memory
        for e in events[:1000]:
            log.append(e)
    for kind in kinds:
        log = EventLog(os.path.join(tmp, kind))
        gc.collect()
        if kind == "append":
            append = log.append
            start = time.perf_counter()
            for e in events:
                append(e)
            out[kind] = time.perf_counter() - start
        else:
            start = time.perf_counter()
            log.append_many(events)
            out[kind] = time.perf_counter() - start
        assert log.head == n, (kind, log.head)
        log.close()
finally:
    shutil.rmtree(tmp, ignore_errors=True)
print(json.dumps(out))
"""


class CheckoutError(Exception):
    """The two commits cannot be checked out as worktrees."""


def git(*args: str) -> str:
    proc = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise CheckoutError(f"git {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout.strip()


def resolve(rev: str) -> str:
    return git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")


@contextlib.contextmanager
def worktrees(commits: Sequence[str]) -> Iterator[list[str]]:
    """Detached worktree checkouts of ``commits`` in a temporary folder, removed on exit."""
    try:
        if git("rev-parse", "--is-inside-work-tree") != "true":
            raise CheckoutError(f"{REPO} is not a git work tree")
    except FileNotFoundError as exc:
        raise CheckoutError("git is not installed") from exc
    top = tempfile.mkdtemp(prefix="eventpipe-compare-")
    paths: list[str] = []
    try:
        for k, commit in enumerate(commits):
            path = os.path.join(top, f"{k}-{commit[:10]}")
            git("worktree", "add", "--detach", "--quiet", path, commit)
            paths.append(path)
        yield paths
    finally:
        for path in paths:
            with contextlib.suppress(CheckoutError):
                git("worktree", "remove", "--force", path)
        shutil.rmtree(top, ignore_errors=True)
        with contextlib.suppress(CheckoutError):
            git("worktree", "prune")


def measure(checkout: str, events: int, data_dir: str, kinds: Sequence[str]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=checkout)
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(events), data_dir, ",".join(kinds)],
                          capture_output=True, text=True, env=env, cwd=data_dir, timeout=600,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {checkout} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    where = os.path.dirname(os.path.dirname(os.path.realpath(result["eventpipe"])))
    if where != os.path.realpath(checkout):
        raise RuntimeError(f"imported eventpipe from {where}, not from {checkout}")
    return result


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def fmt_rate(rate: float) -> str:
    return f"{rate / 1e6:.2f}M/s" if rate >= 1e6 else f"{rate / 1e3:.0f}k/s"


def render(results: dict[str, dict[str, Any]], events: int) -> str:
    head = ["measure", "old median", "new median", "old rate", "new rate", "new/old",
            "paired", "within 10%"]
    cells = [head]
    for kind in KINDS:
        r = results[kind]
        cells.append([f"{TITLES[kind]}, {events:,} events", fmt_ms(r["old"]), fmt_ms(r["new"]),
                      fmt_rate(events / r["old"]), fmt_rate(events / r["new"]),
                      f"{r['ratio']:.3f}x", f"{r['paired_ratio']:.3f}x",
                      "yes" if r["within"] else "NO"])
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = [" | ".join(c.rjust(w) if i else c.ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("old", help="the old commit (any git revision)")
    ap.add_argument("new", nargs="?", default="HEAD", help="the new commit (default HEAD)")
    ap.add_argument("--runs", type=int, default=7, help="runs of each commit (default 7)")
    ap.add_argument("--events", type=int, default=100_000, help="events per measurement")
    ap.add_argument("--dir", default=None, help="where the measured logs go (default: tmp)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    a = ap.parse_args(argv)
    if a.runs < 1 or a.events < 1:
        ap.error("--runs and --events must be >= 1")
    try:
        commits = [resolve(a.old), resolve(a.new)]
    except (CheckoutError, FileNotFoundError) as exc:
        print(f"compare_commits: cannot resolve the commits: {exc}", file=sys.stderr)
        return 2
    samples: dict[str, dict[str, list[float]]] = {k: {"old": [], "new": []} for k in KINDS}
    started = time.perf_counter()
    try:
        with worktrees(commits) as (old_tree, new_tree), \
                tempfile.TemporaryDirectory(prefix="eventpipe-compare-data-",
                                            dir=a.dir) as data:
            for run in range(a.runs):
                sides = [("old", old_tree), ("new", new_tree)]
                kinds = list(KINDS) if run % 2 == 0 else list(KINDS)[::-1]
                for side, tree in sides if run % 2 == 0 else sides[::-1]:
                    got: dict[str, Any] = {}
                    for kind in kinds:
                        # One process per measurement: what one measurement leaves in a
                        # process's heap moved the next one's time by 15-20% (append_many
                        # after 100k append() calls; see benchmarks/README, issue 10).
                        got.update(measure(tree, a.events, data, [kind]))
                    for kind in KINDS:
                        samples[kind][side].append(got[kind])
                    print(f"[{time.strftime('%H:%M:%S')}] run {run + 1}/{a.runs} {side}: "
                          + ", ".join(f"{k} {fmt_ms(got[k])}" for k in KINDS),
                          file=sys.stderr, flush=True)
    except CheckoutError as exc:
        print(f"compare_commits: cannot check the commits out as worktrees: {exc}",
              file=sys.stderr)
        return 2
    results: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        old, new = samples[kind]["old"], samples[kind]["new"]
        ratio = statistics.median(new) / statistics.median(old)
        paired = statistics.median(n / o for n, o in zip(new, old, strict=True))
        results[kind] = {"old": statistics.median(old), "new": statistics.median(new),
                         "ratio": ratio, "paired_ratio": paired, "within": ratio <= LIMIT,
                         "old_samples": old, "new_samples": new}
    elapsed = time.perf_counter() - started
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    if a.json:
        print(json.dumps({"old": commits[0], "new": commits[1], "runs": a.runs,
                          "events": a.events, "python": sys.executable, "date": date,
                          "elapsed_s": elapsed, "results": results}, indent=2))
        return 0
    print(f"old {commits[0][:10]} ({a.old}) against new {commits[1][:10]} ({a.new}): "
          f"median of {a.runs} runs each, interleaved, one subprocess per run; {date}; "
          f"{sys.executable}; total {elapsed:.0f} s")
    print("times are per measurement; new/old = ratio of the medians (above 1: new is slower), "
          "paired = median of the per-run ratios")
    print()
    print(render(results, a.events))
    print()
    missed = [TITLES[k] for k in KINDS if not results[k]["within"]]
    print(f"more than 10% slower: {', '.join(missed)}" if missed
          else "new is within 10% of old on every measure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
