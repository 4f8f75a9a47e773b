"""Group commit under ``sync="always"`` (``_groupsync``): flushes shared, never waited for.

The test holds the lock of the durable mark (a flock on ``sync.state``, which every writer
takes to read the mark before it flushes) while writers commit; their appends are visible but
none has returned, since none could look. When it lets go, the threads of a process share one
flush, and a process flushes without waiting for another's: the durable mark counts one flush
per process at most. With a fault injected into the flushes (strace), every writer they
covered gets ``DurabilityError``. A flush held up in one process (strace delays it) does not
hold up an append in another.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from eventpipe import EventLog
from eventpipe._groupsync import DurableMark, read_mark
from eventpipe._layout import Folder

from ._wait import wait_until

APPEND = r"""
import json, sys, threading
from eventpipe import EventLog, DurabilityError
log = EventLog(sys.argv[1], sync="always", compression=None)
out = {}
def one(k):
    try:
        out[k] = {"offset": log.append({"writer": sys.argv[2], "k": k})}
    except DurabilityError as exc:
        out[k] = {"error": type(exc).__name__, "committed": [exc.committed.start,
                                                             exc.committed.stop]}
threads = [threading.Thread(target=one, args=(k,)) for k in range(int(sys.argv[3]))]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(out))
try:
    log.close()
except DurabilityError:
    pass
"""


@contextmanager
def mark_lock(log: Path) -> Iterator[None]:
    """Hold the lock of ``log``'s durable mark, as a writer reading or moving it would."""
    fd = os.open(log / "sync.state", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def head(log: Path) -> int:
    with EventLog(log, create=False) as reader:
        return reader.head


def flushes(log: Path) -> int:
    root = Folder.open(log)
    try:
        return read_mark(root).flushes
    finally:
        root.close()


def start(log: Path, writer: str, threads: int = 1,
          strace: list[str] | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-c", APPEND, str(log), writer, str(threads)]
    return subprocess.Popen([*(strace or []), *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str]) -> dict[str, dict[str, object]]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result: dict[str, dict[str, object]] = json.loads(out.splitlines()[-1])
    return result


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "log"
    with EventLog(path, sync="always", compression=None) as first:
        first.append({"warm": True})  # creates sync.state through a first flush
    return path


@pytest.mark.parametrize(("processes", "threads"), [(5, 1), (1, 6), (3, 3)],
                         ids=["5 processes", "6 threads", "3 processes x 3 threads"])
def test_one_flush_covers_every_writer_that_committed_before_it(
        log: Path, processes: int, threads: int) -> None:
    before = flushes(log)
    total = processes * threads
    with mark_lock(log):
        procs = [start(log, f"p{k}", threads) for k in range(processes)]
        # Committed (readers see them) but not returned: nobody could flush.
        wait_until(lambda: head(log) == 1 + total, timeout=60,
                 what=f"{total} appends committed")
        assert all(p.poll() is None for p in procs)
    results = [finish(p) for p in procs]
    offsets = sorted(int(str(r["offset"])) for res in results for r in res.values())
    assert offsets == list(range(1, 1 + total))
    # Each process flushes once for all its threads, or not at all when it finds the mark
    # already past its appends (another process's flush read the header after them).
    done = flushes(log) - before
    assert 1 <= done <= processes, done
    status = subprocess.run([sys.executable, "-m", "eventpipe", "status", str(log), "--json"],
                            capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(status.stdout)["group_commit"] == {
        "durable_head": 1 + total, "flushes": before + done, "failed": None}


def test_appends_after_a_flush_began_get_one_of_their_own(log: Path) -> None:
    before = flushes(log)
    with mark_lock(log):
        first = start(log, "a", 2)
        wait_until(lambda: head(log) == 3, timeout=60, what="two appends committed")
    assert len(finish(first)) == 2
    second = start(log, "b", 2)
    assert len(finish(second)) == 2
    assert before + 2 <= flushes(log) <= before + 3


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed "
                    "(.ci/run installs it)")
def test_a_failed_flush_reaches_every_writer_it_covered(log: Path) -> None:
    """The first header fdatasync of each writer fails: the thread flushing for its process
    fails, and every writer whose append it covered, in its process or another, gets
    DurabilityError naming that append as committed. Appends after it flush anew and
    succeed."""
    inject = ["strace", "-f", "-qq", "-o", "/dev/null", "-P", str(log / "head"),
              "-e", "trace=fdatasync", "-e", "inject=fdatasync:error=EIO:when=1"]
    with mark_lock(log):
        procs = [start(log, f"p{k}", 2, strace=inject) for k in range(3)]
        wait_until(lambda: head(log) == 7, timeout=60, what="six appends committed")
    results = [finish(p) for p in procs]
    outcomes = [r for res in results for r in res.values()]
    assert all(r.get("error") == "DurabilityError" for r in outcomes), outcomes
    committed = sorted(tuple(map(int, r["committed"])) for r in outcomes)  # type: ignore[call-overload]
    assert committed == [(k, k + 1) for k in range(1, 7)]
    root = Folder.open(log)
    try:
        mark = read_mark(root)
    finally:
        root.close()
    assert (mark.failed_from, mark.failed_to) == (1, 7)
    # An operator sees it: `eventpipe status` names the offsets whose durability is unknown.
    status = subprocess.run([sys.executable, "-m", "eventpipe", "status", str(log), "--json"],
                            capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(status.stdout)["group_commit"]["failed"] == [1, 7]
    text = subprocess.run([sys.executable, "-m", "eventpipe", "status", str(log)],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert "FAILED     a flush of offsets 1..6 failed" in text
    with EventLog(log, create=False) as reader:  # committed: visible, never handed out again
        assert sorted(r.event["k"] for r in reader.read(1)) == [0, 0, 0, 1, 1, 1]
    later = finish(start(log, "after", 2))
    assert sorted(int(str(r["offset"])) for r in later.values()) == [7, 8]


def tracee(proc: subprocess.Popen[str]) -> int:
    """The pid of the Python that strace (``proc``) runs (strace forks short-lived probes of
    its own first, and its child runs strace's code until it execs)."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    found: list[int] = []

    def python_child() -> bool:
        for pid in map(int, children.read_text().split()):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if command.split(b"\0")[0] == sys.executable.encode():
                found.append(pid)
                return True
        return False

    wait_until(python_child, timeout=30, what="strace's Python child")
    return found[0]


def in_fdatasync(pid: int) -> bool:
    """Whether a thread of ``pid`` is inside fdatasync (syscall 75 on x86-64)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return False
    for task in tasks:
        try:
            if (task / "syscall").read_text().split()[0] == "75":
                return True
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return False


@pytest.mark.skipif(shutil.which("strace") is None or os.uname().machine != "x86_64",
                    reason="needs strace (.ci/run installs it) and x86-64 syscall numbers")
def test_a_slow_flush_in_one_process_does_not_hold_up_another(log: Path) -> None:
    """Writer A's header fdatasync is held for two minutes (strace). While A is inside it,
    writer B appends, flushes on its own and returns; A is still inside its fdatasync when B
    is done. (Had B waited for A's flush, as a shared flush lock made it, B would not return
    within its minute.)"""
    hold = ["strace", "-f", "-qq", "-o", "/dev/null", "-P", str(log / "head"),
            "-e", "trace=fdatasync", "-e", "inject=fdatasync:delay_exit=120000000:when=1"]
    slow = start(log, "slow", 1, strace=hold)
    pid = -1
    try:
        pid = tracee(slow)
        wait_until(lambda: head(log) == 2 and in_fdatasync(pid), timeout=60,
                   what="writer A committed and inside its header fdatasync")
        writer_b = start(log, "fast", 1)
        try:
            fast = finish(writer_b)
        except subprocess.TimeoutExpired:
            writer_b.kill()
            writer_b.communicate()
            pytest.fail("B did not return in 60 s while A's flush was held: it waited for it")
        assert in_fdatasync(pid), "B returned only after A's flush ended"
    finally:
        # Killing strace lets A go (or takes it along); its append was committed either way.
        slow.kill()
        slow.communicate(timeout=60)
        if pid > 0:
            wait_until(lambda: gone(pid), timeout=60, what="writer A ended")
    assert fast["0"]["offset"] == 2
    with EventLog(log, create=False) as reader:
        assert [r.event["writer"] for r in reader.read(1)] == ["slow", "fast"]
    assert read_mark_of(log).head == 3  # B's flush covered both


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie nobody reaped counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def read_mark_of(log: Path) -> DurableMark:
    root = Folder.open(log)
    try:
        return read_mark(root)
    finally:
        root.close()


def test_a_mark_past_the_committed_head_is_forgotten(log: Path, tmp_path: Path) -> None:
    """The log restored from an older copy, beside the newer sync.state: its mark claims
    offsets the restored log will hand out again. The next writer forgets it, so the appends
    that reuse those offsets are flushed, not waved through."""
    older = tmp_path / "older"
    shutil.copytree(log, older)  # one event
    assert len(finish(start(log, "newer", 5))) == 5
    root = Folder.open(log)
    try:
        assert read_mark(root).head == 6
    finally:
        root.close()
    for entry in log.iterdir():
        if entry.name != "sync.state":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    for entry in older.iterdir():
        if entry.name != "sync.state":
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, log / entry.name)
    after = finish(start(log, "after", 1))
    assert [int(str(r["offset"])) for r in after.values()] == [1], after
    root = Folder.open(log)
    try:
        mark = read_mark(root)
    finally:
        root.close()
    assert (mark.head, mark.flushes) == (2, 1)  # forgotten, then one flush of its own
