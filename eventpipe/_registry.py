"""Consumers whose checkpoints live outside the log, registered inside it for retention.

A consumer keeps its checkpoint in ``<log>/consumers/<name>.json`` unless given
``checkpoint_dir``; retention and ``eventpipe status`` find the in-log ones by listing that
folder. One with a folder of its own is known only through a registration file in the log::

    <log>/consumers/external/<name>@<hash>.json
        {"format": "eventpipe-external-consumer", "version": 1, "name": ...,
         "checkpoint": "/absolute/path/<name>.json", "registered_at": 1700000000.0}

``<hash>`` is the first 12 hex digits of the SHA-256 of the absolute checkpoint path, so one
name may be registered with several folders (each is then a separate hold, until forgotten).
The consumer registers at construction; the file is rewritten only when missing or different,
so a restart costs one read. Nothing removes a registration but :func:`unregister_external`
(``eventpipe consumers forget``): a consumer that is merely stopped must keep its hold.

What retention makes of each known consumer (:func:`consumer_positions`):

- a checkpoint that loads and belongs to this log: held back from its offset;
- a registered consumer whose checkpoint does not exist yet (it has not checkpointed, or was
  deleted by its operator): held back from offset 0, i.e. nothing more is removed, and both
  ``status`` and the prune report say so and how to forget it;
- anything that cannot be read or checked (an unreadable checkpoint, a permission error, a
  checkpoint of another log, a registration that is not valid, a folder that cannot be
  listed): held back from offset 0, with the reason and the path. Never silently skipped:
  a skipped consumer is one whose events retention would remove.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from typing import NamedTuple

import orjson

from ._fsutil import atomic_write, fsync_dir, make_dirs, os_errors
from .checkpoint import Checkpoint, load_checkpoint, validate_name
from .errors import ConfigError, EventPipeError, StorageError

__all__ = [
    "ConsumerPosition",
    "KnownConsumer",
    "consumer_positions",
    "describe",
    "known_checkpoints",
    "register_external",
    "registration_path",
    "unregister_external",
]

CONSUMERS_DIR = "consumers"
EXTERNAL_DIR = "external"  # inside CONSUMERS_DIR: a checkpoint is never named "external.json"
FORMAT_NAME = "eventpipe-external-consumer"
FORMAT_VERSION = 1
_HASH = re.compile(r"[0-9a-f]{12}")


class KnownConsumer(NamedTuple):
    """A consumer retention must wait for: its name and checkpoint file.

    ``external``: registered in ``consumers/external/`` (``registration`` is that file)
    rather than checkpointing in ``consumers/``. ``error`` is set, and ``checkpoint`` may be
    None, when the registration (or a folder) could not be read or is not valid.
    """

    name: str
    checkpoint: str | None
    external: bool
    registration: str | None = None
    error: str | None = None


class ConsumerPosition(NamedTuple):
    """A known consumer and what its checkpoint says (see the module docstring)."""

    consumer: KnownConsumer
    checkpoint: Checkpoint | None  # None: not checkpointed yet, or ``error``
    error: str | None  # why the position is unknown (retention then holds from offset 0)

    @property
    def hold(self) -> int | None:
        """The first offset retention must keep for this consumer (None: none)."""
        if self.checkpoint is not None:
            return self.checkpoint.offset
        if self.error is None and not self.consumer.external:
            return None  # an in-log checkpoint removed since the listing: the consumer is gone
        return 0

    @property
    def pending(self) -> bool:
        """A registered external consumer that has not checkpointed yet (or whose checkpoint
        was deleted): it holds retention from offset 0 until it checkpoints or is forgotten."""
        return self.consumer.external and self.checkpoint is None and self.error is None


def _external_dir(log_path: str) -> str:
    return os.path.join(log_path, CONSUMERS_DIR, EXTERNAL_DIR)


def _digest(checkpoint_file: str) -> str:
    return hashlib.sha256(os.fsencode(checkpoint_file)).hexdigest()[:12]


def registration_path(log_path: str, name: str, checkpoint_file: str) -> str:
    """Where the registration of ``name`` with ``checkpoint_file`` lives (raises ConfigError
    for an invalid name)."""
    cp = os.path.abspath(checkpoint_file)
    return os.path.join(_external_dir(log_path), f"{validate_name(name)}@{_digest(cp)}.json")


def _encode(name: str, checkpoint_file: str, registered_at: float) -> bytes:
    try:
        return orjson.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, "name": name,
                             "checkpoint": checkpoint_file, "registered_at": registered_at})
    except orjson.JSONEncodeError:
        raise ConfigError(f"checkpoint path {checkpoint_file!r} cannot be stored (not UTF-8)",
                          option="checkpoint_dir") from None


def _parse(path: str, raw: bytes) -> tuple[str, str, float]:
    """(name, checkpoint, registered_at) of a registration file; ValueError says what is
    wrong. The file's own name must be the one register_external gives it, and the checkpoint
    an absolute ``<name>.json``: a planted file cannot make retention read an arbitrary one."""
    doc = orjson.loads(raw)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ValueError("not an eventpipe consumer registration")
    if not isinstance(doc.get("version"), int) or doc["version"] > FORMAT_VERSION:
        raise ValueError(f"unsupported registration version {doc.get('version')!r}")
    name, cp, at = doc.get("name"), doc.get("checkpoint"), doc.get("registered_at")
    if not isinstance(name, str) or not isinstance(cp, str) or isinstance(at, bool) \
            or not isinstance(at, int | float):
        raise ValueError("fields name, checkpoint and registered_at are missing or mistyped")
    try:
        validate_name(name)
    except ConfigError:
        raise ValueError(f"invalid consumer name {name!r}") from None
    if not os.path.isabs(cp) or os.path.normpath(cp) != cp \
            or os.path.basename(cp) != f"{name}.json":
        raise ValueError(f"checkpoint {cp!r} is not an absolute path to {name}.json")
    if os.path.basename(path) != f"{name}@{_digest(cp)}.json":
        raise ValueError(f"file name does not match its content (expected {name}@"
                         f"{_digest(cp)}.json)")
    return name, cp, float(at)


def register_external(log_path: str, name: str, checkpoint_file: str, file_mode: int,
                      dir_mode: int) -> None:
    """Make the consumer ``name`` checkpointing in ``checkpoint_file`` (outside
    ``<log>/consumers``) known to retention and status. Idempotent.

    Writes only when the registration is missing or differs (one read otherwise); atomically
    and durably (temp file, fsync, rename, fsync of the folder, and of its parents when they
    were created). Raises ConfigError for an invalid name, StorageError when the log's folder
    cannot be written (the consumer must not run unregistered: retention would not wait for it).
    """
    cp = os.path.abspath(checkpoint_file)
    path = registration_path(log_path, name, cp)
    try:
        with open(path, "rb") as f:
            current = _parse(path, f.read())
        if current[:2] == (name, cp):
            return
    except (OSError, ValueError):
        pass  # missing, unreadable or invalid: write it afresh
    folder = os.path.dirname(path)
    created = not os.path.isdir(folder)
    if created:
        make_dirs(folder, dir_mode)
    atomic_write(path, _encode(name, cp, time.time()), file_mode)
    if created:  # the new folders' entries in their parents
        fsync_dir(os.path.dirname(folder))
        fsync_dir(log_path)


def unregister_external(log_path: str, name: str, checkpoint_file: str | None = None
                        ) -> list[str]:
    """Forget the external consumer ``name``: remove its registrations (only the one for
    ``checkpoint_file`` if given) so retention no longer waits for it. Returns the files
    removed (empty if none). Leaves the checkpoint itself alone, and does not check whether
    the consumer is running (``eventpipe consumers forget`` does): a running consumer that
    is forgotten is registered again only when it restarts.

    A registration that is not valid is removed too when its file name is ``<name>@<hash>.json``.
    Raises ConfigError for an invalid name, StorageError when a file cannot be removed.
    """
    validate_name(name)
    folder = _external_dir(log_path)
    if checkpoint_file is not None:
        targets = [registration_path(log_path, name, checkpoint_file)]
    else:
        try:
            entries = os.listdir(folder)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError.from_os_error(exc, "list consumer registrations",
                                             path=folder) from exc
        targets = []
        for entry in sorted(entries):
            stem, at, digest = entry.removesuffix(".json").rpartition("@")
            if entry.endswith(".json") and at and stem == name and _HASH.fullmatch(digest):
                targets.append(os.path.join(folder, entry))
    removed = []
    for path in targets:
        with os_errors("remove consumer registration", path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
        removed.append(path)
    if removed:
        fsync_dir(folder)
    return removed


def known_checkpoints(log_path: str) -> list[KnownConsumer]:
    """Every consumer retention must wait for: those checkpointing in ``<log>/consumers/``
    (sorted by name), then the registered external ones (sorted by name and checkpoint).

    Never raises for what it finds: an invalid registration, or a folder that cannot be
    listed, is an entry with ``error`` set (and the path), which retention treats as a
    consumer at offset 0. A registration naming a checkpoint in ``<log>/consumers/`` is left
    to the listing of that folder.
    """
    out: list[KnownConsumer] = []
    folder = os.path.join(log_path, CONSUMERS_DIR)
    try:
        names = sorted(n[:-5] for n in os.listdir(folder) if n.endswith(".json"))
    except FileNotFoundError:
        return out
    except OSError as exc:
        return [KnownConsumer("?", None, False, folder,
                              f"cannot list consumer checkpoints: {exc.strerror} [path={folder}]")]
    out.extend(KnownConsumer(n, os.path.join(folder, f"{n}.json"), False) for n in names)
    external = _external_dir(log_path)
    try:
        entries = sorted(n for n in os.listdir(external) if n.endswith(".json"))
    except FileNotFoundError:
        return out
    except OSError as exc:
        return [*out, KnownConsumer("?", None, True, external,
                                    f"cannot list consumer registrations: {exc.strerror} "
                                    f"[path={external}]")]
    in_log = os.path.realpath(folder)
    registered = []
    for entry in entries:
        path = os.path.join(external, entry)
        guess = entry[:-5].rpartition("@")[0] or entry[:-5]  # for the report only
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            registered.append(KnownConsumer(guess, None, True, path,
                                            f"cannot read consumer registration: {exc.strerror} "
                                            f"[path={path}]"))
            continue
        try:
            name, cp, _ = _parse(path, raw)
        except ValueError as exc:  # orjson.JSONDecodeError is a ValueError too
            registered.append(KnownConsumer(guess, None, True, path,
                                            f"invalid consumer registration: {exc} [path={path}]"))
            continue
        if os.path.realpath(os.path.dirname(cp)) == in_log:
            continue
        registered.append(KnownConsumer(name, cp, True, path))
    out.extend(sorted(registered, key=lambda k: (k.name, k.checkpoint or "")))
    return out


def consumer_positions(log_path: str, log_id: str) -> list[ConsumerPosition]:
    """Each known consumer with its loaded checkpoint, or why it has none (never raises for
    one consumer's files; see the module docstring for what retention makes of each)."""
    out = []
    for known in known_checkpoints(log_path):
        if known.error is not None or known.checkpoint is None:
            out.append(ConsumerPosition(known, None, known.error or "no checkpoint path"))
            continue
        try:
            cp = load_checkpoint(known.checkpoint)
        except EventPipeError as exc:  # corrupt, or unreadable (StoragePermissionError)
            out.append(ConsumerPosition(known, None, str(exc)))
            continue
        if cp is not None and cp.log_id != log_id:
            out.append(ConsumerPosition(known, None, (
                f"checkpoint belongs to another log (log id {cp.log_id}, this log is "
                f"{log_id}) [path={known.checkpoint}]")))
            continue
        out.append(ConsumerPosition(known, cp, None))
    return out


def describe(known: KnownConsumer) -> str:
    """``consumer 'name'`` plus, for an external one, where it checkpoints."""
    where = f" (external checkpoint {known.checkpoint})" if known.external and known.checkpoint \
        else ""
    return f"consumer {known.name!r}{where}"

