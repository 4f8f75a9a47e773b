"""``eventpipe status``: what a log holds and who is using it, from the directory alone."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

import orjson

from ._checksum import sum_name
from ._compress import load_state
from ._deadletter import DeadLetterCounts
from ._groupsync import read_mark
from ._inotify import inotify_usage
from ._layout import COMPRESS_LOCK, CONSUMERS_DIR, QUARANTINE_DIR, WRITER_LOCK, Folder
from ._log import EventLog
from ._registry import ConsumerPosition, consumer_positions
from ._segment import SegmentFile, list_segments
from .errors import StorageError

__all__ = ["flock_holders", "format_status", "log_status", "openers"]


def openers(path: str) -> tuple[list[int], bool]:
    """PIDs of the processes with ``path`` open (a standby keeps its lock file open while it
    waits), and whether every process could be looked at (other users' are hidden unless
    root)."""
    try:
        st = os.stat(path, follow_symlinks=False)
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return [], False
    base = os.path.basename(path)
    found, complete = set(), True
    for pid in pids:
        fds = f"/proc/{pid}/fd"
        try:
            entries = os.listdir(fds)
        except FileNotFoundError:
            continue  # exited meanwhile
        except OSError:
            complete = False
            continue
        for fd in entries:
            with contextlib.suppress(OSError):
                if os.readlink(f"{fds}/{fd}").removesuffix(" (deleted)").endswith(base):
                    other = os.stat(f"{fds}/{fd}")
                    if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                        found.add(int(pid))
    return sorted(found), complete


def flock_holders(path: str) -> list[int]:
    """PIDs holding a flock on ``path``, from /proc/locks (empty where unavailable).

    Linux lists each lock with the pid that took it and the file's device and inode; a lock
    inherited across fork() shows the original taker.
    """
    try:
        st = os.stat(path, follow_symlinks=False)  # a planted link names the link's inode
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:123 0 EOF" (blocked waiters have "->")
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        if parts[5] == dev:
            pids.append(int(parts[4]))
    return sorted(set(pids))


def log_status(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready description of the log at ``path`` (read-only).

    Raises NotAnEventLogError when ``path`` holds no log (opening one would create it).
    """
    now = time.time()
    with EventLog(path, create=False) as log:
        head = log.head
        segs = list_segments(log.segments)
        sizes = []
        for s in segs:
            st = log.segments.lstat(s.name)  # a link planted here is not followed
            sizes.append(0 if st is None else st.st_size)  # 0: compressed or pruned meanwhile
        # In the log's consumers/ folder, and registered ones checkpointing elsewhere.
        consumers = []
        dead_letters = DeadLetterCounts()
        try:
            inside: Folder | None = log.folder.sub(CONSUMERS_DIR)
        except StorageError:
            inside = None  # no consumer yet (or not a folder: verify says so)
        try:
            for pos in consumer_positions(log.folder, log.log_id):
                entry = _consumer_entry(pos, head, now)
                if "offset" in entry:
                    entry["lag_seconds"] = _rounded(log.lag_seconds(entry["offset"], now=now))
                entry.update(dead_letters.fields(pos.checkpoint))
                stop = _last_stop(inside, pos)
                if stop is not None:
                    entry["last_stop"] = stop
                consumers.append(entry)
        finally:
            if inside is not None:
                inside.close()
        try:
            with log.folder.sub(QUARANTINE_DIR) as quarantine:
                quarantined = len(quarantine.names())
        except StorageError:
            quarantined = 0  # none yet (or not a folder: verify reports that)
        active = log.committed_header().segment_base
        return {
            "path": log.path,
            "log_id": log.log_id,
            "head": head,
            "first_offset": segs[0].base if segs else head,
            "segments": {
                "count": len(segs),
                "bytes": sum(sizes),
                "compressed": sum(1 for s in segs if s.compressed),
                "plain": sum(1 for s in segs if not s.compressed),
            },
            "consumers": consumers,
            "writers_holding_lock": flock_holders(os.path.join(log.path, WRITER_LOCK)),
            # A writer keeps writer.lock open from its first append until it closes, and
            # holds the lock only while it commits: a streaming `eventpipe append` is here.
            "writers_open": openers(os.path.join(log.path, WRITER_LOCK))[0],
            "compressing": flock_holders(os.path.join(log.path, COMPRESS_LOCK)),
            "sealing": _sealing(log.folder, log.segments, segs, active),
            "group_commit": _group_commit(log.folder),
            "quarantined_files": quarantined,
            "inotify": _inotify(),
        }


def _inotify() -> dict[str, Any]:
    """inotify capacity of the user running status: past the limit, new consumers and
    followers poll instead of being woken (see :func:`eventpipe._changes.inotify_usage`)."""
    usage = inotify_usage()
    return {**dataclasses.asdict(usage), "warning": usage.warning}


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _consumer_entry(pos: ConsumerPosition, head: int, now: float) -> dict[str, Any]:
    """One consumer of the report. An external one (checkpointing outside the log, registered
    in ``consumers/external/``) shows its checkpoint and registration files; one that has not
    checkpointed yet is ``pending``; ``holds_retention_from`` is the first offset retention
    keeps for it (0 when its position is unknown: pending or ``error``)."""
    known, cp = pos.consumer, pos.checkpoint
    entry: dict[str, Any] = {"name": known.name, "external": known.external}
    if known.external:
        entry.update(checkpoint=known.checkpoint, registration=known.registration)
    if pos.error is not None:
        entry["error"] = pos.error
    elif cp is not None:
        entry.update(offset=cp.offset, lag=max(0, head - cp.offset),
                     last_checkpoint=cp.updated_at,
                     checkpoint_age_seconds=round(now - cp.updated_at, 3))
    elif pos.pending:
        entry["pending"] = True
    entry["holds_retention_from"] = pos.hold
    lock = os.path.join(os.path.dirname(known.checkpoint), f"{known.name}.lock") \
        if known.checkpoint is not None else None
    entry["running_pids"] = flock_holders(lock) if lock is not None else []
    return entry


def _last_stop(inside: Folder | None, pos: ConsumerPosition) -> dict[str, Any] | None:
    """What stopped the consumer last (its ``<name>.error``, left when a handler error or an
    unstorable state stopped it and removed by its next checkpoint); None if nothing did."""
    known = pos.consumer
    name = f"{known.name}.error"
    try:
        if known.external:
            if known.checkpoint is None:
                return None
            with Folder.open(os.path.dirname(known.checkpoint)) as folder:
                raw = folder.read_bytes(name)
        elif inside is not None:
            raw = inside.read_bytes(name)
        else:
            return None
        doc = orjson.loads(raw) if raw is not None else None
    except (StorageError, orjson.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _sealing(root: Folder, folder: Folder, segs: list[SegmentFile],
             active: int) -> dict[str, Any]:
    """The sealing work on sealed segments: what is left, what was found damaged, the
    compressor's recent errors (from ``compress.state``, written by whichever process ran
    the last pass)."""
    sealed = [s for s in segs if s.base < active]
    state = load_state(root)
    return {
        "sealed": len(sealed),
        "without_checksum": sum(1 for s in sealed if not folder.exists(sum_name(s.base))),
        "plain": sum(1 for s in sealed if not s.compressed),
        "checksummed_below": state.summed_below if state is not None else None,
        "compressed_below": state.gzipped_below if state is not None else None,
        "damaged": [{"segment": base, "next": nxt, "error": why}
                    for base, (nxt, why) in sorted(state.damaged.items())]
        if state is not None else [],
        "errors": state.errors if state is not None else [],
    }


def _group_commit(root: Folder) -> dict[str, Any] | None:
    """sync="always"'s durable mark for this boot (see _groupsync): how far flushes made the
    log durable, how many there were, and the offsets of any flush that failed; None when no
    writer flushed under sync="always" since the machine started."""
    mark = read_mark(root)
    if not mark.boot:
        return None
    failed = [mark.failed_from, mark.failed_to] if mark.failed_to else None
    return {"durable_head": mark.head, "flushes": mark.flushes, "failed": failed}


def format_status(report: dict[str, Any]) -> str:
    """The human-readable form of :func:`log_status`."""
    seg = report["segments"]
    lines = [
        f"log        {report['path']}",
        f"head       {report['head']:,} events (first stored offset {report['first_offset']:,})",
        f"segments   {seg['count']} ({seg['compressed']} gzip, {seg['plain']} plain), "
        f"{seg['bytes']:,} bytes on disk",
        f"writers    {', '.join(map(str, report.get('writers_open', []))) or 'none'} with the "
        f"log open for appending, "
        f"{', '.join(map(str, report['writers_holding_lock'])) or 'none'} holding the writer "
        "lock",
    ]
    sealing = report.get("sealing")
    if sealing is not None:
        lines.append(
            f"sealing    {sealing['sealed']} sealed segment(s): {sealing['without_checksum']} "
            f"without checksum, {sealing['plain']} not compressed")
        for d in sealing["damaged"]:
            lines.append(f"damaged    segment {d['segment']:,} (offsets {d['segment']:,}.."
                         f"{d['next'] - 1:,}): {d['error']} (left as it is; see verify)")
        for e in sealing["errors"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("time", 0)))
            lines.append(f"compressor {when} pid {e.get('pid', '?')}: {e.get('error', '?')}")
    group = report.get("group_commit")
    if group is not None:
        lines.append(f"durable    offsets below {group['durable_head']:,} flushed "
                     f"(sync=always, {group['flushes']:,} group flush(es) since boot)")
        if group["failed"] is not None:
            first, end = group["failed"]
            lines.append(f"FAILED     a flush of offsets {first:,}..{end - 1:,} failed: they are "
                         "committed but their durability is unknown (their writers got "
                         "DurabilityError)")
    if report["quarantined_files"]:
        lines.append(f"quarantine {report['quarantined_files']} file(s) of cut torn tails")
    inotify = report.get("inotify")
    if inotify is not None:
        def of(limit: int | None) -> str:
            return "?" if limit is None else f"{limit:,}"

        lines.append(
            f"inotify    {inotify['instances_in_use']} of {of(inotify['max_user_instances'])} "
            f"instances in use by uid {inotify['uid']} ({inotify['watches_in_use']:,} of "
            f"{of(inotify['max_user_watches'])} watches)")
        if inotify["warning"]:
            lines.append(f"WARNING    {inotify['warning']}")
    lines.append("consumers" + ("" if report["consumers"] else "  none"))
    for c in report["consumers"]:
        lines += _consumer_lines(c, report["path"])
    return "\n".join(lines) + "\n"


def _consumer_lines(c: dict[str, Any], path: str) -> list[str]:
    """One consumer's lines in :func:`format_status`."""
    lines = []
    running = f"running (pid {', '.join(map(str, c['running_pids']))})" \
        if c["running_pids"] else "stopped"
    if "error" in c:
        lines.append(f"  {c['name']:<20} ERROR {c['error']} (retention keeps everything "
                     "for it until fixed)")
    elif c.get("pending"):
        lines.append(f"  {c['name']:<20} no checkpoint yet: retention keeps everything for "
                     f"it  {running}  (if it was removed: eventpipe consumers forget "
                     f"{path} {c['name']})")
    else:
        behind = c.get("lag_seconds")
        lines.append(f"  {c['name']:<20} offset {c.get('offset', 0):>12,}  lag "
                     f"{c.get('lag', 0):>10,}"
                     f" ({'?' if behind is None else f'{behind:.1f}s'})  checkpoint "
                     f"{c.get('checkpoint_age_seconds', 0):.1f}s ago  {running}")
    stop = c.get("last_stop")
    if stop:
        lines.append(f"  {'':<20} stopped by: {stop.get('error')} (pid {stop.get('pid')}, "
                     f"{max(0.0, time.time() - float(stop.get('time') or 0)):.0f}s ago)")
    if c.get("dead_letter_log"):
        count = c.get("dead_letters")
        lines.append(f"  {'':<20} dead letters: {count:,} in {c['dead_letter_log']}"
                     if count is not None else
                     f"  {'':<20} dead letters: ? ({c['dead_letter_log']} cannot be read, "
                     "or holds another log now)")
    if c.get("external"):
        lines.append(f"  {'':<20} external checkpoint {c.get('checkpoint') or '?'} "
                     f"(registered in {c.get('registration')})")
    return lines
