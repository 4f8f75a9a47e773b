"""Append times: every record's time, offsets by time, and their crash safety (``_timeindex``).

The "fake clock" is eventpipe's own clock function (``eventpipe._appender._time_ns``) replaced in
the process under test: nothing of the file system or the lock is faked.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import eventpipe._appender as appender
from eventpipe import EventLog, verify_log

from ._main import Cli
from .conftest import ROOT, Children

MS = 1_000_000
T0 = 1_800_000_000 * 1_000_000_000  # 2027-01-15, well clear of "now"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class FakeClock:
    def __init__(self, start: int) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock(T0)
    monkeypatch.setattr(appender, "_time_ns", fake)
    yield fake


def times(log: EventLog, start: int = 0) -> list[int | None]:
    return [r.time for r in log.read(start)]


def rises(values: list[int | None]) -> bool:
    known = [v for v in values if v is not None]
    return all(a <= b for a, b in itertools.pairwise(known))


def test_every_record_read_followed_or_consumed_has_its_append_time(log_path: Path) -> None:
    before = time.time_ns()
    with EventLog(log_path, segment_max_events=7) as log:
        log.append({"i": 0})
        log.append_many([{"i": i} for i in range(1, 20)])
        after = time.time_ns()
        recs = list(log.read())
        assert all(r.time is not None and before <= r.time <= after for r in recs)
        assert rises([r.time for r in recs])
        fifth = recs[5].time
        assert fifth is not None
        assert recs[5].datetime == datetime.fromtimestamp(fifth / 1e9, tz=UTC)
        assert [log.time_of(r.offset) for r in recs] == [r.time for r in recs]
        follower = log.follow(0, poll_interval=0.05)
        followed = []
        for rec in follower:
            followed.append(rec)
            if len(followed) == 20:
                follower.stop()
        assert [r.time for r in followed] == [r.time for r in recs]


def test_batches_get_their_commit_time_and_fast_ones_share_a_millisecond(
        log_path: Path, clock: FakeClock) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"i": 0}, {"i": 1}])
        clock.now += MS // 2  # within the grain: shares the last entry's time
        log.append({"i": 2})
        clock.now += MS
        log.append({"i": 3})
        clock.now += 7 * MS
        log.append_many([{"i": 4}, {"i": 5}])
        assert times(log) == [T0, T0, T0, T0 + MS + MS // 2, T0 + 8 * MS + MS // 2,
                              T0 + 8 * MS + MS // 2]


def test_a_clock_stepped_back_gives_equal_times_never_earlier(
        log_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    with EventLog(log_path, segment_max_events=3) as log:
        log.append({"i": 0})
        clock.now += 5 * MS
        log.append({"i": 1})
        clock.now = T0 - 3600 * 10**9  # an hour back
        log.append({"i": 2})
        log.append_many([{"i": i} for i in range(3, 8)])  # and across a segment roll
        clock.now = T0 + 10 * MS
        log.append({"i": 8})
        assert times(log) == [T0] + [T0 + 5 * MS] * 7 + [T0 + 10 * MS]
        assert log.clock_steps_back == 2
        assert caplog.text.count("the clock reads 3600.005 s earlier") == 1
    assert verify_log(log_path)[0] == []


def test_the_floor_carries_across_writer_processes(log_path: Path, clock: FakeClock) -> None:
    # This process appends "in the future"; another process with the true clock appends next:
    # its events get this process's last time, not its own earlier one.
    with EventLog(log_path) as log:
        log.append({"i": 0})
    script = ("import sys; from eventpipe import EventLog\n"
              "with EventLog(sys.argv[1]) as log:\n"
              "    log.append({'i': 1}); print(log.clock_steps_back)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script, str(log_path)], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert time.time_ns() < T0 and out.strip() == "1"  # it saw its clock behind the log's
    with EventLog(log_path) as log:
        assert times(log) == [T0, T0]


WRITER = """
import sys
from eventpipe import EventLog
path, wid, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with EventLog(path, segment_max_events=50, sync="none") as log:
    i = 0
    while i < n:
        if i % 3:
            log.append({"w": wid, "seq": i}); i += 1
        else:
            log.append_many([{"w": wid, "seq": i + k} for k in range(4)]); i += 4
"""


def test_times_rise_by_offset_across_concurrent_writer_processes(
        log_path: Path, children: Children) -> None:
    with EventLog(log_path):
        pass
    procs = [children.popen([sys.executable, "-c", WRITER, str(log_path), str(w), "400"])
             for w in range(4)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    with EventLog(log_path) as log:
        recs = list(log.read())
    assert len(recs) == 4 * 400 and all(r.time is not None for r in recs)
    assert rises([r.time for r in recs])
    for w in range(4):
        assert [r.event["seq"] for r in recs if r.event["w"] == str(w)] == list(range(400))
    assert verify_log(log_path)[0] == []


@pytest.mark.parametrize("compression", ["gzip", None])
def test_offset_at_is_exact_at_batch_boundaries(
        log_path: Path, clock: FakeClock, compression: str | None) -> None:
    rng = random.Random(7)
    starts: list[int] = []
    stamps: list[int] = []
    with EventLog(log_path, segment_max_events=40, compression=compression) as log:
        for k in range(60):
            clock.now = T0 + k * 2 * MS
            starts.append(log.head)
            stamps.append(clock.now)
            log.append_many([{"k": k, "j": j} for j in range(rng.randint(1, 9))])
        head = log.head
        assert log.compress() >= 0
        for k, (start, t) in enumerate(zip(starts, stamps, strict=True)):
            following = starts[k + 1] if k + 1 < len(starts) else head
            assert log.offset_at(t) == start
            assert log.offset_at(t - 1) == start
            assert log.offset_at(t + 1) == following
            assert [r.event["k"] for r in log.read(since=t, until=t + 1)] == \
                [k] * (following - start)
        assert log.offset_at(0) == 0 and log.offset_at(stamps[-1] + 1) == head
        when = datetime.fromtimestamp(stamps[30] / 1e9, tz=UTC)
        assert log.offset_at(when) == starts[30]
        assert log.offset_at(stamps[30] / 1e9) in (starts[30], starts[31])  # float: ~1 µs
        assert [r.offset for r in log.read(since=stamps[10], until=stamps[20])] == \
            list(range(starts[10], starts[20]))
        assert [r.offset for r in log.read(5, 30, since=stamps[2])] == \
            list(range(max(5, starts[2]), 30))
    if compression:
        assert any(n.endswith(".jsonl.gz") for n in os.listdir(log_path / "segments"))


def test_a_log_written_before_times_reads_with_unknown_times(
        log_path: Path, clock: FakeClock) -> None:
    with EventLog(log_path, segment_max_events=4, compression=None) as log:
        log.append_many([{"i": i} for i in range(10)])
    # Make it what the previous version wrote: no time indexes, an EPH2 header, format 2.
    for name in os.listdir(log_path / "segments"):
        if name.endswith(".times"):
            os.unlink(log_path / "segments" / name)
    raw = (log_path / "head").read_bytes()
    fields = struct.unpack("<4sQQQQQIIQI", raw[:64])
    body = struct.pack("<4sQQQQQI", b"EPH2", *fields[1:7])
    record = body + zlib.crc32(body).to_bytes(4, "little")
    (log_path / "head").write_bytes(record + bytes(512 - len(record)) + record)
    meta = (log_path / "eventpipe.json").read_text().replace('"version": 3', '"version": 2')
    (log_path / "eventpipe.json").write_text(meta)
    with EventLog(log_path) as log:
        assert times(log) == [None] * 10 and log.time_of(9) is None
        assert log.offset_at(0) == 10  # unknown times count as older than any time
        clock.now += MS
        log.append({"i": 10})  # into the old active segment (8..): its index starts at 10
        log.append_many([{"i": i} for i in range(11, 14)])
        assert times(log) == [None] * 10 + [T0 + MS] * 4
        assert log.offset_at(T0) == 10 and log.offset_at(T0 + MS + 1) == 14
    assert verify_log(log_path)[0] == []


def test_verify_finds_a_damaged_time_index_and_readers_keep_reading(
        log_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    with EventLog(log_path, segment_max_events=10, compression=None) as log:
        for k in range(25):
            clock.now += 2 * MS
            log.append({"k": k})
    index = log_path / "segments" / f"{10:020d}.times"
    raw = bytearray(index.read_bytes())
    assert len(raw) == 10 * 16
    raw[4 * 16 + 6] ^= 0x40  # a flipped bit in entry 4's time
    index.write_bytes(bytes(raw))
    problems, _ = verify_log(log_path)
    assert [(p.path, p.offset) for p in problems] == [(str(index), 13)]
    assert "time index is damaged at entry 4" in problems[0].problem
    with EventLog(log_path) as log:
        got = times(log)
    assert [r for r in got[:14]] == [T0 + 2 * MS * (k + 1) for k in range(14)]
    assert got[14:20] == [T0 + 2 * MS * 14] * 6  # the last valid time, never a wrong one
    assert "time index damaged" in caplog.text


def test_an_index_entry_a_killed_writer_left_past_the_count_is_never_believed(
        log_path: Path, clock: FakeClock) -> None:
    with EventLog(log_path) as log:
        log.append({"i": 0})
    index = log_path / "segments" / f"{0:020d}.times"
    # What a writer killed between the entry and the header leaves: an entry the header does
    # not count, claiming offset 1 at a later time.
    rel_and_time = struct.pack("<IQ", 1, T0 + 50 * MS)
    with open(index, "ab") as f:
        f.write(rel_and_time + zlib.crc32(rel_and_time).to_bytes(4, "little"))
    with EventLog(log_path) as log:
        assert log.time_of(0) == T0
        clock.now += MS // 4  # within the grain: event 1 shares entry 0's time
        log.append({"i": 1})
        assert times(log) == [T0, T0]
    assert index.stat().st_size == 16
    assert verify_log(log_path)[0] == []


def test_entries_lost_from_the_active_index_are_cut_and_later_times_still_rise(
        log_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    with EventLog(log_path) as log:
        for k in range(6):
            clock.now += 2 * MS
            log.append({"k": k})
    index = log_path / "segments" / f"{0:020d}.times"
    os.truncate(index, 3 * 16)  # what a power loss can do to entries not yet on disk
    assert verify_log(log_path)[0] != []
    with EventLog(log_path) as log:
        clock.now += 2 * MS
        log.append({"k": 6})
        got = times(log)
    assert got == [T0 + 2 * MS, T0 + 4 * MS] + [T0 + 6 * MS] * 4 + [T0 + 14 * MS]
    assert "time index holds 3 valid entries of the 6 committed" in caplog.text
    assert verify_log(log_path)[0] == []


KILLED_WRITER = """
import sys
from eventpipe import EventLog
print("ready", flush=True)
with EventLog(sys.argv[1], segment_max_bytes=600, sync="none", compression=None) as log:
    i = 0
    while True:
        if i % 2:
            log.append({"i": i, "pad": "x" * (i % 40)})
        else:
            log.append_many([{"i": i, "j": j} for j in range(i % 5 + 1)])
        i += 1
"""


@pytest.mark.parametrize("rounds", [pytest.param(12, id="12"),
                                    pytest.param(150, id="150", marks=pytest.mark.slow)])
def test_times_stay_whole_and_rising_across_kill_9(
        log_path: Path, children: Children, rounds: int) -> None:
    rng = random.Random(rounds)
    with EventLog(log_path):
        pass
    for _ in range(rounds):
        proc = children.popen([sys.executable, "-c", KILLED_WRITER, str(log_path)])
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.08))  # a random moment to kill at, not a synchronisation
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with EventLog(log_path, segment_max_bytes=600) as log:
            log.append({"after": True})
    with EventLog(log_path) as log:
        got = times(log)
        known = [t for t in got if t is not None]
        assert len(known) == len(got) and rises(got)
        # offset_at agrees with the times read, at every distinct time.
        for t in sorted(set(known))[:: max(1, len(set(known)) // 40)]:
            assert log.offset_at(t) == got.index(t)
    assert verify_log(log_path)[0] == []


def test_relative_and_iso_times_parse(log_path: Path) -> None:
    from eventpipe._timeindex import to_ns

    when = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    assert to_ns(when) == int(when.timestamp()) * 10**9
    assert to_ns(when + timedelta(microseconds=3)) == to_ns(when) + 3000
    with pytest.raises(TypeError):
        to_ns(True)


def iso(time_ns: int) -> str:
    return datetime.fromtimestamp(time_ns // 10**9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S") \
        + f".{time_ns // 1000 % 10**6:06d}+00:00"


def stamped_log(path: Path, clock: FakeClock, *, compression: str | None,
                start: int = T0) -> list[int]:
    """30 events, one every 10 ms of the fake clock from ``start``, over several segments;
    their times."""
    stamps = []
    with EventLog(path, segment_max_events=8, compression=compression) as log:
        for k in range(30):
            clock.now = start + k * 10 * MS
            stamps.append(clock.now)
            log.append({"k": k})
        if compression:
            log.compress()
    return stamps


@pytest.mark.parametrize("compression", ["gzip", None])
def test_cli_read_since_and_until(log_path: Path, clock: FakeClock, cli: Cli,
                                  compression: str | None) -> None:
    stamps = stamped_log(log_path, clock, compression=compression)
    assert any(n.endswith(".gz") for n in os.listdir(log_path / "segments")) == bool(compression)
    r = cli("read", log_path, "--since", iso(stamps[5]), "--until", iso(stamps[12]))
    assert (r.code, [json.loads(x)["k"] for x in r.out.splitlines()]) == (0, list(range(5, 12)))
    r = cli("read", log_path, "--since", iso(stamps[5] + 1000), "--from", "3", "--to", "9")
    assert (r.code, [json.loads(x)["k"] for x in r.out.splitlines()]) == (0, [6, 7, 8])
    r = cli("read", log_path, "--since", f"@{stamps[27] / 1e9:.6f}", "--with-times")
    got = [json.loads(x) for x in r.out.splitlines()]
    assert r.code == 0 and [g["offset"] for g in got] == [27, 28, 29]
    assert [g["time"] for g in got] == [iso(t).replace("+00:00", "Z") for t in stamps[27:]]
    assert [g["event"] for g in got] == [{"k": 27}, {"k": 28}, {"k": 29}]
    r = cli("read", log_path, "--until", iso(stamps[0]))
    assert (r.code, r.out) == (0, "")
    local = datetime.fromtimestamp(stamps[20] / 1e9).strftime("%Y-%m-%dT%H:%M:%S.%f")
    r = cli("read", log_path, "--since", local)  # no zone: local time
    assert (r.code, len(r.out.splitlines())) == (0, 10)
    r = cli("read", log_path, "--since", "yesterday-ish")
    assert r.code == 2 and "--since" in r.err and "ISO 8601" in r.err
    r = cli("read", log_path, "--until", "now", "--follow")
    assert r.code == 2 and "--follow" in r.err


def test_relative_times_count_back_from_now(log_path: Path, cli: Cli) -> None:
    with EventLog(log_path) as log:
        log.append({"old": True})
    for ago in ("--since=-15m", "--since=15m", "--since=1d ago"):
        r = cli("read", log_path, ago)
        assert (r.code, r.out) == (0, '{"old":true}\n'), ago
    r = cli("read", log_path, "--until=-15m")
    assert (r.code, r.out) == (0, "")
    r = cli("read", log_path, "--since=now")
    assert (r.code, r.out) == (0, "")


def test_a_consumer_gets_times_lag_seconds_and_can_start_at_a_time(
        log_path: Path, clock: FakeClock) -> None:
    from eventpipe import Consumer

    an_hour_ago = time.time_ns() - 3600 * 10**9
    stamps = stamped_log(log_path, clock, compression="gzip", start=an_hour_ago)
    seen: dict[int, int | None] = {}  # (a retry replays events 4..6 from the checkpoint)
    failed: set[int] = set()

    def handler(state: int, event: dict[str, int], offset: int, t: int | None) -> int:
        if offset == 7 and offset not in failed:  # fails once: the retry gets the time too
            failed.add(offset)
            raise RuntimeError("once")
        seen[offset] = t
        return state + 1

    start = EPOCH + timedelta(microseconds=stamps[4] // 1000)  # at or just before event 4
    with Consumer(log_path, "timed", handler, 0, pass_time=True, start=start,
                  on_error="retry", retry_backoff=0.001) as c:
        assert c.lag == 26 and c.lag_seconds is not None
        assert c.lag_seconds == pytest.approx(3600, abs=60)
        assert c.catch_up() == 26
        assert c.lag_seconds == 0.0
    assert seen == {k: stamps[k] for k in range(4, 30)} and failed == {7}
    # A time from the environment, as a unit's env file gives it: ISO 8601 text.
    os.environ["EVENTPIPE_START"] = iso(stamps[25] - 1)
    try:
        with Consumer(log_path, "from-env", lambda s, e, o: [*s, o], []) as c:
            assert c.catch_up() == [25, 26, 27, 28, 29]
    finally:
        del os.environ["EVENTPIPE_START"]


def test_lag_in_seconds_in_status_consumers_and_metrics(
        log_path: Path, clock: FakeClock, cli: Cli) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    from eventpipe import Consumer

    an_hour_ago = time.time_ns() - 3600 * 10**9
    stamped_log(log_path, clock, compression=None, start=an_hour_ago)
    # "behind" stops at event 9 (its handler fails there): its next event is an hour old.
    with Consumer(log_path, "behind", lambda s, e, o: s + 1 if o < 9 else 1 / 0, 0,
                  checkpoint_every=1) as c, pytest.raises(Exception, match="division"):
        c.catch_up()
    with Consumer(log_path, "current", lambda s, e, o: s + 1, 0) as c:
        c.catch_up()
    report = cli("status", log_path, "--json").json()
    lags = {c["name"]: c["lag_seconds"] for c in report["consumers"]}
    assert lags["current"] == 0.0
    assert lags["behind"] == pytest.approx(3600, abs=60)  # event 9, appended an hour ago
    listed = cli("consumers", log_path, "--json").json()["consumers"]
    assert {c["name"]: c["lag_seconds"] for c in listed} == pytest.approx(lags, abs=5)
    text = cli("consumers", log_path).out
    assert "BEHIND" in text and "0.0s" in text
    assert "(0.0s)" in cli("status", log_path).out
    metrics = cli("status", log_path, "--format", "prometheus").out
    got = {s.labels["consumer"]: s.value
           for family in text_string_to_metric_families(metrics)  # type: ignore[no-untyped-call]
           for s in family.samples if s.name == "eventpipe_consumer_lag_seconds"}
    assert got["current"] == 0.0 and got["behind"] == pytest.approx(3600, abs=60)


def test_consumer_reset_to_a_time(log_path: Path, clock: FakeClock, cli: Cli) -> None:
    from eventpipe import Consumer

    stamps = stamped_log(log_path, clock, compression="gzip")
    with Consumer(log_path, "c", lambda s, e, o: s + 1, 0) as c:
        c.catch_up()
    r = cli("consumer", "reset", log_path, "c", "--to-time", iso(stamps[12] - 1000),
            "--state", "12", "--dry-run")
    assert r.code == 0 and "-> offset 12" in r.out
    r = cli("consumer", "reset", log_path, "c", "--to-time", iso(stamps[12] - 1000),
            "--state", "12")
    assert r.code == 0, r.err
    with Consumer(log_path, "c", lambda s, e, o: s + 1, 0) as c:
        assert c.offset == 12 and c.catch_up() == 30
    r = cli("consumer", "reset", log_path, "c", "--to-time", "not a time", "--keep-state")
    assert r.code == 2 and "--to-time" in r.err


def test_cli_consume_starts_at_a_time_and_passes_times(
        log_path: Path, clock: FakeClock, tmp_path: Path) -> None:
    stamps = stamped_log(log_path, clock, compression=None)
    handler = tmp_path / "timed_handler.py"
    handler.write_text("def handle(state, event, offset, t):\n"
                       "    return state + [[offset, t]]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "eventpipe", "consume", str(log_path), "--name", "t",
         "--handler", f"{handler}:handle", "--initial-state", "[]", "--catch-up",
         "--print-state", "--pass-time", f"--start={iso(stamps[26] - 1000)}"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [[k, stamps[k]] for k in range(26, 30)]


def test_append_lines_with_given_times_keeps_them_exactly(log_path: Path) -> None:
    # What a mirror does: batches carrying another log's times, some within a millisecond.
    with EventLog(log_path, segment_max_events=3) as log:
        log.append_lines(b'{"i":0}\n{"i":1}\n', 2, time_ns=T0)
        log.append_lines(b'{"i":2}\n', 1, time_ns=T0 + 10)  # 10 ns later: its own entry
        log.append_lines(b'{"i":3}\n{"i":4}\n{"i":5}\n', 3, time_ns=T0 + 20)  # and a roll
        log.append_lines(b'{"i":6}\n', 1, time_ns=T0 + 20)
        log.append_lines(b'{"i":7}\n', 1, time_ns=T0 - 5)  # earlier than stored: raised
        assert times(log) == [T0, T0, T0 + 10] + [T0 + 20] * 5
        assert log.offset_at(T0 + 1) == 2 and log.offset_at(T0 + 11) == 3
        assert log.clock_steps_back == 1
    assert verify_log(log_path)[0] == []
