"""Readers never return a wrong answer: no event under an offset that is not its own.

Segment names are claims: a segment that lost lines, one deleted from the middle, a foreign
file with a segment-like name, bytes changed in a sealed segment or NUL bytes in the active one
must each be a CorruptLogError naming the file and the offsets affected, never other events
under the requested offsets. Also: the cached segment listing under concurrent invalidation
and other processes' retention, a slow reader under retention, and many processes creating
one log at once.
"""

from __future__ import annotations

import gzip
import itertools
import multiprocessing
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from eventpipe import CorruptLogError, EventLog, OffsetOutOfRangeError
from eventpipe._checksum import write_sum
from eventpipe._compress import compress_segment
from eventpipe._segment import list_bases, list_segments

ROOT = Path(__file__).resolve().parent.parent


def ev(i: int) -> dict[str, Any]:
    """An event that carries its own offset, so a reader's answer can be checked."""
    return {"i": i, "pad": "p" * (i % 7)}


def build(log_path: Path, n: int, **options: Any) -> None:
    options.setdefault("compression", None)
    with EventLog(log_path, sync="none", **options) as log:
        log.append_many([ev(i) for i in range(n)])


def seg(log_path: Path, base: int, compressed: bool = False) -> Path:
    return log_path / "segments" / f"{base:020d}.jsonl{'.gz' if compressed else ''}"


def sum_file(log_path: Path, base: int) -> Path:
    return log_path / "segments" / f"{base:020d}.sum"


def add_sums(log_path: Path) -> None:
    """Give every sealed plain segment its checksum file now (the background compressor's
    job, done here so the test does not depend on its timing)."""
    segs = list_segments(str(log_path / "segments"))
    for s, nxt in itertools.pairwise(segs):
        if not s.compressed and not sum_file(log_path, s.base).exists():
            write_sum(str(log_path / "segments"), s.base, nxt.base - s.base, 0o644)


def drop_sums(log_path: Path) -> None:
    for p in (log_path / "segments").glob("*.sum"):
        p.unlink()


def read_checked(log: EventLog, start: int, stop: int | None = None,
                 ) -> tuple[list[int], CorruptLogError | None]:
    """Offsets read from ``start`` until the end or a CorruptLogError; every event read must
    be the one stored under its offset."""
    got: list[int] = []
    try:
        for rec in log.read(start, stop):
            assert rec.event["i"] == rec.offset, f"event {rec.event} returned under {rec.offset}"
            got.append(rec.offset)
    except CorruptLogError as exc:
        return got, exc
    return got, None


def rewrite_content(path: Path, change: Any) -> None:
    """Replace a segment's (uncompressed) content by ``change(content)``, keeping its form."""
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(change(gzip.decompress(path.read_bytes()))))
    else:
        path.write_bytes(change(path.read_bytes()))


# ------------------------------------------------------------------ item 1: extents


@pytest.mark.parametrize("form", ["plain", "plain+sum", "gzip", "gzip+sum"])
def test_lines_lost_at_a_sealed_segments_end_are_named_never_relabelled(
        log_path: Path, form: str) -> None:
    build(log_path, 250, segment_max_events=100)  # 0 and 100 sealed, 200 active
    if form.startswith("gzip"):
        with EventLog(log_path, compression=None) as log:
            log.compress()
    else:
        add_sums(log_path)
    if not form.endswith("+sum"):
        drop_sums(log_path)
    path = seg(log_path, 0, compressed=form.startswith("gzip"))
    rewrite_content(path, lambda data: b"".join(data.splitlines(keepends=True)[:90]))

    with EventLog(log_path) as log:
        for start in (0, 50, 89, 90, 95, 99):
            got, err = read_checked(log, start)
            assert err is not None, f"read({start}) must fail, got {len(got)} events"
            assert err.path == str(path)
            assert err.offset is not None and err.offset <= max(start, 90)
            assert got == list(range(start, min(start + len(got), 90)))
            if form.endswith("+sum"):
                # The checksum file knows the content: what cannot be checked is not returned.
                assert "bytes" in err.message and "missing" in err.message
            else:
                assert "offsets 90..99 are missing" in err.message, err.message
        for start in (100, 150, 249):
            assert read_checked(log, start) == (list(range(start, 250)), None)


@pytest.mark.parametrize("sums", [False, True])
def test_a_segment_deleted_from_the_middle_is_a_gap_not_other_events(
        log_path: Path, sums: bool) -> None:
    build(log_path, 450, segment_max_events=50)  # 0, 50, ..., 350 sealed; 400 active
    if sums:
        add_sums(log_path)
    with EventLog(log_path) as log:
        # Read it whole first: what the reader learnt then (listing, counts) must not hide
        # the gap later.
        assert read_checked(log, 0) == (list(range(450)), None)
        seg(log_path, 350).unlink()
        sum_file(log_path, 350).unlink(missing_ok=True)
        got, err = read_checked(log, 360, 400)
        assert got == [] and err is not None
        assert "segment 300 holds 50 events but the next segment starts at 400" in err.message
        assert "offsets 350..399 are missing" in err.message
        assert err.path == str(seg(log_path, 300))
        got, err = read_checked(log, 0)
        assert err is not None and "350..399" in err.message
        assert got == list(range(len(got))) and len(got) >= 300
        assert read_checked(log, 400) == (list(range(400, 450)), None)
        assert log.first_offset == 0


def test_a_foreign_file_with_a_segment_name_is_an_overlap(log_path: Path) -> None:
    build(log_path, 100, segment_max_events=50)  # 0 sealed, 50 active
    seg(log_path, 20).write_bytes(b"".join(b'{"i":%d}\n' % (1000 + k) for k in range(5)))
    with EventLog(log_path) as log:
        got, err = read_checked(log, 0)
        assert got == [] and err is not None
        assert "segment 0 holds 50 events but the next segment starts at 20" in err.message
        assert err.path == str(seg(log_path, 0))
        got, err = read_checked(log, 22)
        assert got == [] and err is not None
        assert "offsets 25..49 are missing" in err.message
        assert err.path == str(seg(log_path, 20))
        assert read_checked(log, 50) == (list(range(50, 100)), None)


def test_an_active_segment_shorter_than_committed_is_damage_whatever_the_start(
        log_path: Path) -> None:
    build(log_path, 30, segment_max_events=100)
    path = seg(log_path, 0)
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:25]))
    with EventLog(log_path) as log:
        for start in (0, 10, 24, 25, 27, 29):
            got, err = read_checked(log, start)
            assert err is not None, f"read({start}) returned {got}"
            assert "offsets 25..29 are missing" in err.message and err.path == str(path)
            assert got == []  # the extent is checked before anything is returned


def test_a_listing_that_missed_a_segment_is_corrected_not_reported(log_path: Path) -> None:
    # A cached listing can miss a segment (a directory read racing with compression's rename
    # and unlink): the segment before it then looks short. The reader lists again first.
    # Here the listing misses it for real: segment 100 is away while the log lists.
    build(log_path, 300, segment_max_events=100)
    away = log_path / "segment-100-away"
    seg(log_path, 100).rename(away)
    with EventLog(log_path) as log:
        assert log.first_offset == 0  # caches the listing [0, 200]
        away.rename(seg(log_path, 100))
        assert log.segment_index.bases(200) == (0, 200)  # the cache still misses it
        assert read_checked(log, 0) == (list(range(300)), None)
        assert read_checked(log, 150) == (list(range(150, 300)), None)


# ------------------------------------------------------------------ item 2: checksums


def _damage_one_digit(content: bytes, at: int) -> tuple[bytes, int]:
    """Change the first digit of the offset of the first event starting at or after ``at``:
    still valid JSON, another event's number. Returns the content and the changed position."""
    line = content.index(b"\n", at) + 1
    digit = line + len(b'{"i":')
    changed = bytearray(content)
    changed[digit] = ord("1") if changed[digit] != ord("1") else ord("2")
    return bytes(changed), digit


@pytest.mark.parametrize("compressed", [False, True])
def test_a_changed_digit_in_a_sealed_segment_is_refused_from_its_block_on(
        log_path: Path, compressed: bool) -> None:
    with EventLog(log_path, sync="none", compression=None, segment_max_events=3000) as log:
        log.append_many([{"i": i, "pad": "x" * 80} for i in range(7000)])
        if compressed:
            log.compress()
    add_sums(log_path)
    path = seg(log_path, 0, compressed)
    content = gzip.decompress(path.read_bytes()) if compressed else path.read_bytes()
    assert len(content) > 4 * 65536  # five 64 KiB blocks
    damaged, where = _damage_one_digit(content, 2 * 65536 + 1000)
    assert where // 65536 == 2
    rewrite_content(path, lambda _: damaged)
    first_affected = content.count(b"\n", 0, 2 * 65536)  # the line overlapping block 2

    with EventLog(log_path) as log:
        got, err = read_checked(log, 0)
        assert got == list(range(first_affected)), "every event before the bad block"
        assert err is not None and err.offset == first_affected and err.path == str(path)
        assert "bytes 131072..196607" in err.message
        assert read_checked(log, 10, first_affected) == (list(range(10, first_affected)), None)
        got, err = read_checked(log, first_affected + 5)
        assert got == [] and err is not None and err.path == str(path)
        got, err = read_checked(log, 2950)
        if compressed:  # read from its start: the offset of 2950 cannot be counted to
            assert got == [] and err is not None and err.offset == first_affected
        else:  # found from the segment's checked end, past the damage
            assert (got, err) == (list(range(2950, 7000)), None)
        assert read_checked(log, 3000) == (list(range(3000, 7000)), None)

    # The command line refuses it too: exit status 3, nothing of the damaged block printed.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "eventpipe", "read", str(log_path)],
                       capture_output=True, env=env, timeout=120, check=False)
    assert r.returncode == 3, r.stderr
    assert b"CorruptLogError" in r.stderr
    printed = r.stdout.splitlines()
    assert len(printed) == first_affected
    assert printed == content.splitlines()[:first_affected]


def test_nul_bytes_in_the_active_segment_are_never_returned(log_path: Path) -> None:
    build(log_path, 20, segment_max_events=100)
    path = seg(log_path, 0)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[10] = b"\0" * (len(lines[10]) - 1) + b"\n"
    path.write_bytes(b"".join(lines))
    with EventLog(log_path) as log:
        raw: list[bytes] = []
        with pytest.raises(CorruptLogError) as info:
            raw.extend(log.read_raw(0))
        assert len(raw) == 10 and all(b"\0" not in line for line in raw)
        assert info.value.offset == 10 and info.value.path == str(path)
        assert list(log.read_raw(0, 10)) == [line.rstrip(b"\n") for line in lines[:10]]
        assert read_checked(log, 11) == (list(range(11, 20)), None)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "eventpipe", "read", str(log_path)],
                       capture_output=True, env=env, timeout=120, check=False)
    assert r.returncode == 3 and b"\0" not in r.stdout
    assert r.stdout.splitlines() == [line.rstrip(b"\n") for line in lines[:10]]


# ----------------------------------------------------------- item 7: the segment index


def test_a_listing_that_raced_with_an_invalidation_is_not_kept(
        log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build(log_path, 450, segment_max_events=100)  # 0..300 sealed, 400 active
    with EventLog(log_path) as log:
        assert log.first_offset == 0
        log.segment_index.invalidate()  # the next reader lists
        listed, go = threading.Event(), threading.Event()
        once = threading.Lock()
        real = list_bases

        def slow_listing(folder: Any) -> Any:
            found = real(folder)
            if once.acquire(blocking=False):  # only the reader's listing is held back
                listed.set()
                assert go.wait(60)
            return found

        for name in ("eventpipe._log", "eventpipe._segindex"):
            module = sys.modules.get(name)
            if module is not None and hasattr(module, "list_bases"):
                monkeypatch.setattr(module, "list_bases", slow_listing)
        seen: list[int] = []
        reader = threading.Thread(target=lambda: seen.append(log.first_offset))
        reader.start()
        try:
            assert listed.wait(60)
            # Retention removes 0, 100 and 200 while the reader's listing is in flight, and
            # invalidates the index; the reader's listing predates it.
            assert log.prune(before=300).removed == [0, 100, 200]
        finally:
            go.set()
            reader.join(60)
        assert seen and seen[0] in (0, 300)  # concurrent with the prune: either is right
        assert log.first_offset == 300
        assert log.segment_index.locate(50, 400) is None  # the stale listing was not stored
        with pytest.raises(OffsetOutOfRangeError):
            list(log.read(50))


def test_first_offset_notices_another_process_pruned(log_path: Path) -> None:
    build(log_path, 450, segment_max_events=100)
    with EventLog(log_path) as log:
        assert log.first_offset == 0  # cached listing: 0, 100, 200, 300, 400
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        code = ("import sys; from eventpipe import EventLog\n"
                "with EventLog(sys.argv[1]) as log:\n"
                "    assert log.prune(before=300).removed == [0, 100, 200]\n")
        subprocess.run([sys.executable, "-c", code, str(log_path)], env=env, check=True,
                       timeout=120)
        assert log.first_offset == 300
        assert read_checked(log, 300) == (list(range(300, 450)), None)


def test_committed_header_and_segment_index_are_public(log_path: Path) -> None:
    build(log_path, 250, segment_max_events=100)
    with EventLog(log_path) as log:
        h = log.committed_header()
        assert (h.head, h.segment_base) == (250, 200)
        assert log.segment_index.locate(150, h.segment_base) == (100, 200)
        assert log.segment_index.first_base(h.segment_base) == 0
        generation = log.segment_index.generation
        log.segment_index.invalidate()
        assert log.segment_index.generation == generation + 1


# --------------------------------------------------------- item 9: slow reader, creation


def test_a_slow_reader_whose_active_segment_was_pruned_gets_out_of_range(
        log_path: Path) -> None:
    build(log_path, 15, segment_max_events=10)  # 0 sealed, 10 active (head 15)
    with EventLog(log_path) as reader:
        records = reader.read(0)
        assert [next(records).offset for _ in range(10)] == list(range(10))
        # The reader's header says segment 10 is active. While it is slow, writers roll past
        # it and retention removes it.
        with EventLog(log_path, compression=None, segment_max_events=10) as writer:
            writer.append_many([ev(i) for i in range(15, 45)])
            assert writer.prune(before=40).removed == [0, 10, 20, 30]
        with pytest.raises(OffsetOutOfRangeError):
            next(records)


def test_an_active_segment_missing_per_a_fresh_header_is_still_damage(log_path: Path) -> None:
    build(log_path, 15, segment_max_events=10)
    seg(log_path, 10).unlink()
    with EventLog(log_path) as log:
        for start in (0, 12):
            with pytest.raises(CorruptLogError, match="active segment"):
                list(log.read(start))


def _open_at_the_signal(path: str, barrier: Any, out: str) -> None:
    barrier.wait()
    try:
        with EventLog(path) as log:
            log_id = log.log_id
    except BaseException as exc:
        with open(out, "w") as f:
            f.write(f"error {exc!r}")
        os._exit(1)
    with open(out, "w") as f:
        f.write(log_id)
    os._exit(0)


def test_many_processes_creating_one_log_at_once_all_succeed(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")  # cheap starts, so all 40 race in earnest
    procs = 40
    for round_ in range(10):
        path = tmp_path / f"log{round_}"
        outs = tmp_path / f"out{round_}"
        outs.mkdir()
        barrier = ctx.Barrier(procs)
        workers = [ctx.Process(target=_open_at_the_signal,
                               args=(str(path), barrier, str(outs / str(k))))
                   for k in range(procs)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        results = [(outs / str(k)).read_text() for k in range(procs)]
        failed = [r for r in results if r.startswith("error")]
        assert not failed, f"round {round_}: {len(failed)} of {procs} failed: {failed[:3]}"
        assert [w.exitcode for w in workers] == [0] * procs
        assert len(set(results)) == 1
        with EventLog(path, create=False) as log:
            assert log.log_id == results[0] and log.head == 0


def test_reads_are_unchanged_on_a_healthy_log_in_every_form(log_path: Path) -> None:
    # Every start and a few ranges over segments in every form: plain with and without a
    # checksum file, gzip with and without one, and the active segment.
    build(log_path, 470, segment_max_events=100)  # 0..300 sealed, 400 active
    add_sums(log_path)
    folder = str(log_path / "segments")
    for base in (200, 300):
        compress_segment(folder, base, level=6, file_mode=0o644)
    sum_file(log_path, 100).unlink()
    sum_file(log_path, 300).unlink()
    with EventLog(log_path) as log:
        for start in range(0, 470, 7):
            assert read_checked(log, start) == (list(range(start, 470)), None)
        for start, stop in ((0, 1), (99, 101), (150, 250), (299, 300), (398, 400), (450, 470)):
            assert read_checked(log, start, stop) == (list(range(start, stop)), None)
