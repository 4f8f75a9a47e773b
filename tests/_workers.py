"""Child-process programs for multi-process tests: ``python tests/_workers.py NAME ARGS``.

Each prints one line to stdout per acknowledged operation, flushed, *after* the operation
returned, so the parent knows exactly what was acknowledged before it killed the child.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Callable
from typing import Any

from eventpipe import Consumer, EventLog


def writer(path: str, wid: str, count: str, seed: str, seg_bytes: str) -> None:
    """Append ``count`` events ``{"w", "seq", "batch", "size"}`` mixing the three write paths."""
    rng = random.Random(int(seed))
    out = sys.stdout
    seq = 0
    n = int(count)
    with EventLog(path, segment_max_bytes=int(seg_bytes), sync="none") as log:
        buffered = log.writer(max_events=1000, linger=None)
        while seq < n:
            mode = rng.choice(("one", "many", "buffered"))
            size = 1 if mode == "one" else rng.randint(1, 20)
            size = min(size, n - seq)
            events = [{"w": wid, "seq": seq + k, "batch": seq, "size": size} for k in range(size)]
            if mode == "one":
                first = log.append(events[0])
                offsets = range(first, first + 1)
            elif mode == "many":
                offsets = log.append_many(events)
            else:
                for e in events:
                    buffered.append(e)
                offsets = buffered.flush()
                assert offsets == buffered.last_flushed and len(offsets) == size
            # Acknowledge after the call returned: "offset seq" for each event of the batch.
            out.write("".join(f"{o} {seq + k}\n" for k, o in enumerate(offsets)))
            out.flush()
            seq += size
        buffered.close()


def reader(path: str) -> None:
    """Read the whole log repeatedly until stdin closes, checking density; print counts."""
    with EventLog(path) as log:
        while True:
            count = 0
            for rec in log.read():
                assert rec.offset == count, (rec.offset, count)
                assert isinstance(rec.event, dict)
                count += 1
            print(count, flush=True)
            if sys.stdin.readline() == "":
                return


def fold(state: dict[str, Any], event: Any, offset: int) -> dict[str, Any]:
    """The test consumers' handler: counts and sums, and insists on seeing every offset once."""
    if state["next"] != offset:
        raise AssertionError(f"expected offset {state['next']}, got {offset}")
    state["next"] = offset + 1
    state["n"] += 1
    state["sum"] += event.get("seq", 0) if isinstance(event, dict) else 0
    return state


INITIAL = {"next": 0, "n": 0, "sum": 0}


def consumer(path: str, name: str, *flags: str) -> None:
    """Run a Consumer with the fold handler; prints "caught-up", each offset with --echo."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--standby", action="store_true")
    parser.add_argument("--poll", type=float, default=1.0)
    parser.add_argument("--no-notify", action="store_true")
    parser.add_argument("--echo", action="store_true")
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args(flags)

    def handler(state: dict[str, Any], event: Any, offset: int) -> dict[str, Any]:
        state = fold(state, event, offset)
        if args.echo:
            print(offset, flush=True)
        return state

    with Consumer(path, name, handler, INITIAL, standby=args.standby,
                  poll_interval=args.poll, notifications=not args.no_notify,
                  checkpoint_every=args.every,
                  on_caught_up=lambda c: print("caught-up", flush=True)) as c:
        c.run()
        print("final", json.dumps(c.state), c.offset, flush=True)


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    programs: dict[str, Callable[..., None]] = {
        "writer": writer, "reader": reader, "consumer": consumer,
    }
    programs[name](*args)
    os._exit(0)
