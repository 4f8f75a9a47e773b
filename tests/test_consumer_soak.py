"""Soak: a consumer killed at random instants under each on_error mode ends exactly where an
uninterrupted run does (issue 8's must-show; the standby variant is in test_standby.py).

Each round starts a consumer process and stops it at a random moment: mostly SIGKILL, some
SIGINT (KeyboardInterrupt wherever Python is, the handler included) and some SIGTERM. A writer
appends throughout. The handler changes its state in place before it may fail, and fails the
first time ever on some events (a downstream outage: a marker file makes the next try pass),
and for good on others under ``dead_letter``. At the end a fresh consumer finishes, and its
state must equal an independent fold of the log, with each failing event dead-lettered once.

``EVENTPIPE_CONSUMER_SOAK_ROUNDS`` sets the rounds per mode (default 60).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from eventpipe import Consumer, EventLog, HandlerError

from .conftest import Children

ROUNDS = int(os.environ.get("EVENTPIPE_CONSUMER_SOAK_ROUNDS", "60"))
TOTAL = 60_000
MODES = ("stop", "retry", "dead_letter")


def fails_for_good(seq: int) -> bool:
    return seq % 211 == 100


def fails_once(seq: int, mode: str) -> bool:
    # Rarer under on_error='stop', where each one ends the process.
    return seq % (997 if mode == "stop" else 53) == 7


def handler_for(markers: Path, mode: str, slow: bool = False) -> Any:
    def handler(state: dict[str, Any], event: Any, offset: int) -> dict[str, Any]:
        if state["next"] > offset:
            raise AssertionError(f"offset {offset} again (next {state['next']})")
        state["n"] += 1  # in place, before any failure: only a rebuild undoes it
        if slow:
            time.sleep(0.00005)  # some work, so the rounds stop it mid-backlog
        seq = event["seq"]
        if mode == "dead_letter" and fails_for_good(seq):
            raise ValueError(f"cannot handle {seq}")
        if fails_once(seq, mode):
            marker = markers / str(offset)
            if not marker.exists():
                marker.touch()
                raise ConnectionError(f"downstream down at {offset}")
        state["sum"] += seq
        state["next"] = offset + 1
        return state

    return handler


INITIAL = {"next": 0, "n": 0, "sum": 0}


def options(mode: str, dlq: Path) -> dict[str, Any]:
    opts: dict[str, Any] = {"on_error": mode, "checkpoint_every": 97, "max_retries": 2,
                            "retry_backoff": 0.001, "poll_interval": 0.05}
    if mode == "dead_letter":
        opts["dead_letter"] = str(dlq)
    return opts


def run_member(path: str, dlq: str, markers: str, mode: str) -> None:
    """One soak consumer process: exit 3 when on_error='stop' stops it (a HandlerError)."""
    with Consumer(path, "soak", handler_for(Path(markers), mode, slow=True), INITIAL,
                  **options(mode, Path(dlq))) as c:
        print("started", flush=True)
        try:
            c.run()
        except HandlerError:
            sys.exit(3)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_soak_consumer_killed_at_random_instants(
        tmp_path: Path, children: Children, mode: str) -> None:
    rng = random.Random(MODES.index(mode))
    path, dlq, markers = tmp_path / "log", tmp_path / "dlq", tmp_path / "markers"
    markers.mkdir()
    EventLog(path, segment_max_bytes=64 * 1024).close()
    writer = children.worker("writer", str(path), "w", str(TOTAL), "9", "65536",
                             stdout=subprocess.DEVNULL)
    signals = {signal.SIGKILL: 0, signal.SIGINT: 0, signal.SIGTERM: 0}
    exits: dict[int, int] = {}
    for _ in range(ROUNDS):
        member = children.popen([sys.executable, "-m", "tests.test_consumer_soak", str(path),
                                 str(dlq), str(markers), mode])
        assert member.stdout is not None
        # Once it has started (or exited: on_error='stop' at once), a random instant to stop
        # it at, within its catch-up or while it follows the writer.
        member.stdout.readline()
        time.sleep(rng.uniform(0, 0.3))
        sig = rng.choices(list(signals), weights=(8, 1, 1))[0]
        if member.poll() is None:
            member.send_signal(sig)
            signals[sig] += 1
        code = member.wait(60)
        exits[code] = exits.get(code, 0) + 1
        # Clean exits only: 0 (stopped), 3 (on_error='stop'), or killed; never a traceback.
        # (SIGINT or SIGTERM before run() installs its handlers end the process by default.)
        assert code in (0, 3, -signal.SIGKILL, -signal.SIGINT, -signal.SIGTERM), code
    assert writer.wait(120) == 0
    handler = handler_for(markers, mode)
    with Consumer(path, "soak", handler, INITIAL, **options(mode, dlq)) as c:
        resumed_at = c.offset
        while True:
            try:
                state = c.catch_up()
                break
            except HandlerError:
                continue  # on_error='stop' at a first-time failure: the next try passes
        assert c.offset == TOTAL
    want = dict(INITIAL)
    failing = []
    with EventLog(path) as log:
        for rec in log.read():
            if mode == "dead_letter" and fails_for_good(rec.event["seq"]):
                failing.append(rec.offset)
                continue
            want["n"] += 1
            want["sum"] += rec.event["seq"]
            want["next"] = rec.offset + 1
    assert state == want, (state, want)
    if mode == "dead_letter":
        with EventLog(dlq) as log:
            entries = sorted(r.event["offset"] for r in log.read())
        assert entries == failing, "each failing event dead-lettered exactly once"
    print(f"\n{mode}: {ROUNDS} rounds ({signals[signal.SIGKILL]} SIGKILL, "
          f"{signals[signal.SIGINT]} SIGINT, {signals[signal.SIGTERM]} SIGTERM; exits {exits}),"
          f" pool at {resumed_at}/{TOTAL} when the rounds ended, {len(failing)} dead-lettered,"
          f" {len(os.listdir(markers))} first-time failures: state exact")


if __name__ == "__main__":
    run_member(*sys.argv[1:])
