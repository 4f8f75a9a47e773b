"""Issue 8, items 2-7: consumer paths that broke exactly-once, stopping, the loop or the watchdog.

Each test failed on the code before its fix. Child programs (real processes, real signals) are
at the bottom: ``python -m tests.test_consumer_defects PROGRAM ARGS``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventpipe import Consumer, CorruptLogError, EventLog, HandlerError

from ._loop import loop_gaps
from ._sdnotify import fake_systemd
from ._workers import INITIAL, fold
from .conftest import ROOT, Children
from .test_consumer import expected_state, fold_until, read_line

MODULE = "tests.test_consumer_defects"


def checkpoint_of(log_path: Path, name: str) -> tuple[dict[str, Any], int]:
    doc = json.loads((log_path / "consumers" / f"{name}.json").read_bytes())
    return doc["state"], doc["offset"]


def dead_letters(path: Path) -> int:
    if not path.exists():
        return 0
    with EventLog(path) as log:
        return log.head


def spin(seconds: float) -> None:
    """Busy for ``seconds`` (a handler's CPU work; sleeping would release the CPU)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def in_place(state: dict[str, Any], event: Any, offset: int) -> dict[str, Any]:
    """fold(), updating the state in place in steps with work between them."""
    if state["next"] != offset:
        raise AssertionError(f"expected offset {state['next']}, got {offset}")
    state["n"] += 1
    spin(0.00005)  # an interrupt here leaves n counted and the rest not
    state["sum"] += event["seq"]
    state["next"] = offset + 1
    return state


# ------------------------------------------------------------------------------------ item 2


def test_ctrl_c_on_run_until_complete_never_checkpoints_a_half_applied_state(
    log_path: Path, children: Children
) -> None:
    rng = random.Random(8)
    with EventLog(log_path) as log:
        for first in range(0, 60_000, 10_000):
            log.append_many([{"seq": i} for i in range(first, first + 10_000)])
    interrupted = 0
    for _ in range(12):
        child = children.popen([sys.executable, "-m", MODULE, "sigint-async", str(log_path)],
                               stderr=subprocess.DEVNULL)
        assert read_line(child) == "ready"
        time.sleep(rng.uniform(0.05, 0.4))  # a random moment to interrupt at
        child.send_signal(signal.SIGINT)
        child.wait(30)
        assert child.stdout is not None
        interrupted += b"interrupted" in child.stdout.read()
        # Whatever the moment: the checkpoint pairs a state with its own offset.
        state, offset = checkpoint_of(log_path, "c")
        assert state == fold_until(log_path, offset), offset
    assert interrupted >= 6  # most rounds were cut short inside the run, not before it
    with Consumer(log_path, "c", in_place, INITIAL) as c:
        assert c.catch_up() == expected_state(log_path)


@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("mode", ["run", "catch_up", "run_async"])
def test_a_base_exception_from_an_in_place_handler_is_never_checkpointed(
    log_path: Path, raised: type[BaseException], mode: str
) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(100)])
    armed = [True]

    def handler(state: dict[str, Any], event: Any, offset: int) -> dict[str, Any]:
        state = in_place(state, event, offset)
        if offset == 57 and armed[0]:
            armed[0] = False
            raise raised()  # after changing the state: half of event 57 is in it
        return state

    with Consumer(log_path, "c", handler, INITIAL, checkpoint_every=10) as c:
        with pytest.raises(raised):
            if mode == "run":
                c.run()
            elif mode == "catch_up":
                c.catch_up()
            else:
                asyncio.run(c.run_async())
        state, offset = checkpoint_of(log_path, "c")
        assert offset == 50 and state == fold_until(log_path, 50)
        # In memory too, the consumer is back at its last checkpoint, and stays consistent.
        assert (c.state, c.offset) == (state, offset)
        c.checkpoint()
        assert checkpoint_of(log_path, "c") == (state, offset)
        assert c.catch_up() == expected_state(log_path)
    assert checkpoint_of(log_path, "c") == (expected_state(log_path), 100)


def test_checkpoint_called_from_inside_an_in_place_handler_saves_nothing_partial(
    log_path: Path,
) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(100)])
    holder: list[Consumer] = []
    checked = []

    def handler(state: dict[str, Any], event: Any, offset: int) -> dict[str, Any]:
        state = in_place(state, event, offset)
        if offset % 10 == 3:
            holder[0].checkpoint()  # mid-batch: the state holds events past the offset
            if (log_path / "consumers" / "c.json").exists():
                saved, at = checkpoint_of(log_path, "c")
                checked.append(at)
                assert saved == fold_until(log_path, at), at
        return state

    with Consumer(log_path, "c", handler, INITIAL, checkpoint_every=25) as c:
        holder.append(c)
        assert c.catch_up() == expected_state(log_path)
    assert checked and checkpoint_of(log_path, "c") == (expected_state(log_path), 100)


# ------------------------------------------------------------------------------------ item 3


@pytest.mark.parametrize("mode", ["run", "catch_up"])
@pytest.mark.parametrize("on_error", ["stop", "retry", "dead_letter"])
def test_a_failure_during_the_rebuild_replay_is_a_clear_error_and_never_checkpointed(
    tmp_path: Path, mode: str, on_error: str
) -> None:
    path, dlq = tmp_path / "log", tmp_path / "dlq"
    with EventLog(path) as log:
        log.append_many([{"seq": i} for i in range(100)])
    outage = [False]

    def handler(state: dict[str, Any], event: Any, offset: int) -> dict[str, Any]:
        state = in_place(state, event, offset)
        if offset == 57:
            outage[0] = True  # a downstream outage starts: every call fails from now on
        if outage[0]:
            raise ConnectionError("downstream is down")
        return state

    with Consumer(path, "c", handler, INITIAL, checkpoint_every=50, on_error=on_error,
                  max_retries=2, retry_backoff=0.001, dead_letter=str(dlq)) as c:
        with pytest.raises(HandlerError) as exc:
            c.run() if mode == "run" else c.catch_up()
        # The replay from the checkpoint at 50 failed at once, at offset 50: said so, typed.
        assert exc.value.offset == 50 and exc.value.event == {"seq": 50}
        assert "rebuilding the state" in str(exc.value) and "offset 57" in str(exc.value)
        assert isinstance(exc.value.__cause__, ConnectionError)
        assert checkpoint_of(path, "c") == (fold_until(path, 50), 50)
        assert (c.state, c.offset) == (fold_until(path, 50), 50)
    assert dead_letters(dlq) == 0


# ------------------------------------------------------------------------------------ item 4


def decode_error() -> orjson.JSONDecodeError:
    try:
        orjson.loads(b"{")
    except orjson.JSONDecodeError as exc:
        return exc
    raise AssertionError("unreachable")


@pytest.mark.parametrize("where", ["last", "middle"])
def test_a_handler_raising_json_decode_error_is_a_handler_error(
    log_path: Path, where: str
) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(100)])
    bad = 99 if where == "last" else 40

    def handler(state: dict[str, Any], event: Any, offset: int) -> dict[str, Any]:
        if offset == bad:
            raise decode_error()  # e.g. the handler parses a field of the event itself
        return fold(state, event, offset)

    with Consumer(log_path, "c", handler, INITIAL) as c, pytest.raises(HandlerError) as exc:
        c.catch_up()
    assert exc.value.offset == bad and isinstance(exc.value.__cause__, orjson.JSONDecodeError)
    assert checkpoint_of(log_path, "c") == (fold_until(log_path, bad), bad)


def test_a_handler_json_error_just_before_a_corrupt_stored_event_is_the_handler_s(
    log_path: Path,
) -> None:
    with EventLog(log_path, compression=None) as log:
        log.append_many([{"seq": i} for i in range(100)])
    seg = log_path / "segments" / "00000000000000000000.jsonl"
    seg.write_bytes(seg.read_bytes().replace(b'{"seq":61}', b'{"seq"61 }'))

    def handler(state: dict[str, Any], event: Any, offset: int) -> dict[str, Any]:
        if offset == 60:
            raise decode_error()
        return fold(state, event, offset)

    with Consumer(log_path, "c", handler, INITIAL) as c, pytest.raises(HandlerError) as exc:
        c.catch_up()
    assert exc.value.offset == 60
    assert checkpoint_of(log_path, "c") == (fold_until(log_path, 60), 60)
    # And a corrupt stored event alone is still reported as one, after every event before it.
    with Consumer(log_path, "d", fold, INITIAL) as c, pytest.raises(CorruptLogError) as err:
        c.catch_up()
    assert err.value.offset == 61
    assert checkpoint_of(log_path, "d") == (fold_until(log_path, 61), 61)


# ------------------------------------------------------------------------------------ item 5

FAILING_HANDLER = """
import sys

def handler(state, event, offset):
    if state["next"] != offset:
        raise AssertionError(f"expected offset {state['next']}, got {offset}")
    state["n"] += 1  # in place, before failing
    if event["seq"] == 30:
        sys.stderr.write("failing 30\\n")
        sys.stderr.flush()
        raise ConnectionError("downstream is down")
    state["sum"] += event["seq"]
    state["next"] = offset + 1
    return state
"""


@pytest.mark.parametrize("on_error", ["retry", "dead_letter"])
def test_sigterm_during_a_retry_backoff_stops_cleanly_before_the_event(
    tmp_path: Path, children: Children, on_error: str
) -> None:
    path, dlq = tmp_path / "log", tmp_path / "dlq"
    with EventLog(path) as log:
        log.append_many([{"seq": i} for i in range(50)])
    (tmp_path / "failing.py").write_text(FAILING_HANDLER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), EVENTPIPE_RETRY_BACKOFF="5")
    child = children.popen(
        [sys.executable, "-m", "eventpipe", "consume", str(path), "--name", "c",
         "--handler", f"{tmp_path / 'failing.py'}:handler", "--initial-state",
         json.dumps(INITIAL), "--on-error", on_error, "--max-retries", "5",
         "--dead-letter", str(dlq), "--print-state"],
        stderr=subprocess.PIPE, env=env)
    assert child.stderr is not None
    ready, _, _ = select.select([child.stderr], [], [], 30)
    assert ready and child.stderr.readline() == b"failing 30\n"  # now in the backoff
    t0 = time.monotonic()
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert time.monotonic() - t0 < 3.0  # the 5 s backoff was cut short
    assert b"failing 30" not in err  # no second try, and...
    assert dead_letters(dlq) == 0  # ...nothing dead-lettered early
    assert b"stopped at offset 30" in err
    assert json.loads(out) == fold_until(path, 30)
    assert checkpoint_of(path, "c") == (fold_until(path, 30), 30)


# ------------------------------------------------------------------------------------ item 6


def busy_handler(state: int, event: Any, offset: int) -> int:
    spin(0.00001)  # a 10 us handler
    return state + 1


def test_run_async_with_a_backlog_and_a_backoff_never_stalls_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with EventLog(path) as log:
        for first in range(0, 150_000, 50_000):
            log.append_many([{"seq": i} for i in range(first, first + 50_000)])
    failed = [False]

    def handler(state: int, event: Any, offset: int) -> int:
        if offset == 100_000 and not failed[0]:
            failed[0] = True
            raise ConnectionError("once")
        return busy_handler(state, event, offset)

    async def main() -> tuple[int, float, int]:
        with Consumer(path, "c", handler, 0, on_error="retry", retry_backoff=0.5,
                      on_caught_up=lambda c: c.stop()) as c:
            async with loop_gaps() as gaps:
                await asyncio.sleep(0.01)
                state: int = await c.run_async()
        return state, max(gaps), len(gaps)

    state, longest, ticks = asyncio.run(main())
    assert state == 150_000
    print(f"longest loop stall during run_async catch-up: {longest * 1000:.1f} ms ({ticks} ticks)")
    assert longest < 0.25


def test_async_follow_hands_the_loop_back_while_records_are_available(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with EventLog(path) as log:
        for first in range(0, 150_000, 50_000):
            log.append_many([{"seq": i} for i in range(first, first + 50_000)])

    async def main() -> tuple[int, float]:
        seen = 0
        with EventLog(path) as log:
            async with loop_gaps() as gaps:
                await asyncio.sleep(0.01)
                async for rec in log.follow(0):
                    spin(0.00001)  # a 10 us loop body that does not await
                    seen += 1
                    if rec.offset == 149_999:
                        break
        return seen, max(gaps)

    seen, longest = asyncio.run(main())
    assert seen == 150_000
    print(f"longest loop stall during async follow: {longest * 1000:.1f} ms")
    assert longest < 0.25


# ------------------------------------------------------------------------------------ item 7


def receive_until(sock: socket.socket, last: str) -> list[tuple[float, str]]:
    """Datagrams with their arrival times, up to and including one containing ``last``."""
    got = []
    while True:
        message = sock.recv(4096).decode()
        got.append((time.monotonic(), message))
        if last in message:
            return got


def test_watchdog_pings_keep_time_with_a_slow_handler_and_during_a_backoff(
    log_path: Path, children: Children, tmp_path: Path
) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(400)])
    with fake_systemd(tmp_path, 1000000) as (sock, env):
        # 5 ms per event (2 s of backlog) and a 1.5 s retry backoff at offset 200.
        child = children.popen([sys.executable, "-m", MODULE, "slow", str(log_path), "0.005",
                                "200", "1.5", "0"], env=env)
        messages = receive_until(sock, "STOPPING=1")
        assert child.wait(30) == 0
    pings = [t for t, m in messages if m == "WATCHDOG=1"]
    ready = next(t for t, m in messages if "READY=1" in m)
    gaps = [b - a for a, b in zip([messages[0][0], *pings], [*pings, ready], strict=True)]
    print(f"longest watchdog gap: {max(gaps) * 1000:.0f} ms over {len(pings)} pings")
    # WATCHDOG_USEC=1 s: pings every 0.5 s; systemd would act after 1 s without one (before,
    # none came for the whole catch-up, nor during the backoff).
    assert len(pings) >= 6 and max(gaps) < 1.0
    assert checkpoint_of(log_path, "slow") == (expected_state(log_path), 400)


def test_interval_checkpoints_keep_time_with_a_slow_handler(log_path: Path) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(400)])
    seen: list[float] = []
    holder: list[Consumer] = []

    def handler(state: dict[str, Any], event: Any, offset: int) -> dict[str, Any]:
        time.sleep(0.005)
        at = holder[0].last_checkpoint_at
        if at is not None and (not seen or at != seen[-1]):
            seen.append(at)
        return fold(state, event, offset)

    with Consumer(log_path, "c", handler, INITIAL, checkpoint_interval=0.25) as c:
        holder.append(c)
        t0 = time.time()
        c.catch_up()
        t1 = time.time()
    marks = [t0, *seen, t1]
    gaps = [b - a for a, b in itertools.pairwise(marks)]
    print(f"longest time between checkpoints: {max(gaps) * 1000:.0f} ms ({len(seen)} taken)")
    # Before, the 2 s of backlog went by in one sub-batch, with no checkpoint until its end.
    assert len(seen) >= 5 and max(gaps) < 0.75


def test_a_hung_handler_aborted_by_the_watchdog_shows_where_it_hung(
    log_path: Path, children: Children, tmp_path: Path
) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(10)])
    with fake_systemd(tmp_path, 1000000) as (_sock, env):  # bound while the child sends
        child = children.popen([sys.executable, "-m", MODULE, "hang", str(log_path)], env=env,
                               stderr=subprocess.PIPE, preexec_fn=no_core_dumps)
        assert read_line(child) == "hanging"
        child.send_signal(signal.SIGABRT)  # what systemd sends when the pings stop
        _, err = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGABRT
    assert b"Fatal Python error: Aborted" in err, err
    assert b"in hang_in_the_handler" in err and b"test_consumer_defects.py" in err, err


def no_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


# ------------------------------------------------------------------------- child programs


def sigint_async(path: str) -> None:
    """run_async() under loop.run_until_complete, default SIGINT: KeyboardInterrupt anywhere."""
    # Checkpoints by time only: an interrupt mostly finds events handled since the last one.
    with Consumer(path, "c", in_place, INITIAL, checkpoint_interval=0.1) as c:
        loop = asyncio.new_event_loop()
        print("ready", flush=True)
        try:
            loop.run_until_complete(c.run_async())
        except KeyboardInterrupt:
            print("interrupted", flush=True)


def slow(path: str, delay: str, fail_at: str, backoff: str, verbose: str) -> None:
    """A slow handler that fails once at ``fail_at``; retries after ``backoff``; stops when
    caught up."""
    failed: list[int] = []

    def handler(state: dict[str, Any], event: Any, offset: int) -> dict[str, Any]:
        time.sleep(float(delay))
        if offset == int(fail_at) and not failed:
            failed.append(offset)
            raise ConnectionError("once")
        return fold(state, event, offset)

    with Consumer(path, "slow", handler, INITIAL, on_error="retry", max_retries=1,
                  retry_backoff=float(backoff), on_caught_up=lambda c: c.stop()) as c:
        c.run()


def hang_in_the_handler() -> None:
    print("hanging", flush=True)  # from inside: this frame is on the stack from here on
    threading.Event().wait()


def hang(path: str) -> None:
    def handler(state: dict[str, Any], event: Any, offset: int) -> dict[str, Any]:
        if offset == 3:
            hang_in_the_handler()
        return fold(state, event, offset)

    with Consumer(path, "hang", handler, INITIAL) as c:
        c.run()


if __name__ == "__main__":
    programs: dict[str, Callable[..., None]] = {
        "sigint-async": sigint_async, "slow": slow, "hang": hang}
    programs[sys.argv[1]](*sys.argv[2:])
