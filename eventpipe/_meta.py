"""``eventpipe.json``: the marker that makes a folder a log, its format version and log id.

Written once, atomically, by whoever creates the log; rewritten (atomically) only to raise the
format version when a writer upgrades an older log. Version 2 logs have the two-copy header of
``_header``; a version-1 log is read as it is and upgraded by its next writer, so an older
eventpipe refuses it clearly (UnsupportedFormatError) rather than misreading the new header.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from ._layout import META_FILE, Folder
from .errors import NotAnEventLogError, StorageError, UnsupportedFormatError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "META_FILE", "new_meta", "read_meta",
           "stored_file_mode", "upgrade"]

FORMAT_NAME = "eventpipe-log"
FORMAT_VERSION = 3  # 3: the EPH3 header and time indexes


def new_meta(file_mode: int) -> bytes:
    """The content of a new log's ``eventpipe.json``: a fresh log id, and the mode its files
    are created with (every later writer uses it unless told otherwise)."""
    return orjson.dumps({
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "log_id": uuid.uuid4().hex,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "file_mode": oct(file_mode),
    }, option=orjson.OPT_INDENT_2)


def stored_file_mode(meta: dict[str, Any]) -> int | None:
    """The file mode a log was created with; None for logs made before it was recorded (or
    a value that is not a valid mode, which is then ignored)."""
    text = meta.get("file_mode")
    try:
        mode = int(text, 8) if isinstance(text, str) else None
    except ValueError:
        return None
    return mode if mode is not None and 0o600 <= mode <= 0o777 and mode & 0o600 == 0o600 \
        else None


def read_meta(root: Folder) -> dict[str, Any]:
    """The checked content of ``eventpipe.json`` in log folder ``root``; NotAnEventLogError
    for a foreign or damaged file, UnsupportedFormatError for a newer format."""
    meta_path = root.path_of(META_FILE)
    raw = root.read_bytes(META_FILE)
    if raw is None:
        raise StorageError.from_os_error(FileNotFoundError(2, "No such file or directory"),
                                         "read log metadata", path=meta_path)
    try:
        meta = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise NotAnEventLogError(f"{META_FILE} is not JSON", path=meta_path) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise NotAnEventLogError(f"{META_FILE} does not describe an eventpipe log",
                                 path=meta_path)
    if not isinstance(meta.get("log_id"), str) or not meta["log_id"]:
        raise NotAnEventLogError(f"{META_FILE} has no log id; not written by eventpipe",
                                 path=meta_path)
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise NotAnEventLogError(f"{META_FILE} has no valid format version ({version!r})",
                                 path=meta_path)
    if version > FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"log format version {version!r} is newer than this eventpipe supports "
            f"({FORMAT_VERSION}); upgrade eventpipe to read it",
            path=meta_path,
        )
    return meta


def upgrade(root: Folder, file_mode: int) -> None:
    """Raise an older log's format version to this one's (the caller holds the writer lock,
    before it writes anything in the new format)."""
    meta = read_meta(root)
    if meta["version"] < FORMAT_VERSION:
        meta["version"] = FORMAT_VERSION
        root.write_atomic(META_FILE, orjson.dumps(meta, option=orjson.OPT_INDENT_2), file_mode)
