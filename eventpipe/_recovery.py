"""Recovery: what a writer does with bytes the header does not account for.

Three cases, all handled under the writer lock:

* **A torn tail** (bytes past ``committed``): a writer was killed mid-write, or a failed append
  could not be cut back. They were never committed: they are moved to ``quarantine/`` and cut.
* **Committed bytes missing or damaged** in the active segment. While the kernel that wrote the
  header is still running (same boot), the page cache never lost a byte, so this is damage:
  reported as :class:`CorruptLogError` with the byte range, nothing cut, no offset reassigned.
  After a reboot, bytes from the header's ``synced`` mark on may never have reached the disk
  (a power loss under ``sync="none"/"interval"``, or under ``"always"`` before the group flush
  of appends that had not returned, see ``_groupsync``): the log is cut back to the last whole
  event before the first missing or damaged byte, never below ``synced``.
* **Both header copies invalid**: the header is rebuilt from the last segment's whole lines when
  the damage is a tail; damage followed by more events is reported, not cut.
"""

from __future__ import annotations

import logging
import os
import time

from ._fsutil import os_errors, write_all
from ._header import Header, boot_id
from ._layout import QUARANTINE_DIR, Folder
from .errors import CorruptLogError

__all__ = ["check_active", "quarantine", "rebuild_header", "scan_whole_lines"]

log = logging.getLogger("eventpipe")

_BLOCK = 1 << 20


def scan_whole_lines(fd: int, start: int, end: int) -> tuple[int, int]:
    """``(good_end, lines)``: where the whole lines from ``start`` (a line start) stop being
    events, before ``end``, and how many there are.

    A line stops being an event at a NUL byte, an empty line, or bytes with no newline before
    ``end``. ``good_end`` is just past the last newline before the first such byte.
    """
    position = good_end = start
    lines = 0
    previous = b"\n"  # start is a line start
    while position < end:
        block = os.pread(fd, min(_BLOCK, end - position), position)
        if not block:
            break
        bad = block.find(b"\0")
        # An empty line is a newline right after another (or at ``start``): in ``previous +
        # block`` its index is the block index of that second newline.
        empty = (previous + block).find(b"\n\n")
        if empty >= 0 and (bad < 0 or empty < bad):
            bad = empty
        whole = block if bad < 0 else block[:bad]
        cut = whole.rfind(b"\n") + 1
        lines += whole.count(b"\n")
        if cut:
            good_end = position + cut
        if bad >= 0:
            return good_end, lines
        previous = block[-1:]
        position += len(block)
    return good_end, lines


def check_active(fd: int, path: str, h: Header) -> Header:
    """The header a writer may append after: ``h`` itself, or ``h`` cut back after a reboot.

    Raises CorruptLogError when committed bytes are missing or damaged where no crash can
    explain it (see the module docstring). Cutting back is left to the caller (it quarantines
    ``good_end..size`` and rewrites the header).
    """
    size = os.fstat(fd).st_size
    if h.boot != 0 and h.boot == boot_id():
        if size < h.committed:
            raise CorruptLogError(
                f"active segment is {size} bytes but the header commits {h.committed}: bytes "
                f"{size}..{h.committed - 1} are missing, though no crash of this boot can have "
                "lost them; refusing to append (run `eventpipe verify`)",
                path=path, offset=h.head)
        return h
    # After a reboot: read the whole active segment once (it is bounded by the segment size).
    good_end, lines = scan_whole_lines(fd, 0, min(size, h.committed))
    if good_end == h.committed:
        return h
    if good_end < h.synced:
        raise CorruptLogError(
            f"active segment is damaged at bytes {good_end}..{h.synced - 1}, which had been "
            f"fsynced before the restart; refusing to append (run `eventpipe verify`)",
            path=path, offset=h.segment_base + lines)
    head = h.segment_base + lines
    if head > h.head:
        raise CorruptLogError(
            f"active segment holds more lines ({head - h.segment_base}) than the header "
            f"commits ({h.head - h.segment_base})", path=path, offset=h.head)
    log.warning("%s: after a restart, events %d..%d (bytes %d..%d) were not on disk; cutting "
                "the log back to offset %d (%s)",
                path, head, h.head - 1, good_end, h.committed, head,
                "appends that had not been made durable: under sync=none or interval, or "
                "under always appends that had not returned")
    return h._replace(head=head, committed=good_end, synced=min(h.synced, good_end),
                      boot=boot_id(), flags=0)


def rebuild_header(fd: int, path: str, base: int) -> Header:
    """A header for segment ``base`` (open as ``fd``) when both header copies are invalid.

    Keeps every whole event before the first damaged byte. If whole lines follow the damage,
    the damage is inside committed history: CorruptLogError naming the byte range, nothing cut.
    """
    size = os.fstat(fd).st_size
    good_end, lines = scan_whole_lines(fd, 0, size)
    if good_end < size:
        rest_nl = _first_newline_after_damage(fd, good_end, size)
        if rest_nl >= 0:
            raise CorruptLogError(
                f"the log header is invalid and the active segment is damaged at bytes "
                f"{good_end}..{rest_nl} with events after the damage; refusing to guess where "
                f"the log ends (offset {base + lines} is the first one affected)",
                path=path, offset=base + lines)
    log.warning("%s: log header was invalid; rebuilt it from %d whole events", path, lines)
    return Header(base + lines, base, good_end, 0, boot_id(), 0)


def _first_newline_after_damage(fd: int, start: int, end: int) -> int:
    """Position of a newline after ``start`` that ends more data, -1 if only a torn tail (a
    partial line, NUL bytes) follows."""
    position = start
    while position < end:
        block = os.pread(fd, min(_BLOCK, end - position), position)
        if not block:
            break
        nl = block.replace(b"\0", b"").find(b"\n")
        if nl >= 0:
            return position + block.find(b"\n")
        position += len(block)
    return -1


def quarantine(fd: int, path: str, root: Folder, base: int, start: int, end: int, *,
               file_mode: int, dir_mode: int) -> str:
    """Move bytes ``start..end`` of segment ``base`` (open as ``fd``) to the log's
    ``quarantine/`` folder and cut them off; returns the quarantine file's path."""
    name = f"{base:020d}-{start}-{time.time_ns()}.bin"
    with root.sub(QUARANTINE_DIR, create_mode=dir_mode) as qdir:
        qpath = qdir.path_of(name)
        qfd = qdir.open_file(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode)
        with os_errors("quarantine torn tail", qpath):
            try:
                pos = start
                while pos < end:
                    block = os.pread(fd, min(_BLOCK, end - pos), pos)
                    if not block:
                        break
                    write_all(qfd, block, pos - start)
                    pos += len(block)
                os.fsync(qfd)
            finally:
                os.close(qfd)
        qdir.fsync()
    with os_errors("cut torn tail", path):
        os.ftruncate(fd, start)
        os.fsync(fd)
    log.warning("%s: cut %d uncommitted bytes at %d..%d (kept in %s)", path, end - start,
                start, end, qpath)
    return qpath
