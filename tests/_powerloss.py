"""What a power loss would leave on disk, rebuilt from a strace of real writer processes.

``strace -f -xx -s <big>`` records every ``openat``, ``pwrite64``, ``ftruncate``, ``fsync`` and
``fdatasync`` of the writers (and their threads) in one file, in the order the kernel ran them.
A write is *durable* at a cut point when an fsync of the same file began after the write
returned and returned itself before the cut. Everything else written before the cut may or may
not be on disk: an adversary chooses (drop it all, keep every header write and drop the rest,
or a coin per write), and the log folder is rebuilt from the chosen writes, as the disk would
hold it after the machine came back.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

_LINE = re.compile(r"^(\d+)\s+(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_RESULT = re.compile(r"\)\s+=\s+(-?\d+)(?:\s.*)?$")
_STRING = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')


def _bytes(escaped: str) -> bytes:
    return bytes.fromhex(escaped.replace("\\x", ""))


@dataclass
class Call:
    pid: int
    name: str
    args: str
    result: int
    entry: int  # line index where the call began
    exit: int  # line index where it returned


def parse(trace: str) -> list[Call]:
    """The completed calls of a ``strace -f`` output, with entry and exit positions."""
    calls: list[Call] = []
    pending: dict[int, tuple[str, str, int]] = {}
    for index, raw in enumerate(trace.splitlines()):
        m = _LINE.match(raw)
        if not m:
            continue
        pid, rest = int(m.group(1)), m.group(2)
        if rest.endswith("<unfinished ...>"):
            c = _CALL.match(rest)
            if c:
                pending[pid] = (c.group(1), c.group(2)[: -len("<unfinished ...>")], index)
            continue
        r = _RESUMED.match(rest)
        if r:
            name, args, entry = pending.pop(pid, (r.group(1), "", index))
            rest_args = args + r.group(2)
        else:
            c = _CALL.match(rest)
            if not c:
                continue
            name, rest_args, entry = c.group(1), c.group(2), index
        res = _RESULT.search(rest_args)
        if not res:
            continue
        calls.append(Call(pid, name, rest_args[: res.start()], int(res.group(1)), entry,
                          index))
    return calls


@dataclass
class FileOps:
    writes: list[tuple[int, int, bytes]] = field(default_factory=list)  # (exit, offset, data)
    truncates: list[tuple[int, int]] = field(default_factory=list)  # (exit, length)
    syncs: list[tuple[int, int]] = field(default_factory=list)  # (entry, exit)
    created: int = -1  # exit of the open that created it


@dataclass
class Recording:
    files: dict[str, FileOps]
    markers: list[tuple[int, bytes]]  # (entry, text) of the writers' writes to stderr
    end: int  # one past the last line


def record(calls: list[Call], end: int) -> Recording:
    """Per file: its writes, truncations and fsyncs; and the writers' stderr markers."""
    group: dict[int, int] = {}  # thread -> process
    fds: dict[tuple[int, int], str] = {}
    files: dict[str, FileOps] = {}
    markers: list[tuple[int, bytes]] = []
    for c in calls:
        proc = group.setdefault(c.pid, c.pid)
        first = c.args.split(",")[0].strip()
        if c.name in ("clone", "clone3") and c.result > 0:
            group[c.result] = proc if "CLONE_THREAD" in c.args else c.result
            if "CLONE_THREAD" not in c.args:  # a new process: a copy of the fd table
                for (p, fd), path in list(fds.items()):
                    if p == proc:
                        fds[(c.result, fd)] = path
        elif c.name == "openat" and c.result >= 0:
            s = _STRING.search(c.args)
            if not s:
                continue
            name = _bytes(s.group(1)).decode("utf-8", "replace")
            base = "" if first == "AT_FDCWD" or name.startswith("/") else fds.get(
                (proc, int(first)), "?")
            path = f"{base}/{name}" if base else name
            fds[(proc, c.result)] = path
            ops = files.setdefault(path, FileOps())
            if "O_CREAT" in c.args and ops.created < 0:
                ops.created = c.exit
        elif c.name == "close" and c.result == 0:
            fds.pop((proc, int(first)), None)
        elif c.name in ("pwrite64", "write") and c.result > 0:
            s = _STRING.search(c.args)
            if s is None:
                continue
            data = _bytes(s.group(1))[: c.result]
            if c.name == "write":
                if int(first) == 2:
                    markers.append((c.entry, data))
                continue
            offset = int(c.args.rsplit(",", 1)[1])
            target = fds.get((proc, int(first)))
            if target is not None:
                files.setdefault(target, FileOps()).writes.append((c.exit, offset, data))
        elif c.name == "ftruncate" and c.result == 0:
            target = fds.get((proc, int(first)))
            if target is not None:
                length = int(c.args.split(",")[1])
                files.setdefault(target, FileOps()).truncates.append((c.exit, length))
        elif c.name in ("fsync", "fdatasync") and c.result == 0:
            target = fds.get((proc, int(first)))
            if target is not None:
                files.setdefault(target, FileOps()).syncs.append((c.entry, c.exit))
    return Recording(files, markers, end)


def on_disk(ops: FileOps, cut: int, keep: str, rng: random.Random, is_header: bool) -> bytes:
    """The content the disk could hold at ``cut`` for one file, the adversary ``keep``
    choosing among the writes no finished fsync covers: "synced" keeps none of them,
    "headers" keeps them in the header and none elsewhere, "coin" tosses for each."""
    content = bytearray()
    events: list[tuple[int, int, int, bytes]] = []
    for exit_, offset, data in ops.writes:
        if exit_ >= cut:
            continue
        durable = any(entry > exit_ and sync_exit < cut for entry, sync_exit in ops.syncs)
        if not durable and not (keep == "headers" and is_header) and not (
                keep == "coin" and rng.random() < 0.5):
            continue
        events.append((exit_, 0, offset, data))
    events.extend((exit_, 1, length, b"") for exit_, length in ops.truncates if exit_ < cut)
    for _, kind, where, data in sorted(events, key=lambda e: (e[0], e[1])):
        if kind == 1:
            del content[where:]
            continue
        if len(content) < where:
            content.extend(bytes(where - len(content)))
        content[where:where + len(data)] = data
    return bytes(content)


def rebuild(rec: Recording, log: Path, out: Path, cut: int, keep: str, seed: int) -> bool:
    """Write at ``out`` the log folder the disk could hold at ``cut``; False if the log did
    not exist yet. Files are those of ``log`` the writers created or wrote (the header, the
    segments and their time indexes); the metadata file is copied (written once, before)."""
    rng = random.Random(seed)
    prefix = str(log) + "/"
    head = rec.files.get(prefix + "head")
    if head is None or not any(e < cut for e, _, _ in head.writes):
        return False
    out.mkdir()
    (out / "segments").mkdir()
    (out / "eventpipe.json").write_bytes((log / "eventpipe.json").read_bytes())
    for path, ops in sorted(rec.files.items()):
        if not path.startswith(prefix):
            continue
        name = path[len(prefix):]
        wanted = name == "head" or (name.startswith("segments/") and name.endswith(
            (".jsonl", ".times")))
        if not wanted or 0 <= cut <= ops.created or (ops.created < 0 and not ops.writes):
            continue
        (out / name).write_bytes(on_disk(ops, cut, keep, rng, name == "head"))
    return True
