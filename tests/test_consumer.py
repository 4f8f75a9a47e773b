"""Consumers: exactly-once state across SIGKILL, exclusivity, standby, errors, follow."""

from __future__ import annotations

import asyncio
import json
import random
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from eventpipe import (
    CheckpointError,
    CheckpointMismatchError,
    Consumer,
    ConsumerBusyError,
    EventLog,
    HandlerError,
)

from ._sdnotify import fake_systemd
from ._workers import INITIAL, fold, rewrite_checkpoint
from .conftest import Children


def fold_until(log_path: Path, stop: int | None = None) -> dict[str, Any]:
    """The state after the events before ``stop`` (default: all), folded straight from the log."""
    state = dict(INITIAL)
    with EventLog(log_path) as log:
        for rec in log.read(0, stop):
            state = fold(state, rec.event, rec.offset)
    return state


def expected_state(log_path: Path) -> dict[str, Any]:
    """The state an uninterrupted run ends in, folded straight from the log."""
    return fold_until(log_path)


def read_line(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    """Next stdout line of a child, failing (not hanging) past ``timeout``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "child printed nothing in time"
    line = proc.stdout.readline()  # unbuffered pipe: select saw exactly what is there
    assert line, f"child exited (rc={proc.wait()})"
    return line.decode().strip()


def read_final(proc: subprocess.Popen[bytes]) -> tuple[dict[str, Any], int]:
    """Parse the consumer worker's last line: ``final <state json> <offset>``."""
    line = read_line(proc)
    while not line.startswith("final "):
        line = read_line(proc)
    state_json, offset = line.removeprefix("final ").rsplit(" ", 1)
    return json.loads(state_json), int(offset)


def wait_for(line: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    while (got := read_line(proc, timeout)) != line:
        pass
    assert got == line


def test_consumer_killed_at_random_moments_ends_in_the_uninterrupted_state(
    log_path: Path, children: Children
) -> None:
    rng = random.Random(42)
    EventLog(log_path, segment_max_bytes=8192).close()
    writer = children.worker("writer", str(log_path), "w", "40000", "7", "8192",
                             stdout=subprocess.DEVNULL)
    for _ in range(20):
        c = children.worker("consumer", str(log_path), "counter", "--every", "37")
        time.sleep(rng.uniform(0.0, 0.15))  # a random moment to kill at, not a synchronisation
        c.send_signal(signal.SIGKILL)
        assert c.wait() == -signal.SIGKILL
    assert writer.wait() == 0
    final = children.worker("consumer", str(log_path), "counter")
    wait_for("caught-up", final)
    final.send_signal(signal.SIGTERM)
    state, offset = read_final(final)
    assert final.wait() == 0
    with EventLog(log_path) as log:
        head = log.head
    assert state == expected_state(log_path)
    assert offset == head == 40000


def test_several_consumers_each_reach_the_head_with_their_own_state(
    log_path: Path, children: Children
) -> None:
    EventLog(log_path, segment_max_bytes=4096).close()
    writer = children.worker("writer", str(log_path), "w", "5000", "1", "4096",
                             stdout=subprocess.DEVNULL)
    consumers = [children.worker("consumer", str(log_path), f"c{k}", "--every", str(10 + k))
                 for k in range(3)]
    assert writer.wait() == 0
    for c in consumers:
        wait_for("caught-up", c)
    want = expected_state(log_path)
    for k, c in enumerate(consumers):
        # A consumer may still be working through the tail: poll its checkpoint to the head.
        deadline = time.monotonic() + 30
        cp = log_path / "consumers" / f"c{k}.json"
        while json.loads(cp.read_bytes())["offset"] < 5000:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        c.send_signal(signal.SIGTERM)
        state, offset = read_final(c)
        assert c.wait() == 0
        assert state == want and offset == 5000


@pytest.mark.parametrize("notifications", [True, False])
def test_follow_latency_from_another_process(
    log_path: Path, children: Children, notifications: bool
) -> None:
    poll = 5.0 if notifications else 0.5
    EventLog(log_path).close()
    flags = ["--echo", "--poll", str(poll)] + ([] if notifications else ["--no-notifications"])
    c = children.worker("consumer", str(log_path), "echo", *flags)
    wait_for("caught-up", c)
    latencies = []
    with EventLog(log_path) as log:
        for i in range(5):
            t0 = time.monotonic()
            offset = log.append({"seq": i})
            assert read_line(c) == str(offset)
            latencies.append(time.monotonic() - t0)
    c.send_signal(signal.SIGTERM)
    assert c.wait(30) == 0
    if notifications:
        # "Well before the poll interval": notified, not polled (5 s here).
        assert max(latencies) < 1.0, latencies
    else:
        assert max(latencies) < poll + 0.5, latencies


def test_same_name_is_exclusive_and_standby_takes_over(
    log_path: Path, children: Children
) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(10)])
    first = children.worker("consumer", str(log_path), "solo", "--echo")
    wait_for("caught-up", first)
    with pytest.raises(ConsumerBusyError) as exc:
        Consumer(log_path, "solo", fold, INITIAL)
    assert f"pid {first.pid}" in str(exc.value) and exc.value.holder is not None
    assert isinstance(exc.value, BlockingIOError)
    standby = children.worker("consumer", str(log_path), "solo", "--standby", "--echo",
                              "--poll", "0.1")
    with EventLog(log_path) as log:
        log.append({"seq": 10})
        assert read_line(first) == "10"
        first.send_signal(signal.SIGKILL)
        assert first.wait() == -signal.SIGKILL
        wait_for("caught-up", standby)  # it took the name over after the holder died
        log.append({"seq": 11})
        assert read_line(standby) == "11"
    standby.send_signal(signal.SIGTERM)
    state, offset = read_final(standby)
    assert standby.wait() == 0
    assert state == expected_state(log_path) and offset == 12


def test_checkpoint_ahead_of_the_log_is_refused_and_left_untouched(log_path: Path) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(10)])
        with Consumer(log, "c", fold, INITIAL) as c:
            c.catch_up()
        cp = log_path / "consumers" / "c.json"
        rewrite_checkpoint(cp, offset=25)
        before = cp.read_bytes()
        with pytest.raises(CheckpointMismatchError) as exc:
            Consumer(log, "c", fold, INITIAL)
        assert "ahead of the log" in str(exc.value) and exc.value.offset == 25
        assert cp.read_bytes() == before


def test_checkpoint_of_a_replaced_log_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with EventLog(a) as log:
        log.append_many([{"seq": i} for i in range(10)])
        Consumer(log, "c", fold, INITIAL, checkpoint_dir=str(tmp_path / "cps")).catch_up()
    with EventLog(b) as log:
        log.append_many([{"seq": i} for i in range(20)])
        with pytest.raises(CheckpointMismatchError, match="another log"):
            Consumer(log, "c", fold, INITIAL, checkpoint_dir=str(tmp_path / "cps"))


def test_fingerprint_mismatch_when_the_event_was_rewritten(log_path: Path) -> None:
    with EventLog(log_path, compression=None) as log:
        log.append_many([{"seq": i} for i in range(10)])
        with Consumer(log, "c", fold, INITIAL) as c:
            c.catch_up()
    seg = log_path / "segments" / "00000000000000000000.jsonl"
    seg.write_bytes(seg.read_bytes().replace(b'{"seq":9}', b'{"seq":8}'))
    cp = log_path / "consumers" / "c.json"
    before = cp.read_bytes()
    with EventLog(log_path) as log, Consumer(log, "c", fold, INITIAL) as c:
        with pytest.raises(CheckpointMismatchError) as exc:
            c.catch_up()
        assert exc.value.offset == 9
    assert cp.read_bytes() == before


def test_corrupt_checkpoint_is_a_clear_error(log_path: Path) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(3)])
        with Consumer(log, "c", fold, INITIAL) as c:
            c.catch_up()
            log.append({"seq": 3})
            c.catch_up()  # a second checkpoint: the first is kept as .prev
        cp = log_path / "consumers" / "c.json"
        prev = log_path / "consumers" / "c.json.prev"
        assert json.loads(prev.read_bytes())["offset"] == 3
        cp.write_bytes(cp.read_bytes()[:20])
        prev.write_bytes(prev.read_bytes()[:25])  # (one damaged file falls back to the other)
        with pytest.raises(CheckpointError) as exc:
            Consumer(log, "c", fold, INITIAL)
        assert exc.value.path == str(cp)
        assert "c.json.prev), which is damaged too" in str(exc.value)


def failing_on(seq: int, times: int | None = None) -> Any:
    calls = {"n": 0}

    def handler(state: dict[str, Any], event: Any, offset: int) -> dict[str, Any]:
        if event["seq"] == seq and (times is None or calls["n"] < times):
            calls["n"] += 1
            raise ValueError(f"cannot handle {seq}")
        # A dead-lettered event leaves a gap in the offsets this handler sees.
        return fold(dict(state, next=offset), event, offset)

    return handler


def test_handler_error_stops_with_state_checkpointed_before_the_event(log_path: Path) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(10)])
        with Consumer(log, "c", failing_on(6), INITIAL) as c, \
                pytest.raises(HandlerError) as exc:
            c.catch_up()
        assert exc.value.offset == 6 and exc.value.event == {"seq": 6}
        assert isinstance(exc.value.__cause__, ValueError)
        doc = json.loads((log_path / "consumers" / "c.json").read_bytes())
        assert doc["offset"] == 6 and doc["state"] == {"next": 6, "n": 6, "sum": 15}


def test_retry_then_success_and_dead_letter_goes_on(tmp_path: Path) -> None:
    path, dlq_path = tmp_path / "log", tmp_path / "dlq"
    with EventLog(path) as log:
        log.append_many([{"seq": i} for i in range(10)])
        with Consumer(log, "retry", failing_on(3, times=2), INITIAL, on_error="retry",
                      retry_backoff=0.001) as c:
            assert c.catch_up()["n"] == 10
        with Consumer(log, "dl", failing_on(4), INITIAL, on_error="dead_letter",
                      dead_letter=str(dlq_path), max_retries=0) as c:
            state = c.catch_up()
        assert state == {"next": 10, "n": 9, "sum": 45 - 4} and c.offset == 10
    with EventLog(dlq_path) as dlq:
        [entry] = [r.event for r in dlq.read()]
    assert entry["offset"] == 4 and entry["event"] == {"seq": 4}
    assert entry["consumer"] == "dl" and "ValueError: cannot handle 4" in entry["error"]


def test_stop_from_inside_a_handler_stops_right_after_that_event(log_path: Path) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(100)])
        holder: list[Consumer] = []

        def handler(state: dict[str, Any], event: Any, offset: int) -> dict[str, Any]:
            if offset == 41:
                holder[0].stop()
            return fold(state, event, offset)

        with Consumer(log, "c", handler, INITIAL) as c:
            holder.append(c)
            c.run()
            assert c.offset == 42
        assert json.loads((log_path / "consumers" / "c.json").read_bytes())["offset"] == 42


def test_invalid_names_are_refused(log_path: Path) -> None:
    for bad in ["", "..", "a/b", "x" * 129, "sp ace"]:
        with pytest.raises(Exception, match="consumer name"):
            Consumer(log_path, bad, fold, INITIAL)


def test_sd_notify_messages_under_a_fake_systemd(
    log_path: Path, children: Children, tmp_path: Path
) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(5)])
    with fake_systemd(tmp_path, 200000) as (sock, env):
        c = children.worker("consumer", str(log_path), "sd", env=env)
        messages = [sock.recv(4096).decode()]
        while "READY=1" not in messages[-1]:
            messages.append(sock.recv(4096).decode())
        # WATCHDOG_USEC=0.2 s: pings at half of it while idle.
        while "WATCHDOG=1" not in messages[-1]:
            messages.append(sock.recv(4096).decode())
        c.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in messages[-1]:
            messages.append(sock.recv(4096).decode())
        assert c.wait(30) == 0
    assert any(m.startswith("STATUS=consumer sd: offset 5, lag 0") for m in messages), messages
    assert json.loads((log_path / "consumers" / "sd.json").read_bytes())["offset"] == 5


def test_async_follow_receives_events_from_another_process_and_cancels_cleanly(
    log_path: Path, children: Children
) -> None:
    EventLog(log_path).close()

    async def main() -> list[int]:
        got: list[int] = []
        with EventLog(log_path) as log:

            async def collect() -> None:
                async for rec in log.follow(0):
                    got.append(rec.event["seq"])
                    if len(got) == 300:
                        return

            async def idle_follower() -> None:
                async for _ in log.follow():
                    pass

            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.001)

            tick_task = asyncio.create_task(ticker())
            idle = asyncio.create_task(idle_follower())
            collecting = asyncio.create_task(collect())
            writer = children.worker("writer", str(log_path), "w", "300", "3", "4096",
                                     stdout=subprocess.DEVNULL)
            await asyncio.wait_for(collecting, 60)
            assert writer.wait() == 0
            idle.cancel()
            with pytest.raises(asyncio.CancelledError):
                await idle
            tick_task.cancel()
            assert ticks > 5, "the event loop was blocked while followers waited"
        return got

    got = asyncio.run(main())
    assert got == list(range(300))


def test_blocking_follow_and_run_async(log_path: Path) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(50)])
        follower = log.follow(45)
        seen = []
        for rec in follower:
            seen.append(rec.offset)
            if rec.offset == 49:
                follower.stop()
        assert seen == [45, 46, 47, 48, 49]

        async def main() -> dict[str, Any]:
            c = Consumer(log, "async", fold, INITIAL,
                         on_idle=lambda c: c.stop())
            try:
                state: dict[str, Any] = await c.run_async()
                return state
            finally:
                c.close()

        assert asyncio.run(main()) == expected_state(log_path)


def test_a_handler_that_changed_its_state_before_raising_is_undone(tmp_path: Path) -> None:
    # Handlers may update the state in place (the README's do). One that raises half-way must
    # not leave half an event in the checkpoint, nor in the state a retry or the next event sees.
    def mutate_then_fail(state: dict[str, Any], event: Any, offset: int) -> dict[str, Any]:
        state["n"] += 1
        state["sum"] += event["seq"]
        if event["seq"] in (4, 6):
            raise ValueError("half done")
        return state

    path = tmp_path / "log"
    with EventLog(path) as log:
        log.append_many([{"seq": i} for i in range(10)])
        for i in range(3):  # checkpoints mid-way, so the rebuild starts from one
            with Consumer(log, "stop", mutate_then_fail, {"n": 0, "sum": 0},
                          checkpoint_every=3) as c:
                with pytest.raises(HandlerError):
                    c.catch_up()
                assert c.offset == 4 and c.state == {"n": 4, "sum": 0 + 1 + 2 + 3}, i
        with Consumer(log, "dl", mutate_then_fail, {"n": 0, "sum": 0}, on_error="dead_letter",
                      dead_letter=str(tmp_path / "dlq"), max_retries=1,
                      retry_backoff=0.001) as c:
            assert c.catch_up() == {"n": 8, "sum": 45 - 4 - 6}
        doc = json.loads((path / "consumers" / "stop.json").read_bytes())
        assert doc["state"] == {"n": 4, "sum": 6} and doc["offset"] == 4
