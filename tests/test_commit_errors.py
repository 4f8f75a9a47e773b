"""Failures around the commit point, injected into real writer processes by strace.

``strace -P PATH -e inject=SYSCALL:error=EIO:when=N`` makes the N-th such call on that one file
fail (or delivers a signal after it), so each test can aim at one step of an append: before the
commit (the log must be as before, the error typed) or after it (the append happened: a
DurabilityError with the committed offsets, and no further appends from that process).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from eventpipe import EventLog

pytestmark = pytest.mark.skipif(shutil.which("strace") is None,
                                reason="strace is not installed (.ci/run installs it)")

# The child appends a warm-up event, then the event the fault is aimed at, then tries once
# more; it reports what each call did as JSON on stdout.
CHILD = r"""
import json, sys
from eventpipe import EventLog, DurabilityError, StorageError
out = {"calls": []}
log = EventLog(sys.argv[1], sync=sys.argv[2], compression=None, segment_max_events=int(sys.argv[3]))
for name in ("warm", "target", "again"):
    try:
        out["calls"].append({"ok": log.append({"name": name})})
    except KeyboardInterrupt as exc:
        out["calls"].append({"error": "KeyboardInterrupt", "notes": getattr(exc, "__notes__", []),
                             "committed": list(getattr(exc, "committed", range(0)))})
    except StorageError as exc:
        out["calls"].append({"error": type(exc).__name__, "errno": exc.errno, "path": exc.path,
                             "committed": list(getattr(exc, "committed", range(0)))})
try:
    log.close()
    out["close"] = "ok"
except StorageError as exc:
    out["close"] = type(exc).__name__
print(json.dumps(out))
"""


def run_child(log: Path, inject: str, target: str, *, sync: str = "always",
              segment_max_events: int = 1000, trace: str | None = None) -> dict[str, Any]:
    EventLog(log).close()  # created outside strace: the counts below are the appends' own
    call = inject.split(":", maxsplit=1)[0]
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-P", str(log / target),
         "-e", f"trace={trace or call}", "-e", f"inject={inject}",
         sys.executable, "-c", CHILD, str(log), sync, str(segment_max_events)],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def stored(log: Path) -> list[str]:
    with EventLog(log) as lg:
        return [r.event["name"] for r in lg.read()]


def test_failed_header_fsync_after_commit_raises_durability_error_with_offsets(
    tmp_path: Path,
) -> None:
    log = tmp_path / "log"
    # head's fdatasyncs: 1 = the warm-up append's commit, 2 = the target's.
    out = run_child(log, "fdatasync:error=EIO:when=2", "head")
    warm, target, again = out["calls"]
    assert warm == {"ok": 0}
    assert target["error"] == "DurabilityError" and target["committed"] == [1]
    assert target["path"] == str(log / "head")
    # The page cache can no longer be trusted: this process appends nothing more...
    assert again["error"] == "DurabilityError" and again["committed"] == [1]
    assert out["close"] == "DurabilityError"
    # ...and the committed event is there exactly once (the caller was told not to retry).
    assert stored(log) == ["warm", "target"]
    with EventLog(log) as lg:  # reopened: appends work again
        assert lg.append({"name": "later"}) == 2


def test_interrupt_after_the_commit_says_the_append_happened(tmp_path: Path) -> None:
    log = tmp_path / "log"
    # SIGINT delivered as the target's header fsync returns: after the commit point.
    out = run_child(log, "fdatasync:signal=SIGINT:when=2", "head")
    warm, target, again = out["calls"]
    assert warm == {"ok": 0}
    assert target["error"] == "KeyboardInterrupt"
    assert any("committed at offsets 1..1" in note for note in target["notes"])
    assert target["committed"] == [1]  # the same attribute a DurabilityError has
    assert again == {"ok": 2}  # the fsync had succeeded: nothing to refuse
    assert stored(log) == ["warm", "target", "again"]


def test_failing_unlock_after_commit_is_a_durability_error(tmp_path: Path) -> None:
    log = tmp_path / "log"
    # writer.lock flocks: open (1 lock, 2 unlock), warm-up (3, 4), target (5 lock, 6 unlock).
    out = run_child(log, "flock:error=EIO:when=6", "writer.lock")
    warm, target, again = out["calls"]
    assert warm == {"ok": 0}
    assert target["error"] == "DurabilityError" and target["committed"] == [1]
    assert again["error"] == "DurabilityError"
    assert stored(log) == ["warm", "target"]


@pytest.mark.parametrize("sync", ["always", "interval", "none"])
def test_failed_header_write_before_commit_leaves_the_log_as_before(
    tmp_path: Path, sync: str,
) -> None:
    log = tmp_path / "log"
    # head's pwrites: 1 = the warm-up commit, 2 = the target's commit, which fails.
    out = run_child(log, "pwrite64:error=EIO:when=2", "head", sync=sync)
    warm, target, again = out["calls"]
    assert warm == {"ok": 0}
    assert target["error"] == "StorageError" and target["errno"] == 5
    assert target["committed"] == []
    assert again == {"ok": 1}  # nothing of the target was stored: its offset is free
    assert stored(log) == ["warm", "again"]


def test_failed_header_read_and_lock_are_typed(tmp_path: Path) -> None:
    log = tmp_path / "log"
    out = run_child(log, "pread64:error=EIO:when=1", "head")
    assert out["calls"][0]["error"] == "StorageError"
    assert out["calls"][0]["path"] == str(log / "head")
    assert out["calls"][1:] == [{"ok": 0}, {"ok": 1}]
    log2 = tmp_path / "log2"
    out = run_child(log2, "flock:error=ENOLCK:when=3", "writer.lock")
    assert out["calls"][0]["error"] == "StorageError"
    assert out["calls"][0]["path"] == str(log2 / "writer.lock")
    assert out["calls"][1:] == [{"ok": 0}, {"ok": 1}]
    assert stored(log) == ["target", "again"] and stored(log2) == ["target", "again"]


def test_failed_roll_marker_write_leaves_the_log_as_before(tmp_path: Path) -> None:
    log = tmp_path / "log"
    # With one event per segment the target rolls: its first head pwrite is the ROLLING mark.
    out = run_child(log, "pwrite64:error=EIO:when=2", "head", segment_max_events=1)
    warm, target, again = out["calls"]
    assert warm == {"ok": 0} and target["error"] == "StorageError" and again == {"ok": 1}
    assert stored(log) == ["warm", "again"]
    assert sorted(p.name for p in (log / "segments").glob("*.jsonl")) == [
        f"{0:020d}.jsonl", f"{1:020d}.jsonl"]


SYNCER = r"""
import json, sys, time
from eventpipe import EventLog, DurabilityError
log = EventLog(sys.argv[1], sync="interval", sync_interval=0.02, compression=None)
acked = []
deadline = time.monotonic() + 20
error = None
while time.monotonic() < deadline:
    try:
        acked.append(log.append({"n": len(acked)}))
    except DurabilityError as exc:
        error = exc
        break
    time.sleep(0.001)
out = {"acked": len(acked), "error": type(error).__name__ if error else None,
       "committed": [error.committed.start, error.committed.stop] if error else None}
try:
    log.append({"n": -1})
    out["after"] = "appended"
except DurabilityError:
    out["after"] = "refused"
try:
    log.close()
    out["close"] = "ok"
except DurabilityError:
    out["close"] = "DurabilityError"
print(json.dumps(out))
"""


def test_failed_background_fsync_reaches_the_appender(tmp_path: Path) -> None:
    log = tmp_path / "log"
    EventLog(log).close()
    seg = log / "segments" / f"{0:020d}.jsonl"
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-P", str(seg), "-e", "trace=fdatasync",
         "-e", "inject=fdatasync:error=EIO:when=3", sys.executable, "-c", SYNCER, str(log)],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    # Before the fix the sync thread died silently and appends went on unsynced for 20 s.
    assert out["error"] == "DurabilityError", out
    start, stop = out["committed"]
    assert 0 <= start < stop <= out["acked"]
    assert out["after"] == "refused" and out["close"] == "DurabilityError"
    with EventLog(log) as lg:  # every acknowledged append is there, once
        assert [r.event["n"] for r in lg.read()] == list(range(out["acked"]))


@pytest.mark.parametrize("sync", ["always", "interval"])
@pytest.mark.parametrize("when", range(1, 6))
def test_every_failing_lock_call_is_a_typed_error(tmp_path: Path, sync: str, when: int) -> None:
    """ENOLCK from any of the first flock calls on the writer lock (take or release, at open
    or in an append) is a StorageError, never a bare OSError; and nothing committed is lost.
    (Found by the kill-and-fault soak with every writer under sync="always": the release of
    the writer lock at open raised a bare OSError.)"""
    log = tmp_path / "log"
    out = run_child(log, f"flock:error=ENOLCK:when={when}", "writer.lock", sync=sync)
    for call in out["calls"]:
        assert "ok" in call or call["error"] in ("StorageError", "DurabilityError", "LockTimeout")
    acked = [c["ok"] for c in out["calls"] if "ok" in c]
    names = stored(log)
    for offset in acked:
        assert offset < len(names)


@pytest.mark.parametrize("when", [1, 2, 3])
def test_a_failing_read_of_the_durable_mark_is_a_typed_error(tmp_path: Path, when: int) -> None:
    """EIO reading sync.state (group commit's durable mark): an append that had not
    committed raises nothing untyped, one that had committed raises DurabilityError. (Found
    by the kill-and-fault soak, round 150: the mark read before the commit raised a bare
    OSError.)"""
    log = tmp_path / "log"
    out = run_child(log, f"pread64:error=EIO:when={when}", "sync.state", sync="always")
    for call in out["calls"]:
        assert "ok" in call or call["error"] in ("StorageError", "DurabilityError"), call
    names = stored(log)
    for call in out["calls"]:
        if "ok" in call:
            assert call["ok"] < len(names)
