"""The "bare minimum" of simple-event-sourcing's README, in eventpipe.

The original (JavaScript) creates a file event source, a consumer with a state backup file
("snapshot"), a default state and an event handler, subscribes the consumer, waits for both to
catch up, and stores 20 events ``{ts, name}``. Here the log is a directory, the consumer's
snapshot is its checkpoint (state and position saved atomically together), and there is no
waiting before writing: appends and reads never need a catch-up first.

    python examples/bare_minimum.py
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from eventpipe import Consumer, EventLog


def handler(state: dict[str, Any], event: dict[str, Any], offset: int) -> dict[str, Any]:
    """The event handler: returns the new state (which must be JSON-serialisable)."""
    state["count"] += 1
    state["last"] = event["name"]
    return state


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # The event source: a log directory (created on first open). Any number of processes
        # may open it at once; each append is visible to all of them when it returns.
        log = EventLog(os.path.join(tmp, "bare-minimum"))

        # The consumer: a name (one process at a time holds it), the handler, a default state,
        # and where its snapshot (checkpoint) goes; by default <log>/consumers/<name>.json.
        snapshot_dir = os.path.join(tmp, "snapshots")
        consumer = Consumer(log, "bare-minimum", handler, {"count": 0, "last": None},
                            checkpoint_dir=snapshot_dir)

        # Then write some events.
        for i in range(20):
            log.append({"ts": time.time_ns() // 1_000_000, "name": f"event{i}"})

        # Handle everything up to the head and save state and position together.
        state = consumer.catch_up()
        print(f"state after {consumer.offset} events: {state}")
        consumer.close()
        print(f"snapshot: {os.path.join(snapshot_dir, 'bare-minimum.json')}")

        # A restarted consumer resumes from its snapshot: nothing is handled twice.
        with Consumer(log, "bare-minimum", handler, {"count": 0, "last": None},
                      checkpoint_dir=snapshot_dir) as again:
            print(f"resumed at offset {again.offset} with state {again.state}")
            log.append({"ts": time.time_ns() // 1_000_000, "name": "event20"})
            print(f"after one more event: {again.catch_up()}")
        log.close()


if __name__ == "__main__":
    main()
