"""The buffered writer: batching, and what each exception means, so that a retry never stores an
event twice and nothing buffered is lost without a word.

Failures are real: a file-size limit (``RLIMIT_FSIZE``) or a full tmpfs for a failed write,
strace fault injection (``inject=fdatasync``) for an fsync that fails after the commit, a real
``os.fork()``, and child processes that exit without closing their writer.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eventpipe import EventLog, StorageError

from .conftest import Children

HAS_STRACE = shutil.which("strace") is not None
needs_strace = pytest.mark.skipif(not HAS_STRACE, reason="strace is not installed "
                                  "(.ci/run installs it)")

# Prepended to every child program: report(**fields) prints one JSON line, flushed.
PRELUDE = r"""
import json, os, resource, signal, sys, time
from eventpipe import EventLog, StorageError, LogClosedError

def report(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()

# A write past RLIMIT_FSIZE raises SIGXFSZ (fatal by default); ignored, it fails with EFBIG.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

def file_limit(path, on):
    # The soft limit only: the hard one stays infinite so it can be lifted again. 10 bytes
    # past the active segment: no batch fits, the header (rewritten in place) still does.
    if on:
        seg = os.path.join(path, "segments", sorted(os.listdir(os.path.join(path, "segments")))[-1])
        limit = os.path.getsize(seg) + 10
    else:
        limit = resource.RLIM_INFINITY
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

def deadline_loop(what, seconds=30):
    end = time.monotonic() + seconds
    while True:
        yield
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.001)
"""

EXISTING = 100  # events a log starts with: its segment (~3.7 KB) outgrows the header file


def make_log(path: Path, **options: Any) -> int:
    """Create a log holding EXISTING events; return its head."""
    options.setdefault("compression", None)
    with EventLog(path, **options) as log:
        log.append_many([{"old": i, "pad": "p" * 20} for i in range(EXISTING)])
        return log.head


def stored(path: Path, start: int = EXISTING) -> list[Any]:
    """The events stored from ``start`` on, read by a fresh reader."""
    with EventLog(path) as log:
        return [r.event for r in log.read(start)]


def run_child(children: Children, program: str, *args: str, strace: list[str] | None = None,
              ) -> tuple[list[dict[str, Any]], str]:
    """Run ``program`` (after PRELUDE) in a child to its end; its reports and its stderr."""
    cmd = [sys.executable, "-c", PRELUDE + program, *args]
    if strace is not None:
        cmd = ["strace", "-f", "-qq", "-o", os.devnull, *strace, *cmd]
    proc = children.popen(cmd, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    stderr = err.decode()
    assert proc.returncode == 0, stderr
    return [json.loads(line) for line in out.decode().splitlines()], stderr


# ------------------------------------------------------------------------------ batching


def test_batches_by_count_and_by_linger(log_path: Path) -> None:
    with EventLog(log_path) as log, EventLog(log_path) as other:
        w = log.writer(max_events=10, linger=None)
        for i in range(25):
            w.append({"i": i})
        assert log.head == 20 and w.pending == 5
        assert w.flush() == range(20, 25)
        assert w.last_flushed == range(20, 25)
        w.close()
        lingering = log.writer(max_events=1000, linger=0.01)
        lingering.append({"i": 25})
        deadline = time.monotonic() + 10
        while other.head < 26:  # the linger thread commits without any further call
            assert time.monotonic() < deadline
            time.sleep(0.001)
        # pending is read under the buffer's lock, which the linger thread holds from before
        # it commits until its bookkeeping is done: a committed event is never still pending.
        assert lingering.pending == 0
        assert lingering.last_flushed == range(25, 26)
        lingering.close()
        assert [r.event["i"] for r in other.read()] == list(range(26))


PENDING_CHILD = r"""
path = sys.argv[1]
log, other = EventLog(path, sync="always", compression=None), EventLog(path)
w = log.writer(linger=0.01)
head = other.head
w.append({"n": 0})
for _ in deadline_loop("the linger thread's commit"):
    if other.head > head:  # committed: readers see it; its header fdatasync is still running
        break
report(pending=w.pending)
w.close()
log.close()
other.close()
"""


@needs_strace
def test_pending_never_counts_an_event_readers_already_see(
    log_path: Path, children: Children
) -> None:
    # strace holds each fdatasync of the header for 2 s: the linger thread's commit is visible
    # (the header is written) long before its flush returns. pending, read as soon as readers
    # see the event, must not still count it (the old unsynchronised read did: flaky tests).
    make_log(log_path, sync="always")
    reports, _ = run_child(
        children, PENDING_CHILD, str(log_path),
        strace=["-P", str(log_path / "head"), "-e", "trace=fdatasync",
                "-e", "inject=fdatasync:delay_exit=2000000"])
    assert reports == [{"pending": 0}]
    assert stored(log_path) == [{"n": 0}]


# ----------------------------------------------------------- a failed commit, then a retry


APPEND_RETRY_CHILD = r"""
path = sys.argv[1]
with EventLog(path, sync="none", compression=None) as log:
    w = log.writer(max_events=3, linger=None)
    w.append({"n": 0})
    w.append({"n": 1})
    file_limit(path, True)
    try:
        w.append({"n": 2})  # completes the batch: its commit fails
    except StorageError as exc:
        report(raised=type(exc).__name__, errno=exc.errno, pending=w.pending)
    file_limit(path, False)
    w.append({"n": 2})  # the retry the contract allows: "append raised: not accepted"
    report(pending=w.pending, last=[w.last_flushed.start, w.last_flushed.stop])
    w.close()
"""


def test_append_whose_flush_fails_did_not_accept_its_event(
    log_path: Path, children: Children
) -> None:
    head = make_log(log_path, sync="none")
    reports, _ = run_child(children, APPEND_RETRY_CHILD, str(log_path))
    assert reports == [
        # The earlier two stay buffered; the third was not accepted.
        {"raised": "StorageError", "errno": errno.EFBIG, "pending": 2},
        {"pending": 0, "last": [head, head + 3]},
    ]
    assert stored(log_path) == [{"n": 0}, {"n": 1}, {"n": 2}]  # each once


CLOSE_RETRY_CHILD = r"""
path = sys.argv[1]
with EventLog(path, sync="none", compression=None) as log:
    w = log.writer(max_events=100, linger=None)
    for i in range(3):
        w.append({"n": i})
    file_limit(path, True)
    try:
        w.close()
    except StorageError as exc:
        report(raised=exc.errno, pending=w.pending)
    w.append({"n": 3})  # still open: nothing was committed, nothing was dropped
    file_limit(path, False)
    r = w.close()
    report(closed=[r.start, r.stop], pending=w.pending)
    try:
        w.append({"n": 4})
    except LogClosedError:
        report(closed_now=True)
"""


def test_close_that_fails_keeps_the_events_and_can_be_retried(
    log_path: Path, children: Children
) -> None:
    head = make_log(log_path, sync="none")
    reports, _ = run_child(children, CLOSE_RETRY_CHILD, str(log_path))
    assert reports == [
        {"raised": errno.EFBIG, "pending": 3},
        {"closed": [head, head + 4], "pending": 0},
        {"closed_now": True},
    ]
    assert stored(log_path) == [{"n": i} for i in range(4)]


BACKGROUND_CHILD = r"""
path = sys.argv[1]
with EventLog(path, sync="none", compression=None) as log:
    w = log.writer(max_events=10**6, linger=0.01)
    file_limit(path, True)
    w.append({"n": 0})
    k = 0
    for _ in deadline_loop("the linger thread's failure"):
        k += 1
        try:
            w.append({"n": k})  # accepted, until the background failure is reported
        except StorageError as exc:
            report(raised=exc.errno, k=k)
            break
    file_limit(path, False)
    w.append({"n": k})  # not accepted above: given again
    w.close()
"""


def test_a_background_flush_error_is_raised_by_the_next_append_which_drops_nothing(
    log_path: Path, children: Children
) -> None:
    make_log(log_path, sync="none")
    reports, _ = run_child(children, BACKGROUND_CHILD, str(log_path))
    [got] = reports
    assert got["raised"] == errno.EFBIG
    assert stored(log_path) == [{"n": i} for i in range(got["k"] + 1)]


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, for a real ENOSPC (needs root)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_append_on_a_full_disk_then_retry_stores_each_event_once(tiny_tmpfs: Path) -> None:
    path = tiny_tmpfs / "log"
    big = "x" * 3000  # a batch of three needs new pages of the segment file
    with EventLog(path, sync="none", compression=None) as log:
        log.append({"first": True})
        filler = tiny_tmpfs / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        w = log.writer(max_events=3, linger=None)
        w.append({"n": 0, "pad": big})
        w.append({"n": 1, "pad": big})
        with pytest.raises(StorageError) as info:
            w.append({"n": 2, "pad": big})
        assert info.value.errno == errno.ENOSPC
        assert w.pending == 2 and log.head == 1
        filler.unlink()
        w.append({"n": 2, "pad": big})  # the retry
        assert w.pending == 0 and w.last_flushed == range(1, 4)
        w.close()
        assert [r.event.get("n") for r in log.read(1)] == [0, 1, 2]


# ---------------------------------------------------- committed, but the fsync after failed

DURABILITY_CHILD = r"""
from eventpipe import DurabilityError
path, how = sys.argv[1], sys.argv[2]
log = EventLog(path, sync="always", compression=None)
other = EventLog(path)
head = other.head

def rng(r):
    return [r.start, r.stop]

if how == "flush":
    w = log.writer(max_events=100, linger=None)
    for i in range(3):
        w.append({"n": i})
    try:
        w.flush()
    except DurabilityError as exc:
        report(raised=rng(exc.committed), pending=w.pending, last=rng(w.last_flushed))
elif how == "append":
    w = log.writer(max_events=3, linger=None)
    for i in range(3):
        w.append({"n": i})  # the third completes the batch: committed, its fsync fails
    report(returned=True, pending=w.pending, last=rng(w.last_flushed))
else:
    w = log.writer(max_events=100, linger=0.01)
    w.append({"n": 0})  # one: the linger thread may commit as soon as it is buffered
    for _ in deadline_loop("the linger thread's commit"):
        if other.head > head:
            break
# The next call reports it (append without accepting its event), or, for flush, is refused.
try:
    w.append({"n": 3})
except DurabilityError as exc:
    report(next_append=rng(exc.committed), pending=w.pending)
else:
    report(next_append=None, pending=w.pending)
# This process may no longer append: a flush is refused, and what is buffered stays so.
w.append({"n": 4})
try:
    w.flush()
except DurabilityError as exc:
    report(refused=rng(exc.committed), pending=w.pending)
try:
    log.close()
except DurabilityError:
    pass
other.close()
# Exit with the writer open: the exit hook says what it could not commit.
"""


@needs_strace
@pytest.mark.parametrize("how", ["flush", "append", "linger"])
def test_a_batch_committed_without_durability_is_reported_once_and_not_kept(
    log_path: Path, children: Children, how: str
) -> None:
    head = make_log(log_path, sync="always")
    size = 1 if how == "linger" else 3
    batch = [head, head + size]
    reports, stderr = run_child(
        children, DURABILITY_CHILD, str(log_path), how,
        strace=["-P", str(log_path / "head"), "-e", "trace=fdatasync",
                "-e", "inject=fdatasync:error=EIO"])
    expected: list[dict[str, Any]] = []
    if how == "flush":
        expected.append({"raised": batch, "pending": 0, "last": batch})
        # Nothing buffered was committed: n3 is; refused, it stays buffered.
        expected.append({"next_append": None, "pending": 1})
        pending_at_end = 2
    else:
        if how == "append":
            expected.append({"returned": True, "pending": 0, "last": batch})
        # Reported by the next append, which did not accept n3.
        expected.append({"next_append": batch, "pending": 0})
        pending_at_end = 1
    expected.append({"refused": batch, "pending": pending_at_end})
    assert reports == expected
    assert stored(log_path) == [{"n": i} for i in range(size)]  # once, and nothing else
    assert f"{pending_at_end} event" in stderr and "lost at exit" in stderr, stderr


INTERRUPT_CHILD = r"""
path = sys.argv[1]
with EventLog(path, sync="always", compression=None) as log:
    w = log.writer(max_events=100, linger=None)
    for i in range(3):
        w.append({"n": i})
    try:
        w.flush()  # SIGINT lands as the header's fdatasync returns: after the commit
    except KeyboardInterrupt:
        report(interrupted=True, pending=w.pending,
               last=[w.last_flushed.start, w.last_flushed.stop])
    r = w.flush()  # nothing left to store again
    w.append({"n": 3})
    r2 = w.close()
    report(again=[r.start, r.stop], then=[r2.start, r2.stop])
"""


@needs_strace
def test_an_interrupt_after_the_commit_leaves_the_batch_unbuffered(
    log_path: Path, children: Children
) -> None:
    head = make_log(log_path, sync="always")
    reports, _ = run_child(
        children, INTERRUPT_CHILD, str(log_path),
        strace=["-P", str(log_path / "head"), "-e", "trace=fdatasync",
                "-e", "inject=fdatasync:signal=SIGINT:when=1"])
    assert reports == [
        {"interrupted": True, "pending": 0, "last": [head, head + 3]},
        {"again": [0, 0], "then": [head + 3, head + 4]},
    ]
    assert stored(log_path) == [{"n": i} for i in range(4)]


# -------------------------------------------------------------------------------- fork


FORK_CHILD = r"""
path = sys.argv[1]
log = EventLog(path, sync="none", compression=None)
batched = log.writer(max_events=100, linger=None)
lingering = log.writer(max_events=100, linger=0.01)
for i in range(3):
    batched.append({"parent": i})
pid = os.fork()
if pid == 0:
    try:
        # The parent's three are the parent's: were they here too, both would store them.
        report(child_pending=batched.pending)
        batched.append({"child": 0})
        batched.append({"child": 1})
        r = batched.flush()
        # A linger thread of its own, started by its first event, commits without a call.
        lingering.append({"child": 2})
        for _ in deadline_loop("the child's linger thread"):
            if lingering.pending == 0:
                break
        report(child_flushed=r.stop - r.start, lingering=lingering.last_flushed.stop
               - lingering.last_flushed.start)
    finally:
        os._exit(0)  # no exit hooks: whatever was committed, threads did it
_, status = os.waitpid(pid, 0)
assert status == 0, status
r = batched.close()
lingering.close()
log.close()
report(parent_flushed=r.stop - r.start)
"""


def test_a_forked_child_starts_with_an_empty_buffer_and_its_own_linger_thread(
    log_path: Path, children: Children
) -> None:
    make_log(log_path, sync="none")
    reports, _ = run_child(children, FORK_CHILD, str(log_path))
    assert reports == [{"child_pending": 0}, {"child_flushed": 2, "lingering": 1},
                       {"parent_flushed": 3}]
    got = stored(log_path)
    assert sorted(map(json.dumps, got)) == sorted(json.dumps(e) for e in [
        {"child": 0}, {"child": 1}, {"child": 2}, {"parent": 0}, {"parent": 1}, {"parent": 2}])


# ---------------------------------------------------------------- exit without close()


EXIT_CHILD = r"""
path, how = sys.argv[1], sys.argv[2]
log = EventLog(path, sync="none", compression=None)
w = log.writer(max_events=100, linger=None if how != "linger" else 3600)
for i in range(3):
    w.append({"n": i})
if how == "full":
    file_limit(path, True)
elif how == "log-closed":
    log.close()
# A normal exit, nothing closed.
"""


@pytest.mark.parametrize("how", ["no-linger", "linger"])
def test_events_buffered_at_a_normal_exit_are_committed(
    log_path: Path, children: Children, how: str
) -> None:
    make_log(log_path, sync="none")
    _, stderr = run_child(children, EXIT_CHILD, str(log_path), how)
    assert stored(log_path) == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert "eventpipe" not in stderr


@pytest.mark.parametrize(("how", "reason"), [("full", "File too large"),
                                             ("log-closed", "log is closed")])
def test_events_that_cannot_be_committed_at_exit_are_reported_lost(
    log_path: Path, children: Children, how: str, reason: str
) -> None:
    make_log(log_path, sync="none")
    _, stderr = run_child(children, EXIT_CHILD, str(log_path), how)
    assert stored(log_path) == []
    assert "3 events buffered for" in stderr and "lost at exit" in stderr, stderr
    assert reason in stderr, stderr


def test_a_writer_dropped_with_events_buffered_says_so(
    log_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with EventLog(log_path) as log:
        w = log.writer(linger=None)
        w.append({"n": 0})
        w.append({"n": 1})
        with caplog.at_level(logging.WARNING, logger="eventpipe"):
            del w
            gc.collect()
        assert "2 events buffered" in caplog.text and "garbage-collected" in caplog.text
        assert log.head == 0
