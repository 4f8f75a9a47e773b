"""Child-process programs for multi-process tests: ``python tests/_workers.py NAME ARGS``.

Each prints one line to stdout per acknowledged operation, flushed, *after* the operation
returned, so the parent knows exactly what was acknowledged before it killed the child.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
from collections.abc import Callable
from typing import Any

from eventpipe import Consumer, EventLog
from eventpipe._checkpoint import load_checkpoint
from eventpipe._layout import Folder


def rewrite_checkpoint(path: str | os.PathLike[str], **changes: Any) -> None:
    """Rewrite a checkpoint file with some fields changed and a valid checksum: a checkpoint
    as eventpipe itself could have written it (e.g. before the log was restored from an older
    copy). Editing the JSON by hand now only tests the checksum."""
    with Folder.open(os.path.dirname(os.path.abspath(path))) as folder:
        cp = load_checkpoint(folder, os.path.basename(path))
    assert cp is not None
    with open(path, "wb") as f:
        f.write(dataclasses.replace(cp, **changes).to_bytes())


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


def soak_writer(path: str, wid: str, count: str, seed: str, sync: str, out: Any = None) -> None:
    """Append ``count`` events ``{"w", "seq"}`` under random faults; print what was acked.

    Lines: ``ack OFFSET SEQ`` for each event known to be stored at OFFSET (after the call
    returned, or from a DurabilityError's committed offsets), ``retry KIND`` when a typed
    StorageError was retried, ``fatal KIND MESSAGE`` for anything else (the soak fails on it),
    ``done`` at the end. A StorageError (the append left no trace) is retried once with the same
    events: a retry must never store them twice.
    """
    from eventpipe import DurabilityError, StorageError

    rng = random.Random(int(seed))
    out = out or sys.stdout
    seq = 0
    n = int(count)
    last_acked = -1

    def ack(offsets: range, first_seq: int) -> None:
        nonlocal last_acked
        last_acked = max(last_acked, offsets.stop - 1)
        out.write("".join(f"ack {o} {first_seq + k}\n" for k, o in enumerate(offsets)))
        out.flush()

    try:
        with EventLog(path, segment_max_bytes=2048, sync=sync, sync_interval=0.01) as log:
            while seq < n:
                size = min(rng.choice((1, 1, 3, 17)), n - seq)
                batch = [{"w": wid, "seq": seq + k, "pad": "p" * rng.randint(0, 300)}
                         for k in range(size)]
                for attempt in range(2):
                    try:
                        if size == 1:
                            first = log.append(batch[0])
                            offsets = range(first, first + 1)
                        else:
                            offsets = log.append_many(batch)
                        ack(offsets, seq)
                        break
                    except DurabilityError as exc:
                        # Offsets past what was acked are this call's (a background fsync's
                        # error names earlier, already acknowledged appends).
                        if exc.committed and exc.committed.start > last_acked:
                            ack(exc.committed, seq)
                        out.write("done\n")
                        out.flush()
                        os._exit(0)  # the log refuses further appends: this writer is done
                    except StorageError as exc:
                        out.write(f"retry {type(exc).__name__} {exc.errno}\n")
                        out.flush()
                        if attempt:
                            raise
                seq += size
    except StorageError:
        pass  # typed, and the log is as before: acceptable under injected faults
    except BaseException as exc:  # anything untyped is a defect the soak reports
        out.write(f"fatal {type(exc).__name__} {exc!r}\n".replace("\n", " ") + "\n")
        out.flush()
        os._exit(1)
    out.write("done\n")
    out.flush()


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
    parser.add_argument("--no-notifications", action="store_true")
    parser.add_argument("--echo", action="store_true")
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args(flags)

    def handler(state: dict[str, Any], event: Any, offset: int) -> dict[str, Any]:
        state = fold(state, event, offset)
        if args.echo:
            print(offset, flush=True)
        return state

    with Consumer(path, name, handler, INITIAL, standby=args.standby,
                  poll_interval=args.poll, notifications=not args.no_notifications,
                  checkpoint_every=args.every,
                  on_caught_up=lambda c: print("caught-up", flush=True)) as c:
        c.run()
        print("final", json.dumps(c.state), c.offset, flush=True)


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    programs: dict[str, Callable[..., None]] = {
        "writer": writer, "reader": reader, "consumer": consumer, "soak_writer": soak_writer,
    }
    programs[name](*args)
    os._exit(0)
