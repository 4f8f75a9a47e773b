"""Bad input and hostile storage: typed errors that say what and where, and no trace on disk.

Every case checks the eventpipe error class *and* the stdlib base a caller would catch, that
the message names the option, event or file involved, and that the log directory is byte for
byte what it was before (:func:`snapshot` covers every name and every byte under it).

Storage failures are real: a file-size limit (``RLIMIT_FSIZE``) set in a child process, and
permissions enforced on a child process (switched to an unprivileged user when the tests run
as root, where permission bits would not apply).
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventpipe import (
    ConfigError,
    CorruptLogError,
    EventLog,
    EventPipeError,
    EventTooLargeError,
    NotAnEventLogError,
    StorageError,
    StoragePermissionError,
    UnserializableEventError,
    UnsupportedFormatError,
)
from eventpipe._header import decode_header

from ._unprivileged import NOBODY, run_unprivileged
from .conftest import Children

Snapshot = dict[str, bytes | None]  # relative name -> bytes (None for a directory)


def snapshot(root: Path) -> Snapshot:
    """Every directory and file under ``root`` (included), by relative name, with its bytes."""
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out[rel + "/"] = None
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):  # os.walk does not descend into links: record them
                out[os.path.relpath(full, root)] = os.readlink(full).encode()
        for name in filenames:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = f.read()
    return out


def assert_unchanged(before: Snapshot, root: Path) -> None:
    after = snapshot(root)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert (added, removed, changed) == ([], [], []), "log directory changed"


def events(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"i": i, "name": f"event-{i}"} for i in range(start, start + n)]


def active_size(log_path: Path) -> int:
    h = decode_header((log_path / "head").read_bytes())
    assert h is not None
    return h.committed


def settle(lg: EventLog) -> None:
    """Finish the background work rolls start (checksums, compression) so that the files stay
    as they are until the test writes: ``compress()`` waits for a running pass, then does
    everything left, after which a background pass finds nothing to do. With nothing sealed
    there is no such work."""
    h = decode_header((Path(lg.path) / "head").read_bytes())
    assert h is not None
    if h.segment_base > 0:
        lg.compress()


@pytest.fixture
def log(log_path: Path) -> Iterator[EventLog]:
    """A log with a few rolled segments, its background work done."""
    with EventLog(log_path, sync="none", compression=None, segment_max_events=3) as lg:
        lg.append_many(events(7))
        settle(lg)
        yield lg


# ------------------------------------------------------------------ unserialisable events

def _deep(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels):
        value = [value]
    return value


# (event, a fragment of orjson's reason that the message must carry)
UNSERIALISABLE = [
    pytest.param(object(), "object", id="object"),
    pytest.param({1, 2}, "set", id="set"),
    pytest.param({1: "one"}, "key", id="int-key"),
    pytest.param({"ok": {("a", "b"): 1}}, "key", id="nested-tuple-key"),
    pytest.param(2**64, "64-bit", id="int-over-64-bit"),
    pytest.param(-(2**63) - 1, "64-bit", id="int-under-64-bit"),
    pytest.param(b"raw bytes", "bytes", id="bytes"),
    pytest.param(1 + 2j, "complex", id="complex"),
    pytest.param("lone \ud800 surrogate", "surrogate", id="lone-surrogate"),
    pytest.param({"n": _deep(300)}, "ecursion", id="nested-too-deep"),
]


@pytest.mark.parametrize(("bad", "reason"), UNSERIALISABLE)
def test_append_refuses_unserialisable_event(
    log: EventLog, log_path: Path, bad: Any, reason: str
) -> None:
    before = snapshot(log_path)
    with pytest.raises(UnserializableEventError) as info:
        log.append(bad)
    err = info.value
    assert isinstance(err, TypeError) and isinstance(err, EventPipeError)
    assert err.index == 0
    assert err.path == str(log_path)
    assert reason in str(err) and str(log_path) in str(err)
    assert_unchanged(before, log_path)
    assert log.head == 7
    assert log.append({"fine": True}) == 7


@pytest.mark.parametrize(("bad", "reason"), UNSERIALISABLE)
@pytest.mark.parametrize("k", [0, 1, 5, 1500])  # 1500: past the first encoding slice
def test_append_many_refuses_whole_batch_naming_the_bad_index(
    log: EventLog, log_path: Path, bad: Any, reason: str, k: int
) -> None:
    batch = [*events(k, 100), bad, *events(2, 200)]
    before = snapshot(log_path)
    for given in (batch, tuple(batch), iter(batch)):
        with pytest.raises(UnserializableEventError) as info:
            log.append_many(given)
        err = info.value
        assert isinstance(err, TypeError)
        assert err.index == k
        assert f"event {k} " in str(err) and reason in str(err) and str(log_path) in str(err)
        assert_unchanged(before, log_path)
    assert log.head == 7
    assert [r.event for r in log.read()] == events(7)


@pytest.mark.parametrize(("bad", "reason"), UNSERIALISABLE)
def test_buffered_writer_refuses_unserialisable_event_at_once(
    log: EventLog, log_path: Path, bad: Any, reason: str
) -> None:
    before = snapshot(log_path)
    with log.writer(max_events=2, linger=None) as w:
        w.append({"good": 1})
        with pytest.raises(UnserializableEventError) as info:
            w.append(bad)  # with max_events=2 a buffered bad event would have forced a flush
        err = info.value
        assert isinstance(err, TypeError)
        assert reason in str(err) and str(log_path) in str(err)
        assert w.pending == 1  # the buffer is as before the bad call
        assert_unchanged(before, log_path)
        assert w.flush() == range(7, 8)
    assert [r.event for r in log.read(7)] == [{"good": 1}]


# ---------------------------------------------------------------------- oversized events

LIMIT = 100


def sized(n: int) -> dict[str, str]:
    """An event that encodes to exactly ``n`` bytes."""
    event = {"p": "x" * (n - 8)}
    assert len(orjson.dumps(event)) == n
    return event


@pytest.fixture
def small_log(log_path: Path) -> Iterator[EventLog]:
    with EventLog(log_path, sync="none", compression=None, max_event_bytes=LIMIT,
                  segment_max_bytes=256) as lg:
        lg.append_many(events(5))
        settle(lg)
        yield lg


def test_event_of_exactly_max_event_bytes_is_accepted(small_log: EventLog) -> None:
    assert small_log.append(sized(LIMIT)) == 5
    # Many events each within the limit may together weigh far more than it.
    assert small_log.append_many([sized(LIMIT)] * 10) == range(6, 16)
    with small_log.writer(linger=None) as w:
        w.append(sized(LIMIT))
    assert [r.event for r in small_log.read(5)] == [sized(LIMIT)] * 12


def test_append_refuses_event_over_max_event_bytes(small_log: EventLog, log_path: Path) -> None:
    before = snapshot(log_path)
    with pytest.raises(EventTooLargeError) as info:
        small_log.append(sized(LIMIT + 1))
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, EventPipeError)
    assert err.size == LIMIT + 1 and err.index == 0
    assert f"{LIMIT + 1} bytes" in str(err) and f"max_event_bytes={LIMIT}" in str(err)
    assert str(log_path) in str(err)
    assert_unchanged(before, log_path)


@pytest.mark.parametrize("k", [0, 3, 1500])
def test_append_many_refuses_batch_with_event_over_max_event_bytes(
    small_log: EventLog, log_path: Path, k: int
) -> None:
    batch = [sized(LIMIT)] * k + [sized(LIMIT + 40)] + [sized(50)] * 3
    before = snapshot(log_path)
    with pytest.raises(EventTooLargeError) as info:
        small_log.append_many(batch)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.index == k and err.size == LIMIT + 40
    assert f"event {k} " in str(err) and f"max_event_bytes={LIMIT}" in str(err)
    assert_unchanged(before, log_path)
    assert small_log.head == 5


def test_buffered_writer_refuses_event_over_max_event_bytes(
    small_log: EventLog, log_path: Path
) -> None:
    before = snapshot(log_path)
    with small_log.writer(max_events=2, linger=None) as w:
        w.append(sized(10))
        with pytest.raises(EventTooLargeError) as info:
            w.append(sized(LIMIT + 1))
        assert isinstance(info.value, ValueError)
        assert info.value.size == LIMIT + 1 and f"max_event_bytes={LIMIT}" in str(info.value)
        assert w.pending == 1
        assert_unchanged(before, log_path)
    assert small_log.head == 6


# --------------------------------------------------------------------------- bad options

def _config_error(open_log: Callable[[], EventLog]) -> ConfigError:
    """The ConfigError opening raises; a log opened by mistake is closed (no stray threads)."""
    try:
        log = open_log()
    except ConfigError as exc:
        return exc
    log.close()
    pytest.fail(f"accepted: {log.config}")


BAD_OPTIONS = [
    # unknown
    pytest.param({"segment_size": 1000}, "segment_size", id="unknown-option"),
    pytest.param({"Sync": "none"}, "Sync", id="unknown-option-case"),
    # wrong type
    pytest.param({"segment_max_bytes": "1000"}, "segment_max_bytes", id="bytes-as-str"),
    pytest.param({"segment_max_bytes": 1000.0}, "segment_max_bytes", id="bytes-as-float"),
    pytest.param({"segment_max_events": True}, "segment_max_events", id="events-as-bool"),
    pytest.param({"sync": 1}, "sync", id="sync-as-int"),
    pytest.param({"compression": True}, "compression", id="compression-as-bool"),
    pytest.param({"compression_level": 6.0}, "compression_level", id="level-as-float"),
    pytest.param({"compression_level": True}, "compression_level", id="level-as-bool"),
    pytest.param({"sync_interval": "1"}, "sync_interval", id="interval-as-str"),
    pytest.param({"max_event_bytes": 1.5e3}, "max_event_bytes", id="max-event-as-float"),
    pytest.param({"file_mode": "644"}, "file_mode", id="mode-as-str"),
    pytest.param({"lock_timeout": "5"}, "lock_timeout", id="lock-timeout-as-str"),
    # out of range
    pytest.param({"segment_max_bytes": 63}, "segment_max_bytes", id="bytes-too-small"),
    pytest.param({"segment_max_events": 0}, "segment_max_events", id="events-zero"),
    pytest.param({"compression": "zstd"}, "compression", id="compression-unknown"),
    pytest.param({"compression_level": 0}, "compression_level", id="level-0"),
    pytest.param({"compression_level": 10}, "compression_level", id="level-10"),
    pytest.param({"sync": "sometimes"}, "sync", id="sync-unknown"),
    pytest.param({"sync_interval": 0}, "sync_interval", id="interval-zero"),
    pytest.param({"sync_interval": float("nan")}, "sync_interval", id="interval-nan"),
    pytest.param({"sync_interval": float("inf")}, "sync_interval", id="interval-inf"),
    pytest.param({"max_event_bytes": 1}, "max_event_bytes", id="max-event-1"),
    pytest.param({"file_mode": 0o400}, "file_mode", id="mode-not-writable"),
    pytest.param({"file_mode": 0o1777}, "file_mode", id="mode-sticky"),
    pytest.param({"lock_timeout": 0}, "lock_timeout", id="lock-timeout-zero"),
    pytest.param({"lock_timeout": -1.0}, "lock_timeout", id="lock-timeout-negative"),
]


@pytest.mark.parametrize(("options", "option"), BAD_OPTIONS)
def test_bad_option_is_refused_before_touching_disk(
    tmp_path: Path, options: dict[str, Any], option: str
) -> None:
    before = snapshot(tmp_path)
    path = tmp_path / "parent" / "log"
    err = _config_error(lambda: EventLog(path, **options))
    assert isinstance(err, ValueError) and isinstance(err, EventPipeError)
    assert err.option == option
    assert repr(option) in str(err)
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize(("options", "option"), BAD_OPTIONS[:6])
def test_bad_option_on_an_existing_log_leaves_it_untouched(
    log: EventLog, log_path: Path, options: dict[str, Any], option: str
) -> None:
    before = snapshot(log_path)
    assert _config_error(lambda: EventLog(log_path, **options)).option == option
    assert_unchanged(before, log_path)


BAD_ENV = [
    pytest.param("EVENTPIPE_SYNC", "bogus", "sync", id="sync-bogus"),
    pytest.param("EVENTPIPE_SEGMENT_MAX_BYTES", "lots", "segment_max_bytes", id="bytes-text"),
    pytest.param("EVENTPIPE_SEGMENT_MAX_BYTES", "10", "segment_max_bytes", id="bytes-small"),
    pytest.param("EVENTPIPE_SEGMENT_MAX_EVENTS", "-3", "segment_max_events", id="events-neg"),
    pytest.param("EVENTPIPE_COMPRESSION", "lz4", "compression", id="compression-lz4"),
    pytest.param("EVENTPIPE_COMPRESSION_LEVEL", "12", "compression_level", id="level-12"),
    pytest.param("EVENTPIPE_SYNC_INTERVAL", "soon", "sync_interval", id="interval-text"),
    pytest.param("EVENTPIPE_SYNC_INTERVAL", "-1", "sync_interval", id="interval-negative"),
    pytest.param("EVENTPIPE_SYNC_INTERVAL", "inf", "sync_interval", id="interval-inf"),
    pytest.param("EVENTPIPE_MAX_EVENT_BYTES", "1MB", "max_event_bytes", id="max-event-unit"),
    pytest.param("EVENTPIPE_FILE_MODE", "999", "file_mode", id="mode-not-octal"),
    pytest.param("EVENTPIPE_FILE_MODE", "0o444", "file_mode", id="mode-read-only"),
    pytest.param("EVENTPIPE_LOCK_TIMEOUT", "forever", "lock_timeout", id="lock-timeout-text"),
]


@pytest.mark.parametrize(("var", "value", "option"), BAD_ENV)
def test_bad_environment_variable_is_refused_before_touching_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str, value: str, option: str
) -> None:
    monkeypatch.setenv(var, value)
    before = snapshot(tmp_path)
    err = _config_error(lambda: EventLog(tmp_path / "log"))
    assert isinstance(err, ValueError)
    assert err.option == option
    assert repr(option) in str(err) and var in str(err) and repr(value) in str(err)
    assert_unchanged(before, tmp_path)


# ----------------------------------------------------------- folders that are not a log

@pytest.mark.parametrize(
    "contents",
    [
        pytest.param({"notes.txt": b"my notes\n"}, id="a-file"),
        pytest.param({"sub/": None}, id="an-empty-subfolder"),
        pytest.param({"segments/": None, "head": b"\0" * 32}, id="log-like-without-marker"),
        pytest.param({".hidden": b""}, id="a-hidden-file"),
    ],
)
def test_non_empty_folder_that_is_not_a_log_is_refused(
    tmp_path: Path, contents: dict[str, bytes | None]
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    for name, data in contents.items():
        if data is None:
            (folder / name).mkdir()
        else:
            (folder / name).write_bytes(data)
    before = snapshot(folder)
    with pytest.raises(NotAnEventLogError) as info:
        EventLog(folder)
    assert isinstance(info.value, ValueError) and isinstance(info.value, EventPipeError)
    assert info.value.path == str(folder) and str(folder) in str(info.value)
    assert_unchanged(before, folder)


def test_path_that_is_a_regular_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"someone's file\n")
    before = snapshot(tmp_path)
    with pytest.raises(EventPipeError) as info:
        EventLog(target, sync="none", compression=None)
    assert isinstance(info.value, NotAnEventLogError | StorageError), info.value
    assert info.value.path is not None and info.value.path.startswith(str(target))
    assert str(target) in str(info.value)
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize(
    "meta",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not json at all\n", id="not-json"),
        pytest.param(b"\xff\xfe{}", id="binary"),
        pytest.param(b"[1, 2, 3]", id="a-list"),
        pytest.param(b'"eventpipe-log"', id="a-string"),
        pytest.param(b'{"format": "something-else", "version": 1}', id="other-format"),
        pytest.param(b'{"version": 1, "log_id": "abc"}', id="no-format"),
        pytest.param(b'{"format": "eventpipe-log", "version": 1}', id="no-log-id"),
    ],
)
@pytest.mark.parametrize("alone", [True, False], ids=["marker-alone", "with-other-files"])
def test_foreign_marker_file_is_refused(tmp_path: Path, meta: bytes, alone: bool) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "eventpipe.json").write_bytes(meta)
    if not alone:
        (folder / "readme").write_text("someone else's folder\n")
    before = snapshot(folder)
    with pytest.raises(NotAnEventLogError) as info:
        EventLog(folder, sync="none", compression=None)
    assert isinstance(info.value, ValueError)
    marker = str(folder / "eventpipe.json")
    assert info.value.path == marker and marker in str(info.value)
    assert_unchanged(before, folder)


@pytest.mark.parametrize("version", [4, 99])
def test_newer_format_version_is_refused_untouched(
    log_path: Path, version: int
) -> None:
    with EventLog(log_path, sync="none", compression=None, segment_max_events=2) as lg:
        lg.append_many(events(5))
    meta = json.loads((log_path / "eventpipe.json").read_bytes())
    meta["version"] = version
    (log_path / "eventpipe.json").write_text(json.dumps(meta))
    before = snapshot(log_path)
    with pytest.raises(UnsupportedFormatError) as info:
        EventLog(log_path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, EventPipeError)
    assert str(version) in str(info.value)
    assert info.value.path == str(log_path / "eventpipe.json")
    assert_unchanged(before, log_path)


# ------------------------------------------------------------------------ corrupt segments

def _sealed_log(log_path: Path) -> None:
    """20 events in segments of 5: 0, 5, 10 sealed and 15 active."""
    with EventLog(log_path, sync="none", compression=None, segment_max_events=5) as lg:
        lg.append_many(events(20))


def _read_until_error(lg: EventLog, start: int = 0) -> tuple[list[int], CorruptLogError]:
    got: list[int] = []
    with pytest.raises(CorruptLogError) as info:
        for rec in lg.read(start):
            got.append(rec.offset)
    return got, info.value


def test_invalid_json_in_a_sealed_segment_names_file_and_offset(log_path: Path) -> None:
    _sealed_log(log_path)
    seg = log_path / "segments" / f"{5:020d}.jsonl"
    # Not yet checksummed: a reader finds the one bad event by decoding. (Where a .sum exists
    # the checksum refuses its whole 64 KiB block: tests/test_reader_integrity.py.)
    (log_path / "segments" / f"{5:020d}.sum").unlink(missing_ok=True)
    data = bytearray(seg.read_bytes())
    line_start = data.index(b'{"i":7,')
    data[line_start + 3] = ord("#")  # {"i#:7,...}: same length, no newline, not JSON
    seg.write_bytes(bytes(data))
    with EventLog(log_path, sync="none", compression=None) as lg:
        got, err = _read_until_error(lg)
        assert got == list(range(7)), "events before the damaged one are delivered"
        assert isinstance(err, ValueError) and isinstance(err, EventPipeError)
        assert err.path == str(seg) and err.offset == 7
        assert str(seg) in str(err) and "offset=7" in str(err)
        # From the damaged event itself, and reading around it.
        assert _read_until_error(lg, 7)[1].offset == 7
        assert [r.offset for r in lg.read(8)] == list(range(8, 20))
        assert [r.offset for r in lg.read(0, 7)] == list(range(7))


@pytest.mark.parametrize("keep", ["half", "all-but-trailer-byte", "header-only"])
def test_truncated_gzip_segment_names_file_and_offset(log_path: Path, keep: str) -> None:
    _sealed_log(log_path)
    with EventLog(log_path, sync="none", compression=None) as lg:
        assert lg.compress() == 3
    gz = log_path / "segments" / f"{5:020d}.jsonl.gz"
    data = gz.read_bytes()
    assert gzip.decompress(data).count(b"\n") == 5
    cut = {"half": len(data) // 2, "all-but-trailer-byte": len(data) - 1, "header-only": 10}
    gz.write_bytes(data[: cut[keep]])
    with EventLog(log_path, sync="none", compression=None) as lg:
        got, err = _read_until_error(lg)
        assert got == list(range(len(got))) and 5 <= len(got) <= 10
        assert isinstance(err, ValueError)
        assert err.path == str(gz) and str(gz) in str(err)
        assert err.offset is not None, "the error must say from which offset events are lost"
        assert 5 <= err.offset <= len(got)
        assert f"offset={err.offset}" in str(err)
        with pytest.raises(CorruptLogError):
            list(lg.read_raw(5, 10))
        assert [r.offset for r in lg.read(10)] == list(range(10, 20))


# ------------------------------------------------------------- file-size limit mid-write

FSIZE_CHILD = r"""
import json, resource, signal, sys
from eventpipe import EventLog

# A write past RLIMIT_FSIZE raises SIGXFSZ (fatal by default); ignored, it fails with EFBIG.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path, how, limit, seg_max = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
batch = json.loads(sys.stdin.readline())


def report(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


with EventLog(path, sync="none", compression=None, segment_max_bytes=seg_max) as log:
    w = log.writer(max_events=10**6, max_bytes=1 << 30, linger=None)

    def attempt():
        if how == "single":
            o = log.append(batch[0])
            return [o, o + 1]
        if how == "batch":
            r = log.append_many(batch)
            return [r.start, r.stop]
        for e in batch:
            w.append(e)
        r = w.flush()
        return [r.start, r.stop]

    # Lower the soft limit only: the hard one stays infinite so it can be raised again.
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        got = attempt()
    except Exception as exc:
        report(failed=True, types=[c.__name__ for c in type(exc).__mro__],
               errno=getattr(exc, "errno", None), path=getattr(exc, "path", None),
               offset=getattr(exc, "offset", None), message=str(exc), head=log.head,
               pending=w.pending)
    else:
        report(failed=False, got=got)
    assert sys.stdin.readline() == "go\n"  # the parent has compared the files
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    if how == "buffered":
        r = w.flush()  # the failed batch stayed buffered: nothing is dropped
        got = [r.start, r.stop]
    else:
        got = attempt()
    w.close()
    report(got=got, head=log.head)
"""


def _small(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"i": i, "pad": "s" * 20} for i in range(start, start + n)]  # ~40 bytes a line


# (how, segment_max_bytes, events already in the log, limit above the active size, batch)
FSIZE_CASES = [
    pytest.param("single", 1 << 20, 10, 10, [{"pad": "x" * 300}], id="single-append"),
    pytest.param("batch", 1 << 20, 10, 100, _small(30, 1000), id="append-many"),
    pytest.param("buffered", 1 << 20, 10, 100, _small(30, 1000), id="buffered-writer"),
    # Rolls, but the limit hits while filling the active segment: no new segment yet.
    pytest.param("batch", 600, 8, 40, _small(60, 1000), id="roll-hits-limit-in-active"),
    # Fills the active segment and three new ones, then an event bigger than a segment gets a
    # segment of its own and hits the limit there: every new segment must be removed.
    pytest.param("batch", 600, 8, None, [*_small(40, 1000), {"big": "z" * 1500}],
                 id="roll-hits-limit-in-new-segment"),
]


@pytest.mark.parametrize(("how", "seg_max", "existing", "slack", "batch"), FSIZE_CASES)
def test_file_size_limit_mid_write_leaves_log_unchanged_and_retry_succeeds(
    log_path: Path, children: Children, how: str, seg_max: int, existing: int,
    slack: int | None, batch: list[dict[str, Any]],
) -> None:
    with EventLog(log_path, sync="none", compression=None, segment_max_bytes=seg_max) as lg:
        lg.append_many(_small(existing))
        settle(lg)
        head = lg.head
    size = active_size(log_path)
    # slack None: room for a full segment (so the active one and new full ones fit).
    limit = seg_max + 100 if slack is None else size + slack
    before = snapshot(log_path)
    child = children.popen(
        [sys.executable, "-c", FSIZE_CHILD, str(log_path), how, str(limit), str(seg_max)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(json.dumps(batch).encode() + b"\n")
    child.stdin.flush()
    first = json.loads(child.stdout.readline() or b"null")
    assert first is not None, f"child died: rc={child.wait()}"
    assert first["failed"], f"the append should have hit the file-size limit: {first}"
    assert "StorageError" in first["types"] and "OSError" in first["types"], first
    assert first["errno"] == errno.EFBIG
    assert first["offset"] == head, "the error names the offset the append would have had"
    assert first["path"] is not None and first["path"] in first["message"]
    assert first["path"].startswith(str(log_path / "segments"))
    assert "nothing of it is stored" in first["message"]
    assert first["head"] == head
    if how == "buffered":
        assert first["pending"] == len(batch), "a failed flush keeps the batch buffered"
    assert_unchanged(before, log_path)  # the writer cut back everything it wrote

    child.stdin.write(b"go\n")
    child.stdin.flush()
    second = json.loads(child.stdout.readline() or b"null")
    assert child.wait() == 0
    assert second == {"got": [head, head + len(batch)], "head": head + len(batch)}
    with EventLog(log_path, sync="none", compression=None) as lg:
        assert [r.event for r in lg.read()] == [*_small(existing), *batch]
        assert [r.offset for r in lg.read()] == list(range(head + len(batch)))
    assert not (log_path / "quarantine").exists()


# ------------------------------------------------------------------------------ permissions

def describe(exc: BaseException) -> dict[str, Any]:
    return {
        "types": [c.__name__ for c in type(exc).__mro__],
        "errno": getattr(exc, "errno", None),
        "path": getattr(exc, "path", None),
        "message": str(exc),
    }


def _make_read_only(root: Path) -> None:
    """Files 0444, folders 0555 (as root, the unprivileged child owns none of them anyway)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o444)
        os.chmod(dirpath, 0o555)


def test_append_to_read_only_log_raises_permission_error_and_reading_works(
    shared_tmp: Path,
) -> None:
    path = shared_tmp / "log"
    with EventLog(path, sync="none", compression=None, segment_max_events=3) as lg:
        lg.append_many(events(7))
        settle(lg)
    _make_read_only(path)
    before = snapshot(path)

    def child() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with EventLog(path, sync="none", compression=None) as log:
            try:
                log.append({"x": 1})
                out["append"] = None
            except Exception as exc:
                out["append"] = describe(exc)
            try:
                log.append_many(events(2))
                out["append_many"] = None
            except Exception as exc:
                out["append_many"] = describe(exc)
            w = log.writer(linger=None)
            w.append({"x": 2})
            try:
                w.flush()
                out["flush"] = None
            except Exception as exc:
                out["flush"] = describe(exc)
            out["pending"] = w.pending
            out["read"] = [r.event for r in log.read()]
            out["head"] = log.head
        return out

    got = run_unprivileged(child)
    for name in ("append", "append_many", "flush"):
        err = got[name]
        assert err is not None, f"{name} succeeded on a read-only log"
        assert "StoragePermissionError" in err["types"], (name, err)
        assert "PermissionError" in err["types"] and "StorageError" in err["types"]
        assert err["errno"] == errno.EACCES
        assert err["path"] is not None and err["path"].startswith(str(path))
        assert os.path.exists(err["path"]), f"the error names a file that exists: {err}"
        assert err["path"] in err["message"]
    assert got["pending"] == 1
    assert got["read"] == events(7) and got["head"] == 7
    assert_unchanged(before, path)


def test_roll_into_unwritable_segments_folder_names_that_folder(shared_tmp: Path) -> None:
    """The active segment is writable, the segments folder is not: the batch that must open
    a new segment fails, and the error must point at what refused (not at the active file)."""
    path = shared_tmp / "log"
    with EventLog(path, sync="none", compression=None, segment_max_events=2) as lg:
        lg.append(events(1)[0])
    if os.geteuid() == 0:  # the child runs as nobody: it must own the log, as a writer would
        for dirpath, _dirs, files in os.walk(path):
            for p in [dirpath, *(os.path.join(dirpath, f) for f in files)]:
                os.chown(p, NOBODY, NOBODY)
    seg_dir = path / "segments"
    seg_dir.chmod(0o555)
    before = snapshot(path)

    def child() -> dict[str, Any]:
        with EventLog(path, sync="none", compression=None, segment_max_events=2) as log:
            try:
                log.append_many(events(2, 1))  # event 1 fits the active segment, 2 rolls
                err = None
            except Exception as exc:
                err = describe(exc)
            return {"err": err, "read": [r.event for r in log.read()]}

    got = run_unprivileged(child)
    err = got["err"]
    assert err is not None, "the roll succeeded in a read-only segments folder"
    assert "StoragePermissionError" in err["types"] and "PermissionError" in err["types"]
    assert err["errno"] == errno.EACCES
    assert got["read"] == events(1)
    assert_unchanged(before, path)
    refused = {str(seg_dir), str(seg_dir / f"{2:020d}.jsonl")}
    assert err["path"] in refused, (
        f"error names {err['path']}, which is writable; what refused is one of {refused}"
    )


@pytest.mark.parametrize("where", ["child", "grandchild", "existing-empty-folder"])
def test_creating_log_without_write_permission_names_the_path(
    shared_tmp: Path, where: str
) -> None:
    locked = shared_tmp / "locked"
    locked.mkdir()
    target = {
        "child": locked / "log",
        "grandchild": locked / "deeper" / "log",
        "existing-empty-folder": locked,
    }[where]
    locked.chmod(0o555)
    before = snapshot(shared_tmp)

    def child() -> dict[str, Any]:
        try:
            EventLog(target, sync="none", compression=None).close()
        except Exception as exc:
            return describe(exc)
        return {"types": []}

    err = run_unprivileged(child)
    assert "StoragePermissionError" in err["types"], err
    assert "PermissionError" in err["types"]
    assert err["errno"] == errno.EACCES
    assert err["path"] is not None and err["path"].startswith(str(target))
    assert err["path"] in err["message"]
    assert_unchanged(before, shared_tmp)


def test_storage_error_keeps_errno_and_filename_across_processes(shared_tmp: Path) -> None:
    """Errors "pickle across processes (multiprocessing workers re-raise them in the parent)":
    a permission error raised in a worker must still say which errno and file."""
    path = shared_tmp / "log"
    EventLog(path, sync="none", compression=None).close()
    _make_read_only(path)

    def child() -> dict[str, Any]:
        with EventLog(path, sync="none", compression=None) as log:
            try:
                log.append({"x": 1})
            except StorageError as exc:
                return {"pickled": pickle.dumps(exc), "errno": exc.errno,
                        "filename": exc.filename, "strerror": exc.strerror}
        return {}

    got = run_unprivileged(child)
    assert got, "append succeeded on a read-only log"
    err = pickle.loads(got["pickled"])
    assert isinstance(err, StoragePermissionError) and isinstance(err, PermissionError)
    assert got["errno"] == errno.EACCES
    assert (err.errno, err.filename, err.strerror) == (
        got["errno"], got["filename"], got["strerror"])
