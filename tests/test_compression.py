"""Compression of sealed segments: killed at any moment, it leaves nothing a later pass
does not clean up, and readers never notice."""

from __future__ import annotations

import gzip
import json
import random
import signal
import sys
import time
from pathlib import Path

from eventpipe import EventLog
from eventpipe._checksum import TMP_SUFFIX
from eventpipe._compress import clean_stale

from .conftest import Children

COMPRESS_FOREVER = r"""
import sys
from eventpipe import EventLog
with EventLog(sys.argv[1], compression=None) as log:
    print("ready", flush=True)
    log.compress()
    print("done", flush=True)
"""


def names(log_path: Path) -> list[str]:
    return sorted(p.name for p in (log_path / "segments").iterdir())


def test_compressor_killed_at_random_moments(log_path: Path, children: Children) -> None:
    rng = random.Random(7)
    events = [{"i": i, "pad": "x" * rng.randint(0, 200)} for i in range(20000)]
    with EventLog(log_path, segment_max_bytes=64 * 1024, compression=None) as log:
        log.append_many(events)
    sealed = len([n for n in names(log_path) if n.endswith(".jsonl")]) - 1
    assert sealed > 30
    interrupted = 0
    for _ in range(12):
        proc = children.popen([sys.executable, "-c", COMPRESS_FOREVER, str(log_path)])
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.05))  # a random moment to kill at, not a synchronisation
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        interrupted += proc.stdout.read() != b"done\n"
        # Whatever the kill left, readers read every event, in order, exactly once.
        with EventLog(log_path) as reader:
            assert [r.event["i"] for r in reader.read()] == list(range(20000))
    with EventLog(log_path, compression=None) as log:
        log.compress()
        final = names(log_path)
        assert not [n for n in final if n.endswith(TMP_SUFFIX)]
        bases = [n.split(".")[0] for n in final if ".jsonl" in n]
        assert len(bases) == len(set(bases)), "a segment left in both forms"
        assert sum(n.endswith(".jsonl.gz") for n in final) == sealed
        assert [r.event for r in log.read()] == events
    assert interrupted, "no kill landed before the pass finished: the test proved nothing"


def test_stale_leftovers_of_a_crashed_pass_are_removed(log_path: Path) -> None:
    with EventLog(log_path, segment_max_events=10, compression=None) as log:
        log.append_many([{"i": i} for i in range(35)])
        log.compress()
    seg = log_path / "segments"
    first = seg / f"{0:020d}.jsonl.gz"
    # A crash after the verified gzip copy was renamed in, before the original was unlinked:
    (seg / f"{0:020d}.jsonl").write_bytes(gzip.decompress(first.read_bytes()))
    # A crash in the middle of writing a copy:
    (seg / f"{10:020d}.jsonl.gz{TMP_SUFFIX}").write_bytes(b"\x1f\x8b partial")
    with EventLog(log_path) as log:
        assert [r.event["i"] for r in log.read()] == list(range(35))
    clean_stale(str(seg))
    left = names(log_path)
    assert f"{0:020d}.jsonl" not in left and not any(n.endswith(TMP_SUFFIX) for n in left)
    with EventLog(log_path) as log:
        assert [r.event["i"] for r in log.read()] == list(range(35))


SEAL_THEN_KILLED = r"""
import sys
from eventpipe import EventLog
log = EventLog(sys.argv[1], segment_max_events=7, sync="none", retention_max_bytes=60000)
start = int(sys.argv[2])
log.append_many([{"i": i, "pad": "y" * 150} for i in range(start, start + 300)])
print("ready", flush=True)
log.finish_sealing(60)  # killed somewhere in here (or in the background pass before)
print("done", flush=True)
"""


def test_background_passes_killed_at_random_moments_keep_the_watermark_true(
        log_path: Path, children: Children) -> None:
    """Writers whose compressor walks on from the watermark and prunes, each killed at a random
    moment: the next pass still seals everything, and compress.state matches the disk."""
    rng = random.Random(11)
    with EventLog(log_path, sync="none") as log:
        log.append({"i": -1, "pad": ""})
    interrupted = 0
    for k in range(10):
        proc = children.popen([sys.executable, "-c", SEAL_THEN_KILLED, str(log_path),
                               str(k * 300)])
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.15))  # a random moment to kill at, not a synchronisation
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        interrupted += proc.stdout.read() != b"done\n"
    with EventLog(log_path, segment_max_events=7, sync="none",
                  retention_max_bytes=60000) as log:
        log.append({"i": 3000, "pad": ""})
        assert log.finish_sealing(120)
        first = log.first_offset
        recs = list(log.read(first))
        assert [r.offset for r in recs] == list(range(first, 3002))
        assert all(r.event["i"] == r.offset - 1 for r in recs)
    final = names(log_path)
    assert not [n for n in final if ".tmp" in n]
    bases = [n.split(".")[0] for n in final if ".jsonl" in n]
    assert len(bases) == len(set(bases)), "a segment left in both forms"
    active_name = max(m for m in final if ".jsonl" in m)
    assert all(n.endswith(".jsonl.gz") for n in final if ".jsonl" in n and n != active_name)
    doc = json.loads((log_path / "compress.state").read_bytes())
    active = max(int(b) for b in bases)
    assert doc["checksummed_below"] == doc["compressed_below"] == active
    sealed = [n for n in final if n.endswith(".jsonl.gz")]
    assert doc["first_segment"] == int(min(bases))
    assert doc["sealed_bytes"] == sum((log_path / "segments" / n).stat().st_size
                                      for n in sealed)
    assert sum((log_path / "segments" / n).stat().st_size for n in final
               if ".jsonl" in n) <= 60000
    assert interrupted, "no kill landed before the pass finished: the test proved nothing"
