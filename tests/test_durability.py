"""sync="always" in the system calls themselves: what reaches the disk, and in which order.

Its guarantee rests on an order of syscalls that can be watched: under ``sync="always"`` an
append returns only once its segment bytes and a header that commits them were fdatasync'd
(group commit writes the header first and flushes both after the writer lock is released:
recovery after a reboot handles a header that reached the disk before its data), and a new
segment file's directory entry is fsync'd before a header names it. strace records a real
writer process; the test replays the trace against those rules. ``test_power_loss.py`` goes
further: it rebuilds what the disk could hold at any point of such a trace and recovers it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ._powerloss import FileOps, parse, record

WRITER = r"""
import sys
from eventpipe import EventLog
with EventLog(sys.argv[1], sync="always", segment_max_events=3, compression=None) as log:
    for i in range(5):
        log.append({"i": i})
    log.append_many([{"i": i} for i in range(5, 12)])
"""



@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed "
                    "(.ci/run installs it)")
def test_sync_always_returns_after_flushing_data_then_header(tmp_path: Path) -> None:
    log = tmp_path / "log"
    trace = tmp_path / "trace"
    proc = subprocess.run(
        # -f: the flushes run in the writer's threads too; one file keeps their order.
        ["strace", "-f", "-qq", "-xx", "-s", "100000", "-o", str(trace), "-e",
         "trace=openat,close,pwrite64,fdatasync,fsync,ftruncate,clone,clone3",
         sys.executable, "-c", WRITER, str(log)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    text = trace.read_text()
    rec = record(parse(text), len(text.splitlines()))
    head = rec.files[f"{log}/head"]
    segments = {p: ops for p, ops in rec.files.items()
                if p.startswith(f"{log}/segments/") and p.endswith(".jsonl")}
    data = sorted((e, p) for p, ops in segments.items() for e, _, _ in ops.writes)
    folder_syncs = rec.files[f"{log}/segments"].syncs

    def flushed(ops: FileOps, written: int, before: int) -> bool:
        return any(entry > written and done < before for entry, done in ops.syncs)

    commits = sorted(e for e, _, _ in head.writes)
    # Each commit is followed, before the next append writes data (it has returned by then),
    # by a flush of the header and of every segment byte written before it.
    for k, commit in enumerate(commits):
        nxt = next((e for e, _ in data if e > commit), rec.end)
        if k + 1 < len(commits) and commits[k + 1] < nxt:
            continue  # the header rewrite that flags a roll: the same append goes on
        assert flushed(head, commit, nxt), "append returned before its header was flushed"
        for written, path in data:
            if written < commit:
                assert flushed(segments[path], written, nxt), (
                    f"append returned before {path} (written at line {written}) was flushed")
    # A new segment's folder entry is flushed before a header names it.
    for path, ops in segments.items():
        if ops.created >= 0:
            naming = next(e for e in commits if e > ops.created)
            assert any(entry > ops.created and done < naming for entry, done in folder_syncs), (
                f"a header named {path} before its folder entry was flushed")
    # 5 appends and 1 batch: six commits, plus the header rewrites that flag the two rolls
    # (append 3 and the batch) before their new segments are created; each checked above.
    assert len(commits) == 8
