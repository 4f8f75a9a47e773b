"""EventLog against a plain in-memory list: a hypothesis state machine and slice properties.

Everything runs on real files in a fresh temporary directory per example. Segment limits are
small so that single appends, batches and buffered batches roll segments all the time; some
runs compress sealed segments in the background (``compression="gzip"``), all runs may call
``log.compress()`` explicitly and close and reopen the log, also with other limits.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from eventpipe import EventLog, OffsetOutOfRangeError
from eventpipe._checksum import SUM_SUFFIX, read_sum, sum_blocks
from eventpipe._header import decode_header
from eventpipe._segment import list_segments, parse_name
from eventpipe._timeindex import parse_entries, parse_times_name, times_name

from .conftest import Children

Json = Any

# orjson encodes integers from -2**63 up to 2**64 - 1 and refuses anything wider; NaN and the
# infinities it silently turns into null, so they cannot round-trip and are left out.
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1

scalars = (
    st.none()
    | st.booleans()
    | st.integers(INT_MIN, INT_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values: st.SearchStrategy[Json] = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _bulk(n: int, tag: str) -> list[Json]:
    """A large-ish batch, built rather than drawn so that hypothesis stays fast."""
    return [{"n": i, "tag": tag, "pad": "x" * (i % 7)} for i in range(n)]


def _huge(n: int) -> list[Json]:
    """More events than one encoding slice (1000) holds, each tiny to keep segments few."""
    return list(range(n))


def _big(size: int) -> list[Json]:
    """Events bigger than any segment limit drawn here, between small ones."""
    return [{"small": 1}, {"big": "B" * size}, {"small": 2}, {"big": "b" * (size // 2)}]


batches: st.SearchStrategy[list[Json]] = st.one_of(
    st.just([]),
    st.lists(json_values, min_size=1, max_size=12),
    st.builds(_bulk, st.integers(20, 100), st.text(max_size=6)),
    st.builds(_big, st.integers(150, 5000)),
)
# Batches of more than a thousand events are encoded and planned in several slices.
huge_batches = st.builds(_huge, st.integers(995, 1100))

limits_st: st.SearchStrategy[dict[str, Any]] = st.one_of(
    st.fixed_dictionaries({"segment_max_bytes": st.integers(200, 2000)}),
    st.fixed_dictionaries({"segment_max_events": st.integers(1, 20)}),
    st.fixed_dictionaries(
        {"segment_max_bytes": st.integers(200, 2000), "segment_max_events": st.integers(1, 20)}
    ),
)


def encode(event: Json) -> bytes:
    return orjson.dumps(event)


@contextmanager
def temp_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="eventpipe-model-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def check_layout(path: str, head: int, limits: dict[str, Any] | None) -> None:
    """Check the files of a closed log: contiguous segments, whole lines, nothing stray, and
    every checksum sidecar (``<base>.sum``, written for sealed segments) true to its segment.

    With ``limits`` (every event was written under these limits) also check that no segment
    exceeds them, except a segment holding a single event larger than a segment.
    """
    seg_dir = os.path.join(path, "segments")
    names = sorted(os.listdir(seg_dir))
    sums = {n for n in names if n.endswith(SUM_SUFFIX) and n[: -len(SUM_SUFFIX)].isdigit()}
    times = {n for n in names if parse_times_name(n) is not None}
    parsed = [parse_name(n) for n in names if n not in sums | times]
    stray = [n for n in names if n not in sums | times and parse_name(n) is None]
    assert not stray, f"stray files in segments/: {stray}"
    bases = {p[0] for p in parsed if p is not None}
    assert len(bases) == len(parsed), f"a segment is stored both plain and compressed: {names}"
    assert not os.path.exists(os.path.join(path, "quarantine")), "nothing should be quarantined"
    with open(os.path.join(path, "head"), "rb") as f:
        h = decode_header(f.read())
    assert h is not None
    assert h.head == head
    segs = list_segments(seg_dir)
    assert segs[0].base == 0
    assert segs[-1].base == h.segment_base
    assert not segs[-1].compressed
    sealed = {s.base for s in segs[:-1]}
    # Every sealed segment has its time index (all were written by this version), and only
    # segments have one (the active one from its first append).
    indexed = {parse_times_name(n) for n in times}
    assert sealed <= indexed <= {s.base for s in segs}, f"times: {times}"
    assert {int(n[: -len(SUM_SUFFIX)]) for n in sums} <= sealed, f"stray checksums: {sums}"
    for k, seg in enumerate(segs):
        with open(seg.path, "rb") as f:
            data = f.read()
        if seg.compressed:
            data = gzip.decompress(data)
        last = k == len(segs) - 1
        end = h.head if last else segs[k + 1].base
        if last:
            assert len(data) == h.committed, "active segment has bytes past the commit point"
        else:
            assert end > seg.base, f"sealed segment {seg.base} is empty"
        assert data.count(b"\n") == end - seg.base, f"segment {seg.base} holds wrong count"
        assert not data or data.endswith(b"\n")
        if seg.base in indexed:
            with open(os.path.join(seg_dir, times_name(seg.base)), "rb") as f:
                entries = parse_entries(f.read(), limit=end - seg.base,
                                        claimed=h.tcount if last else None)
            assert entries.damaged_at is None, f"time index of {seg.base} is damaged"
            assert entries.rels[:1] == ([0] if end > seg.base else []), f"times of {seg.base}"
        checksum = read_sum(seg_dir, seg.base)
        if checksum is not None:
            assert (checksum.events, checksum.size) == (end - seg.base, len(data))
            assert checksum.block_crcs == sum_blocks([data])[2]
        if limits is not None:
            events = end - seg.base
            max_events = limits.get("segment_max_events")
            max_bytes = limits.get("segment_max_bytes")
            if max_events is not None:
                assert events <= max_events, f"segment {seg.base}: {events} events"
            if max_bytes is not None and events > 1:
                assert len(data) <= max_bytes, f"segment {seg.base}: {len(data)} bytes"


class LogMachine(RuleBasedStateMachine):
    """Two instances on one path: the main one, and another "process view" that mostly
    reads and sometimes writes. Both must agree with the model after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="eventpipe-model-")
        self.path = os.path.join(self.tmp, "log")
        self.model: list[Json] = []  # decoded events, as they must read back
        self.raw: list[bytes] = []  # encoded events, as read_raw must return them
        self.limits: dict[str, Any] = {}
        self.limits_changed = False
        self.compression: str | None = None
        self.log: EventLog | None = None
        self.view: EventLog | None = None

    # ---------------------------------------------------------------------------- helpers

    def _open(self) -> None:
        self.log = EventLog(self.path, sync="none", compression=self.compression, **self.limits)
        # Another "process view" of the same log: mostly reads, sometimes writes too.
        self.view = EventLog(self.path, sync="none", compression=None, **self.limits)

    def _close(self) -> None:
        for log in (self.log, self.view):
            if log is not None:
                log.close()
        self.log = self.view = None

    def _writer_log(self) -> EventLog:
        assert self.log is not None
        return self.log

    def _record(self, events: list[Json]) -> None:
        for e in events:
            raw = encode(e)
            self.raw.append(raw)
            self.model.append(orjson.loads(raw))

    def _check_slice(self, log: EventLog, start: int, stop: int | None) -> None:
        want = self.model[start:stop]
        recs = list(log.read(start, stop))
        assert [r.offset for r in recs] == list(range(start, start + len(want)))
        assert [r.event for r in recs] == want
        assert list(log.read_raw(start, stop)) == self.raw[start:stop]

    # ------------------------------------------------------------------------------ rules

    @initialize(limits=limits_st, compression=st.sampled_from(["gzip", None]))
    def open_log(self, limits: dict[str, Any], compression: str | None) -> None:
        note(f"limits={limits} compression={compression}")
        self.limits = limits
        self.compression = compression
        self._open()

    @rule(event=json_values)
    def append(self, event: Json) -> None:
        offset = self._writer_log().append(event)
        assert offset == len(self.model)
        self._record([event])

    @rule(batch=batches)
    def append_many(self, batch: list[Json]) -> None:
        offsets = self._writer_log().append_many(batch)
        assert offsets == range(len(self.model), len(self.model) + len(batch))
        self._record(batch)

    # Every sealed segment costs a few fsyncs (checksum, compression): keep their number sane.
    @precondition(lambda self: (self.limits.get("segment_max_events") or 20) >= 15)
    @rule(batch=huge_batches)
    def append_huge_batch(self, batch: list[Json]) -> None:
        self.append_many(batch)

    @rule(event=st.builds(lambda n: {"big": "B" * n}, st.integers(150, 5000)))
    def append_big_event(self, event: Json) -> None:
        self.append(event)

    @rule(batch=batches)
    def append_via_other_instance(self, batch: list[Json]) -> None:
        assert self.view is not None
        if len(batch) == 1:
            assert self.view.append(batch[0]) == len(self.model)
        else:
            offsets = self.view.append_many(batch)
            assert offsets == range(len(self.model), len(self.model) + len(batch))
        self._record(batch)

    @rule(
        items=st.lists(st.tuples(json_values, st.booleans()), max_size=25),
        max_events=st.integers(1, 8),
    )
    def buffered(self, items: list[tuple[Json, bool]], max_events: int) -> None:
        log = self._writer_log()
        start = len(self.model)
        committed = start  # offsets handed out so far
        with log.writer(max_events=max_events, linger=None) as w:
            for k, (event, flush_after) in enumerate(items):
                w.append(event)
                buffered_so_far = start + k + 1
                if w.pending == 0:  # filled up: committed as one batch at once
                    assert w.last_flushed == range(committed, buffered_so_far)
                    committed = buffered_so_far
                assert log.head == committed, "buffered events must not be visible yet"
                if flush_after:
                    got = w.flush()
                    assert got == range(committed, buffered_so_far) or (
                        got == range(0) and committed == buffered_so_far
                    )
                    committed = buffered_so_far
            tail = w.close()
        assert tail == range(committed, start + len(items)) or (
            tail == range(0) and committed == start + len(items)
        )
        self._record([e for e, _ in items])

    @rule()
    def compress(self) -> None:
        log = self._writer_log()
        log.compress()
        seg_dir = os.path.join(self.path, "segments")
        with open(os.path.join(self.path, "head"), "rb") as f:
            h = decode_header(f.read())
        assert h is not None
        plain = [s.base for s in list_segments(seg_dir)
                 if not s.compressed and s.base < h.segment_base]
        assert not plain, f"sealed segments left uncompressed after compress(): {plain}"

    @rule(new_limits=st.none() | limits_st)
    def reopen(self, new_limits: dict[str, Any] | None) -> None:
        self._close()
        check_layout(self.path, len(self.model), None if self.limits_changed else self.limits)
        if new_limits is not None and new_limits != self.limits:
            self.limits = new_limits
            self.limits_changed = True
        self._open()

    @rule(data=st.data())
    def read_slice(self, data: st.DataObject) -> None:
        n = len(self.model)
        start = data.draw(st.integers(0, n), label="start")
        stop = data.draw(st.none() | st.integers(0, n + 3), label="stop")
        self._check_slice(self._writer_log(), start, stop)

    @rule(data=st.data())
    def read_slice_other_instance(self, data: st.DataObject) -> None:
        assert self.view is not None
        n = len(self.model)
        start = data.draw(st.integers(0, n), label="start")
        stop = data.draw(st.none() | st.integers(0, n + 3), label="stop")
        self._check_slice(self.view, start, stop)

    @precondition(lambda self: len(self.model) > 0)
    @rule(data=st.data())
    def read_tail(self, data: st.DataObject) -> None:
        # Starts near the end of the active segment are found by scanning backwards.
        n = len(self.model)
        start = data.draw(st.integers(max(0, n - 5), n), label="start")
        self._check_slice(self._writer_log(), start, None)

    @rule(beyond=st.integers(1, 3))
    def read_beyond_head(self, beyond: int) -> None:
        offset = len(self.model) + beyond
        with pytest.raises(OffsetOutOfRangeError) as info:
            list(self._writer_log().read(offset))
        assert isinstance(info.value, IndexError)
        assert info.value.offset == offset

    # ------------------------------------------------------------------------- invariants

    @invariant()
    def heads_match_model(self) -> None:
        if self.log is None or self.view is None:
            return
        assert self.log.head == len(self.model)
        assert self.view.head == len(self.model)

    def teardown(self) -> None:
        try:
            self._close()
            if os.path.exists(self.path):
                check_layout(self.path, len(self.model),
                             None if self.limits_changed else self.limits)
                with EventLog(self.path, sync="none", compression=None) as fresh:
                    assert fresh.head == len(self.model)
                    recs = list(fresh.read())
                    assert [r.offset for r in recs] == list(range(len(self.model)))
                    assert [r.event for r in recs] == self.model
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.mark.slow  # 12-45 s on a busy 2-cpu VM: 80 programs of up to 30 steps, real files
def test_log_state_machine() -> None:
    run_state_machine_as_test(
        LogMachine,
        settings=settings(
            max_examples=80,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )


# --------------------------------------------------------------------------- plain properties


@settings(max_examples=100, deadline=None)
@given(event=json_values)
def test_json_values_round_trip_through_orjson(event: Json) -> None:
    # What the model relies on: every value the strategy draws reads back equal.
    assert orjson.loads(orjson.dumps(event)) == event


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(json_values, max_size=40),
    limits=limits_st,
    compressed=st.booleans(),
    data=st.data(),
)
def test_any_slice_reads_as_the_model_slice(
    events: list[Json], limits: dict[str, Any], compressed: bool, data: st.DataObject
) -> None:
    model = [orjson.loads(encode(e)) for e in events]
    raw = [encode(e) for e in events]
    with temp_dir() as tmp, EventLog(os.path.join(tmp, "log"), sync="none",
                                      compression=None, **limits) as log:
        # A mix of single appends and batches, so both write paths build the layout.
        i = 0
        while i < len(events):
            size = data.draw(st.integers(1, 6), label="batch size")
            if size == 1:
                assert log.append(events[i]) == i
            else:
                assert log.append_many(events[i : i + size]) == range(
                    i, min(i + size, len(events)))
            i += size
        if compressed:
            log.compress()
        n = len(events)
        assert log.head == n
        starts = range(n + 1) if n <= 12 else data.draw(
            st.lists(st.integers(0, n), min_size=1, max_size=15), label="starts")
        for start in starts:
            drawn = data.draw(st.integers(0, n + 2), label="stop")
            for stop in dict.fromkeys([None, start, start + 1, n, n + 2, drawn]):
                recs = list(log.read(start, stop))
                want = len(model[start:stop])
                assert [r.offset for r in recs] == list(range(start, start + want))
                assert [r.event for r in recs] == model[start:stop]
                assert list(log.read_raw(start, stop)) == raw[start:stop]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(st.lists(json_values, max_size=6), max_size=12),
    limits=limits_st,
)
def test_second_instance_sees_what_the_writer_wrote_after_each_append(
    batches: list[list[Json]], limits: dict[str, Any]
) -> None:
    model: list[Json] = []
    with temp_dir() as tmp:
        path = os.path.join(tmp, "log")
        with EventLog(path, sync="none", compression=None, **limits) as writer, \
                EventLog(path, sync="none", compression=None) as reader:
            for batch in batches:
                before = len(model)
                if len(batch) == 1:
                    assert writer.append(batch[0]) == before
                else:
                    assert writer.append_many(batch) == range(before, before + len(batch))
                model.extend(orjson.loads(encode(e)) for e in batch)
                assert reader.head == writer.head == len(model)
                new = list(reader.read(before))
                assert [r.offset for r in new] == list(range(before, len(model)))
                assert [r.event for r in new] == model[before:]
                assert [r.event for r in reader.read()] == model


@pytest.mark.slow  # 5-15 s on a busy 2-cpu VM: 8 races over 119 sealed segments
def test_explicit_compress_while_background_compression_runs() -> None:
    """``log.compress()`` racing the log's own background compressor must neither fail nor
    disturb readers: both take ``compress.lock``, which must exclude them (it does between
    processes; this checks two threads of one process)."""
    for trial in range(8):
        with temp_dir() as tmp, EventLog(os.path.join(tmp, "log"), sync="none",
                                          compression="gzip", segment_max_events=1) as log:
            events = [{"trial": trial, "i": i, "pad": "p" * 1500} for i in range(120)]
            log.append_many(events)  # 119 sealed segments: kicks the background compressor
            log.compress()  # runs while the background pass is still going
            assert [r.event for r in log.read()] == events
            errors = log.sealing_errors
            assert errors == [], f"background compression failed: {errors}"



def test_compress_with_nothing_sealed_does_nothing(tmp_path: Path) -> None:
    for n in (0, 1, 5):
        with EventLog(tmp_path / f"log{n}", sync="none", compression=None) as log:
            log.append_many([{"i": i} for i in range(n)])
            assert log.compress() == 0
            assert [r.event for r in log.read()] == [{"i": i} for i in range(n)]

COMPRESS_CHILD = "import sys; from eventpipe import EventLog; EventLog(sys.argv[1]).compress()"


@pytest.mark.slow  # 15-25 s on a busy 2-cpu VM: readers open while 2000 segments compress
def test_readers_opened_while_another_process_compresses_read_everything(
    tmp_path: Path, children: Children,
) -> None:
    """Compression renames ``<base>.jsonl.gz`` into place and then unlinks ``<base>.jsonl``:
    at every instant one of the two exists, so a reader listing the folder meanwhile must
    still find every segment (and must not keep a bad listing cached afterwards)."""
    n = 2000  # enough entries that listing the folder takes several directory reads
    events = [{"i": i} for i in range(n)]
    path = str(tmp_path / "log")
    with EventLog(path, sync="none", compression=None, segment_max_events=1) as log:
        log.append_many(events)
    readers: list[EventLog] = []
    compressor = children.popen([sys.executable, "-c", COMPRESS_CHILD, path])
    try:
        while compressor.poll() is None:
            # A fresh instance lists the segments folder on its first read.
            reader = EventLog(path, sync="none", compression=None)
            readers.append(reader)
            assert [r.event for r in reader.read(n - 100)] == events[n - 100 :]
        assert compressor.wait() == 0
        for reader in readers:  # and every one of them still reads once it is done
            assert [r.event for r in reader.read(n - 100)] == events[n - 100 :]
    finally:
        compressor.kill()
        compressor.wait()
        for reader in readers:
            reader.close()
