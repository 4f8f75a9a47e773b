"""``eventpipe verify``: check every stored byte of a log and every consumer checkpoint.

Checks the metadata file and header; for every segment, that it decompresses (gzip), holds
complete non-empty JSON lines, exactly as many as the offsets its name and the next segment's
promise, and matches its checksum sidecar block by block (so a flipped byte is found even where
it leaves valid JSON); and for every checkpoint, that it parses, belongs to this log, is not
ahead of it, and that the event it was taken after is still the same. Reads only; never
repairs.

A live log gives no false alarm: the folder is listed twice and the listings merged (one
directory read can miss a segment being compressed), a segment is read in whichever form,
plain or gzip, it has when opened (the active one too: it may have been sealed and compressed
since the header was read), a segment gone since the listing is checked against a fresh
listing and header (retention removes only sealed segments, oldest first), and a checkpoint
ahead of the head is checked against a fresh header (the consumer may have moved on).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson

from ._header import HEADER_SIZE, Header, decode_header
from .checkpoint import load_checkpoint
from .compress import BLOCK_BYTES, first_damaged_block, read_sum, sum_blocks
from .errors import EventPipeError
from .segment import SegmentFile, list_segments, segment_path

__all__ = ["Problem", "verify_log"]


class Problem(NamedTuple):
    """One thing wrong: the file, the event offset (when known), and what."""

    path: str
    offset: int | None
    problem: str


def _gzip_content(path: str, problems: list[Problem], base: int) -> bytes | None:
    """Decompress a whole gzip segment, or report where the compressed data breaks."""
    inflater = zlib.decompressobj(wbits=31)
    out: list[bytes] = []
    consumed = 0
    step = 4096  # small steps, so a failure is located to within 4 KiB of compressed input
    with open(path, "rb") as f:
        raw = f.read()
    try:
        while consumed < len(raw) and not inflater.eof:
            out.append(inflater.decompress(raw[consumed : consumed + step]))
            consumed += step
        if not inflater.eof:
            raise zlib.error("compressed data ends early (truncated file)")
    except zlib.error as exc:
        done = b"".join(out)
        problems.append(Problem(
            path, base + done.count(b"\n"),
            f"gzip data damaged near compressed byte {consumed}..{consumed + step} "
            f"(after {len(done)} good bytes of content): {exc}"))
        return None
    if inflater.unused_data:
        problems.append(Problem(path, None, f"{len(inflater.unused_data)} bytes of trailing "
                                            "data after the gzip stream"))
    return b"".join(out)


def _content(seg: SegmentFile, sealed: bool, committed: int,
             problems: list[Problem]) -> tuple[SegmentFile, bytes | None]:
    """A segment's uncompressed content (the committed part of the active one), from
    whichever form is there now (the listed one, else the other: compression may have replaced
    it since the listing); None when its gzip data is damaged (reported). Raises
    FileNotFoundError when neither form is there, OSError when a file cannot be read."""
    forms = (seg.compressed, not seg.compressed)
    for k, compressed in enumerate(forms):
        path = segment_path(os.path.dirname(seg.path), seg.base, compressed)
        try:
            content = _read_form(path, compressed, sealed, committed, problems, seg.base)
        except FileNotFoundError:
            if k == len(forms) - 1:
                raise
            continue
        return seg._replace(path=path, compressed=compressed), content
    raise AssertionError("unreachable")


def _read_form(path: str, compressed: bool, sealed: bool, committed: int,
               problems: list[Problem], base: int) -> bytes | None:
    if compressed:
        content = _gzip_content(path, problems, base)
        # The active segment when the header was read, sealed and compressed since.
        return content if sealed or content is None else content[:committed]
    with open(path, "rb") as f:
        content = f.read() if sealed else f.read(committed)
    if not sealed and len(content) < committed:
        problems.append(Problem(path, None, f"active segment is shorter "
                                f"({len(content)} bytes) than committed ({committed})"))
    return content


def _listing(folder: str) -> list[SegmentFile]:
    """The segments, listed twice and merged.

    One directory read can miss a segment that compression renames in (``.jsonl.gz``) and
    unlinks (``.jsonl``) meanwhile: it may pass the new name's place before the rename and
    the old name's after the unlink. The unlink comes after the rename, so a second read,
    started after the first ended, sees the gzip name of any segment the first one missed.
    """
    merged = {s.base: s for s in list_segments(folder)}
    for s in list_segments(folder):
        merged.setdefault(s.base, s)
    return [merged[b] for b in sorted(merged)]


def _read_header(head_path: str) -> Header | None:
    with open(head_path, "rb") as f:
        return decode_header(f.read(HEADER_SIZE))


def _check_segment(seg: SegmentFile, content: bytes, expected_events: int,
                   problems: list[Problem], folder: str, sealed: bool) -> int:
    """Check one segment's uncompressed content; returns the events it holds."""
    path = seg.path
    if content and not content.endswith(b"\n"):
        problems.append(Problem(path, seg.base + content.count(b"\n"),
                                "last line is not terminated (torn write)"))
    count = 0
    lines = content.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    try:
        for _ in map(orjson.loads, lines):
            count += 1
    except orjson.JSONDecodeError:
        pass
    if count < len(lines):
        # Find each bad line (the fast pass stops at the first).
        for k, line in enumerate(lines[count:], count):
            try:
                orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                what = "empty line" if not line else f"not valid JSON ({exc})"
                problems.append(Problem(path, seg.base + k, what))
                if len(problems) > 1000:
                    break
    if len(lines) != expected_events:
        problems.append(Problem(
            path, seg.base + min(len(lines), expected_events),
            f"holds {len(lines)} events, but offsets {seg.base}..{seg.base + expected_events - 1}"
            f" ({expected_events} events) belong here"))
    if sealed:
        try:
            expected = read_sum(folder, seg.base)
        except EventPipeError as exc:
            problems.append(Problem(exc.path or path, None, exc.message))
            expected = None
        if expected is not None:
            _, size, crcs = sum_blocks([content])
            damaged = first_damaged_block(crcs, size, expected)
            if damaged is not None:
                start = damaged * BLOCK_BYTES
                first_event = seg.base + content.count(b"\n", 0, start)
                problems.append(Problem(
                    path, first_event,
                    f"content differs from its checksum in bytes {start}..{start + BLOCK_BYTES - 1}"
                    f" (events from offset {first_event}): a changed byte"))
    return len(lines)


def verify_log(
    path: str | os.PathLike[str],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Problem], dict[str, Any]]:
    """Check the log at ``path``; returns (problems, summary). An empty list means healthy."""
    root = os.path.abspath(os.fspath(path))
    problems: list[Problem] = []
    summary: dict[str, Any] = {"segments": 0, "events": 0, "checkpoints": 0}
    meta_path = os.path.join(root, "eventpipe.json")
    try:
        with open(meta_path, "rb") as f:
            meta = orjson.loads(f.read())
        if not isinstance(meta, dict) or meta.get("format") != "eventpipe-log":
            problems.append(Problem(meta_path, None, "not an eventpipe log's metadata"))
            meta = {}
    except (OSError, orjson.JSONDecodeError) as exc:
        problems.append(Problem(meta_path, None, f"metadata unreadable: {exc}"))
        return problems, summary
    head_path = os.path.join(root, "head")
    try:
        with open(head_path, "rb") as f:
            header = decode_header(f.read(HEADER_SIZE))
    except OSError as exc:
        problems.append(Problem(head_path, None, f"header unreadable: {exc}"))
        return problems, summary
    if header is None:
        problems.append(Problem(head_path, None, "header checksum or magic is wrong"))
        return problems, summary
    folder = os.path.join(root, "segments")
    segs = [s for s in _listing(folder) if s.base <= header.segment_base]
    if (not segs or segs[-1].base != header.segment_base) and not (
            _moved_on(head_path, header.segment_base) and _removed(folder, header.segment_base)):
        problems.append(Problem(folder, header.segment_base,
                                "the active segment named by the header is missing"))
    summary["head"] = header.head
    summary["first_offset"] = segs[0].base if segs else header.head
    for i, listed in enumerate(segs):
        if progress is not None:
            progress(i, len(segs))
        sealed = listed.base < header.segment_base
        next_base = segs[i + 1].base if i + 1 < len(segs) else header.head
        try:
            seg, content = _content(listed, sealed, header.committed, problems)
        except FileNotFoundError:
            # Removed by retention since we listed (it only removes sealed segments, oldest
            # first, so the header has moved past it): no longer part of the log.
            if sealed and _removed(folder, listed.base):
                continue
            if not sealed and _moved_on(head_path, listed.base) and _removed(folder,
                                                                              listed.base):
                continue
            problems.append(Problem(listed.path, listed.base, "segment file is missing"))
            continue
        except OSError as exc:
            problems.append(Problem(listed.path, listed.base,
                                    f"segment unreadable: {exc.strerror}"))
            continue
        if content is None:
            continue
        summary["events"] += _check_segment(seg, content, next_base - seg.base, problems,
                                            folder, sealed)
        summary["segments"] += 1
    if progress is not None:
        progress(len(segs), len(segs))
    _check_checkpoints(root, meta, header.head, segs, problems, summary)
    return problems, summary


def _moved_on(head_path: str, base: int) -> bool:
    """Whether the header, read again, names an active segment past ``base``."""
    try:
        fresh = _read_header(head_path)
    except OSError:
        return False
    return fresh is not None and fresh.segment_base > base


def _removed(folder: str, base: int) -> bool:
    """Whether segment ``base`` lies before the first segment listed now (retention)."""
    now = _listing(folder)
    return bool(now) and base < now[0].base


def _check_checkpoints(root: str, meta: dict[str, Any], head: int, segs: list[SegmentFile],
                       problems: list[Problem], summary: dict[str, Any]) -> None:
    folder = os.path.join(root, "consumers")
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
    except FileNotFoundError:
        return
    first = segs[0].base if segs else head
    for name in names:
        cp_path = os.path.join(folder, name)
        summary["checkpoints"] += 1
        try:
            cp = load_checkpoint(cp_path)
        except EventPipeError as exc:
            problems.append(Problem(cp_path, None, exc.message))
            continue
        if cp is None:
            continue
        if cp.log_id != meta.get("log_id"):
            problems.append(Problem(cp_path, cp.offset, "checkpoint belongs to another log"))
        elif cp.offset > head and cp.offset > (head := _fresh_head(root, head)):
            # (read again: a live consumer may have passed the head we read at the start)
            problems.append(Problem(cp_path, cp.offset, f"checkpoint is ahead of the head {head}"))
        elif cp.offset > first and cp.segment is not None:
            line = _event_bytes(root, cp.offset - 1)
            if line is not None and zlib.crc32(line) != cp.fingerprint:
                problems.append(Problem(cp_path, cp.offset - 1,
                                        "the event this checkpoint was taken after has changed"))


def _fresh_head(root: str, head: int) -> int:
    try:
        fresh = _read_header(os.path.join(root, "head"))
    except OSError:
        return head
    return max(head, fresh.head) if fresh is not None else head


def _event_bytes(root: str, offset: int) -> bytes | None:
    from .log import EventLog

    try:
        with EventLog(root) as log:
            for chunk in log.chunks(offset, offset + 1):
                return chunk.lines[0]
    except EventPipeError:
        return None
    return None
