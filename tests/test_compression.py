"""Compression of sealed segments: killed at any moment, it leaves nothing a later pass
does not clean up, and readers never notice."""

from __future__ import annotations

import gzip
import random
import signal
import sys
import time
from pathlib import Path

from eventpipe import EventLog
from eventpipe.compress import TMP_SUFFIX, clean_stale

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
