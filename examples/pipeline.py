"""A multi-process pipeline: writers, projection consumers and a dead-letter log, checked.

Three writer processes append bank-like events to one log; two consumer processes fold it
into projections (balance per account, count per event type), each with its own checkpoint.
A few events are malformed on purpose: the balances handler rejects them and they go to a
dead-letter log instead of stopping the consumer. The processes share nothing but the
directory. At the end each consumer's state is compared with a fold of the log done here.

    python examples/pipeline.py
"""

from __future__ import annotations

import multiprocessing
import os
import random
import tempfile
import time
from typing import Any

from eventpipe import Consumer, EventLog, log_status


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


WRITERS = 3
EVENTS_PER_WRITER = 2000
PROJECTIONS = {"balances": balances, "type-counts": type_counts}


def writer(path: str, wid: int) -> None:
    """Append EVENTS_PER_WRITER events in batches of random size; about 1 in 500 malformed."""
    rng = random.Random(wid)
    with EventLog(path) as log:
        written = 0
        while written < EVENTS_PER_WRITER:
            size = min(rng.randint(1, 200), EVENTS_PER_WRITER - written)
            log.append_many([
                {"type": rng.choice(("deposit", "withdrawal", "fee")),
                 "account": f"acct-{rng.randrange(10)}",
                 "amount": "lots" if rng.random() < 0.002 else rng.randint(1, 500),
                 "writer": wid}
                for _ in range(size)
            ])  # one batch: all of it or none, under one lock
            written += size


def consumer(path: str, name: str, dead_letter: str, results: Any) -> None:
    """Fold the log with one projection until SIGTERM, then report the final state."""
    with Consumer(path, name, PROJECTIONS[name], {}, on_error="dead_letter",
                  dead_letter=dead_letter, max_retries=0) as c:
        c.run()  # catches up, follows new events, returns on SIGTERM (after a checkpoint)
        results.put((name, c.offset, c.state))


def drained(path: str) -> bool:
    """True when every projection has a checkpoint at the head (see `eventpipe status`)."""
    found = log_status(path)["consumers"]
    return len(found) == len(PROJECTIONS) and all(c.get("lag") == 0 for c in found)


def main(base: str) -> bool:
    path, dlq = os.path.join(base, "events"), os.path.join(base, "dead-letter")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    consumers = [ctx.Process(target=consumer, args=(path, name, dlq, results))
                 for name in PROJECTIONS]
    writers = [ctx.Process(target=writer, args=(path, w)) for w in range(WRITERS)]
    EventLog(path).close()
    try:
        for p in consumers + writers:
            p.start()
        for p in writers:
            p.join()
            assert p.exitcode == 0, f"writer exited with {p.exitcode}"
        # Wait until every consumer has checkpointed everything, then stop them.
        deadline = time.monotonic() + 60
        while not drained(path):
            assert all(p.is_alive() for p in consumers), "a consumer died"
            assert time.monotonic() < deadline, "consumers did not catch up in time"
            time.sleep(0.05)
        for p in consumers:
            p.terminate()  # SIGTERM: the consumer finishes its event and checkpoints
        final = {name: (offset, state) for name, offset, state in
                 (results.get(timeout=30) for _ in consumers)}
        for p in consumers:
            p.join()
    finally:
        for p in consumers + writers:
            if p.is_alive():
                p.kill()
                p.join()

    # The check: fold the log here, independently, and compare.
    expected: dict[str, dict[str, int]] = {name: {} for name in PROJECTIONS}
    malformed = []
    with EventLog(path) as log:
        head = log.head
        for offset, event in log.read():
            for name, fold in PROJECTIONS.items():
                try:
                    expected[name] = fold(expected[name], event, offset)
                except ValueError:
                    malformed.append(offset)
    with EventLog(dlq) as dead:
        lettered = [entry["offset"] for _, entry in dead.read()]
    print(f"{head} events from {WRITERS} writer processes in {path}")
    ok = True
    for name, (offset, state) in sorted(final.items()):
        good = offset == head and state == expected[name]
        ok = ok and good
        print(f"  consumer {name:<12} offset {offset}  state "
              f"{'matches' if good else 'DIFFERS FROM'} a fold of the log")
    print(f"  balances: {dict(sorted(final['balances'][1].items())[:3])} ...")
    print(f"  type-counts: {final['type-counts'][1]}")
    dead_ok = sorted(lettered) == malformed
    ok = ok and dead_ok
    print(f"  dead-letter log: {len(lettered)} malformed events (offsets {lettered}) "
          f"{'as expected' if dead_ok else f'but expected {malformed}'}")
    print("verdict: OK" if ok else "verdict: FAILED")
    return ok


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="eventpipe-pipeline-") as tmp:
        raise SystemExit(0 if main(tmp) else 1)
