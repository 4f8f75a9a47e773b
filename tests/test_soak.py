"""Soak: hundreds of rounds of writers killed with SIGKILL and writers under injected faults.

One log lives through every round. Each round forks writer processes (all three sync settings,
small segments so they roll, gzip compression running in their background threads), kills some
of them at random moments, and runs one writer under strace with a random syscall failing
(EIO / ENOSPC in pwrite, fdatasync, fsync, ftruncate, openat, rename, flock). After each round:

* every acknowledged append is at the offset it was acknowledged at (nothing lost, nothing
  moved, no wrong event under any offset);
* no event is stored twice (a retry after a typed error never duplicates);
* offsets are dense and each writer's events are in its own order;
* every few rounds, and at the end, ``verify`` finds nothing wrong.

``EVENTPIPE_SOAK_ROUNDS`` sets the number of rounds (default 300); ``EVENTPIPE_SOAK_SYNC`` the
sync policies drawn from (default ``none,interval,always``).
"""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eventpipe import EventLog
from eventpipe._verify import verify_log

from . import _workers
from .conftest import ROOT, WORKERS

pytestmark = pytest.mark.slow

ROUNDS = int(os.environ.get("EVENTPIPE_SOAK_ROUNDS", "300"))
# EVENTPIPE_SOAK_SYNC=always runs every writer under one policy (group commit under fire).
SYNCS = tuple(os.environ.get("EVENTPIPE_SOAK_SYNC", "none,interval,always").split(","))
FAULTS = [
    "pwrite64:error=ENOSPC", "pwrite64:error=EIO", "fdatasync:error=EIO", "fsync:error=EIO",
    "ftruncate:error=EIO", "openat:error=ENOSPC", "renameat:error=EIO", "flock:error=ENOLCK",
    "pread64:error=EIO",
]


def fork_writer(path: Path, wid: str, count: int, seed: int, sync: str) -> tuple[int, int]:
    """A writer in a forked child (no interpreter start-up); returns (pid, read end of its
    acknowledgement pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(r)
            with os.fdopen(w, "w") as out:
                _workers.soak_writer(str(path), wid, str(count), str(seed), sync, out)
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def strace_writer(path: Path, wid: str, count: int, seed: int, fault: str,
                  when: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    call = fault.split(":", maxsplit=1)[0]
    return subprocess.Popen(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={call}",
         "-e", f"inject={fault}:when={when}", sys.executable, str(WORKERS), "soak_writer",
         str(path), wid, str(count), str(seed), random.Random(seed).choice(SYNCS)],
        stdout=subprocess.PIPE, env=env)


def parse(wid: str, text: str, acked: dict[int, tuple[str, int]], fatal: list[str]) -> None:
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "ack":
            offset, seq = rest.split()
            acked[int(offset)] = (wid, int(seq))
        elif kind == "fatal":
            fatal.append(f"{wid}: {rest}")


def check(path: Path, acked: dict[int, tuple[str, int]]) -> int:
    seen: set[tuple[str, int]] = set()
    last_seq: dict[str, int] = {}
    with EventLog(path, compression=None) as log:
        head = log.head
        expect = 0
        for rec in log.read():
            assert rec.offset == expect
            expect += 1
            key = (rec.event["w"], rec.event["seq"])
            assert key not in seen, f"event {key} stored twice (again at {rec.offset})"
            seen.add(key)
            assert last_seq.get(key[0], -1) < key[1], f"{key} out of its writer's order"
            last_seq[key[0]] = key[1]
            want = acked.get(rec.offset)
            assert want is None or want == key, (
                f"offset {rec.offset} holds {key}, but {want} was acknowledged there")
        assert expect == head
    lost = [o for o in acked if o >= head]
    assert not lost, f"acknowledged offsets beyond the head: {lost[:5]}"
    return head


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_kill_and_fault_soak(tmp_path: Path) -> None:
    path = tmp_path / "log"
    EventLog(path, segment_max_bytes=2048).close()
    rng = random.Random(int(os.environ.get("EVENTPIPE_SOAK_SEED", "7")))
    acked: dict[int, tuple[str, int]] = {}
    fatal: list[str] = []
    kills = faults = retries = 0
    started = time.monotonic()
    for rnd in range(ROUNDS):
        writers = {f"r{rnd}w{k}": fork_writer(path, f"r{rnd}w{k}", rng.randint(5, 60),
                                              rng.randrange(1 << 30),
                                              rng.choice(SYNCS))
                   for k in range(3)}
        traced = None
        if rnd % 3 == 0:
            wid = f"r{rnd}s"
            traced = (wid, strace_writer(path, wid, rng.randint(5, 40), rng.randrange(1 << 30),
                                         rng.choice(FAULTS), rng.randint(1, 30)))
        outputs = {wid: b"" for wid in writers}
        victims = rng.sample(sorted(writers), rng.randint(1, 3))
        kill_at = time.monotonic() + rng.uniform(0.0, 0.03)
        pending = dict(writers)
        while pending:
            timeout = max(0.0, kill_at - time.monotonic()) if victims else 5.0
            ready, _, _ = select.select([r for _, r in pending.values()], [], [], timeout)
            if not ready and victims and time.monotonic() >= kill_at:
                for wid in victims:
                    if wid in pending:
                        os.kill(pending[wid][0], signal.SIGKILL)
                        kills += 1
                victims = []
                continue
            for wid, (pid, r) in list(pending.items()):
                if r in ready:
                    chunk = os.read(r, 1 << 16)
                    if chunk:
                        outputs[wid] += chunk
                    else:
                        os.close(r)
                        os.waitpid(pid, 0)
                        del pending[wid]
        for wid, data in outputs.items():
            # A line cut by the kill is incomplete: only whole lines were acknowledged.
            text = data.decode()
            parse(wid, text[: text.rfind("\n") + 1], acked, fatal)
        if traced is not None:
            wid, proc = traced
            out, _ = proc.communicate(timeout=120)
            faults += 1
            retries += out.count(b"retry ")
            parse(wid, out.decode(), acked, fatal)
        assert not fatal, fatal
        head = check(path, acked)
        if rnd % 25 == 24:
            problems, _ = verify_log(path)
            assert not problems, problems[:3]
    problems, summary = verify_log(path)
    assert not problems, problems[:3]
    print(f"\nsoak: {ROUNDS} rounds, {kills} SIGKILLs, {faults} fault-injected writers "
          f"({retries} typed errors retried), {len(acked)} acknowledged appends, head {head}, "
          f"{summary['segments']} segments, {time.monotonic() - started:.0f}s")
