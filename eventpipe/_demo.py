"""``eventpipe demo``: writer and consumer processes on one directory, checked at the end.

Starts writer processes that append bank-like events to a log, and consumer processes that
fold them into projections (balances per account, counts per event type), each a separate OS
process coordinating only through the directory. Shows live throughput and each consumer's
lag, then stops the writers, lets the consumers drain, stops them with SIGTERM, and checks
their persisted state against a fold of the log done here. Some events are deliberately
malformed: the balances consumer sends them to a dead-letter log, and the check expects
exactly those there.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any, TextIO

from ._checkpoint import Checkpoint, checkpoint_file, load_checkpoint
from ._consumer import Consumer
from ._layout import CONSUMERS_DIR, Folder
from ._log import EventLog
from .errors import EventPipeError

__all__ = ["DemoResult", "balances", "run_demo", "type_counts"]

ACCOUNTS = [f"acct-{i:02d}" for i in range(20)]
TYPES = ("deposit", "withdrawal", "fee")


def balances(state: dict[str, int], event: dict[str, Any], offset: int) -> dict[str, int]:
    """Projection: balance per account. Rejects events whose amount is not an integer."""
    amount = event["amount"]
    if not isinstance(amount, int):
        raise ValueError(f"amount must be an integer, got {amount!r}")
    sign = 1 if event["type"] == "deposit" else -1
    state[event["account"]] = state.get(event["account"], 0) + sign * amount
    return state


def type_counts(state: dict[str, int], event: dict[str, Any], offset: int) -> dict[str, int]:
    """Projection: number of events per type."""
    state[event["type"]] = state.get(event["type"], 0) + 1
    return state


PROJECTIONS: dict[str, Callable[[dict[str, int], dict[str, Any], int], dict[str, int]]] = {
    "balances": balances,
    "type-counts": type_counts,
}


def _writer(path: str, wid: int, rate: float, stop: Any, seed: int) -> None:
    """Append about ``rate`` events/s in small batches until ``stop`` is set."""
    rng = random.Random(seed)
    seq = 0
    with EventLog(path) as log, log.writer(max_events=500, linger=0.02) as buffered:
        started = time.monotonic()
        while not stop.is_set():
            due = int((time.monotonic() - started) * rate) - seq
            if due <= 0:
                stop.wait(0.005)
                continue
            batch = []
            for _ in range(min(due, 2000)):
                amount: Any = rng.randint(1, 500)
                if rng.random() < 0.001:
                    amount = "lots"  # malformed on purpose: goes to the dead-letter log
                batch.append({"type": rng.choice(TYPES), "account": rng.choice(ACCOUNTS),
                              "amount": amount, "writer": wid, "seq": seq})
                seq += 1
            if wid % 2:
                log.append_many(batch)
            else:
                for event in batch:
                    buffered.append(event)


def _consumer(path: str, name: str, dead_letter: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when consumers stop
    with Consumer(path, name, PROJECTIONS[name], {}, on_error="dead_letter",
                  dead_letter=dead_letter, max_retries=0, checkpoint_interval=0.2) as c:
        c.run()


@dataclass
class DemoResult:
    """What the demo saw and whether every consumer's state matched the log."""

    directory: str
    events: int
    seconds: float
    dead_lettered: int
    ok: bool
    problems: list[str]


def _checkpoint(path: str, name: str) -> Checkpoint | None:
    """Consumer ``name``'s last checkpoint (None until it has one)."""
    try:
        with Folder.open(path) as root, root.sub(CONSUMERS_DIR) as folder:
            return load_checkpoint(folder, checkpoint_file(name), name)
    except EventPipeError:
        return None


def _offset(path: str, name: str) -> int | None:
    cp = _checkpoint(path, name)
    return cp.offset if cp is not None else None


def run_demo(
    directory: str | None = None,
    *,
    seconds: float = 5.0,
    writers: int = 3,
    rate: float = 20000.0,
    out: TextIO | None = None,
) -> DemoResult:
    """Run the demo pipeline; returns the verdict. Prints progress to ``out`` (stderr)."""
    out = out or sys.stderr
    base = directory or tempfile.mkdtemp(prefix="eventpipe-demo-")
    path = os.path.join(base, "events")
    dlq = os.path.join(base, "dead-letter")
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    EventLog(path, segment_max_bytes=4 << 20).close()
    EventLog(dlq).close()
    print(f"eventpipe demo: {writers} writer and {len(PROJECTIONS)} consumer processes on "
          f"{base}", file=out)
    print("  (lag is read from each consumer's checkpoint file, as any other process would)",
          file=out)
    consumers = [ctx.Process(target=_consumer, args=(path, name, dlq), name=f"consumer {name}")
                 for name in PROJECTIONS]
    producers = [ctx.Process(target=_writer, args=(path, w, rate / writers, stop, w),
                             name=f"writer {w}") for w in range(writers)]
    problems: list[str] = []
    started = time.monotonic()
    try:
        for p in consumers + producers:
            p.start()
        with EventLog(path) as log:
            _show_progress(path, log, started, seconds, out)
            stop.set()
            problems += _joined(producers)
            head = log.head
            print(f"  writers stopped at {head:,} events; waiting for consumers to drain",
                  file=out)
            problems += _drain(path, head, consumers)
            elapsed = time.monotonic() - started
            bad = _check(path, log, head, dlq, problems)
    finally:
        stop.set()
        for p in consumers + producers:
            if p.pid is None:
                continue  # never started
            if p.is_alive():
                p.kill()
            p.join()
    result = DemoResult(base, head, elapsed, bad, not problems, problems)
    verdict = "OK" if result.ok else "FAILED"
    print(f"{verdict}: {head:,} events from {writers} writers in {elapsed:.1f}s; each consumer's "
          f"checkpointed state equals a fold of the log; {bad} malformed events "
          "dead-lettered exactly once." if result.ok else
          f"{verdict}: " + "; ".join(problems), file=out)
    print(f"  files kept in {base} (try: eventpipe status {path})", file=out)
    return result


def _drain(path: str, head: int, consumers: Sequence[BaseProcess]) -> list[str]:
    """Let the consumers reach ``head`` (at most 60 s), stop them with SIGTERM as systemd
    would, and return what went wrong with them."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_offset(path, n) != head for n in PROJECTIONS):
        time.sleep(0.05)  # a progress poll of checkpoint files, not a synchronisation
    for p in consumers:
        if p.pid is not None and p.is_alive():
            os.kill(p.pid, signal.SIGTERM)
    return _joined(consumers)


def _show_progress(path: str, log: EventLog, started: float, seconds: float,
                   out: TextIO) -> None:
    """Print the head, the rate and each consumer's lag until ``seconds`` have passed (one
    line rewritten in place on a terminal, a line a second otherwise)."""
    live = out.isatty()
    last_head, last_t = log.head, time.monotonic()
    while time.monotonic() - started < seconds:
        time.sleep(0.5 if live else 1.0)
        head, now = log.head, time.monotonic()
        # Lag as any other process sees it: from each consumer's last checkpoint (taken every
        # 0.2 s here), so it reads a little high while they keep up.
        lags = {n: head - (_offset(path, n) or 0) for n in PROJECTIONS}
        line = (f"  {now - started:4.1f}s  head {head:>9,}  "
                f"{(head - last_head) / (now - last_t):>9,.0f} events/s  " + "  ".join(
                    f"{n} lag {lag:,}" for n, lag in lags.items()))
        print(("\r" + line) if live else line, end="" if live else "\n", file=out, flush=True)
        last_head, last_t = head, now
    if live:
        print(file=out)


def _joined(procs: Sequence[BaseProcess]) -> list[str]:
    """Wait for ``procs`` to end; what went wrong with any of them."""
    problems = []
    for p in procs:
        p.join(30)
        if p.exitcode != 0:
            problems.append(f"{p.name} exited with {p.exitcode}")
    return problems


def _check(path: str, log: EventLog, head: int, dlq: str, problems: list[str]) -> int:
    """Fold the log here, independently, and compare with each consumer's checkpoint and the
    dead-letter log; appends to ``problems``. Returns the number of malformed events."""
    expected: dict[str, dict[str, int]] = {n: {} for n in PROJECTIONS}
    bad = []
    for rec in log.read():
        for name, fold in PROJECTIONS.items():
            try:
                expected[name] = fold(expected[name], rec.event, rec.offset)
            except ValueError:
                bad.append(rec.offset)
    for name in PROJECTIONS:
        cp = _checkpoint(path, name)
        if cp is None or cp.offset != head:
            problems.append(f"consumer {name} stopped at {cp and cp.offset}, head {head}")
        elif cp.state != expected[name]:
            problems.append(f"consumer {name}'s state differs from a fold of the log")
    with EventLog(dlq) as dead:
        lettered = sorted(r.event["offset"] for r in dead.read())
    if lettered != bad:
        problems.append(f"dead-letter log holds offsets {lettered[:5]}..., expected {bad[:5]}")
    return len(bad)
