"""The sealing work (checksums, compression, retention) gets done, in bounded time, at a cost
that does not grow with the number of segments; a damaged segment stops none of it.

Real processes and real files throughout: CLI writers that live a fraction of a second, a
compressor holding the lock in another process, kills by strace at a chosen system call, and
system-call counts from strace where the point is what a pass does not touch.
"""

from __future__ import annotations

import gzip
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from eventpipe import Consumer, EventLog
from eventpipe._checksum import read_sum, sum_blocks
from eventpipe._compress import clean_stale
from eventpipe._header import HEADER_SIZE, Header, decode_header
from eventpipe._status import flock_holders

from ._wait import wait_until
from .conftest import ROOT, Children

STATE_FILE = "compress.state"  # the compressor's watermark, damaged segments, recent errors
ERRORS_KEPT = 10

needs_strace = pytest.mark.skipif(shutil.which("strace") is None,
                                  reason="strace is not installed (.ci/run installs it)")

# EventLog.close() finishes the sealing work once log.py calls Compressor.finish() there
# (the patch is in the change's report); until then a closing writer abandons it.
CLOSE_FINISHES = "finish(" in inspect.getsource(EventLog.close)
needs_close_finish = pytest.mark.skipif(
    not CLOSE_FINISHES, reason="EventLog.close() does not call Compressor.finish() yet")
# Consumers take a share once they ask for it on a roll (EventLog.seal_soon(), patch likewise).
CONSUMERS_KICK = "seal_soon" in inspect.getsource(Consumer)
needs_consumer_kick = pytest.mark.skipif(
    not CONSUMERS_KICK, reason="Consumer does not call EventLog.seal_soon() on a roll yet")


def env(**options: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))
    for key in [k for k in e if k.startswith("EVENTPIPE_")]:
        del e[key]
    e.update({f"EVENTPIPE_{k.upper()}": v for k, v in options.items()})
    return e


def header(log: Path) -> Header:
    h = decode_header((log / "head").read_bytes()[:HEADER_SIZE])
    assert h is not None
    return h


def segment_names(log: Path) -> list[str]:
    return sorted(n for n in os.listdir(log / "segments") if ".jsonl" in n)


def sealed(log: Path) -> dict[int, list[str]]:
    """{base: [file names]} of the sealed segments (segment files, .sum, leftovers)."""
    active = header(log).segment_base
    out: dict[int, list[str]] = {}
    for name in os.listdir(log / "segments"):
        if name[:20].isdigit() and int(name[:20]) < active:
            out.setdefault(int(name[:20]), []).append(name)
    return {b: sorted(v) for b, v in sorted(out.items())}


def unfinished(log: Path, *, compressed: bool = True) -> list[int]:
    """Sealed segments lacking a .sum (or, with ``compressed``, still plain)."""
    left = []
    for base, names in sealed(log).items():
        has_seg = any(".jsonl" in n and not n.endswith(".tmp") for n in names)
        if not has_seg:
            continue
        if f"{base:020d}.sum" not in names or (compressed
                                               and f"{base:020d}.jsonl" in names):
            left.append(base)
    return left


def state(log: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((log / STATE_FILE).read_bytes())
    return doc


def cli(*args: str | Path, stdin: bytes = b"",
        **options: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "eventpipe", *map(str, args)], input=stdin,
                          capture_output=True, timeout=120, env=env(**options), check=False)


# ------------------------------------------------------------- 8: short-lived writers


@needs_close_finish
def test_short_lived_cli_writers_leave_every_sealed_segment_sealed_and_pruned(
        log_path: Path, children: Children) -> None:
    """52 `eventpipe append` runs, four at a time, each sealing a segment or two: afterwards
    every sealed segment has its checksum and is gzip, and retention by bytes was applied."""
    options = {"segment_max_bytes": "1024", "retention_max_bytes": "6000", "sync": "none"}
    per_run = 30
    runs = 52

    def batch(run: int) -> bytes:
        return b"".join(b'{"run":%d,"i":%d,"pad":"%s"}\n' % (run, i, b"x" * 30)
                        for i in range(per_run))

    assert cli("append", log_path, stdin=batch(0), **options).returncode == 0  # creates it
    run = 1
    while run < runs:
        procs = []
        for _ in range(min(4, runs - run)):
            proc = children.popen([sys.executable, "-m", "eventpipe", "append", str(log_path)],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, env=env(**options))
            assert proc.stdin is not None
            proc.stdin.write(batch(run))
            proc.stdin.close()
            procs.append(proc)
            run += 1
        for proc in procs:
            assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    h = header(log_path)
    assert h.head == runs * per_run
    assert h.segment_base > 20, "the runs should have sealed many segments"
    assert unfinished(log_path) == [], "sealed segments left without checksum or gzip"
    assert not [n for n in os.listdir(log_path / "segments") if ".tmp" in n]
    files = segment_names(log_path)
    assert all(n.endswith(".jsonl.gz") for n in files[:-1]) and files[-1].endswith(".jsonl")
    total = sum((log_path / "segments" / n).stat().st_size for n in files)
    assert total <= 6000, f"retention left {total} bytes over retention_max_bytes=6000"
    assert int(files[0][:20]) > 0, "retention removed nothing"
    with EventLog(log_path) as log:
        recs = list(log.read(log.first_offset))
    assert [r.offset for r in recs] == list(range(int(files[0][:20]), h.head))
    verified = cli("verify", log_path)
    assert verified.returncode == 0, verified.stderr


def test_finish_gives_up_at_its_timeout_and_the_next_finish_completes(log_path: Path) -> None:
    with EventLog(log_path, segment_max_events=1, sync="none") as log:
        log.append_many([{"i": i, "pad": "p" * 300} for i in range(600)])
        started = time.monotonic()
        done = log.finish_sealing(0.3)
        elapsed = time.monotonic() - started
        assert not done, "600 segments (2400 fsyncs) cannot all be sealed in 0.3 s"
        assert elapsed < 0.3 + 5.0, f"finish_sealing(0.3) took {elapsed:.2f} s"
        assert unfinished(log_path), "work is left"
        assert not log.sealing_in_background, "the background thread was stopped"
    with EventLog(log_path) as log:
        assert log.finish_sealing(300)
    assert unfinished(log_path) == []


def test_after_finish_sealing_rolls_and_compress_seal_again(log_path: Path) -> None:
    """finish_sealing() stops the background thread for its own work only: a later roll
    starts it again, and an explicit compress() long after its timeout still works."""
    with EventLog(log_path, segment_max_events=1, sync="none", compression=None) as log:
        log.append_many([{"i": i} for i in range(5)])
        assert log.finish_sealing(0.2)
        assert unfinished(log_path, compressed=False) == []
        time.sleep(0.3)  # past finish_sealing's timeout
        log.append({"i": 5})  # seals segment 4's successor: kicks the compressor
        wait_until(lambda: unfinished(log_path, compressed=False) == [], "the restarted pass")
        assert log.sealing_in_background
        assert log.compress() == 5
    assert unfinished(log_path) == []


BACKLOG_LEFT = r"""
import os, sys
from eventpipe import EventLog
log = EventLog(sys.argv[1], segment_max_events=1, sync="none", compression=None)
log.append_many([{"i": i, "pad": "p" * 300} for i in range(int(sys.argv[2]))])
os._exit(0)  # as a writer killed: the sealing backlog is left (for A)
"""

READ_ONLY_FINISH = r"""
import os, sys
from eventpipe import Consumer, EventLog
log = EventLog(sys.argv[1])
print("go", flush=True)
print("done" if log.finish_sealing(float(sys.argv[2])) else "left", flush=True)
os._exit(0)  # nothing more: not close()'s own pass either
"""

SEAL_AND_FINISH = r"""
import os, sys, time
from eventpipe import Consumer, EventLog
log = EventLog(sys.argv[1], segment_max_events=1, sync="none")
log.append_many([{"late": i} for i in range(3)])  # seals segments while the lock is held
started = time.monotonic()
done = log.finish_sealing(30)
print("done" if done else "left", round(time.monotonic() - started, 3), flush=True)
os._exit(0)  # not close(), which would look for the work again: it is A's to do
"""


def _holds_lock(proc: subprocess.Popen[bytes], log: Path) -> Callable[[], bool]:
    return lambda: (proc.pid in flock_holders(str(log / "compress.lock"))
                    or proc.poll() is not None)


def test_a_finish_that_finds_the_lock_held_leaves_its_work_to_the_holder(
        tmp_path: Path, children: Children) -> None:
    """Process A holds the compress lock for a long pass; B seals segments and finishes: it
    does not wait, and A, on releasing the lock, looks again and does B's segments too.

    A's backlog must outlast B's start: it grows until it does (the machine's speed decides).
    """
    for backlog in (300, 1200, 4800):
        log_path = tmp_path / f"log{backlog}"
        backlog_left = subprocess.run(
            [sys.executable, "-c", BACKLOG_LEFT, str(log_path), str(backlog)],
            capture_output=True, timeout=120, env=env(), check=False)
        assert backlog_left.returncode == 0, backlog_left.stderr
        holder = children.popen([sys.executable, "-c", READ_ONLY_FINISH, str(log_path), "600"],
                                env=env())
        assert holder.stdout is not None and holder.stdout.readline() == b"go\n"
        wait_until(_holds_lock(holder, log_path), "A to take the compress lock")
        b = subprocess.run([sys.executable, "-c", SEAL_AND_FINISH, str(log_path)],
                           capture_output=True, timeout=120, env=env(), check=False)
        assert b.returncode == 0, b.stderr
        verdict, seconds = b.stdout.decode().split()
        assert holder.stdout.readline() == b"done\n"
        assert holder.wait(timeout=60) == 0
        if verdict == "done":
            continue  # A was done before B came: try again with more work for A
        assert float(seconds) < 2.0, "B waited for the lock"
        assert unfinished(log_path) == [], "A left B's segments"
        return
    raise AssertionError("A always finished before B came")


WRITER_KILLED = r"""
import os, sys
from eventpipe import Consumer, EventLog
log = EventLog(sys.argv[1], segment_max_events=1, sync="none")
log.append_many([{"i": i, "pad": "p" * 300} for i in range(200)])
os._exit(0)  # as a writer killed: its sealing work is left
"""


def test_a_reader_that_kicks_does_the_sealing_work_writers_left(log_path: Path) -> None:
    killed = subprocess.run([sys.executable, "-c", WRITER_KILLED, str(log_path)],
                            capture_output=True, timeout=120, env=env(), check=False)
    assert killed.returncode == 0, killed.stderr
    assert unfinished(log_path), "the killed writer finished its work: nothing to show"
    writer_lock = (log_path / "writer.lock").stat().st_mtime_ns
    with EventLog(log_path) as reader:  # reads only: a consumer's log
        reader.seal_soon()
        wait_until(lambda: unfinished(log_path) == [], "the reader's compressor")
        assert reader.sealing_in_background
    assert (log_path / "writer.lock").stat().st_mtime_ns == writer_lock


KILLED_CLI_LIKE_WRITER = r"""
import os, sys
from eventpipe import EventLog
log = EventLog(sys.argv[1], segment_max_events=5, sync="none")
log.append_many([{"w": sys.argv[2], "i": i} for i in range(23)])
os._exit(0)  # killed before close(): nothing of its sealing work is finished here
"""


@needs_consumer_kick
def test_a_running_consumer_does_the_sealing_work_of_killed_writers(
        log_path: Path, children: Children) -> None:
    with EventLog(log_path) as log:
        log.append({"w": "first"})
    consumer = children.worker("consumer", str(log_path), "kicker", "--poll", "0.05")
    assert consumer.stdout is not None and consumer.stdout.readline() == b"caught-up\n"
    for k in range(8):
        killed = subprocess.run([sys.executable, "-c", KILLED_CLI_LIKE_WRITER, str(log_path),
                                 str(k)], capture_output=True, timeout=60, env=env(),
                                check=False)
        assert killed.returncode == 0, killed.stderr
    wait_until(lambda: unfinished(log_path) == [] and header(log_path).head == 1 + 8 * 23,
               "the consumer's compressor")
    assert consumer.poll() is None


# -------------------------------------------------------------- 11: compressor hygiene


def _compressed_log(log_path: Path) -> None:
    with EventLog(log_path, segment_max_events=10, sync="none") as log:
        log.append_many([{"i": i} for i in range(45)])
        log.compress()
    assert unfinished(log_path) == []


def test_a_gzip_segment_without_checksum_gets_one_from_its_content(log_path: Path) -> None:
    _compressed_log(log_path)
    seg = log_path / "segments"
    (seg / f"{10:020d}.sum").unlink()
    (log_path / STATE_FILE).unlink(missing_ok=True)  # as a log written by an earlier version
    with EventLog(log_path) as log:
        log.append({"i": 45})  # opens the writer, which starts a pass
        wait_until((seg / f"{10:020d}.sum").exists, "the missing .sum")
    got = read_sum(str(seg), 10)
    content = gzip.decompress((seg / f"{10:020d}.jsonl.gz").read_bytes())
    assert got is not None and got.events == 10
    assert (got.size, got.block_crcs) == sum_blocks([content])[1:]


IDLE_WRITER = r"""
import json, os, sys, time
from eventpipe import Consumer, EventLog
path = sys.argv[1]
log = EventLog(path, sync="none")  # (no interval syncer: it takes the writer lock each second)
log.append({"x": 1})  # the writer opens: its compressor starts a pass
deadline = time.monotonic() + 10
def recorded():
    try:
        with open(os.path.join(path, "compress.state"), "rb") as f:
            return bool(json.loads(f.read())["damaged"])
    except (OSError, ValueError, KeyError):
        return False
while not recorded() and time.monotonic() < deadline:
    time.sleep(0.01)
print("recorded" if recorded() else "not recorded", flush=True)
# The pass that recorded it releases the compress lock just after: wait for that (a lock taken
# and dropped here, before the window), so the window holds only what an idle writer does.
import fcntl
fd = os.open(os.path.join(path, "compress.lock"), os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
fcntl.flock(fd, fcntl.LOCK_UN)
os.close(fd)
os.getppid()  # marks the start of the idle window in the trace
time.sleep(1.0)  # idle: nothing is appended; the window whose system calls are counted
os.getppid()
os._exit(0)
"""


@needs_strace
def test_a_damaged_gzip_segment_without_checksum_is_recorded_once_not_retried(
        log_path: Path, tmp_path: Path) -> None:
    _compressed_log(log_path)
    seg = log_path / "segments"
    gz = seg / f"{10:020d}.jsonl.gz"
    lines = gzip.decompress(gz.read_bytes()).splitlines(keepends=True)
    gz.write_bytes(gzip.compress(b"".join(lines[:9])))  # one event short
    (seg / f"{10:020d}.sum").unlink()
    (log_path / STATE_FILE).unlink(missing_ok=True)
    trace = tmp_path / "trace"
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=flock,getdents64,getppid", "-o", str(trace),
         sys.executable, "-c", IDLE_WRITER, str(log_path)],
        capture_output=True, timeout=120, env=env(), check=False)
    assert proc.returncode == 0, proc.stderr
    calls = trace.read_text().splitlines()
    # A marker may come split ("getppid( <unfinished ...>" then "<... getppid resumed>")
    # when another thread makes a call meanwhile: its first line names the call.
    marks = [i for i, line in enumerate(calls) if "getppid(" in line]
    window = calls[marks[-2] + 1 : marks[-1]]
    # Attempts to take a lock, and listings: an idle writer must make none.
    busy = [line for line in window
            if re.search(r"\bgetdents64\(|\bflock\(.*LOCK_EX", line)]
    assert busy == [], f"an idle writer's compressor kept trying ({len(busy)} calls in 1 s)"
    assert proc.stdout == b"recorded\n", "the damage was never recorded"
    assert not (seg / f"{10:020d}.sum").exists(), "a .sum must never bless damaged content"
    doc = state(log_path)
    assert [d["segment"] for d in doc["damaged"]] == [10]
    assert "holds 9 complete lines, expected 10" in doc["damaged"][0]["error"]


def test_errors_stay_few_and_status_in_another_process_shows_them(log_path: Path) -> None:
    with EventLog(log_path, segment_max_events=10, sync="none", compression=None) as log:
        log.append_many([{"i": i} for i in range(25)])
    seg = log_path / "segments"
    for name in os.listdir(seg):
        if not name.endswith(".jsonl"):
            os.unlink(seg / name)  # no checksums yet
    (log_path / STATE_FILE).unlink(missing_ok=True)  # no watermark yet
    plain = seg / f"{10:020d}.jsonl"
    plain.write_bytes(b"".join(plain.read_bytes().splitlines(keepends=True)[:-1]))  # damaged
    with EventLog(log_path, segment_max_events=1, sync="none", compression=None) as log:
        for i in range(60):
            sealing = header(log_path).segment_base
            log.append({"roll": i})  # each append seals a segment and kicks the compressor
            wait_until((seg / f"{sealing:020d}.sum").exists, "the pass")
        assert unfinished(log_path, compressed=False) == [10]
        errors = log.sealing_errors
        assert 1 <= len(errors) <= ERRORS_KEPT, f"{len(errors)} errors kept"
        assert all(e.__traceback__ is None for e in errors), "errors pin their frames"
        sealing = json.loads(cli("status", log_path, "--json").stdout)["sealing"]
        assert [d["segment"] for d in sealing["damaged"]] == [10]
        text = cli("status", log_path).stdout.decode()
        assert "damaged    segment 10 (offsets 10..19)" in text
        assert "holds 9 complete lines, expected 10" in text
    # The errors of the last pass, shown in another process until a clean pass clears them.
    (log_path / STATE_FILE).unlink()  # forgets the damage: the next pass finds it again
    with EventLog(log_path, sync="none", compression=None) as log:
        log.append({"x": 1})  # opens the writer: a pass, which finds the damage; no roll
        wait_until((log_path / STATE_FILE).exists, "the pass")
        errors = json.loads(cli("status", log_path, "--json").stdout)["sealing"]["errors"]
        assert [e["pid"] for e in errors] == [os.getpid()]
        assert "holds 9 complete lines, expected 10" in errors[0]["error"]
        text = cli("status", log_path).stdout.decode()
        assert re.search(rf"compressor .* pid {os.getpid()}: CorruptLogError: sealed segment "
                         r"holds 9 complete lines, expected 10", text), text
    with EventLog(log_path, sync="none", compression=None, segment_max_events=1) as log:
        log.append({"x": 2})  # seals a segment: a clean pass
        wait_until(lambda: not json.loads(cli("status", log_path, "--json").stdout)
                   ["sealing"]["errors"], "a clean pass to clear the errors")
        assert [d["segment"] for d in state(log_path)["damaged"]] == [10]


def test_clean_stale_removes_every_temp_name_a_compressor_leaves(log_path: Path) -> None:
    _compressed_log(log_path)
    seg = log_path / "segments"
    leftovers = [f"{0:020d}.sum.tmp.4242", f"{10:020d}.sum.tmp", f"{20:020d}.jsonl.gz.tmp"]
    for name in leftovers:
        (seg / name).write_bytes(b"partial")
    keep = ["notes.tmp.txt", f"{30:020d}.sum"]
    (seg / keep[0]).write_bytes(b"not ours")
    clean_stale(str(seg))
    left = os.listdir(seg)
    assert not [n for n in leftovers if n in left]
    assert all(n in left for n in keep)


KILLED_AT_SUM = r"""
import sys
from eventpipe import Consumer, EventLog
log = EventLog(sys.argv[1])
log.append({"x": 1})  # opens the writer: a pass starts and is killed at the .sum rename
log.compress()
"""


@needs_strace
def test_a_compressor_killed_while_writing_a_checksum_leaves_nothing_behind(
        log_path: Path) -> None:
    with EventLog(log_path, segment_max_events=10, sync="none", compression=None) as log:
        log.append_many([{"i": i} for i in range(45)])
    seg = log_path / "segments"
    for name in os.listdir(seg):
        if name.endswith(".sum"):
            os.unlink(seg / name)
    (log_path / STATE_FILE).unlink(missing_ok=True)  # every pass starts at segment 0
    # SIGKILL on entering the process's first rename: the one that puts segment 0's checksum
    # in place (opening an existing log renames nothing).
    killed = subprocess.run(
        # (renameat: files inside the log are renamed relative to folder descriptors)
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=rename,renameat,renameat2",
         "-e", "inject=rename,renameat,renameat2:signal=SIGKILL:when=1", sys.executable, "-c",
         KILLED_AT_SUM, str(log_path)], capture_output=True, timeout=120, env=env(), check=False)
    assert killed.returncode != 0, "the compressor was not killed"
    assert [n for n in os.listdir(seg) if n.startswith(f"{0:020d}.sum.tmp")], \
        f"the kill left no temp file: {sorted(os.listdir(seg))}"
    with EventLog(log_path) as log:
        log.compress()
    assert [n for n in os.listdir(seg) if ".tmp" in n] == []
    assert unfinished(log_path) == []


# -------------------------------------------------------------- 12: scale


ROLLS = r"""
import os, sys, time
from eventpipe import Consumer, EventLog
path = sys.argv[1]
seg = os.path.join(path, "segments")
log = EventLog(path, segment_max_events=1, sync="none", retention_max_bytes=int(sys.argv[2]))
log.append({"warm": 1})
def done(base):
    return (os.path.exists(os.path.join(seg, f"{base:020d}.sum"))
            and os.path.exists(os.path.join(seg, f"{base:020d}.jsonl.gz")))
deadline = time.monotonic() + 60
while not done(log.head - 2) and time.monotonic() < deadline:
    time.sleep(0.005)
os.getppid()  # the counted part starts
for i in range(20):
    log.append({"roll": i})
    base = log.head - 2  # the segment this append sealed
    while not done(base) and time.monotonic() < deadline:
        time.sleep(0.005)
os.getppid()
print("ok" if time.monotonic() < deadline else "timeout", flush=True)
os._exit(0)
"""


@needs_strace
def test_a_roll_costs_the_compressor_the_same_whatever_the_segment_count(
        log_path: Path, tmp_path: Path) -> None:
    """With 500 sealed segments, sealing one more lists no folder and reads no old checksum
    (the compressor walks on from its watermark; retention from its first segment)."""
    with EventLog(log_path, segment_max_events=1, sync="none") as log:
        log.append_many([{"i": i} for i in range(500)])
        log.compress()
    total = sum((log_path / "segments" / n).stat().st_size for n in segment_names(log_path))
    trace = tmp_path / "trace"
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-y", "-e", "trace=openat,getdents64,getppid", "-o",
         str(trace), sys.executable, "-c", ROLLS, str(log_path), str(total)],
        capture_output=True, timeout=300, env=env(), check=False)
    assert proc.returncode == 0 and proc.stdout == b"ok\n", proc.stderr
    calls = trace.read_text().splitlines()
    # A marker may come split ("getppid( <unfinished ...>" then "<... getppid resumed>")
    # when another thread makes a call meanwhile: its first line names the call.
    marks = [i for i, line in enumerate(calls) if "getppid(" in line]
    assert len(marks) == 2, [line for line in calls if "getppid" in line]
    window = calls[marks[-2] + 1 : marks[-1]]
    listings = [line for line in window
                if "getdents64(" in line and "/segments>" in line]
    assert listings == [], f"{len(listings)} listings of the segments folder in 20 rolls"
    sums_read = [line for line in window if "openat(" in line and ".sum\"" in line
                 and "O_RDONLY" in line and "O_CREAT" not in line]
    # Per roll: the new segment's (not there yet), and retention's oldest and the one after.
    assert len(sums_read) <= 5 * 20, f"{len(sums_read)} .sum files opened in 20 rolls"
    first = int(segment_names(log_path)[0][:20])
    assert first >= 15, "retention by bytes removed about one segment per roll"


# ------------------------------------------------ issue 11: explicit compress, day to day


def _plain_log(log_path: Path, segments: int, *, event_bytes: int = 100,
               per_segment: int = 1) -> None:
    """A log of ``segments`` sealed segments, checksummed and left plain (compression off)."""
    with EventLog(log_path, segment_max_events=per_segment, sync="none",
                  compression=None) as log:
        for i in range(segments * per_segment + 1):  # the last one opens the active one
            # Random text: gzip works for it (repeated text would compress in no time).
            log.append({"i": i, "pad": os.urandom(event_bytes // 2).hex()})
        assert log.finish_sealing(120)
    assert unfinished(log_path) == list(range(0, segments * per_segment, per_segment))


def test_compress_on_a_terminal_shows_progress_and_elsewhere_none(log_path: Path) -> None:
    from ._terminal import stderr_on_a_terminal

    _plain_log(log_path, 30)
    rc, out, shown = stderr_on_a_terminal(
        [sys.executable, "-m", "eventpipe", "compress", str(log_path)], env())
    assert rc == 0, shown
    assert out == b"compressed 30 segments\n"
    assert b"\r  0/30 segments compressed" in shown, shown
    assert b"30/30 segments compressed, " in shown and b"/s" in shown, shown
    assert unfinished(log_path) == []

    log_path2 = log_path.with_name("piped")
    _plain_log(log_path2, 5)
    piped = cli("compress", log_path2)
    assert piped.returncode == 0 and piped.stdout == b"compressed 5 segments\n"
    assert b"segments" not in piped.stderr, piped.stderr


def test_an_interrupted_compress_keeps_its_work_and_a_true_state(log_path: Path) -> None:
    """SIGINT part-way through ``eventpipe compress``: compress.state has been saved after
    each segment, so it says which segments are gzip, its byte count matches the disk, and
    the next compress does only the rest."""
    total = 40
    _plain_log(log_path, total, event_bytes=20_000, per_segment=40)  # 40 x ~800 KB
    # compression off for the command's own log options: its close() then only checksums
    # (an explicit compress compresses whatever the option).
    proc = subprocess.Popen([sys.executable, "-m", "eventpipe", "compress", str(log_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env(compression="none", compression_level="9"))
    try:
        wait_until(lambda: sum(n.endswith(".jsonl.gz") for n in segment_names(log_path)) >= 3,
                   timeout=60)
        proc.send_signal(2)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    doc = state(log_path)
    names = set(segment_names(log_path))
    gz = sorted(int(n[:20]) for n in names if n.endswith(".jsonl.gz"))
    assert 3 <= len(gz) < total, names
    assert gz == list(range(0, len(gz) * 40, 40))  # oldest first, no gap
    # The watermark says so (one behind when the signal came between a segment's gzip copy
    # and the save that counts it: the next pass finds that one done).
    assert doc["compressed_below"] in (len(gz) * 40, (len(gz) - 1) * 40), doc
    below = [b for b in range(0, total * 40, 40) if b < doc["checksummed_below"]]
    on_disk = sum((log_path / "segments" / (f"{b:020d}.jsonl.gz" if b in gz
                                            else f"{b:020d}.jsonl")).stat().st_size
                  for b in below)
    assert doc["sealed_bytes"] == on_disk, (doc, on_disk)
    again = cli("compress", log_path)
    assert again.stdout == f"compressed {total - len(gz)} segments\n".encode(), again.stderr
    assert unfinished(log_path) == []
