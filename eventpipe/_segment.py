"""Segment files: naming, listing, and reading lines from any offset without decoding.

A segment holds consecutive events as JSON lines. It is named by the offset of its first event,
zero-padded to 20 digits so names sort as numbers (``00000000000000001000.jsonl``). Once sealed
(a later segment exists) it never changes, and may be replaced by an identical gzip copy
(``.jsonl.gz``); readers accept either form and keep reading an open file whose name was
removed, which is how compression never disturbs a reader.

A name is a claim, not a fact: a line lost at a segment's end, a segment deleted from the
middle or a foreign file with a segment-like name would shift every offset counted from it.
So a reader establishes a segment's *extent* before it yields anything from it, and yields an
event only under its own offset:

* the active segment: its event count and committed size come from the header (a file shorter
  than the committed size is damage);
* a sealed segment with a checksum file (``.sum``, see :class:`Seal`): the count it was sealed
  with must be what its name and the next segment's name imply, and every byte handed out is
  first checked against the CRC-32 of its 64 KiB block (CRC-32 runs at GB/s, far cheaper than
  decoding JSON);
* a sealed segment without one yet (until the background compressor reaches it): plain, its
  whole newline count is checked first (bounded by the segment's size); gzip, the count is
  checked while decoding, never yielding past the expected end.

Only once the extent is established may a reader find a start near the end by scanning
backward from it. A count that disagrees (a gap, an overlap, lost lines) or a block that
fails its checksum is a CorruptLogError naming the file and the offsets affected, raised after
every event before the damage was yielded.
"""

from __future__ import annotations

import errno
import os
import zlib
from collections.abc import Iterator, MutableMapping, Sequence
from typing import NamedTuple

from ._layout import Folder, folder_of
from .errors import CorruptLogError, OffsetOutOfRangeError, StorageError

__all__ = [
    "GZIP_SUFFIX",
    "PLAIN_SUFFIX",
    "LineChunk",
    "Seal",
    "SegmentDamage",
    "SegmentFile",
    "gzip_blocks",
    "list_segments",
    "plain_blocks",
    "read_chunks",
    "segment_name",
    "segment_path",
]

PLAIN_SUFFIX = ".jsonl"
GZIP_SUFFIX = ".jsonl.gz"
NAME_DIGITS = 20
CHUNK_BYTES = 1 << 20  # big enough to amortise syscalls, small enough to keep memory flat
_NUL = b"\0"  # never in JSON text (control characters are escaped): a NUL byte is damage


class SegmentFile(NamedTuple):
    """A segment file found on disk: ``name`` in its folder, ``path`` for messages."""

    base: int
    path: str
    compressed: bool
    name: str


class LineChunk(NamedTuple):
    """Consecutive complete lines of one segment (without their newlines).

    ``position`` is the byte position of the first line in the segment's uncompressed content;
    a consumer stores it so that resuming needs no scan.
    """

    segment_base: int
    first_offset: int
    position: int
    lines: list[bytes]


class Seal(NamedTuple):
    """What a sealed segment held when it was sealed (from its ``.sum`` checksum file).

    ``crcs[i]`` is the CRC-32 of bytes ``i * block_bytes`` up to ``(i + 1) * block_bytes`` of
    the uncompressed content, whose length is ``size`` and which holds ``events`` lines.
    """

    events: int
    size: int
    block_bytes: int
    crcs: Sequence[int]


# A sealed plain segment file whose newlines were counted (the value): base, device, inode,
# size, mtime. Sealed segments never change, so a reader need not count the same file twice.
CountKey = tuple[int, int, int, int, int]


def segment_name(base: int, compressed: bool = False) -> str:
    return f"{base:0{NAME_DIGITS}d}{GZIP_SUFFIX if compressed else PLAIN_SUFFIX}"


def segment_path(folder: Folder | str, base: int, compressed: bool = False) -> str:
    """Where segment ``base`` lies, for messages: files are opened through their Folder."""
    where = folder.path if isinstance(folder, Folder) else os.fspath(folder)
    return os.path.join(where, segment_name(base, compressed))


def parse_name(name: str) -> tuple[int, bool] | None:
    """``(base, compressed)`` for a segment file name, None for anything else."""
    if name.endswith(GZIP_SUFFIX):
        stem, compressed = name[: -len(GZIP_SUFFIX)], True
    elif name.endswith(PLAIN_SUFFIX):
        stem, compressed = name[: -len(PLAIN_SUFFIX)], False
    else:
        return None
    if len(stem) != NAME_DIGITS or not stem.isdigit():
        return None
    return int(stem), compressed


def list_segments(folder: Folder | str) -> list[SegmentFile]:
    """Segment files in ``folder`` sorted by base; one entry per base (plain wins over gzip).

    A base present in both forms is mid-compression or left by a crash after the verified gzip
    copy was renamed into place; the two are identical, and the plain one is cheaper to read.
    """
    found: dict[int, SegmentFile] = {}
    with folder_of(folder) as f:
        for name in f.names():
            parsed = parse_name(name)
            if parsed is None:
                continue
            base, compressed = parsed
            if base in found and compressed:
                continue
            found[base] = SegmentFile(base, f.path_of(name), compressed, name)
    return [found[b] for b in sorted(found)]


def list_bases(folder: Folder) -> list[int]:
    """The sorted bases of the segment files in ``folder`` (either form): what
    :func:`list_segments` gives, without building a path per file (readers' listings)."""
    found = set()
    width = NAME_DIGITS
    for name in folder.names():
        if (name.endswith(PLAIN_SUFFIX) and len(name) == width + len(PLAIN_SUFFIX)) or (
                name.endswith(GZIP_SUFFIX) and len(name) == width + len(GZIP_SUFFIX)):
            stem = name[:width]
            if stem.isdigit():
                found.add(int(stem))
    return sorted(found)


def segment_exists(folder: Folder, base: int) -> bool:
    """Whether segment ``base`` is on disk in either form.

    Plain first: compression renames the gzip copy in before it unlinks the plain file, so a
    segment that is being compressed is always found in one form or the other.
    """
    return folder.exists(segment_name(base)) or folder.exists(segment_name(base, True))


def _open_segment(folder: Folder, base: int, first_wanted: int) -> tuple[int, str, bool]:
    """Open the segment at ``base``, plain or gzip. Returns (fd, path, compressed)."""
    for compressed in (False, True):
        name = segment_name(base, compressed)
        try:
            return folder.open_file(name, os.O_RDONLY), folder.path_of(name), compressed
        except StorageError as exc:
            if exc.errno != errno.ENOENT:
                raise
            # compressed and removed between listing and opening: try the other form
    raise OffsetOutOfRangeError(
        f"segment {base} is gone (removed by retention?); offset {first_wanted} is not stored",
        path=segment_path(folder, base),
        offset=first_wanted,
    )


# ------------------------------------------------------------------------------ extents


def extent_error(path: str, base: int, count: int, end_offset: int, *,
                 active: bool) -> CorruptLogError:
    """A segment holds ``count`` events where its name and what follows it imply
    ``end_offset - base``: name the offsets that are missing or stored twice."""
    expected = end_offset - base
    if active:
        what = (f"active segment {base} holds {count} committed events but the header's head "
                f"is {end_offset}")
    else:
        what = f"segment {base} holds {count} events but the next segment starts at {end_offset}"
    if count < expected:
        return CorruptLogError(f"{what}: offsets {base + count}..{end_offset - 1} are missing",
                               path=path, offset=base + count)
    return CorruptLogError(
        f"{what}: offsets {end_offset}..{base + count - 1} overlap what follows it, so its "
        f"offsets {base}..{end_offset - 1} cannot be trusted", path=path, offset=base)


def _count_lines(fd: int, size: int) -> tuple[int, bool]:
    """(newlines, whether the content ends with one) of the first ``size`` bytes of ``fd``."""
    lines = 0
    position = 0
    last = b"\n"
    while position < size:
        block = os.pread(fd, min(CHUNK_BYTES, size - position), position)
        if not block:
            break
        lines += block.count(b"\n")
        position += len(block)
        last = block[-1:]
    return lines, last == b"\n" and position == size


def _check_count(fd: int, path: str, base: int, size: int, end_offset: int,
                 lines: int | None) -> int:
    """A sealed plain segment without a checksum file: its whole newline count (``lines``
    if already counted) must be what its name and the next segment's imply, and its last line
    complete. Returns the count."""
    whole = True
    if lines is None:
        lines, whole = _count_lines(fd, size)
    if lines != end_offset - base:
        raise extent_error(path, base, lines, end_offset, active=False)
    if not whole:
        raise CorruptLogError(
            f"segment {base} ends with an unterminated line after its {lines} events",
            path=path, offset=end_offset)
    return lines


def _blocks_match(data: bytes, first_block: int, seal: Seal, expected_len: int) -> bool:
    """Whether ``data`` (content from block ``first_block`` on, meant to be ``expected_len``
    bytes of whole blocks or the content's end) matches its checksums."""
    if len(data) != expected_len:
        return False
    bb, crcs = seal.block_bytes, seal.crcs
    view = memoryview(data)
    crc32 = zlib.crc32
    for k in range(0, len(data), bb):
        j = first_block + k // bb
        if j >= len(crcs) or crc32(view[k : k + bb]) != crcs[j]:
            return False
    return True


# ------------------------------------------------------------------------- block sources


class SegmentDamage(Exception):
    """Raised by a block source: content from here on cannot be trusted (``what`` says why)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def plain_blocks(fd: int, position: int, limit: int) -> Iterator[bytes]:
    while position < limit:
        block = os.pread(fd, min(CHUNK_BYTES, limit - position), position)
        if not block:
            return
        position += len(block)
        yield block


def gzip_blocks(fd: int, skip: int, limit: int | None) -> Iterator[bytes]:
    """Decompressed content of a gzip segment from byte ``skip`` up to ``limit`` (if any).

    Inflates at most CHUNK_BYTES at a time (JSON compresses ~8x, so one compressed read would
    otherwise become a block eight times the size readers are meant to hold).
    """
    inflater = zlib.decompressobj(wbits=31)
    read_at = 0
    produced = 0  # content bytes inflated so far
    pending = b""  # compressed input not yet inflated
    try:
        while not inflater.eof:
            if limit is not None and produced >= limit:
                return
            if not pending:
                pending = os.pread(fd, CHUNK_BYTES // 8, read_at)
                read_at += len(pending)
                if not pending:
                    raise SegmentDamage("gzip segment is truncated")
            data = inflater.decompress(pending, CHUNK_BYTES)
            pending = inflater.unconsumed_tail
            start = produced
            produced += len(data)
            if limit is not None and produced > limit:
                data = data[: limit - start]
            if skip:
                cut = min(skip, len(data))
                data, skip = data[cut:], skip - cut
            if data:
                yield data
    except zlib.error as exc:
        raise SegmentDamage(f"gzip segment is damaged: {exc}") from None


def _checked(source: Iterator[bytes], first_block: int, seal: Seal, skip: int) -> Iterator[bytes]:
    """``source`` (content from block ``first_block`` on) minus its first ``skip`` bytes,
    handed out only once each 64 KiB block of it matched its CRC-32.

    Raises SegmentDamage, after yielding every byte before the bad block, for a block that does not
    match or is incomplete, and for content past the size the segment was sealed with.
    """
    bb, crcs, size = seal.block_bytes, seal.crcs, seal.size
    crc32 = zlib.crc32
    at = first_block * bb  # content position of the first byte not yet handed out
    held = b""  # content from ``at`` on, short of a whole block
    for piece in source:
        data = held + piece if held else piece
        view = memoryview(data)
        n = len(data)
        k = 0  # bytes of ``data`` checked
        bad = ""
        while k < n:
            j = (at + k) // bb
            length = min(bb, size - (at + k))
            if length <= 0:
                bad = (f"{n - k} bytes past the {size} it was sealed with (from byte "
                       f"{at + k})")
                break
            if n - k < length:
                break  # wait for the rest of the block
            if crc32(view[k : k + length]) != crcs[j]:
                bad = (f"bytes {at + k}..{at + k + length - 1} (64 KiB block {j}) differ from "
                       "the checksum it was sealed with")
                break
            k += length
        del view
        out = data if k == n else data[:k]
        held = b"" if k == n else data[k:]
        at += k
        if skip:
            cut = min(skip, len(out))
            out, skip = out[cut:], skip - cut
        if out:
            yield out
        if bad:
            raise SegmentDamage(bad)
    if held or at < size:
        raise SegmentDamage(f"bytes {at}..{size - 1} are missing or incomplete (its content "
                            f"ends at byte {at + len(held)}, it was sealed with {size})")


# ------------------------------------------------------------------------ backward search


def _find_from_end(fd: int, end: int, lines_back: int) -> int:
    """Byte position where the line ``lines_back`` lines before ``end`` starts.

    ``end`` is just past a newline. Scans backward, so finding the last events of a large
    segment costs what they weigh, not what the segment weighs. Only for a segment whose end
    is known to be where ``end`` says (the caller established its extent).
    """
    need = lines_back  # newlines to pass, not counting the one that ends the last line
    hi = end - 1
    step = 4096  # start small: the last few events are what most readers want
    while hi > 0:
        lo = max(0, hi - step)
        step = min(step * 4, CHUNK_BYTES)
        block = os.pread(fd, hi - lo, lo)
        count = block.count(b"\n")
        if count >= need:
            cut = len(block)
            for _ in range(need):
                cut = block.rfind(b"\n", 0, cut)
            return lo + cut + 1
        need -= count
        hi = lo
    return 0


def _find_from_end_checked(fd: int, lines_back: int, seal: Seal) -> int | None:
    """As :func:`_find_from_end` from the end of a sealed segment, counting newlines only in
    blocks that match their checksums; None if one does not (the caller then reads forward,
    which yields what precedes the damage and names it)."""
    bb, size = seal.block_bytes, seal.size
    need = lines_back
    top = size - 1  # the newline that ends the last line is not counted
    j_hi = -(-size // bb)
    group = 1  # blocks per read: start small, the last few events are what most readers want
    while j_hi > 0:
        j_lo = max(0, j_hi - group)
        group = min(group * 4, CHUNK_BYTES // bb)
        lo = j_lo * bb
        length = min(j_hi * bb, size) - lo
        data = os.pread(fd, length, lo)
        if not _blocks_match(data, j_lo, seal, length):
            return None
        region = top - lo
        count = data.count(b"\n", 0, region)
        if count >= need:
            cut = region
            for _ in range(need):
                cut = data.rfind(b"\n", 0, cut)
            return lo + cut + 1
        need -= count
        top = lo
        j_hi = j_lo
    return 0


# ------------------------------------------------------------------------------- reading


def read_chunks(
    folder: Folder | str,
    base: int,
    *,
    start: int,
    stop: int | None,
    end_offset: int,
    byte_limit: int | None = None,
    start_position: int | None = None,
    seal: Seal | None = None,
    counted: MutableMapping[CountKey, int] | None = None,
) -> Iterator[LineChunk]:
    """Yield lines of segment ``base`` for offsets ``start`` .. ``stop`` (exclusive; default
    and at most ``end_offset``).

    ``end_offset`` is the offset after the segment's last event: the next segment's base for
    a sealed one, the header's head for the active one, whose committed size ``byte_limit`` is
    (bytes past it are never read). Without ``byte_limit`` the segment is sealed: ``seal``
    is what its checksum file says, if it has one; ``counted`` remembers the newline counts of
    sealed plain segments already counted whole. ``start_position`` is the known byte position
    of ``start``, which skips any scan. Skipped events are never decoded.

    Raises CorruptLogError (a count that disagrees with ``end_offset``, a block that fails its
    checksum, an unterminated line, a NUL byte, damaged gzip data) naming the file and the
    first offset affected, after yielding every event before the damage; OffsetOutOfRangeError
    if the segment is gone; StorageError for I/O errors.
    """
    stop = end_offset if stop is None else min(stop, end_offset)
    if start >= stop:
        return
    with folder_of(folder) as f:
        fd, path, compressed = _open_segment(f, base, start)
    try:
        yield from _read_open(fd, path, compressed, base, start, stop, end_offset, byte_limit,
                              start_position, seal, counted)
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise StorageError.from_os_error(exc, "read segment", path=path) from exc
    finally:
        os.close(fd)


def _read_open(
    fd: int,
    path: str,
    compressed: bool,
    base: int,
    start: int,
    stop: int,
    end_offset: int,
    byte_limit: int | None,
    start_position: int | None,
    seal: Seal | None,
    counted: MutableMapping[CountKey, int] | None,
) -> Iterator[LineChunk]:
    """read_chunks on an open segment: establish its extent, find the start, then read.

    One function on purpose: the three steps share what each learns (the extent decides how
    the start may be found, both decide which checks the read needs), in the order the module
    docstring gives them.
    """
    active = byte_limit is not None
    if active:
        seal = None  # the header gives the active segment's extent; it has no checksum yet
    elif seal is not None and seal.events != end_offset - base:
        raise extent_error(path, base, seal.events, end_offset, active=False)

    # Establish the extent: where the content ends, and whether that end can be trusted to
    # count lines back from.
    limit: int | None = byte_limit
    end_known = active  # the header says how many events end at the committed size
    if not compressed:
        st = os.fstat(fd)
        size = st.st_size
        if byte_limit is not None:
            if size < byte_limit:
                lines, _ = _count_lines(fd, size)
                raise CorruptLogError(
                    f"active segment {base} is {size} bytes but {byte_limit} are committed: "
                    f"offsets {base + lines}..{end_offset - 1} are missing",
                    path=path, offset=base + lines)
        elif seal is not None:
            limit = size  # a size that differs from the seal's fails the checks of its end
            end_known = size == seal.size
        else:
            key = (base, st.st_dev, st.st_ino, size, st.st_mtime_ns)
            known = counted.get(key) if counted is not None else None
            lines = _check_count(fd, path, base, size, end_offset, known)
            if counted is not None and known is None:
                counted[key] = lines
            limit = size
            end_known = True
    elif seal is not None:
        limit = seal.size

    position = 0
    to_skip = start - base
    if start_position is not None:
        position, to_skip = start_position, 0
    elif not compressed and end_known and to_skip > 0:
        assert limit is not None
        lines_back = end_offset - start
        if lines_back < to_skip:  # nearer the end than the start: scan backward
            found = (_find_from_end(fd, limit, lines_back) if seal is None
                     else _find_from_end_checked(fd, lines_back, seal))
            if found is not None:
                position, to_skip = found, 0

    blocks: Iterator[bytes]
    if seal is not None:
        bb = seal.block_bytes
        if compressed:
            blocks = _checked(gzip_blocks(fd, 0, None), 0, seal, position)
        else:
            assert limit is not None
            aligned = position - position % bb
            blocks = _checked(plain_blocks(fd, aligned, limit), aligned // bb, seal,
                              position - aligned)
    elif compressed:
        blocks = gzip_blocks(fd, position, byte_limit)
    else:
        assert limit is not None
        blocks = plain_blocks(fd, position, limit)
    yield from _lines(blocks, path, base, start, stop, end_offset, position, to_skip, active)


def _check_end(blocks: Iterator[bytes], more: bool, path: str, base: int, end_offset: int,
               active: bool) -> None:
    """After the segment's last event: nothing may follow (for gzip, its trailer must check)."""
    try:
        more = more or any(blocks)
    except SegmentDamage as damage:
        raise CorruptLogError(f"segment {base}: {damage.what}, after its last event "
                              f"{end_offset - 1}", path=path, offset=end_offset) from None
    if more:
        raise CorruptLogError(
            f"segment {base} holds more than the {end_offset - base} events "
            f"{'the header commits' if active else 'its offsets allow'}",
            path=path, offset=end_offset)


def _lines(blocks: Iterator[bytes], path: str, base: int, start: int, stop: int,
           end_offset: int, position: int, to_skip: int, active: bool) -> Iterator[LineChunk]:
    """Split content into chunks of lines numbered from ``start`` (after skipping ``to_skip``
    lines), up to ``stop``; check the content ends exactly at ``end_offset`` when read that
    far."""
    # One function on purpose: every read of every event goes through this loop.
    offset = start
    pending = b""
    try:
        for block in blocks:
            buf = pending + block if pending else block
            last_nl = buf.rfind(b"\n")
            if last_nl < 0:
                pending = buf
                continue
            pending = buf[last_nl + 1 :]
            complete = buf[:last_nl]
            if to_skip:
                count = complete.count(b"\n") + 1
                if count <= to_skip:
                    to_skip -= count
                    position += last_nl + 1
                    continue
                parts = complete.split(b"\n", to_skip)
                skipped = len(complete) - len(parts[-1])
                position += skipped
                complete = parts[-1]
                to_skip = 0
            nul = complete.find(_NUL)
            if nul < 0:
                lines = complete.split(b"\n")
            else:  # keep the lines before the one holding it
                cut = complete.rfind(b"\n", 0, nul)
                complete = complete[:cut] if cut >= 0 else b""
                lines = complete.split(b"\n") if cut >= 0 else []
            if offset + len(lines) >= stop:
                extra = len(lines) - (stop - offset)
                del lines[stop - offset :]
                if lines:
                    yield LineChunk(base, offset, position, lines)
                offset = stop
                # Read to the segment's end: check it really ends there (and, for gzip, that
                # its CRC trailer is intact). Cheap: the end is at most one block away.
                if stop == end_offset:
                    _check_end(blocks, bool(extra or nul >= 0 or pending), path, base,
                               end_offset, active)
                return
            if lines:
                yield LineChunk(base, offset, position, lines)
            offset += len(lines)
            position += len(complete) + 1
            if nul >= 0:
                raise SegmentDamage("a NUL byte inside its events")
    except SegmentDamage as damage:
        first = start - to_skip if to_skip else offset
        raise CorruptLogError(
            f"segment {base}: {damage.what}; events from offset {first} on are not returned",
            path=path, offset=first) from None

    first = start - to_skip if to_skip else offset
    if pending:
        raise CorruptLogError(
            f"segment {base} ends with {len(pending)} bytes of an unterminated line",
            path=path, offset=first)
    raise extent_error(path, base, first - base, end_offset, active=active)
