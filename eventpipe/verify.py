"""``eventpipe verify``: check every stored byte of a log and every consumer checkpoint.

Checks the metadata file and header; for every segment, that it decompresses (gzip), holds
complete non-empty JSON lines, exactly as many as the offsets its name and the next segment's
promise, and matches its checksum sidecar block by block (so a flipped byte is found even where
it leaves valid JSON); and for every checkpoint, that it parses, belongs to this log, is not
ahead of it, and that the event it was taken after is still the same. Reads only; never
repairs.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson

from ._header import HEADER_SIZE, decode_header
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
             problems: list[Problem]) -> bytes | None:
    """A segment's uncompressed content (the committed part of the active one); None when
    its gzip data is damaged (reported). Raises OSError when the file cannot be read."""
    if seg.compressed:
        return _gzip_content(seg.path, problems, seg.base)
    with open(seg.path, "rb") as f:
        content = f.read() if sealed else f.read(committed)
    if not sealed and len(content) < committed:
        problems.append(Problem(seg.path, None, f"active segment is shorter "
                                f"({len(content)} bytes) than committed ({committed})"))
    return content


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
    segs = list_segments(folder)
    segs = [s for s in segs if s.base <= header.segment_base]
    if not segs or segs[-1].base != header.segment_base:
        problems.append(Problem(folder, header.segment_base,
                                "the active segment named by the header is missing"))
    summary["head"] = header.head
    summary["first_offset"] = segs[0].base if segs else header.head
    for i, listed in enumerate(segs):
        seg = listed
        if progress is not None:
            progress(i, len(segs))
        sealed = seg.base < header.segment_base
        next_base = segs[i + 1].base if i + 1 < len(segs) else header.head
        try:
            try:
                content = _content(seg, sealed, header.committed, problems)
            except FileNotFoundError:
                if seg.compressed or not sealed:
                    raise
                # A writer's background thread compressed it since the listing.
                seg = seg._replace(path=segment_path(folder, seg.base, compressed=True),
                                   compressed=True)
                content = _content(seg, sealed, header.committed, problems)
        except FileNotFoundError:
            now = list_segments(folder)
            if sealed and now and seg.base < now[0].base:
                continue  # removed by retention while we looked: no longer part of the log
            problems.append(Problem(seg.path, seg.base, "segment file is missing"))
            continue
        except OSError as exc:
            problems.append(Problem(seg.path, seg.base, f"segment unreadable: {exc.strerror}"))
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
        elif cp.offset > head:
            problems.append(Problem(cp_path, cp.offset, f"checkpoint is ahead of the head {head}"))
        elif cp.offset > first and cp.segment is not None:
            line = _event_bytes(root, cp.offset - 1)
            if line is not None and zlib.crc32(line) != cp.fingerprint:
                problems.append(Problem(cp_path, cp.offset - 1,
                                        "the event this checkpoint was taken after has changed"))


def _event_bytes(root: str, offset: int) -> bytes | None:
    from .log import EventLog

    try:
        with EventLog(root) as log:
            for chunk in log.chunks(offset, offset + 1):
                return chunk.lines[0]
    except EventPipeError:
        return None
    return None
