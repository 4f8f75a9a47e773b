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

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WRITER = r"""
import sys
from eventpipe import EventLog
with EventLog(sys.argv[1], sync="always", segment_max_events=3, compression=None) as log:
    for i in range(5):
        log.append({"i": i})
    log.append_many([{"i": i} for i in range(5, 12)])
"""

LINE = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+)")


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed "
                    "(.ci/run installs it)")
def test_sync_always_returns_after_flushing_data_then_header(tmp_path: Path) -> None:
    log = tmp_path / "log"
    prefix = tmp_path / "trace"
    proc = subprocess.run(
        # -ff: one file per thread, so the main thread's calls are never split by another's.
        ["strace", "-ff", "-qq", "-e", "trace=openat,pwrite64,fdatasync,fsync",
         "-o", str(prefix), sys.executable, "-c", WRITER, str(log)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    # The main thread's id is the process id, the lowest of the ids its threads get.
    main = min(tmp_path.glob("trace.*"), key=lambda p: int(p.suffix[1:]))
    lines = main.read_text().splitlines()
    paths: dict[int, str] = {}
    unsynced_data: set[str] = set()  # segments written since their last fdatasync
    uncommitted_dirs = False  # segment created, folder not yet fsync'd
    header_unflushed = False
    header_since_data = True  # a header was written since the last segment write
    commits = 0
    for raw in lines:
        m = LINE.match(raw)
        if not m:
            continue
        call, args, result = m.group(1), m.group(2), int(m.group(3))
        fd = int(args.split(",")[0]) if call != "openat" else -1
        if call == "openat" and result >= 0:
            # Files inside the log are opened relative to folder descriptors (see _layout).
            where, name = args.split(",")[0].strip(), args.split('"')[1]
            path = name if where == "AT_FDCWD" or name.startswith("/") else (
                f"{paths.get(int(where), '?')}/{name}")
            paths[result] = path
            if "/segments/" in path and path.endswith(".jsonl") and "O_CREAT" in args:
                uncommitted_dirs = True
            continue
        path = paths.get(fd, "")
        if call == "pwrite64" and path.endswith(".jsonl"):
            if header_since_data:
                # A new append: the previous one has returned, so its data and then its
                # header were flushed (a batch's later parts are written with no header
                # between them).
                assert not header_unflushed, "next append began before the last header was flushed"
                assert not unsynced_data, "next append began before the last one's data was flushed"
                header_since_data = False
            unsynced_data.add(path)
        elif call == "pwrite64" and path == str(log / "head"):
            assert not uncommitted_dirs, "header names a segment whose folder entry is unflushed"
            header_unflushed = True
            header_since_data = True
            commits += 1
        elif call in ("fdatasync", "fsync"):
            unsynced_data.discard(path)
            if path == str(log / "head"):
                # A header flush makes an append durable only if its data was flushed first.
                assert not unsynced_data, f"header flushed before the data it commits: {raw}"
                header_unflushed = False
            if path == str(log / "segments"):
                uncommitted_dirs = False
    assert not header_unflushed and not unsynced_data
    # 5 appends and 1 batch: six commits, plus the header rewrites that flag the two rolls
    # (append 3 and the batch) before their new segments are created; each checked above.
    assert commits == 8
