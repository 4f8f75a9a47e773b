"""The segment catalog (``segments.idx``, ``_catalog``): time lookups that bisect one file.

Every test checks ``offset_at`` against a model (the times the test gave each batch), on fresh
readers, with the catalog right, missing, torn, behind, lying, and after retention.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import pytest

from eventpipe import EventLog, verify_log
from eventpipe._catalog import RECORD_SIZE, append_record, encode, parse
from eventpipe._layout import Folder

SEC = 1_000_000_000
T0 = 1_800_000_000 * SEC
PER_SEGMENT = 40


def build(path: Path, batches: int = 60, size: int = 7) -> list[int]:
    """A log of ``batches`` batches of ``size`` events, batch k appended at T0 + k s, over
    segments of PER_SEGMENT events, all sealed and recorded; returns each offset's time."""
    times: list[int] = []
    with EventLog(path, segment_max_events=PER_SEGMENT, compression=None) as log:
        for k in range(batches):
            lines = b"".join(b'{"k":%d,"i":%d}\n' % (k, i) for i in range(size))
            log.append_lines(lines, size, time_ns=T0 + k * SEC)
            times.extend([T0 + k * SEC] * size)
        log.compress()
    return times


def expected(times: list[int], t: int) -> int:
    return bisect.bisect_left(times, t)


def probes(times: list[int]) -> list[int]:
    """Times before, at, between and after the batches' times."""
    distinct = sorted(set(times))
    return ([distinct[0] - SEC] + distinct + [t + SEC // 2 for t in distinct]
            + [distinct[-1] + 10 * SEC])


def check_lookups(path: Path, times: list[int], first_stored: int = 0) -> None:
    for t in probes(times):
        with EventLog(path, create=False) as log:  # a fresh reader for each: caches empty
            assert log.offset_at(t) == max(expected(times, t), first_stored), t


def catalog(path: Path) -> tuple[int, list[tuple[int, int, int]]]:
    parsed = parse((path / "segments.idx").read_bytes())
    assert parsed is not None
    return parsed


def test_sealing_records_every_sealed_segment_and_lookups_match_the_model(
        log_path: Path) -> None:
    times = build(log_path)
    from_base, records = catalog(log_path)
    with EventLog(log_path, create=False) as log:
        active = log.committed_header().segment_base
    assert from_base == 0
    assert [r[0] for r in records] == list(range(0, active, PER_SEGMENT))
    assert all(end == base + PER_SEGMENT for base, end, _ in records)
    assert [r[2] for r in records] == [times[base] for base, _, _ in records]
    check_lookups(log_path, times)
    problems, summary = verify_log(log_path)
    assert problems == [] and summary["warnings"] == []


def test_a_catalog_that_says_otherwise_is_believed_and_verify_reports_it(
        log_path: Path) -> None:
    """It is used (a lie changes the answer) and verify catches a lie its CRCs cannot."""
    times = build(log_path)
    from_base, records = catalog(log_path)
    # Every first time made a minute earlier: a lookup now bisects past the segment that
    # holds the answer, into later segments that do hold later times (a lie the other way
    # is caught on the way: the segment it points at has no such time, so the reader lists).
    lying = [(b, e, t - 60 * SEC) for b, e, t in records]
    (log_path / "segments.idx").write_bytes(encode(from_base, lying))
    t = records[5][2]
    with EventLog(log_path, create=False) as log:
        assert log.offset_at(t) != expected(times, t)
    problems, _ = verify_log(log_path)
    assert problems and {p.kind for p in problems} == {"catalog"}
    assert "first time" in problems[0].problem
    with EventLog(log_path, create=False) as log:
        log.compress()  # an explicit pass rebuilds it from the segments
    check_lookups(log_path, times)
    assert verify_log(log_path)[0] == []


@pytest.mark.parametrize("damage", ["missing", "torn", "flipped", "foreign", "behind"])
def test_lookups_stay_right_whatever_happened_to_the_catalog(log_path: Path,
                                                             damage: str) -> None:
    times = build(log_path)
    idx = log_path / "segments.idx"
    data = idx.read_bytes()
    if damage == "missing":
        idx.unlink()
    elif damage == "torn":
        idx.write_bytes(data[:-5])
    elif damage == "flipped":
        idx.write_bytes(data[:40] + bytes([data[40] ^ 1]) + data[41:])
    elif damage == "foreign":
        idx.write_bytes(b"not a catalog\n" * 10)
    else:  # its last record dropped: it ends before the active segment
        idx.write_bytes(data[:-RECORD_SIZE])
    check_lookups(log_path, times)
    if damage in ("torn", "flipped", "foreign"):
        warnings = verify_log(log_path)[1]["warnings"]
        assert [w.kind for w in warnings] == ["catalog"]
    # The next sealing pass puts it right (a rebuild from the listing).
    with EventLog(log_path, create=False, segment_max_events=PER_SEGMENT,
                  compression=None) as log:
        lines = b"".join(b'{"late":%d}\n' % i for i in range(PER_SEGMENT))
        log.append_lines(lines, PER_SEGMENT, time_ns=T0 + 1000 * SEC)
        times.extend([T0 + 1000 * SEC] * PER_SEGMENT)
        log.compress()
        active = log.committed_header().segment_base
    from_base, records = catalog(log_path)
    assert from_base == 0 and records[-1][1] == active
    assert [r[0] for r in records] == list(range(0, active, PER_SEGMENT))
    check_lookups(log_path, times)
    assert verify_log(log_path)[0] == []


def test_lookups_after_retention_removed_the_oldest_segments(log_path: Path) -> None:
    times = build(log_path)
    with EventLog(log_path, create=False) as log:
        report = log.prune(before=5 * PER_SEGMENT + 3)
        first = log.first_offset
    assert first == 5 * PER_SEGMENT, report
    # Records of removed segments stay until there are many: lookups still answer within
    # what is stored (a time before it gives the first stored offset).
    assert catalog(log_path)[1][0][0] == 0
    check_lookups(log_path, times, first_stored=first)
    assert verify_log(log_path)[0] == []


def test_many_records_of_removed_segments_are_compacted(tmp_path: Path) -> None:
    root = Folder.open(tmp_path)
    try:
        records = [(b * 10, b * 10 + 10, T0 + b) for b in range(1100)]
        (tmp_path / "segments.idx").write_bytes(encode(0, records))
        # Segment 1100 sealed, with segments below 10,500 removed: 1050 stale records.
        append_record(root, 11_000, 11_010, T0 + 1100, 0o640, first_stored=10_500,
                      listing=lambda: [*records, (11_000, 11_010, T0 + 1100)])
        from_base, kept = catalog(tmp_path)
        assert from_base == 10_500
        assert kept[0] == (10_500, 10_510, T0 + 1050) and kept[-1][0] == 11_000
        assert len(kept) == 51
        # Below the threshold, a record is only appended.
        append_record(root, 11_010, 11_020, T0 + 1101, 0o640, first_stored=10_600,
                      listing=lambda: [])
        assert len(catalog(tmp_path)[1]) == 52
    finally:
        root.close()


def test_a_record_of_zeros_does_not_pass_its_check(tmp_path: Path) -> None:
    """A hole (a file extended but never written) must not read as a record (0, 0, 0)."""
    assert parse(encode(0, []) + bytes(RECORD_SIZE)) is None
    assert parse(encode(0, [(0, 0, 0)])) == (0, [(0, 0, 0)])
