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

First of all, the layout (see :func:`check_layout`): what a log's users could plant in it to
steer a process working there, walked without following a single link.
"""

from __future__ import annotations

import errno
import os
import stat
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson

from . import _catalog as catalog
from ._checkpoint import load_checkpoint
from ._checksum import BLOCK_BYTES, first_damaged_block, read_sum, sum_blocks
from ._config import LOG_OPTIONS, resolve
from ._header import HEADER_SIZE, Header, decode_header
from ._layout import CONSUMERS_DIR, SEGMENT_CATALOG, Folder
from ._ownership import group_name, user_name
from ._segment import SegmentFile, list_segments, segment_path
from ._timeindex import ENTRY_SIZE, parse_entries, times_name
from .errors import EventPipeError, StorageError, UnsafePathError

__all__ = ["Problem", "check_layout", "verify_log"]


class Problem(NamedTuple):
    """One thing wrong: the file, the event offset (when known), what, and its kind.

    Kinds: ``data`` (metadata, header, segments), ``checkpoint``, ``catalog`` (the segment
    catalog, a cache of what the segments say), and the layout's
    ``symlink``, ``hardlink``, ``special_file``, ``foreign_owner``, ``world_writable``,
    ``setuid``, ``unreadable`` (problems) and ``mode`` (a warning).
    """

    path: str
    offset: int | None
    problem: str
    kind: str = "data"


def _gzip_content(path: str, problems: list[Problem], base: int) -> bytes | None:
    """Decompress a whole gzip segment, or report where the compressed data breaks."""
    inflater = zlib.decompressobj(wbits=31)
    out: list[bytes] = []
    consumed = 0
    step = 4096  # small steps, so a failure is located to within 4 KiB of compressed input
    raw = _read_inside(path, 2)
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
    content = _read_inside(path, 2, -1 if sealed else committed)
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
    return decode_header(_read_inside(head_path, 1, HEADER_SIZE))


def _read_inside(path: str, depth: int, size: int = -1) -> bytes:
    """The content (at most ``size`` bytes) of the file ``path``, ``depth`` names below the
    log folder, reached without following any link below the log folder.

    Raises UnsafePathError for a link or anything but a regular file (a FIFO is not waited
    for), FileNotFoundError, or another OSError.
    """
    folder, names = path, list[str]()
    for _ in range(depth):
        folder, name = os.path.split(folder)
        names.insert(0, name)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the operator's path
    try:
        for k, name in enumerate(names):
            last = k == len(names) - 1
            flags = (os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC if last
                     else _DIR_FLAGS)
            try:
                sub = os.open(name, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and stat.S_ISLNK(
                        os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)):
                    raise UnsafePathError("is a symbolic link; refusing to follow it",
                                          path=os.path.join(folder, *names[:k + 1])) from None
                raise
            os.close(fd)
            fd = sub
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError("is not a regular file; refusing to read it", path=path)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(size)
    finally:
        os.close(fd)


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


# --------------------------------------------------------------------------------- layout

_LAYOUT_LIMIT = 100  # problems of one kind named one by one; beyond that, one line counts them
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def check_layout(root: str, file_mode: int) -> tuple[list[Problem], list[Problem]]:
    """Walk the log folder ``root`` without following links; returns (problems, warnings).

    Problems: a symbolic link anywhere inside (eventpipe refuses to follow one); a file with
    hard links outside the log (written through, it would change a file elsewhere); anything
    but files, folders and links (a FIFO would block a reader); an entry whose owner is
    neither the log folder's owner nor root and whose group is not the log folder's (someone
    outside the users sharing the log); a world-writable file or folder, the log folder
    included; a setuid or setgid file; a folder that cannot be listed (its entries go
    unchecked). Warnings: group or other permission bits beyond ``file_mode`` (files) or the
    folder mode it gives (folders), one per kind of excess with the first path and a count.
    Only ``root`` itself is reached through a link (the operator's); entries are read with
    ``lstat`` and folders opened with ``O_NOFOLLOW`` relative to their parent's descriptor.
    """
    walk = _LayoutWalk(root, file_mode)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        walk.problem((), "unreadable", f"cannot open the log folder: {exc.strerror}")
        return walk.problems, []
    try:
        top = os.fstat(fd)
        walk.owner, walk.group = top.st_uid, top.st_gid
        walk.entry((), top)
        walk.folder(fd, ())
        walk.hard_links(fd)
    finally:
        os.close(fd)
    return walk.finish()


class _LayoutWalk:
    def __init__(self, root: str, file_mode: int) -> None:
        self.root = root
        self.file_mode = file_mode
        self.dir_mode = file_mode | ((file_mode & 0o444) >> 2)
        self.owner = self.group = -1
        self.problems: list[Problem] = []
        self.counts: dict[str, int] = {}
        self.excess: dict[tuple[str, int], list[str]] = {}  # (what, bits) -> paths
        # (st_dev, st_ino) -> (st_nlink, the folders where a name of it was found)
        self.linked: dict[tuple[int, int], tuple[int, list[tuple[str, ...]]]] = {}

    def path(self, parts: tuple[str, ...]) -> str:
        return os.path.join(self.root, *parts)

    def problem(self, parts: tuple[str, ...], kind: str, what: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.counts[kind] <= _LAYOUT_LIMIT:
            self.problems.append(Problem(self.path(parts), None, what, kind))

    def folder(self, fd: int, parts: tuple[str, ...]) -> None:
        try:
            names = sorted(os.listdir(fd))
        except OSError as exc:
            self.problem(parts, "unreadable", f"cannot list this folder ({exc.strerror}): "
                                              "its entries were not checked")
            return
        for name in names:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed since the listing (a live log)
            except OSError as exc:
                self.problem((*parts, name), "unreadable", f"cannot stat: {exc.strerror}")
                continue
            self.entry((*parts, name), st, fd)
            if not stat.S_ISDIR(st.st_mode):
                continue
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    self.problem((*parts, name), "symlink",
                                 "became a symbolic link while verified: refusing to follow it")
                else:
                    self.problem((*parts, name), "unreadable",
                                 f"cannot open this folder ({exc.strerror}): its entries were "
                                 "not checked")
                continue
            try:
                self.folder(sub, (*parts, name))
            finally:
                os.close(sub)

    def entry(self, parts: tuple[str, ...], st: os.stat_result, parent_fd: int = -1) -> None:
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            try:
                target = os.readlink(parts[-1], dir_fd=parent_fd)
            except OSError:
                target = "?"
            self.problem(parts, "symlink", f"is a symbolic link (to {target!r}): eventpipe "
                                           "refuses to follow links inside a log; remove it")
            return
        is_dir = stat.S_ISDIR(mode)
        if not is_dir and not stat.S_ISREG(mode):
            self.problem(parts, "special_file", "is neither a file nor a folder (a FIFO, "
                                                "socket or device): remove it")
        if st.st_uid not in (self.owner, 0) and st.st_gid != self.group:
            self.problem(parts, "foreign_owner",
                         f"belongs to {user_name(st.st_uid)} and "
                         f"{group_name(st.st_gid)}: neither the log folder's owner "
                         f"({user_name(self.owner)}) nor its group "
                         f"({group_name(self.group)})")
        if mode & stat.S_IWOTH:
            what = "folder" if is_dir else "file"
            self.problem(parts, "world_writable",
                         f"{what} is writable by every user (mode {stat.S_IMODE(mode):04o}): "
                         "anyone could plant or change what eventpipe reads here")
        if stat.S_ISREG(mode) and mode & (stat.S_ISUID | stat.S_ISGID):
            self.problem(parts, "setuid", f"file is setuid or setgid (mode "
                                          f"{stat.S_IMODE(mode):04o}): nothing in a log is a "
                                          "program; chmod ug-s")
        if stat.S_ISREG(mode) and st.st_nlink > 1:
            self.linked.setdefault((st.st_dev, st.st_ino), (st.st_nlink, []))[1].append(parts)
        # o+w is a problem of its own (above); the rest of group and other bits a warning.
        extra = stat.S_IMODE(mode) & 0o075 & ~(self.dir_mode if is_dir else self.file_mode)
        if extra and (is_dir or stat.S_ISREG(mode)):
            self.excess.setdefault(("folder" if is_dir else "file", extra), []).append(
                self.path(parts))

    def hard_links(self, root_fd: int) -> None:
        """Report files with a name outside the log, after counting the names inside again.

        A consumer links its checkpoint to ``.prev`` names and renames them (all in one
        folder): the first listing may have missed a name that exists now, so each suspect's
        folders are listed again and its names counted against its link count of now.
        """
        for key, (seen_nlink, found) in self.linked.items():
            if len(found) >= seen_nlink:
                continue  # every name of it is inside the log (a checkpoint and its .prev)
            names, nlink = self._count_names(root_fd, key, {p[:-1] for p in found})
            if nlink <= names:
                continue
            self.problem(found[0], "hardlink",
                         f"has {nlink} hard links, {names} of them inside the log: it is also "
                         "a file elsewhere, which writing it would change (eventpipe refuses "
                         "to write through it); replace it with a copy")

    def _count_names(self, root_fd: int, key: tuple[int, int],
                     folders: set[tuple[str, ...]]) -> tuple[int, int]:
        names, nlink = 0, 0
        for folder in folders:
            fd = os.dup(root_fd)
            try:
                for name in folder:
                    sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = sub
                for name in os.listdir(fd):
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if (st.st_dev, st.st_ino) == key:
                        names += 1
                        nlink = st.st_nlink
            except OSError:
                continue  # gone or swapped since: judged on what the walk saw
            finally:
                os.close(fd)
        return names, nlink

    def finish(self) -> tuple[list[Problem], list[Problem]]:
        for kind, count in self.counts.items():
            if count > _LAYOUT_LIMIT:
                self.problems.append(Problem(self.root, None, f"{count - _LAYOUT_LIMIT} more "
                                             f"entries like the {kind} ones above", kind))
        warnings = []
        for (what, bits), paths in sorted(self.excess.items()):
            allowed = self.dir_mode if what == "folder" else self.file_mode
            more = f" (and {len(paths) - 1} more {what}s)" if len(paths) > 1 else ""
            warnings.append(Problem(
                paths[0], None,
                f"{what}{more} gives {_bits(bits)}, beyond the log's {what} mode "
                f"{allowed:04o} (chmod {_bits(bits, '-')}; or, if the log's file_mode is "
                "another, verify with EVENTPIPE_FILE_MODE set to it)", "mode"))
        return self.problems, warnings


def _bits(bits: int, sign: str = "+") -> str:
    """Group and other permission bits as chmod says them: ``g+w,o+r``."""
    parts = []
    for who, shift in (("g", 3), ("o", 0)):
        letters = "".join(c for c, m in (("r", 4), ("w", 2), ("x", 1)) if bits >> shift & m)
        if letters:
            parts.append(f"{who}{sign}{letters}")
    return ",".join(parts)


def verify_log(
    path: str | os.PathLike[str],
    *,
    progress: Callable[[int, int], None] | None = None,
    file_mode: int | None = None,
) -> tuple[list[Problem], dict[str, Any]]:
    """Check the log at ``path``; returns (problems, summary). An empty list means healthy.

    The layout is checked against ``file_mode`` (default: the ``file_mode`` option, from
    ``EVENTPIPE_FILE_MODE`` or built in); its warnings are ``summary["warnings"]``, a list
    of :class:`Problem`. Raises ConfigError for an unparsable ``EVENTPIPE_FILE_MODE``.
    """
    root = os.path.abspath(os.fspath(path))
    if file_mode is None:
        file_mode = resolve(tuple(o for o in LOG_OPTIONS if o.name == "file_mode"),
                            {})["file_mode"]
    problems, warnings = check_layout(root, file_mode)
    summary: dict[str, Any] = {"segments": 0, "events": 0, "checkpoints": 0,
                               "warnings": warnings}
    opened = _meta_and_header(root, problems)
    if opened is None:
        return problems, summary
    meta, header = opened
    head_path = os.path.join(root, "head")
    folder = os.path.join(root, "segments")
    segs = [s for s in _listing(folder) if s.base <= header.segment_base]
    if (not segs or segs[-1].base != header.segment_base) and not (
            _moved_on(head_path, header.segment_base) and _removed(folder, header.segment_base)):
        problems.append(Problem(folder, header.segment_base,
                                "the active segment named by the header is missing"))
    summary["head"] = header.head
    summary["first_offset"] = segs[0].base if segs else header.head
    last_time = 0
    for i, listed in enumerate(segs):
        if progress is not None:
            progress(i, len(segs))
        next_base = segs[i + 1].base if i + 1 < len(segs) else header.head
        events, last_time = _check_listed(listed, next_base, header, head_path, last_time,
                                          problems)
        if events is not None:
            summary["events"] += events
            summary["segments"] += 1
    if progress is not None:
        progress(len(segs), len(segs))
    _check_catalog(root, segs, header, problems, warnings)
    first_checkpoint_problem = len(problems)
    _check_checkpoints(root, meta, header.head, segs, problems, summary)
    problems[first_checkpoint_problem:] = [
        p._replace(kind="checkpoint") for p in problems[first_checkpoint_problem:]]
    return problems, summary


def _meta_and_header(root: str, problems: list[Problem]) -> tuple[dict[str, Any], Header] | None:
    """The log's metadata (``{}`` if foreign) and header; None, with the problem noted, when
    either cannot be read at all (nothing else can be checked then)."""
    meta_path = os.path.join(root, "eventpipe.json")
    try:
        meta = orjson.loads(_read_inside(meta_path, 1))
        if not isinstance(meta, dict) or meta.get("format") != "eventpipe-log":
            problems.append(Problem(meta_path, None, "not an eventpipe log's metadata"))
            meta = {}
    except (OSError, orjson.JSONDecodeError) as exc:
        problems.append(Problem(meta_path, None, f"metadata unreadable: {exc}"))
        return None
    head_path = os.path.join(root, "head")
    try:
        header = _read_header(head_path)
    except OSError as exc:
        problems.append(Problem(head_path, None, f"header unreadable: {exc}"))
        return None
    if header is None:
        problems.append(Problem(head_path, None, "header checksum or magic is wrong"))
        return None
    return meta, header


def _check_listed(listed: SegmentFile, next_base: int, header: Header, head_path: str,
                  last_time: int, problems: list[Problem]) -> tuple[int | None, int]:
    """Check one listed segment and its time index: (events it holds, or None when it was
    not checked; the last time seen so far)."""
    folder = os.path.dirname(listed.path)
    sealed = listed.base < header.segment_base
    try:
        seg, content = _content(listed, sealed, header.committed, problems)
    except FileNotFoundError:
        # Removed by retention since we listed (it only removes sealed segments, oldest
        # first, so the header has moved past it): no longer part of the log.
        gone = _removed(folder, listed.base) and (sealed or _moved_on(head_path, listed.base))
        if not gone:
            problems.append(Problem(listed.path, listed.base, "segment file is missing"))
        return None, last_time
    except OSError as exc:
        problems.append(Problem(listed.path, listed.base, f"segment unreadable: {_reason(exc)}"))
        return None, last_time
    if content is None:
        return None, last_time
    events = _check_segment(seg, content, next_base - seg.base, problems, folder, sealed)
    last_time = _check_times(folder, seg.base, next_base - seg.base,
                             None if sealed else header, last_time, problems)
    return events, last_time


def _check_times(folder: str, base: int, events: int, active: Header | None, last_time: int,
                 problems: list[Problem]) -> int:
    """Check segment ``base``'s time index (``active``: the header, when it is the active
    segment); returns the last time it holds (or ``last_time``)."""
    path = os.path.join(folder, times_name(base))
    try:
        raw = _read_inside(path, 2)
    except FileNotFoundError:
        if active is not None and active.tcount:
            problems.append(Problem(path, base, f"time index is missing; the header counts "
                                                f"{active.tcount} entries"))
        return last_time  # a segment written before eventpipe kept times
    except OSError as exc:
        problems.append(Problem(path, base, f"time index unreadable: {_reason(exc)}"))
        return last_time
    claimed = None if active is None else active.tcount
    found = parse_entries(raw, limit=events, claimed=claimed)
    whole = len(found.rels) * ENTRY_SIZE
    if found.damaged_at is not None or (active is None and whole != len(raw)):
        first = base + found.rels[-1] if found.rels else base
        problems.append(Problem(
            path, first, f"time index is damaged at entry {len(found.rels)} (byte {whole}): "
            f"a bad checksum, a time or offset out of order, or a partial entry; the times of "
            f"events from offset {first} are not known exactly"))
    if found.times and found.times[0] < last_time:
        problems.append(Problem(path, base, "time index starts earlier than the previous "
                                            "segment's last time"))
    if active is not None and found.times and found.times[-1] > active.tlast:
        problems.append(Problem(path, base, "time index holds a time later than the header's "
                                            "last time"))
    return found.times[-1] if found.times else last_time


def _check_catalog(root: str, segs: list[SegmentFile], header: Header,
                   problems: list[Problem], warnings: list[Problem]) -> None:
    """Check the segment catalog (see :mod:`eventpipe._catalog`) against the segments and
    their time indexes. One that fails its checksums is only a warning: readers then list
    the segments. One that passes them but says something else than the segments is a
    problem (kind ``catalog``): time lookups would trust it."""
    path = os.path.join(root, SEGMENT_CATALOG)
    try:
        parsed = catalog.parse(_read_inside(path, 1))
    except FileNotFoundError:
        return
    except OSError as exc:
        warnings.append(Problem(path, None, f"segment catalog unreadable: {_reason(exc)}",
                                "catalog"))
        return
    if parsed is None:
        warnings.append(Problem(path, None, "segment catalog is damaged or torn (time lookups "
                                            "list the segments instead; the next sealing pass "
                                            "or `eventpipe compress` rebuilds it)", "catalog"))
        return
    from_base, records = parsed
    listed = [s.base for s in segs]
    ends = dict(zip(listed, [*listed[1:], header.head], strict=True))
    folder = os.path.join(root, "segments")

    def wrong(base: int, what: str) -> None:
        problems.append(Problem(path, base, f"segment catalog {what}; run `eventpipe compress`"
                                            " to rebuild it", "catalog"))

    expected = from_base
    for base, end, first in records:
        if base != expected:
            wrong(base, f"does not follow on at segment {base} (expected {expected})")
        if end > header.segment_base:
            # The writer may have rolled (and the sealer recorded it) since the header was
            # read: only a fresh header can say the record is wrong.
            fresh = _read_header(os.path.join(root, "head"))
            if fresh is None or end > fresh.segment_base:
                wrong(base, f"names segment {base} ending at {end}, past the active segment")
        elif base in ends:
            if end != ends[base]:
                wrong(base, f"says segment {base} ends at {end}, it ends at {ends[base]}")
            elif (first or None) != _first_time(folder, base) and not _removed(folder, base):
                # (retention may have removed it since the listing: no longer part of it)
                wrong(base, f"gives segment {base} a first time the time index does not")
        expected = end
    missing = [b for b in listed if from_base <= b < min(expected, header.segment_base)
               and b not in {r[0] for r in records}]
    if missing:
        wrong(missing[0], f"lacks {len(missing)} segment(s) from {missing[0]}")


def _first_time(folder: str, base: int) -> int | None:
    try:
        raw = _read_inside(os.path.join(folder, times_name(base)), 2, ENTRY_SIZE)
    except OSError:
        return None
    found = parse_entries(raw)
    return found.times[0] if found.times else None


def _reason(exc: OSError) -> str:
    return exc.message if isinstance(exc, EventPipeError) else str(exc.strerror)


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
    # consumers/ and its files are opened relative to the log folder, never through a link
    # (see _layout): a link there is a problem naming it.
    where = os.path.join(root, CONSUMERS_DIR)
    try:
        with Folder.open(root) as log_folder:
            folder = log_folder.sub(CONSUMERS_DIR)
    except EventPipeError as exc:
        if not (isinstance(exc, StorageError) and exc.errno == errno.ENOENT):
            problems.append(Problem(exc.path or where, None, exc.message))
        return
    with folder:
        try:
            names = sorted(n for n in folder.names() if n.endswith(".json"))
        except StorageError as exc:
            problems.append(Problem(where, None, exc.message))
            return
        _check_checkpoint_files(root, folder, names, meta, head, segs, problems, summary)


def _check_checkpoint_files(root: str, folder: Folder, names: list[str], meta: dict[str, Any],
                            head: int, segs: list[SegmentFile], problems: list[Problem],
                            summary: dict[str, Any]) -> None:
    first = segs[0].base if segs else head
    for name in names:
        cp_path = folder.path_of(name)
        summary["checkpoints"] += 1
        try:
            cp = load_checkpoint(folder, name)
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
    from ._log import EventLog

    try:
        with EventLog(root) as log:
            for chunk in log.chunks(offset, offset + 1):
                return chunk.lines[0]
    except EventPipeError:
        return None
    return None
