"""Recovery never rewrites committed history: what a writer cuts, and what it refuses to.

Damage is planted in real files between a writer that closed and the next one. A header written
in this boot vouches for every committed byte (the page cache lost nothing), so damage there is
reported and never cut; a header from an earlier boot (a power loss) lets recovery cut back only
bytes past its ``synced`` mark.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eventpipe import CorruptLogError, EventLog
from eventpipe._header import decode_header, encode_header

SEG0 = f"{0:020d}.jsonl"


def events(n: int, start: int = 0) -> list[dict[str, object]]:
    return [{"i": i, "pad": "x" * 20} for i in range(start, start + n)]


def quarantined(log: Path) -> list[Path]:
    q = log / "quarantine"
    return sorted(q.iterdir()) if q.exists() else []


def rewrite_header(log: Path, **fields: int) -> None:
    h = decode_header((log / "head").read_bytes())
    assert h is not None
    (log / "head").write_bytes(encode_header(h._replace(**fields)))


def test_a_nul_in_the_committed_tail_is_reported_not_cut(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with EventLog(log, compression=None) as lg:
        lg.append_many(events(100))
    seg = log / "segments" / SEG0
    data = bytearray(seg.read_bytes())
    victim = len(data) - 200  # inside the last 4 KiB, inside event 96 or so
    data[victim] = 0
    seg.write_bytes(bytes(data))
    bad = data[:victim].count(b"\n")
    with EventLog(log) as lg:
        # The next writer appends after the committed bytes: no offset is handed out twice.
        assert lg.append({"i": "new"}) == 100
        assert lg.head == 101
        got: list[int] = []
        with pytest.raises(CorruptLogError) as exc:
            got.extend(r.offset for r in lg.read())
        assert exc.value.offset == bad and got == list(range(bad))
        assert [r.event for r in lg.read(bad + 1)][-1] == {"i": "new"}
    assert quarantined(log) == []
    assert seg.read_bytes()[: len(data)] == bytes(data)


def empty_line_at(seg: Path, event: int) -> bytes:
    """Turn the first byte of event ``event`` into a newline (an empty line, then garbage)."""
    data = bytearray(seg.read_bytes())
    pos = 0
    for _ in range(event):
        pos = data.index(b"\n", pos) + 1
    data[pos] = ord("\n")
    seg.write_bytes(bytes(data))
    return bytes(data)


def test_a_damaged_header_copy_and_an_empty_line_lose_nothing(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with EventLog(log, compression=None) as lg:
        lg.append_many(events(1000))
    damaged = empty_line_at(log / "segments" / SEG0, 500)
    raw = bytearray((log / "head").read_bytes())
    raw[8] ^= 0xFF  # the first copy's head field: its CRC no longer matches
    (log / "head").write_bytes(bytes(raw))
    with EventLog(log) as lg:
        assert lg.head == 1000  # the second copy stands in
        assert lg.append({"i": "new"}) == 1000
        with pytest.raises(CorruptLogError) as exc:
            for _ in lg.read():
                pass
        assert exc.value.offset == 500
    assert quarantined(log) == []
    assert (log / "segments" / SEG0).read_bytes()[: len(damaged)] == damaged


def test_a_destroyed_header_is_not_rebuilt_past_damage(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with EventLog(log, compression=None) as lg:
        lg.append_many(events(1000))
    damaged = empty_line_at(log / "segments" / SEG0, 500)
    (log / "head").write_bytes(b"\xff" * 600)  # both copies gone
    with EventLog(log) as lg, pytest.raises(CorruptLogError) as exc:
        lg.append({"i": "new"})
    # The error names the file, the damaged bytes and the first offset affected...
    assert exc.value.path == str(log / "segments" / SEG0)
    assert exc.value.offset == 500 and "bytes" in str(exc.value)
    # ...and nothing was cut or quarantined: the 1000 events are still there for repair.
    assert quarantined(log) == []
    assert (log / "segments" / SEG0).read_bytes() == damaged


def test_a_destroyed_header_over_a_torn_tail_is_rebuilt(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with EventLog(log, compression=None) as lg:
        lg.append_many(events(10))
    with open(log / "segments" / SEG0, "ab") as f:
        f.write(b'{"i": 10, "pa')  # a killed writer's partial event
    (log / "head").write_bytes(b"\xff" * 600)
    with EventLog(log) as lg:
        assert lg.append({"i": 10}) == 10
        assert [r.event["i"] for r in lg.read()] == list(range(11))
    assert len(quarantined(log)) == 1


def test_after_a_reboot_only_unsynced_bytes_are_cut(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with EventLog(log, compression=None, sync="none") as lg:
        lg.append_many(events(100))
    seg = log / "segments" / SEG0
    data = seg.read_bytes()
    lines = data.splitlines(keepends=True)
    synced = len(b"".join(lines[:60]))
    # Power loss: the header reached the disk, events 90..99 did not (NULs in their place).
    seg.write_bytes(b"".join(lines[:90]) + b"\0" * len(b"".join(lines[90:])))
    rewrite_header(log, boot=12345, synced=synced)
    with EventLog(log) as lg:
        assert lg.append({"i": "new"}) == 90  # those offsets never durably existed
        assert [r.offset for r in lg.read()] == list(range(91))
    assert len(quarantined(log)) == 1


def test_after_a_reboot_damage_below_the_synced_mark_is_reported(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with EventLog(log, compression=None) as lg:
        lg.append_many(events(100))
    seg = log / "segments" / SEG0
    data = seg.read_bytes()
    size = len(data)
    damaged = data[: size - 100] + b"\0" * 100
    seg.write_bytes(damaged)
    rewrite_header(log, boot=12345, synced=size)  # all of it had been fsynced
    with EventLog(log) as lg, pytest.raises(CorruptLogError):
        lg.append({"i": "new"})
    assert quarantined(log) == []
    assert seg.read_bytes() == damaged


def test_a_shortened_active_segment_in_this_boot_is_damage(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with EventLog(log, compression=None) as lg:
        lg.append_many(events(100))
    seg = log / "segments" / SEG0
    data = seg.read_bytes()
    seg.write_bytes(data[: len(data) - 10 * 31])
    with EventLog(log) as lg:
        with pytest.raises(CorruptLogError, match="missing"):
            lg.append({"i": "new"})
        assert lg.head == 100  # nothing rewound
    assert quarantined(log) == []


def test_an_old_format_header_reads_and_is_upgraded(tmp_path: Path) -> None:
    import struct
    import zlib

    log = tmp_path / "log"
    with EventLog(log, compression=None) as lg:
        lg.append_many(events(5))
    size = (log / "segments" / SEG0).stat().st_size
    body = struct.pack("<4sQQQ", b"EPH1", 5, 0, size)
    (log / "head").write_bytes(body + zlib.crc32(body).to_bytes(4, "little"))
    meta = json.loads((log / "eventpipe.json").read_bytes())
    (log / "eventpipe.json").write_text(json.dumps({**meta, "version": 1}))
    with EventLog(log) as lg:
        assert lg.head == 5 and [r.offset for r in lg.read()] == list(range(5))
        assert json.loads((log / "eventpipe.json").read_bytes())["version"] == 1  # reading
        assert lg.append({"i": 5}) == 5
    # The writer marked the log as the new format before writing the new header in it, so an
    # older eventpipe refuses it (UnsupportedFormatError) rather than misread that header.
    assert json.loads((log / "eventpipe.json").read_bytes()) == {**meta, "version": 3}
    assert (log / "head").read_bytes()[:4] == b"EPH3"
