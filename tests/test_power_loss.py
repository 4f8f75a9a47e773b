"""sync="always" against a simulated power loss: every append that returned is there.

Three writer processes append at once under ``sync="always"`` (group commit: each commits, then
flushes unless a finished flush already covered its append, so a flush covers whatever any
writer committed before it) while strace records their file system calls. At cut points along
the trace, the log folder is rebuilt as the disk could hold it had the power gone there (see
``tests/_powerloss.py``: only writes a finished fsync covered are sure to be there; an adversary
decides about the rest), stamped as written in an earlier boot, and opened: recovery runs, and
every append whose return the writers had announced before the cut must be in the log at the
offsets it returned, with nothing else changed.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from eventpipe import EventLog, verify_log

from ._powerloss import parse, rebuild, record

WRITERS = 3
APPENDS = 30  # per writer, one at a time, then one batch of BATCH
BATCH = 6
WRITER = r"""
import os, sys
from eventpipe import EventLog
k, appends, batch = map(int, sys.argv[2:5])
with EventLog(sys.argv[1], sync="always", segment_max_events=25, compression=None) as log:
    for i in range(appends):
        at = log.append({"w": k, "i": i})
        os.write(2, f"RET {k} {i} {at}\n".encode())
    done = log.append_many([{"w": k, "i": appends + j} for j in range(batch)])
    for j, at in enumerate(done):
        os.write(2, f"RET {k} {appends + j} {at}\n".encode())
"""

_BOOT_AT = 36  # magic 4, head, base, committed, synced (8 each): then the boot id
_COPIES = (0, 512)
_RECORD = 64


def as_if_rebooted(head: Path) -> None:
    """Give each valid header copy another boot id (CRC made good): what a header written
    before the power loss looks like to the writer that opens the log after it."""
    data = bytearray(head.read_bytes())
    for at in _COPIES:
        rec = data[at:at + _RECORD]
        if len(rec) < _RECORD or zlib.crc32(rec[:60]) != int.from_bytes(rec[60:], "little"):
            continue
        rec[_BOOT_AT:_BOOT_AT + 8] = struct.pack("<Q", 0x5EB00757)
        rec[60:] = zlib.crc32(rec[:60]).to_bytes(4, "little")
        data[at:at + _RECORD] = rec
    head.write_bytes(bytes(data))


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed "
                    "(.ci/run installs it)")
def test_every_append_that_returned_survives_a_power_loss_anywhere(tmp_path: Path) -> None:
    log = tmp_path / "log"
    EventLog(log, compression=None).close()  # created before: the trace is the appends
    trace = tmp_path / "trace"
    cmd = ["strace", "-f", "-qq", "-xx", "-s", "1000000", "-o", str(trace), "-e",
           "trace=openat,close,pwrite64,write,ftruncate,fsync,fdatasync,clone,clone3",
           sys.executable, "-c",
           "import subprocess, sys\n"
           "ps = [subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2], str(k),"
           " sys.argv[4], sys.argv[5]]) for k in range(int(sys.argv[3]))]\n"
           "sys.exit(max(p.wait() for p in ps))",
           WRITER, str(log), str(WRITERS), str(APPENDS), str(BATCH)]
    proc = subprocess.run(cmd, capture_output=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    text = trace.read_text()
    rec = record(parse(text), len(text.splitlines()))
    returned: list[tuple[int, int, int, int]] = []  # (announced at, writer, i, offset)
    for entry, data in rec.markers:
        for line in data.decode().splitlines():
            if line.startswith("RET "):
                k, i, at = map(int, line.split()[1:])
                returned.append((entry, k, i, at))
    assert len(returned) == WRITERS * (APPENDS + BATCH)
    with EventLog(log, create=False) as final:
        assert final.head == WRITERS * (APPENDS + BATCH)
    # Reported, not asserted: how many header flushes the three writers made for their appends.
    head_syncs = len(rec.files[f"{log}/head"].syncs)
    first = min(e for e, *_ in returned)
    cuts = sorted({first - 1, rec.end} | {e for e, *_ in returned}
                  | set(range(first, rec.end, max(1, (rec.end - first) // 40))))
    checked = 0
    for n, cut in enumerate(cuts):
        for keep in ("synced", "headers", "coin"):
            out = tmp_path / f"cut{n}-{keep}"
            if not rebuild(rec, log, out, cut, keep, seed=n):
                assert not [r for r in returned if r[0] < cut]
                continue
            as_if_rebooted(out / "head")
            with EventLog(out, create=False, sync="always", compression=None) as after:
                after.append({"probe": True})  # the writer that runs recovery
                events = [r.event for r in after.read()]
            for entry, k, i, at in returned:
                if entry < cut:
                    assert at < len(events) and events[at] == {"w": k, "i": i}, (
                        f"cut at line {cut} ({keep}): append {k}/{i} returned offset {at} "
                        f"but the log holds {events[at] if at < len(events) else 'nothing'}")
            assert events[-1] == {"probe": True}
            assert verify_log(out)[0] == []
            shutil.rmtree(out)
            checked += 1
    assert checked >= 60
    print(f"{len(cuts)} cut points x 3 adversaries = {checked} recoveries checked; "
          f"{len(returned)} appends, {head_syncs} header fdatasyncs")
