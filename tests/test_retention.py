"""Automatic retention after each compressor pass goes by ``compress.state`` (its first segment
and the bytes below the watermark) instead of listing and measuring every segment: it must
decide exactly as a listing would, keep its count true, and fall back to a listing when the
disk no longer matches it."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from eventpipe import Consumer, EventLog, HandlerError
from eventpipe._header import HEADER_SIZE, decode_header

STATE_FILE = "compress.state"


def active_base(log: Path) -> int:
    h = decode_header((log / "head").read_bytes()[:HEADER_SIZE])
    assert h is not None
    return h.segment_base


def segments(log: Path) -> list[tuple[int, int]]:
    """(base, bytes on disk) of every segment file, oldest first (one form per base)."""
    out: dict[int, int] = {}
    for name in os.listdir(log / "segments"):
        if name.endswith((".jsonl", ".jsonl.gz")):
            base = int(name[:20])
            if base not in out or name.endswith(".jsonl"):
                out[base] = (log / "segments" / name).stat().st_size
    return sorted(out.items())


def state(log: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((log / STATE_FILE).read_bytes())
    return doc


def assert_state_matches_the_disk(log: Path) -> None:
    doc = state(log)
    sealed = [(b, n) for b, n in segments(log) if b < doc["checksummed_below"]]
    assert doc["first_segment"] == segments(log)[0][0]
    assert doc["sealed_bytes"] == sum(n for _, n in sealed), (doc, sealed)


def roll(log: EventLog, n: int, start: int) -> None:
    """Append ``n`` events that each seal a segment, then finish the sealing work."""
    for i in range(start, start + n):
        log.append({"i": i, "pad": "p" * 100})
    assert log.finish_sealing(60)


def test_by_bytes_keeps_the_total_under_the_limit_and_its_count_true(log_path: Path) -> None:
    limit = 4000
    with EventLog(log_path, segment_max_events=1, sync="none",
                  retention_max_bytes=limit) as log:
        roll(log, 120, 0)
        total = sum(n for _, n in segments(log_path))
        assert total <= limit
        assert total + segments(log_path)[0][1] > limit - 200, "removed more than needed"
        assert segments(log_path)[0][0] > 0
        assert_state_matches_the_disk(log_path)
        assert [r.offset for r in log.read(log.first_offset)] == list(
            range(segments(log_path)[0][0], 120))


def test_a_segment_removed_behind_its_back_makes_it_recount_from_a_listing(
        log_path: Path) -> None:
    with EventLog(log_path, segment_max_events=1, sync="none") as log:
        roll(log, 60, 0)
    for base, _ in segments(log_path)[:10]:  # removed by hand: the state still counts them
        for suffix in (".jsonl.gz", ".jsonl", ".sum"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(log_path / "segments" / f"{base:020d}{suffix}")
    assert state(log_path)["first_segment"] == 0
    total = sum(n for _, n in segments(log_path))
    with EventLog(log_path, segment_max_events=1, sync="none",
                  retention_max_bytes=total - 500) as log:
        roll(log, 1, 60)
        assert sum(n for _, n in segments(log_path)) <= total - 500
        assert_state_matches_the_disk(log_path)
        first = segments(log_path)[0][0]
        assert 10 < first < 30, "removed what the limit asks, counted from the disk"


def test_by_age_goes_by_event_times_not_file_times(
        log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import eventpipe._appender as appender

    an_hour_ago = time.time_ns() - 3600 * 10**9
    monkeypatch.setattr(appender, "_time_ns", lambda: an_hour_ago)
    with EventLog(log_path, segment_max_events=1, sync="none") as log:
        roll(log, 8, 0)
    monkeypatch.undo()  # the true clock from here on
    with EventLog(log_path, segment_max_events=1, sync="none") as log:
        roll(log, 22, 8)
    # File times say the opposite of the events' (a restore, a cp): old for the recent
    # segments, new for the old ones. Retention must not believe them.
    old = time.time() - 7200
    for base, _ in segments(log_path):
        name = log_path / "segments" / f"{base:020d}.jsonl.gz"
        if not name.exists():
            name = log_path / "segments" / f"{base:020d}.jsonl"  # the active one
        if base >= 8:
            os.utime(name, (old, old))
        else:
            os.utime(name)
    with EventLog(log_path, segment_max_events=1, sync="none",
                  retention_max_age=1800) as log:
        roll(log, 1, 30)
        assert segments(log_path)[0][0] == 8
        assert not any(n.startswith(f"{b:020d}") for b in range(8)
                       for n in os.listdir(log_path / "segments"))
        assert_state_matches_the_disk(log_path)


def test_by_age_falls_back_to_file_times_without_event_times(log_path: Path) -> None:
    with EventLog(log_path, segment_max_events=1, sync="none") as log:
        roll(log, 30, 0)
    old = time.time() - 3600
    for base, _ in segments(log_path)[:8]:
        os.utime(log_path / "segments" / f"{base:020d}.jsonl.gz", (old, old))
        (log_path / "segments" / f"{base:020d}.times").unlink()  # as written before times
    with EventLog(log_path, segment_max_events=1, sync="none",
                  retention_max_age=1800) as log:
        roll(log, 1, 30)
        assert segments(log_path)[0][0] == 8
        assert_state_matches_the_disk(log_path)


def test_never_past_a_known_consumer(log_path: Path) -> None:
    with EventLog(log_path, segment_max_events=1, sync="none") as log:
        roll(log, 30, 0)

    def handler(state: int, event: Any, offset: int) -> int:
        if offset == 12:
            raise RuntimeError("stop here")
        return state + 1

    with Consumer(log_path, "slow", handler, 0) as c:
        with contextlib.suppress(HandlerError):
            c.catch_up()
        assert c.offset == 12
    with EventLog(log_path, segment_max_events=1, sync="none", retention_max_bytes=1) as log:
        roll(log, 5, 30)
        assert segments(log_path)[0][0] == 12  # everything before what "slow" needs
        assert_state_matches_the_disk(log_path)
        assert active_base(log_path) == 34


def test_an_explicit_prune_recounts_the_state(log_path: Path) -> None:
    with EventLog(log_path, segment_max_events=1, sync="none") as log:
        roll(log, 40, 0)
        doc = state(log_path)
        doc["sealed_bytes"] += 12345  # wrong, as after a crash between a compression and
        (log_path / STATE_FILE).write_bytes(json.dumps(doc).encode())  # saving the state
        report = log.prune(before=15)
        assert report.removed == list(range(15))
        assert_state_matches_the_disk(log_path)


def test_prune_on_a_terminal_shows_progress_but_not_beside_json(log_path: Path) -> None:
    import subprocess
    import sys

    from ._terminal import stderr_on_a_terminal
    from .test_compressor import env

    with EventLog(log_path, segment_max_events=1, sync="none") as log:
        roll(log, 40, 0)
    cmd = [sys.executable, "-m", "eventpipe", "prune", str(log_path)]
    rc, out, shown = stderr_on_a_terminal([*cmd, "--before", "20"], env())
    assert rc == 0, shown
    assert out.startswith(b"removed 20 segments"), out
    assert b"\r  0/20 segments removed" in shown and b"20/20 segments removed" in shown, shown
    rc, out, shown = stderr_on_a_terminal([*cmd, "--before", "30", "--json"], env())
    assert rc == 0 and json.loads(out)["removed"] == list(range(20, 30)), out
    assert b"segments" not in shown, shown
    piped = subprocess.run([*cmd, "--before", "35"], capture_output=True, env=env(),
                           timeout=120, check=False)
    assert piped.returncode == 0 and piped.stdout.startswith(b"removed 5 segments")
    assert b"segments" not in piped.stderr, piped.stderr
    assert_state_matches_the_disk(log_path)
