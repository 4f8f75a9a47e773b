"""``verify`` on a live log: a writer rolling segments, its compressor renaming plain files to
gzip and unlinking them, retention removing the oldest, a consumer checkpointing. None of that
is damage, and verify must never report it as such."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from eventpipe import EventLog
from eventpipe._verify import verify_log

from .conftest import Children

ROLLING_WRITER = r"""
import sys, time
from eventpipe import EventLog
with EventLog(sys.argv[1], segment_max_bytes=1200, sync="none", compression_level=1,
              retention_max_bytes=15000) as log:
    print("ready", flush=True)
    i = 0
    while True:
        log.append_many([{"i": i + k, "pad": "x" * 40} for k in range(8)])
        i += 8
        time.sleep(0.01)  # a rate the compressor keeps up with: some 40 rolls a second
"""


@pytest.mark.slow  # a 15 s soak
def test_verify_gives_no_false_alarm_while_segments_roll_compress_and_go(
        log_path: Path, children: Children) -> None:
    with EventLog(log_path) as log:
        log.append({"i": -1})
    writer = children.popen([sys.executable, "-c", ROLLING_WRITER, str(log_path)])
    assert writer.stdout is not None and writer.stdout.readline() == b"ready\n"
    consumer = children.worker("consumer", str(log_path), "live", "--every", "20",
                               "--poll", "0.05")
    assert consumer.stdout is not None and consumer.stdout.readline() == b"caught-up\n"
    rounds = 0
    segments = 0
    soak_until = time.monotonic() + 15  # a duration to soak for, not a synchronisation
    while time.monotonic() < soak_until:
        problems, summary = verify_log(log_path)
        assert problems == [], f"round {rounds}: {problems}"
        assert writer.poll() is None and consumer.poll() is None
        rounds += 1
        segments += summary["segments"]
    names = os.listdir(log_path / "segments")
    assert rounds >= 100, f"only {rounds} rounds ran"
    assert segments / rounds > 5
    assert any(n.endswith(".jsonl.gz") for n in names), "nothing was compressed meanwhile"
    with EventLog(log_path) as log:
        assert log.first_offset > 0, "retention removed nothing meanwhile"
