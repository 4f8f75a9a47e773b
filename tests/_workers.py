"""Child-process programs for multi-process tests: ``python tests/_workers.py NAME ARGS``.

Each prints one line to stdout per acknowledged operation, flushed, *after* the operation
returned, so the parent knows exactly what was acknowledged before it killed the child.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable

from eventpipe import EventLog


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


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    programs: dict[str, Callable[..., None]] = {"writer": writer, "reader": reader}
    programs[name](*args)
    os._exit(0)
