"""Consumer checkpoints: a consumer's state and position, persisted atomically together.

One JSON file per consumer name, ``<dir>/<name>.json``, replaced as a whole (temp file, fsync,
rename, fsync of the folder), so a crash at any instant leaves the old checkpoint or the new,
never a mix of one's state with the other's offset. The previous checkpoint is kept beside it
as ``<name>.json.prev``.

Besides ``state`` and ``offset`` (the next offset to process) a checkpoint records where the
last consumed event lies (segment and byte position), so resuming needs no scan, and a CRC of
that event's stored bytes: on resume the event is read back and compared, which catches a log
that was replaced, restored from an older backup, or cut back underneath the consumer.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Any

import orjson

from ._fsutil import atomic_write, os_errors
from .errors import CheckpointError, ConfigError, StorageError

__all__ = ["Checkpoint", "checkpoint_path", "load_checkpoint", "save_checkpoint", "validate_name"]

FORMAT_NAME = "eventpipe-checkpoint"
FORMAT_VERSION = 1
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


def checkpoint_path(folder: str, name: str) -> str:
    return os.path.join(folder, f"{validate_name(name)}.json")


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

    def to_bytes(self) -> bytes:
        return orjson.dumps({
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "name": self.name,
            "log_id": self.log_id,
            "offset": self.offset,
            "segment": self.segment,
            "position": self.position,
            "fingerprint": self.fingerprint,
            "updated_at": self.updated_at,
            "state": self.state,
        })


def save_checkpoint(path: str, checkpoint: Checkpoint, mode: int) -> None:
    """Atomically replace the checkpoint at ``path``, keeping the old one as ``.prev``.

    Raises CheckpointError if the state is not JSON-serialisable, StorageError (disk full,
    permission) with the old checkpoint intact.
    """
    try:
        data = checkpoint.to_bytes()
    except orjson.JSONEncodeError as exc:
        raise CheckpointError(f"consumer state is not JSON-serialisable: {exc}",
                              path=path) from None
    prev = path + ".prev"
    with os_errors("keep previous checkpoint", path):
        # A hard link costs no copy; rename over .prev keeps the swap atomic.
        tmp_prev = f"{prev}.tmp.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_prev)  # left by a process of the same pid killed right here
        try:
            os.link(path, tmp_prev)
        except FileNotFoundError:
            pass  # no checkpoint yet
        else:
            os.rename(tmp_prev, prev)
            # rename() does nothing when both names are already one file (a writer killed
            # between this step and the next left .prev == current): drop the temp name.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_prev)
    atomic_write(path, data, mode)


def load_checkpoint(path: str) -> Checkpoint | None:
    """Read the checkpoint at ``path``; None if there is none.

    Raises CheckpointError naming the file when it is not a valid checkpoint (and says whether
    a previous one is kept beside it).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError.from_os_error(exc, "read checkpoint", path=path) from exc
    try:
        doc = orjson.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise ValueError("not an eventpipe checkpoint")
        if not isinstance(doc.get("version"), int) or doc["version"] > FORMAT_VERSION:
            raise ValueError(f"unsupported checkpoint version {doc.get('version')!r}")
        cp = Checkpoint(
            name=_typed(doc, "name", str),
            log_id=_typed(doc, "log_id", str),
            offset=_typed(doc, "offset", int),
            state=doc["state"],
            segment=_typed(doc, "segment", int, optional=True),
            position=_typed(doc, "position", int, optional=True),
            fingerprint=_typed(doc, "fingerprint", int, optional=True),
            updated_at=float(_typed(doc, "updated_at", float | int)),
        )
        if cp.offset < 0 or (cp.offset > 0 and None in (cp.segment, cp.position,
                                                        cp.fingerprint)):
            raise ValueError("offset and position fields are inconsistent")
    except (ValueError, KeyError) as exc:
        hint = (" (the previous checkpoint is kept as " + os.path.basename(path) + ".prev)"
                if os.path.exists(path + ".prev") else "")
        raise CheckpointError(f"checkpoint is corrupt: {exc}{hint}", path=path) from None
    return cp


def _typed(doc: dict[str, Any], key: str, kind: Any, *, optional: bool = False) -> Any:
    value = doc[key]
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"field {key!r} has the wrong type")
    return value
