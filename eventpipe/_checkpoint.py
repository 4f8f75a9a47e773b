"""Consumer checkpoints: a consumer's state and position, persisted atomically together.

One JSON file per consumer name, ``<dir>/<name>.json``, replaced as a whole (temp file, fsync,
rename, fsync of the folder), so a crash at any instant leaves the old checkpoint or the new,
never a mix of one's state with the other's offset. The previous checkpoint is kept beside it
as ``<name>.json.prev``.

Every file is reached relative to an open :class:`~eventpipe._layout.Folder`, never by path and
never through a link: the folder is shared (``<log>/consumers/``), and a link planted there
would otherwise make a privileged consumer read or write a file elsewhere (issue 15).

Besides ``state`` and ``offset`` (the next offset to process) a checkpoint records where the
last consumed event lies (segment and byte position), so resuming needs no scan, and a CRC of
that event's stored bytes: on resume the event is read back and compared, which catches a log
that was replaced, restored from an older backup, or cut back underneath the consumer.

Format version 2 ends each file with a CRC-32 of everything before it, so an edited or damaged
checkpoint (an offset changed by hand would apply events twice) is refused rather than trusted;
version 1 files (no checksum) are still read. A state is stored only if it reads back equal to
itself (see :func:`encode_state`): JSON types with string keys, 64-bit integers, finite floats.

A consumer with a dead-letter log names it in every checkpoint (``dead_letter``: its absolute
path and log id), so ``eventpipe status`` and ``consumers`` can count the consumer's entries
there. The field was added within version 2: a file without it (written before) reads as
``None`` (not known), and earlier eventpipe versions, which ignore fields they do not know,
read files that have it.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import math
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from ._layout import Folder
from .errors import (
    CheckpointError,
    ConfigError,
    StateNotStorableError,
    StorageError,
    UnsafePathError,
)

__all__ = [
    "Checkpoint",
    "DeadLetterLog",
    "checkpoint_file",
    "encode_state",
    "load_checkpoint",
    "remove_temp_files",
    "save_checkpoint",
    "storage_context",
    "validate_name",
]

FORMAT_NAME = "eventpipe-checkpoint"
FORMAT_VERSION = 2
ROUNDTRIP_LIMIT = 1 << 20
# The file's last field; the CRC covers the bytes before it (plus the closing brace).
_CHECKSUM_KEY = b',"checksum":'
# Types orjson would otherwise write as something else (datetime -> str, dataclass -> dict,
# str/int/dict/list subclasses -> the base type): refused, so a state never changes type across
# a restart.
_STRICT = (orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
           | orjson.OPT_PASSTHROUGH_SUBCLASS)
_NAME = re.compile(r"[A-Za-z0-9_.@:+-]{1,128}")


def validate_name(name: str) -> str:
    """Check a consumer name: 1-128 of ``A-Za-z0-9_.@:+-``, and not ``.`` or ``..``.

    Raises ConfigError. Names become file names, so nothing may escape the folder.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(
            f"consumer name {name!r} is invalid: use 1-128 characters from A-Z a-z 0-9 _ . @ : "
            "+ - (no path separators, not '.' or '..')",
            option="name",
        )
    return name


def checkpoint_file(name: str) -> str:
    """The checkpoint's file name for consumer ``name`` (raises ConfigError if invalid)."""
    return f"{validate_name(name)}.json"


@contextlib.contextmanager
def storage_context(what: str) -> Iterator[None]:
    """Prefix the message of a StorageError raised in the block with ``what`` failed (a
    Folder names only the system call and the path). An UnsafePathError passes unchanged:
    its message says all."""
    try:
        yield
    except UnsafePathError:
        raise
    except StorageError as exc:
        exc.message = f"{what}: {exc.message}"
        raise


def encode_state(state: Any) -> bytes:
    """``state`` as JSON, only if it reads back equal to itself; raises ValueError saying why.

    A checkpointed state is what a restarted consumer resumes with, so it must survive the
    round trip unchanged: dicts with string keys, lists, strings, integers within 64 bits,
    finite floats, booleans and None. The encoder refuses sets, datetimes, dataclasses,
    subclasses of str/int/dict/list, integers beyond 64 bits and non-string keys at no extra
    cost. What orjson would store as another type (tuples as lists, UUIDs and enums as their
    values, NaN as null) only a decode and compare finds: done for states up to
    ROUNDTRIP_LIMIT encoded bytes (a few ms), beyond which it would cost more than the
    checkpoint's write.
    """
    try:
        data = orjson.dumps(state, option=_STRICT)
    except orjson.JSONEncodeError as exc:
        where = _first_change(state)
        raise ValueError(f"{exc}" + (f" ({where})" if where else "")) from None
    if len(data) <= ROUNDTRIP_LIMIT and not _reads_back(data, state):
        raise ValueError(f"it does not read back equal to itself: {_first_change(state)}")
    return data


def _reads_back(data: bytes, state: Any) -> bool:
    # Decoding builds every object anew: with the cyclic GC paused, about 3x the encode time
    # instead of 10-20x (it would otherwise scan the new objects again and again).
    paused = gc.isenabled()
    gc.disable()
    try:
        return bool(orjson.loads(data) == state)
    finally:
        if paused:
            gc.enable()


def _first_change(value: Any, where: str = "state") -> str:
    """Where a value stops surviving a JSON round trip, and as what (for error messages)."""
    children: list[tuple[str, Any]] = []
    if isinstance(value, dict) and type(value) is dict:
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where} has a key of type {type(key).__name__} ({key!r})"
            children.append((f"{where}[{key!r}]", item))
    elif type(value) is list:
        children = [(f"{where}[{i}]", item) for i, item in enumerate(value)]
    elif type(value) is int and not -(1 << 63) <= value < 1 << 64:
        return f"{where} is {value}, beyond 64 bits"
    elif isinstance(value, float) and not math.isfinite(value):
        return f"{where} is {value} (stored as null)"
    elif value is not None and type(value) not in (str, int, float, bool):
        kind = type(value).__name__
        return f"{where} is a {kind} ({value!r:.60}), which JSON does not hold unchanged"
    for path, item in children:
        found = _first_change(item, path)
        if found:
            return found
    return ""


def remove_temp_files(folder: Folder, filename: str) -> int:
    """Remove temp files that writes of the checkpoint ``filename`` in ``folder`` left behind
    when killed.

    Call only while holding the consumer's name: then no other process writes them. Returns
    how many were removed.
    """
    return folder.remove_stale_temps(filename) + folder.remove_stale_temps(filename + ".prev")


class DeadLetterLog(NamedTuple):
    """The dead-letter log a consumer puts failed events in: its absolute path, and its log id
    (so that another log found at the path later is not taken for it)."""

    path: str
    log_id: str


@dataclass(frozen=True)
class Checkpoint:
    """What a consumer persisted: its state and where it is in which log."""

    name: str
    log_id: str
    offset: int  # next offset to process
    state: Any
    segment: int | None  # segment base holding the last consumed event (offset - 1)
    position: int | None  # byte position of that event in the segment's content
    fingerprint: int | None  # crc32 of that event's stored bytes
    updated_at: float  # seconds since the epoch
    # Set only on the checkpoint written just before dead-lettering the event at ``offset``:
    # the dead-letter log's head then. A restart finds the entry (if the append happened) by
    # reading from there, so it is never written twice and the event is not handled again.
    dead_letter_from: int | None = None
    version: int = FORMAT_VERSION  # of the file it was read from
    # The consumer's dead-letter log, if it has one (None also for files written before this
    # field was: not known).
    dead_letter: DeadLetterLog | None = None

    def to_bytes(self) -> bytes:
        """The file's content. Raises ValueError (saying why) for a state that cannot be
        stored unchanged (see :func:`encode_state`)."""
        head = orjson.dumps({
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "name": self.name,
            "log_id": self.log_id,
            "offset": self.offset,
            "segment": self.segment,
            "position": self.position,
            "fingerprint": self.fingerprint,
            "dead_letter_from": self.dead_letter_from,
            "updated_at": self.updated_at,
            **({} if self.dead_letter is None else
               {"dead_letter": {"path": self.dead_letter.path,
                                "log_id": self.dead_letter.log_id}}),
        })
        body = b"%s,\"state\":%s" % (head[:-1], encode_state(self.state))
        return b"%s%s%d}" % (body, _CHECKSUM_KEY, zlib.crc32(body + b"}"))


def save_checkpoint(folder: Folder, filename: str, checkpoint: Checkpoint, mode: int) -> None:
    """Atomically replace the checkpoint ``filename`` in ``folder``, keeping the old one as
    ``.prev``.

    Raises StateNotStorableError if the state cannot be stored unchanged (see :func:`encode_state`),
    StorageError (disk full, permission) with the old checkpoint intact, UnsafePathError for a
    link where a temp file is created. A link at ``filename`` or its ``.prev`` is replaced,
    never written through.
    """
    path = folder.path_of(filename)
    try:
        data = checkpoint.to_bytes()
    except ValueError as exc:
        raise StateNotStorableError(f"consumer state cannot be stored as JSON: {exc}",
                                    path=path) from None
    prev = filename + ".prev"
    with storage_context("keep previous checkpoint"):
        # A hard link costs no copy; rename over .prev keeps the swap atomic. The link is of
        # the entry itself (a planted symbolic link is copied as a link, not followed).
        tmp_prev = f"{prev}.tmp.{os.getpid()}"
        folder.unlink(tmp_prev)  # left by a process of the same pid killed right here
        try:
            folder.link(filename, tmp_prev)
        except StorageError as exc:
            if exc.errno != errno.ENOENT:
                raise
            # no checkpoint yet
        else:
            folder.rename(tmp_prev, prev)
            # rename() does nothing when both names are already one file (a writer killed
            # between this step and the next left .prev == current): drop the temp name.
            folder.unlink(tmp_prev)
    with storage_context("write checkpoint"):
        folder.write_atomic(filename, data, mode)


def load_checkpoint(folder: Folder, filename: str, name: str | None = None
                    ) -> Checkpoint | None:
    """Read the checkpoint ``filename`` in ``folder``; None if there is none.

    Raises CheckpointError naming the file when it is not a valid checkpoint (a bad checksum,
    a field of the wrong type, another consumer's when ``name`` is given), and says whether a
    previous one is kept beside it; UnsafePathError (nothing read) when the file is a link or
    not a regular file; StorageError when it cannot be read.
    """
    path = folder.path_of(filename)
    with storage_context("read checkpoint"):
        raw = folder.read_bytes(filename)
    if raw is None:
        return None
    try:
        cp = _parse(raw)
        if name is not None and cp.name != name:
            raise ValueError(f"it is consumer {cp.name!r}'s checkpoint, not {name!r}'s")
    except (ValueError, KeyError, TypeError) as exc:
        try:
            kept = folder.exists(filename + ".prev")
        except StorageError:
            kept = False
        hint = f" (the previous checkpoint is kept as {filename}.prev)" if kept else ""
        raise CheckpointError(f"checkpoint is corrupt: {exc}{hint}", path=path) from None
    return cp


def _parse(raw: bytes) -> Checkpoint:
    doc = orjson.loads(raw)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ValueError("not an eventpipe checkpoint")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not (
            1 <= version <= FORMAT_VERSION):
        raise ValueError(f"unsupported checkpoint version {version!r}")
    if version >= 2:
        at = raw.rfind(_CHECKSUM_KEY)
        stored = doc.get("checksum")
        if at < 0 or isinstance(stored, bool) or not isinstance(stored, int) or (
                zlib.crc32(raw[:at] + b"}") != stored):
            raise ValueError("checksum mismatch: the file was edited or damaged")
    cp = Checkpoint(
        name=_typed(doc, "name", str),
        log_id=_typed(doc, "log_id", str),
        offset=_typed(doc, "offset", int),
        state=doc["state"],
        segment=_typed(doc, "segment", int, optional=True),
        position=_typed(doc, "position", int, optional=True),
        fingerprint=_typed(doc, "fingerprint", int, optional=True),
        updated_at=float(_typed(doc, "updated_at", float | int)),
        dead_letter_from=(_typed(doc, "dead_letter_from", int, optional=True)
                          if version >= 2 else None),
        version=version,
        dead_letter=_dead_letter(doc.get("dead_letter")),
    )
    if cp.offset < 0 or (cp.offset > 0 and None in (cp.segment, cp.position, cp.fingerprint)):
        raise ValueError("offset and position fields are inconsistent")
    if (cp.segment is not None and cp.segment < 0) or (
            cp.position is not None and cp.position < 0) or (
            cp.dead_letter_from is not None and cp.dead_letter_from < 0):
        raise ValueError("a position field is negative")
    return cp


def _dead_letter(value: Any) -> DeadLetterLog | None:
    """The ``dead_letter`` field: absent or null (not known), or {"path", "log_id"}."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("field 'dead_letter' has the wrong type")
    return DeadLetterLog(_typed(value, "path", str), _typed(value, "log_id", str))


def _typed(doc: dict[str, Any], key: str, kind: Any, *, optional: bool = False) -> Any:
    value = doc[key]
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"field {key!r} has the wrong type")
    return value
