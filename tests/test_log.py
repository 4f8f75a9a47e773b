"""EventLog behaviour in one process: reading, rolling, recovery, options, files."""

from __future__ import annotations

import fcntl
import gzip
import os
import stat
import struct
import time
from pathlib import Path

import pytest

from eventpipe import (
    ConfigError,
    CorruptLogError,
    EventLog,
    LockTimeout,
    LogClosedError,
    OffsetOutOfRangeError,
    Record,
    UnserializableEventError,
)


def events(n: int, start: int = 0) -> list[dict[str, object]]:
    return [{"ts": 1_700_000_000 + i, "name": f"event{i}"} for i in range(start, start + n)]


def segment_names(log_path: Path) -> list[str]:
    """Segment files (not their checksum sidecars), sorted."""
    return sorted(p.name for p in (log_path / "segments").iterdir() if ".jsonl" in p.name)


def header(log_path: Path) -> tuple[int, int, int]:
    raw = (log_path / "head").read_bytes()
    magic, head, base, committed = struct.unpack("<4sQQQ", raw[:28])
    assert magic == b"EPH3" and raw[:64] == raw[512:576]  # two identical copies
    return head, base, committed


def test_append_and_read_back(log_path: Path) -> None:
    with EventLog(log_path) as log:
        assert log.head == 0
        assert list(log.read()) == []
        assert log.append({"a": 1}) == 0
        assert log.append_many(events(3)) == range(1, 4)
        assert log.head == 4
        recs = list(log.read())
        assert recs[0] == Record((0, {"a": 1})) and recs[0].time is not None
        assert recs[0].offset == 0 and recs[0].event == {"a": 1}
        assert [r.event for r in recs[1:]] == events(3)
        assert list(log.read_raw(1, 2)) == [b'{"ts":1700000000,"name":"event0"}']
        assert repr(recs[0]) == f"Record(offset=0, event={{'a': 1}}, time={recs[0].time})"


def test_reads_from_any_offset_across_rolled_and_compressed_segments(log_path: Path) -> None:
    with EventLog(log_path, segment_max_bytes=500, compression=None) as log:
        log.append_many(events(300))
        plain = segment_names(log_path)
        assert len(plain) > 10
        for start, stop in [(0, 300), (17, 18), (150, 290), (299, None), (0, 1), (300, None)]:
            want = events(300)[start:stop]
            assert [r.event for r in log.read(start, stop)] == want
            offsets = [r.offset for r in log.read(start, stop)]
            assert offsets == list(range(start, start + len(want)))
        assert log.compress() == len(plain) - 1  # every segment but the active one
        names = segment_names(log_path)
        assert all(n.endswith(".jsonl.gz") for n in names[:-1]) and names[-1].endswith(".jsonl")
        for start in (0, 1, 33, 151, 299):
            assert [r.event for r in log.read(start)] == events(300)[start:]
    # gzip segments are ordinary gzip files holding the same JSON lines.
    first = gzip.decompress((log_path / "segments" / names[0]).read_bytes()).splitlines()
    assert first[0] == b'{"ts":1700000000,"name":"event0"}'


def test_segment_event_limit_and_batches_split_across_segments(log_path: Path) -> None:
    with EventLog(log_path, segment_max_events=10, compression=None) as log:
        assert log.append_many(events(35)) == range(35)
        log.append({"x": 1})
        bases = [int(name.split(".")[0]) for name in segment_names(log_path)]
        assert bases == [0, 10, 20, 30]
        assert [r.event for r in log.read(8, 12)] == events(35)[8:12]
    assert header(log_path) == (36, 30, header(log_path)[2])


def test_out_of_range_reads(log_path: Path) -> None:
    with EventLog(log_path) as log:
        log.append_many(events(5))
        with pytest.raises(OffsetOutOfRangeError) as exc:
            list(log.read(6))
        assert exc.value.offset == 6 and isinstance(exc.value, IndexError)
        with pytest.raises(OffsetOutOfRangeError):
            list(log.read(-1))
        assert list(log.read(5)) == []
        assert list(log.read(3, 2)) == []


def test_reader_keeps_reading_while_its_segments_are_compressed(log_path: Path) -> None:
    with EventLog(log_path, segment_max_bytes=300, compression=None) as log:
        log.append_many(events(200))
        it = log.read()
        got = [next(it).event for _ in range(5)]
        assert log.compress() > 0  # unlinks the plain files the reader is reading
        got.extend(r.event for r in it)
        assert got == events(200)


def test_torn_tail_is_invisible_then_quarantined_by_next_writer(log_path: Path) -> None:
    with EventLog(log_path) as log:
        log.append_many(events(3))
    seg = log_path / "segments" / "00000000000000000000.jsonl"
    good = seg.read_bytes()
    with seg.open("ab") as f:  # what a writer killed mid-write leaves behind
        f.write(b'{"ts":17000000')
    with EventLog(log_path) as reader:
        assert [r.event for r in reader.read()] == events(3)
        assert reader.append({"after": True}) == 3
        assert [r.event for r in reader.read()] == [*events(3), {"after": True}]
    assert seg.read_bytes().startswith(good)
    [q] = list((log_path / "quarantine").iterdir())
    assert q.read_bytes() == b'{"ts":17000000'


def test_trailing_nul_bytes_are_cut_like_a_torn_tail(log_path: Path) -> None:
    with EventLog(log_path) as log:
        log.append_many(events(2))
    seg = log_path / "segments" / "00000000000000000000.jsonl"
    with seg.open("ab") as f:
        f.write(b"\0" * 4096)
    with EventLog(log_path) as log:
        assert log.append({"n": 2}) == 2
        assert [r.offset for r in log.read()] == [0, 1, 2]
    assert b"\0" not in seg.read_bytes()
    [q] = list((log_path / "quarantine").iterdir())
    assert q.read_bytes() == b"\0" * 4096


def as_after_reboot(log_path: Path, synced: int) -> None:
    """Make the header look as a power loss leaves it: written by another boot, with ``synced``
    bytes of the active segment fsynced."""
    from eventpipe._header import decode_header, encode_header

    h = decode_header((log_path / "head").read_bytes())
    assert h is not None
    (log_path / "head").write_bytes(encode_header(h._replace(boot=12345, synced=synced)))


def test_power_loss_with_header_ahead_of_data_recovers_to_last_whole_event(
    log_path: Path,
) -> None:
    with EventLog(log_path, sync="none") as log:
        log.append_many(events(10))
    seg = log_path / "segments" / "00000000000000000000.jsonl"
    data = seg.read_bytes()
    lines = data.splitlines(keepends=True)
    # The header reached the disk, the last two events' bytes did not (NULs, then nothing).
    seg.write_bytes(b"".join(lines[:8]) + b"\0" * 10)
    as_after_reboot(log_path, synced=len(b"".join(lines[:5])))
    with EventLog(log_path) as log:
        with pytest.raises(CorruptLogError):
            list(log.read())  # readers report it; only a writer, under the lock, repairs
        assert log.append({"n": "new"}) == 8  # these offsets never reached any reader's disk
        assert [r.event for r in log.read()] == [*events(8), {"n": "new"}]


def test_invalid_header_is_rebuilt_from_the_last_segment(log_path: Path) -> None:
    with EventLog(log_path, segment_max_events=4, compression=None) as log:
        log.append_many(events(10))
    (log_path / "head").write_bytes(b"\xff" * 32)
    with EventLog(log_path) as log:
        with pytest.raises(CorruptLogError) as exc:
            _ = log.head
        assert exc.value.path == str(log_path / "head")
        assert log.append({"n": 10}) == 10
        assert [r.offset for r in log.read()] == list(range(11))


def test_options_layer_defaults_env_and_keywords(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVENTPIPE_SEGMENT_MAX_EVENTS", "5")
    monkeypatch.setenv("EVENTPIPE_COMPRESSION", "none")
    monkeypatch.setenv("EVENTPIPE_FILE_MODE", "660")
    with EventLog(log_path) as log:
        assert log.config.segment_max_events == 5
        assert log.config.compression is None
        assert log.config.file_mode == 0o660
        assert log.config.sync == "interval"
    with EventLog(log_path, segment_max_events=7) as log:
        assert log.config.segment_max_events == 7
    monkeypatch.setenv("EVENTPIPE_SYNC", "sometimes")
    with pytest.raises(ConfigError) as exc:
        EventLog(log_path)
    assert exc.value.option == "sync" and "EVENTPIPE_SYNC" in str(exc.value)
    with pytest.raises(ConfigError, match="unknown option 'segment_size'"):
        EventLog(log_path, segment_size=3)


def test_file_and_folder_modes_ignore_the_umask(log_path: Path) -> None:
    old = os.umask(0o077)
    try:
        with EventLog(log_path, file_mode=0o660, segment_max_events=1) as log:
            log.append_many(events(3))
            log.compress()
    finally:
        os.umask(old)
    for p in [log_path, log_path / "segments"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o770, p
    for p in [log_path / "head", log_path / "eventpipe.json", log_path / "writer.lock",
              log_path / "compress.lock", *(log_path / "segments").iterdir()]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o660, p


def test_lock_timeout_when_another_holder_keeps_the_writer_lock(log_path: Path) -> None:
    with EventLog(log_path, lock_timeout=0.2) as log:
        log.append({"n": 0})
        fd = os.open(log_path / "writer.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: a real contender
            with pytest.raises(LockTimeout) as exc:
                log.append({"n": 1})
            assert isinstance(exc.value, TimeoutError)
        finally:
            os.close(fd)
        assert log.append({"n": 1}) == 1


def test_forked_children_do_not_share_the_parents_lock(log_path: Path) -> None:
    log = EventLog(log_path, sync="none", compression=None, segment_max_bytes=2048)
    log.append({"who": "parent", "i": -1})  # writer state (and lock fd) exists before fork
    pids = []
    for k in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                for i in range(400):
                    log.append({"who": k, "i": i})
                log.close()
            except BaseException:
                code = 1
            os._exit(code)
        pids.append(pid)
    for i in range(400):
        log.append({"who": "parent", "i": i})
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    recs = list(log.read())
    log.close()
    assert [r.offset for r in recs] == list(range(1201))
    for who in ("parent", 0, 1):
        mine = [r.event["i"] for r in recs if r.event["who"] == who]
        assert mine == sorted(mine) and len(set(mine)) == len(mine)


def test_closed_log_refuses_use(log_path: Path) -> None:
    log = EventLog(log_path)
    log.close()
    log.close()
    with pytest.raises(LogClosedError):
        log.append({})
    with pytest.raises(LogClosedError):
        list(log.read())


def test_second_opener_sees_appends_at_once(log_path: Path) -> None:
    with EventLog(log_path) as writer, EventLog(log_path) as reader:
        for i in range(50):
            writer.append({"i": i})
            assert reader.head == i + 1
            assert next(reader.read(i)).event == {"i": i}


def test_setgid_of_a_shared_parent_folder_is_kept(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2770)  # a group-shared folder: new files take its group
    with EventLog(shared / "log", file_mode=0o660) as log:
        log.append({"n": 1})
    for p in [shared / "log", shared / "log" / "segments"]:
        assert p.stat().st_mode & 0o7777 == 0o2770, (p, oct(p.stat().st_mode))


def test_append_many_refuses_a_single_string_or_dict(log_path: Path) -> None:
    with EventLog(log_path) as log:
        for not_a_batch in ("abc", b"abc", {"a": 1}):
            with pytest.raises(TypeError, match="iterable of events"):
                log.append_many(not_a_batch)
        assert log.head == 0


def test_keyword_overrides_even_an_unparsable_environment_value(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVENTPIPE_SEGMENT_MAX_BYTES", "lots")
    with EventLog(log_path, segment_max_bytes=4096) as log:
        assert log.config.segment_max_bytes == 4096
    with pytest.raises(ConfigError, match="EVENTPIPE_SEGMENT_MAX_BYTES"):
        EventLog(log_path)


def test_reading_a_once_active_segment_after_it_was_sealed_and_compressed(
    log_path: Path,
) -> None:
    # A reader's header said "segment 0 is active, head 3"; before it opened the file, writers
    # filled the segment, sealed it and compressed it. It must read its 3 events, no more,
    # and not mistake the later events for corruption.
    from eventpipe._segment import read_chunks

    with EventLog(log_path, segment_max_events=10, compression=None) as log:
        log.append_many(events(15))
        assert log.compress() == 1
        committed_then = len(b"".join(
            (line + b"\n") for line in log.read_raw(0, 3)))
    chunks = list(read_chunks(str(log_path / "segments"), 0, start=0, stop=3,
                              byte_limit=committed_then, end_offset=3))
    assert [line for c in chunks for line in c.lines] == [
        b'{"ts":%d,"name":"event%d"}' % (1_700_000_000 + i, i) for i in range(3)]


def test_retention_option_prunes_in_the_background_but_never_past_a_consumer(
    log_path: Path,
) -> None:
    from eventpipe import Consumer

    with EventLog(log_path, segment_max_events=100, compression=None) as log:
        log.append_many(events(300))
        with Consumer(log, "slow", lambda s, e, o: s + 1, 0) as consumer:
            consumer.catch_up()  # a known consumer at offset 300
    with EventLog(log_path, segment_max_events=100, compression=None,
                  retention_max_bytes=1) as log:
        log.append_many(events(250, start=300))  # seals segments: the sealer prunes after
        # Wait on what is on disk (a fresh listing each time), not on a value the background
        # thread updates.
        deadline = time.monotonic() + 30
        while segment_names(log_path)[0] < f"{300:020d}":
            assert time.monotonic() < deadline, segment_names(log_path)
            time.sleep(0.001)
    # Closed: no background work is running any more, so what the disk holds is final.
    # Segments from 300 on hold events the consumer has not handled: all kept.
    assert segment_names(log_path) == [f"{base:020d}.jsonl" for base in (300, 400, 500)]
    with EventLog(log_path) as log:
        assert log.first_offset == 300
        assert [r.offset for r in log.read(300)] == list(range(300, 550))
        with pytest.raises(OffsetOutOfRangeError):
            list(log.read(0))


def test_a_missing_active_segment_is_reported_as_damage(log_path: Path) -> None:
    with EventLog(log_path, segment_max_events=10, compression=None) as log:
        log.append_many(events(25))
    (log_path / "segments" / f"{20:020d}.jsonl").unlink()
    with EventLog(log_path) as log:
        for start in (0, 21):  # before it and in it: the damage is named either way
            with pytest.raises(CorruptLogError, match="active segment"):
                list(log.read(start))


def test_append_lines_checks_framing_and_sizes(log_path: Path) -> None:
    with EventLog(log_path, max_event_bytes=20) as log:
        assert log.append_lines(b'{"a":1}\n{"a":2}\n', 2) == range(0, 2)
        for lines, count in [(b'{"a":1}\n', 2), (b'{"a":1}', 1), (b'{"a":1}\n{"b":2}', 2)]:
            with pytest.raises(UnserializableEventError, match="newline-terminated"):
                log.append_lines(lines, count)
        with pytest.raises(ValueError, match="max_event_bytes"):
            log.append_lines(b'{"a":1}\n{"big":"' + b"x" * 30 + b'"}\n', 2)
        assert [r.event for r in log.read()] == [{"a": 1}, {"a": 2}]


def test_later_writers_create_files_with_the_mode_the_log_was_created_with(
        log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A group-shared log made with 0o660, appended to by a process with the default (0o640):
    # its new segments must stay writable by the group (a service failed with
    # StoragePermissionError on a segment an administrator's append had created).
    monkeypatch.delenv("EVENTPIPE_FILE_MODE", raising=False)
    with EventLog(log_path, file_mode=0o660, segment_max_events=2) as log:
        log.append_many(events(3))
    with EventLog(log_path, segment_max_events=2) as log:  # nothing said about modes
        log.append_many(events(4))
        log.compress()  # checksums and gzip copies are created too
    seg = log_path / "segments"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in seg.iterdir()}
    assert len(modes) > 4 and set(modes.values()) == {0o660}, modes
    with EventLog(log_path, file_mode=0o600, segment_max_events=2) as log:  # told otherwise
        first = log.append_many(events(2)).start
    newest = max(seg.glob("*.jsonl"), key=lambda p: int(p.name.split(".")[0]))
    assert int(newest.name.split(".")[0]) >= first
    assert stat.S_IMODE(newest.stat().st_mode) == 0o600
