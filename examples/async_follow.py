"""Following a log from asyncio while another process appends to it.

``async for record in log.follow(...)`` yields every stored event from the start offset, then
each new one as soon as it is committed. Waiting never blocks the event loop: here a second
task keeps ticking meanwhile. The writer is a separate OS process started with asyncio.

    python examples/async_follow.py
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time

from eventpipe import EventLog

EVENTS = 10


def write(path: str, count: int) -> None:
    """The writer process: append ``count`` events, a few milliseconds apart."""
    with EventLog(path) as log:
        for i in range(count):
            log.append({"n": i, "sent": time.time()})
            time.sleep(0.02)


async def ticker(ticks: list[int]) -> None:
    while True:
        await asyncio.sleep(0.01)
        ticks[0] += 1


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "events")
        with EventLog(path) as log:
            ticks = [0]
            tick_task = asyncio.create_task(ticker(ticks))
            writer = await asyncio.create_subprocess_exec(sys.executable, __file__, "write",
                                                          path, str(EVENTS))
            follower = log.follow(0)
            async for record in follower:
                latency_ms = (time.time() - record.event["sent"]) * 1000
                print(f"offset {record.offset}: event {record.event['n']} "
                      f"({latency_ms:.1f} ms after its append)")
                if record.offset + 1 == EVENTS:
                    follower.stop()  # ends the loop; the follower closes its watcher
            tick_task.cancel()
            print(f"writer exited with {await writer.wait()}; the loop ticked {ticks[0]} "
                  "times while waiting for events")


if __name__ == "__main__":
    if sys.argv[1:2] == ["write"]:
        write(sys.argv[2], int(sys.argv[3]))
    else:
        asyncio.run(main())
