"""Hot standby: same-name consumers wait quietly, exactly one is active, one takes over fast.

Real processes, killed with SIGKILL; who holds the name is read from /proc/locks (the kernel's
own list of flocks), never from what the processes say about themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from eventpipe import Consumer, EventLog

from ._loop import loop_gaps
from ._sdnotify import fake_systemd
from ._workers import INITIAL, fold
from .conftest import Children
from .test_consumer import expected_state, fold_until, read_final, read_line, wait_for

POLL = 30.0  # standbys' poll interval: a takeover well within it was notified, not polled
TAKEOVER_BOUND = 5.0  # kill -9 of the holder to the new holder caught up (generous: 2 cores)


def flock_holders(path: Path) -> list[int]:
    """PIDs holding a flock on ``path``, from /proc/locks.

    Read with one read() call: the kernel lists the locks under its lock-list locks within a
    call, while separate reads may repeat or skip entries as locks come and go.
    """
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    fd = os.open("/proc/locks", os.O_RDONLY)
    try:
        text = os.read(fd, 16 << 20).decode()
    finally:
        os.close(fd)
    pids = set()
    for line in text.splitlines():
        parts = line.split()
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        if parts[5] == dev:
            pids.add(int(parts[4]))
    return sorted(pids)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def holder_within(lock: Path, pid: int, timeout: float) -> float:
    """Poll /proc/locks until ``pid`` alone holds ``lock``; return how long that took."""
    t0 = time.monotonic()
    while True:
        holders = flock_holders(lock) if lock.exists() else []
        assert len(holders) <= 1, f"two holders at once: {holders}"
        if holders == [pid]:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"pid {pid} did not take the name: {holders}"
        time.sleep(0.005)  # polling an observable with a deadline, not a synchronisation


def fd_targets(pid: int) -> set[str]:
    targets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return targets


def wait_until_standing_by(procs: list[subprocess.Popen[bytes]], lock: Path) -> None:
    """Until each process has the lock file and an inotify instance open: it is in its wait
    (run() is running, its SIGTERM handler installed)."""
    deadline = time.monotonic() + 30
    while True:
        assert all(p.poll() is None for p in procs), "a standby exited"
        if all({str(lock), "anon_inode:inotify"} <= fd_targets(p.pid) for p in procs):
            return
        assert time.monotonic() < deadline, "standbys did not get to their wait"
        time.sleep(0.01)


def stdouts(procs: list[subprocess.Popen[bytes]]) -> list[Any]:
    return [p.stdout for p in procs]


def silent(procs: list[subprocess.Popen[bytes]]) -> bool:
    """True if none of ``procs`` has printed anything (or exited) that is not yet read."""
    ready, _, _ = select.select(stdouts(procs), [], [], 0)
    return not ready


def test_three_standbys_take_over_one_at_a_time_through_ten_kill_9s(
    log_path: Path, children: Children
) -> None:
    EventLog(log_path, segment_max_bytes=64 * 1024).close()
    lock = log_path / "consumers" / "pool.lock"
    writer = children.worker("writer", str(log_path), "w", "150000", "11", "65536",
                             stdout=subprocess.DEVNULL)

    def start(standby: bool) -> subprocess.Popen[bytes]:
        flags = ["--every", "500", "--poll", str(POLL)] + (["--standby"] if standby else [])
        return children.worker("consumer", str(log_path), "pool", *flags)

    active = start(False)
    wait_for("caught-up", active)
    assert flock_holders(lock) == [active.pid]
    standbys = [start(True) for _ in range(3)]
    wait_until_standing_by(standbys, lock)
    veteran = standbys[0]  # waits through every round unless it wins one
    cpu_before = cpu_seconds(veteran.pid)
    takeovers = []
    for _ in range(10):
        assert flock_holders(lock) == [active.pid] and silent(standbys)
        active.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        assert active.wait() == -signal.SIGKILL
        # Exactly one standby reports it took over; the others stay silent and alive.
        ready, _, _ = select.select(stdouts(standbys), [], [], TAKEOVER_BOUND)
        assert len(ready) == 1, f"{len(ready)} standbys reacted"
        [winner] = [p for p in standbys if p.stdout is ready[0]]
        assert read_line(winner) == "caught-up"
        takeovers.append(time.monotonic() - t0)
        assert flock_holders(lock) == [winner.pid]
        standbys.remove(winner)
        assert all(p.poll() is None for p in standbys) and silent(standbys)
        active = winner
        standbys.append(start(True))
        wait_until_standing_by(standbys, lock)
    assert max(takeovers) < TAKEOVER_BOUND, takeovers
    if veteran in standbys:
        # Waiting through ten takeovers cost next to no CPU: no busy polling.
        assert cpu_seconds(veteran.pid) - cpu_before < 1.0
    assert writer.wait() == 0
    # Standbys stop waiting on SIGTERM, at once, and never took the name.
    for p in standbys:
        p.send_signal(signal.SIGTERM)
    for p in standbys:
        state, offset = read_final(p)
        assert p.wait(10) == 0 and (state, offset) == (INITIAL, 0)
    assert flock_holders(lock) == [active.pid]
    active.send_signal(signal.SIGTERM)
    state, offset = read_final(active)
    assert active.wait(30) == 0
    assert state == fold_until(log_path, offset)  # it stops at once, maybe short of the head
    # Finish with a fresh consumer: the exact fold of the whole log.
    with Consumer(log_path, "pool", fold, INITIAL) as c:
        final = c.catch_up()
        assert c.offset == 150000
    assert final == expected_state(log_path)
    print("takeover seconds:", [round(t, 3) for t in takeovers])


HANDLER = '''
def fold(state, event, offset):
    if state["next"] != offset:
        raise AssertionError(f"expected offset {state['next']}, got {offset}")
    state["next"] = offset + 1
    state["n"] += 1
    state["sum"] += event["seq"]
    return state
'''


def test_cli_consume_standby_takes_over_after_kill_9(
    log_path: Path, children: Children, tmp_path: Path
) -> None:
    handler = tmp_path / "handler.py"
    handler.write_text(HANDLER)
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(100)])
    cmd = [sys.executable, "-m", "eventpipe", "consume", str(log_path), "--name", "cli",
           "--handler", f"{handler}:fold", "--initial-state", json.dumps(INITIAL),
           "--poll-interval", str(POLL), "--print-state"]
    lock = log_path / "consumers" / "cli.lock"
    first = children.popen(cmd, stderr=subprocess.PIPE)
    holder_within(lock, first.pid, 30)
    second = children.popen([*cmd, "--standby"], stderr=subprocess.PIPE)
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(100, 200)])
        # The standby is up and waiting (not crashed) while the first one holds the name.
        wait_until_standing_by([second], lock)
        assert second.poll() is None and flock_holders(lock) == [first.pid]
        first.send_signal(signal.SIGKILL)
        assert first.wait() == -signal.SIGKILL
        took = holder_within(lock, second.pid, TAKEOVER_BOUND)
        log.append_many([{"seq": i} for i in range(200, 300)])
        cp = log_path / "consumers" / "cli.json"
        deadline = time.monotonic() + 30
        while not cp.exists() or json.loads(cp.read_bytes())["offset"] < 300:
            assert second.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    second.send_signal(signal.SIGTERM)
    out, err = second.communicate(timeout=30)
    assert second.returncode == 0, err
    assert json.loads(out) == expected_state(log_path)
    assert b"stopped at offset 300" in err
    # The journal says what happened: it waited, then took over.
    assert b"consumer cli: standing by, the name is held by pid" in err
    assert b"consumer cli: took the name over" in err
    print(f"CLI takeover: {took:.3f} s")


def test_a_waiting_standby_reports_ready_and_whom_it_waits_for_under_systemd(
    log_path: Path, children: Children, tmp_path: Path
) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(5)])
    holder = children.worker("consumer", str(log_path), "sd")
    wait_for("caught-up", holder)
    with fake_systemd(tmp_path, 400000) as (sock, env):
        standby = children.worker("consumer", str(log_path), "sd", "--standby", "--poll",
                                  str(POLL), env=env)
        messages: list[str] = []
        while not any("READY=1" in m for m in messages) or not any(
                "WATCHDOG=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        # Ready (systemctl shows it active, not "activating"), saying whom it stands by for.
        status = [m for m in messages if m.startswith("STATUS=")]
        assert status and "standing by" in status[0] and f"pid {holder.pid}" in status[0], \
            messages
        assert standby.poll() is None
        # Pings keep coming while it waits (WATCHDOG_USEC=0.4 s: every 0.2 s).
        pings = 0
        t0 = time.monotonic()
        while pings < 3:
            if sock.recv(4096).decode() == "WATCHDOG=1":
                pings += 1
        assert time.monotonic() - t0 < 3.0
        holder.send_signal(signal.SIGTERM)  # a clean stop hands the name over too
        assert holder.wait(30) == 0
        wait_for("caught-up", standby)
        while True:
            m = sock.recv(4096).decode()
            if m.startswith("STATUS=consumer sd: offset 5"):
                break
        standby.send_signal(signal.SIGTERM)
        state, offset = read_final(standby)
        assert standby.wait(30) == 0
    assert offset == 5 and state == expected_state(log_path)


def test_sigterm_ends_a_standby_wait_at_once(log_path: Path, children: Children) -> None:
    EventLog(log_path).close()
    holder = children.worker("consumer", str(log_path), "x")
    wait_for("caught-up", holder)
    lock = log_path / "consumers" / "x.lock"
    standby = children.worker("consumer", str(log_path), "x", "--standby", "--poll", str(POLL))
    wait_until_standing_by([standby], lock)
    t0 = time.monotonic()
    standby.send_signal(signal.SIGTERM)
    state, offset = read_final(standby)
    assert standby.wait(10) == 0 and time.monotonic() - t0 < 2.0
    assert (state, offset) == (INITIAL, 0) and flock_holders(lock) == [holder.pid]


def test_run_async_standby_takes_over_without_blocking_the_loop(
    log_path: Path, children: Children
) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(50)])
    holder = children.worker("consumer", str(log_path), "aio", "--every", "7")
    wait_for("caught-up", holder)
    lock = log_path / "consumers" / "aio.lock"

    async def main() -> tuple[Any, list[float]]:
        def caught_up(c: Consumer) -> None:
            c.stop()

        with Consumer(log_path, "aio", fold, INITIAL, standby=True, poll_interval=POLL,
                      on_caught_up=caught_up) as c:
            async with loop_gaps() as gaps:
                run = asyncio.create_task(c.run_async())
                # Wait (without blocking the loop) until it stands by, then kill the holder.
                while not gaps or flock_holders(lock) != [holder.pid]:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)
                assert not run.done()
                holder.send_signal(signal.SIGKILL)
                state = await asyncio.wait_for(run, TAKEOVER_BOUND)
                assert flock_holders(lock) == [os.getpid()]
        return state, gaps

    state, gaps = asyncio.run(main())
    assert holder.wait() == -signal.SIGKILL
    assert state == expected_state(log_path)
    assert max(gaps) < 0.25, max(gaps)


@pytest.mark.parametrize("notifications", [True, False])
def test_catch_up_with_standby_waits_for_the_name(
    log_path: Path, children: Children, notifications: bool
) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(20)])
    holder = children.worker("consumer", str(log_path), "cu")
    wait_for("caught-up", holder)
    with Consumer(log_path, "cu", fold, INITIAL, standby=True, notifications=notifications,
                  poll_interval=0.5) as c:
        holder.send_signal(signal.SIGTERM)
        assert c.catch_up() == expected_state(log_path)
        assert c.offset == 20
    assert holder.wait(30) == 0


# ------------------------------------------------------------------------------------- soak

SOAK_ROUNDS = int(os.environ.get("EVENTPIPE_STANDBY_SOAK_ROUNDS", "60"))


def soak_fails(seq: int) -> bool:
    """Events the soak handler can never handle (they go to the dead-letter log)."""
    return seq % 101 == 50


def soak_handler() -> Any:
    """In-place fold that fails for good on some events (dead-lettered) and once per process on
    others (a retry, with its rebuild, gets them through)."""
    seen_once: set[int] = set()

    def handler(state: dict[str, Any], event: Any, offset: int) -> dict[str, Any]:
        if state["next"] > offset:
            raise AssertionError(f"offset {offset} again (next {state['next']})")
        state["n"] += 1  # in place, before any failure: only a rebuild undoes it
        if soak_fails(event["seq"]):
            raise ValueError(f"cannot handle {event['seq']}")
        if event["seq"] % 37 == 5 and offset not in seen_once:
            seen_once.add(offset)
            raise ConnectionError("transient")
        state["sum"] += event["seq"]
        state["next"] = offset + 1
        return state

    return handler


SOAK_OPTIONS: dict[str, Any] = {"on_error": "dead_letter", "max_retries": 1,
                                "retry_backoff": 0.001, "checkpoint_every": 200}


def soak_consumer(path: str, dlq: str) -> None:
    """A standby-pool member."""
    with Consumer(path, "soak", soak_handler(), INITIAL, standby=True, poll_interval=POLL,
                  dead_letter=dlq, **SOAK_OPTIONS) as c:
        c.run()


@pytest.mark.slow
def test_soak_kill_9_the_holder_of_a_standby_pool_at_random_moments(
    tmp_path: Path, children: Children
) -> None:
    rng = random.Random(1)
    path, dlq = tmp_path / "log", tmp_path / "dlq"
    total = 700 * SOAK_ROUNDS  # the writer appends through most of the rounds
    EventLog(path, segment_max_bytes=64 * 1024).close()
    lock = path / "consumers" / "soak.lock"
    writer = children.worker("writer", str(path), "w", str(total), "5", "65536",
                             stdout=subprocess.DEVNULL)

    def member() -> subprocess.Popen[bytes]:
        return children.popen([sys.executable, "-m", "tests.test_standby", "soak",
                               str(path), str(dlq)], stdout=subprocess.DEVNULL)

    pool = [member() for _ in range(4)]
    takeovers = []
    for _ in range(SOAK_ROUNDS):
        deadline = time.monotonic() + 30
        while not lock.exists() or not flock_holders(lock):
            assert time.monotonic() < deadline, "nobody took the name"
            assert all(p.poll() is None for p in pool), "a pool member exited"
            time.sleep(0.002)
        [pid] = flock_holders(lock)
        [holder] = [p for p in pool if p.pid == pid]
        time.sleep(rng.uniform(0, 0.1))  # a random moment to kill at
        holder.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        assert holder.wait() == -signal.SIGKILL
        pool.remove(holder)
        while not flock_holders(lock):
            assert time.monotonic() - t0 < TAKEOVER_BOUND, "no takeover"
            time.sleep(0.001)
        takeovers.append(time.monotonic() - t0)
        pool.append(member())
        wait_until_standing_by(pool, lock)  # three standbys again before the next kill
    assert writer.wait() == 0
    wait_until_standing_by(pool, lock)  # each in run(), its SIGTERM handler installed
    for p in pool:
        p.send_signal(signal.SIGTERM)
    for p in pool:
        assert p.wait(30) == 0
    # A fresh consumer finishes from the pool's last checkpoint.
    with Consumer(path, "soak", soak_handler(), INITIAL, dead_letter=str(dlq),
                  **SOAK_OPTIONS) as c:
        resumed_at = c.offset
        state = c.catch_up()
        assert c.offset == total
    want = dict(INITIAL)
    with EventLog(path) as log:
        failing = []
        for rec in log.read():
            if soak_fails(rec.event["seq"]):
                failing.append(rec.offset)
                continue  # dead-lettered: its in-place change was rebuilt away
            want["n"] += 1
            want["sum"] += rec.event["seq"]
            want["next"] = rec.offset + 1
    assert state == want, (state, want)
    with EventLog(dlq) as log:
        entries = [r.event["offset"] for r in log.read()]
    assert sorted(entries) == failing, "each failing event dead-lettered exactly once"
    takeovers.sort()
    print(f"{SOAK_ROUNDS} kill -9 takeovers, pool at {resumed_at}/{total} events: median "
          f"{takeovers[len(takeovers) // 2] * 1000:.0f} ms, max {takeovers[-1] * 1000:.0f} ms")


if __name__ == "__main__":
    if sys.argv[1] == "soak":
        soak_consumer(*sys.argv[2:])
