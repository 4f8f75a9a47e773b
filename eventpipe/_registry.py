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

Inside the log, ``consumers/``, ``external/`` and every file in them are reached relative to
open :class:`~eventpipe._layout.Folder` objects, never through a link: a link there is an
error naming it (an unknown position, for retention). A registered checkpoint lives outside
the log, in a folder its operator named: that folder is opened by its path (links in the path
are followed), the checkpoint file in it is not followed if it is a link.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import time
from typing import NamedTuple

import orjson

from ._checkpoint import Checkpoint, load_checkpoint, storage_context, validate_name
from ._layout import CONSUMERS_DIR, EXTERNAL_DIR, Folder, folder_of
from .errors import ConfigError, EventPipeError, StorageError, UnsafePathError

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

# EXTERNAL_DIR is inside CONSUMERS_DIR: a checkpoint is never named "external.json".
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


LogFolder = Folder | str | os.PathLike[str]
"""A log, as its open folder (``EventLog.folder``) or its path (opened for the call)."""


def _sub(folder: Folder, name: str) -> Folder | None:
    """Subfolder ``name`` (never through a link: UnsafePathError), None if missing."""
    try:
        return folder.sub(name)
    except StorageError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


def _reason(exc: EventPipeError) -> str:
    """What went wrong, without the path (the caller adds it)."""
    if isinstance(exc, StorageError) and not isinstance(exc, UnsafePathError) \
            and exc.errno is not None:
        return str(exc.strerror)
    return exc.message


def _external_dir(log: LogFolder) -> str:
    root = log.path if isinstance(log, Folder) else os.path.abspath(os.fspath(log))
    return os.path.join(root, CONSUMERS_DIR, EXTERNAL_DIR)


def _digest(checkpoint_file: str) -> str:
    return hashlib.sha256(os.fsencode(checkpoint_file)).hexdigest()[:12]


def _registration_name(name: str, checkpoint_file: str) -> str:
    return f"{validate_name(name)}@{_digest(checkpoint_file)}.json"


def registration_path(log: LogFolder, name: str, checkpoint_file: str) -> str:
    """Where the registration of ``name`` with ``checkpoint_file`` lives (raises ConfigError
    for an invalid name). For messages: the file is only ever opened relative to its folder."""
    cp = os.path.abspath(checkpoint_file)
    return os.path.join(_external_dir(log), _registration_name(name, cp))


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


def register_external(log: LogFolder, name: str, checkpoint_file: str, file_mode: int,
                      dir_mode: int) -> None:
    """Make the consumer ``name`` checkpointing in ``checkpoint_file`` (outside
    ``<log>/consumers``) known to retention and status. Idempotent.

    Writes only when the registration is missing or differs (one read otherwise); atomically
    and durably (temp file, fsync, rename, fsync of the folder, and of its parents when they
    were created). Raises ConfigError for an invalid name, StorageError when the log's folder
    cannot be written (the consumer must not run unregistered: retention would not wait for it),
    UnsafePathError when ``consumers/``, ``external/`` or the registration is a link.
    """
    cp = os.path.abspath(checkpoint_file)
    filename = _registration_name(name, cp)
    with folder_of(log) as root:
        created_consumers = root.mkdir(CONSUMERS_DIR, dir_mode)
        with root.sub(CONSUMERS_DIR) as consumers:
            created = consumers.mkdir(EXTERNAL_DIR, dir_mode)
            with consumers.sub(EXTERNAL_DIR) as external:
                path = external.path_of(filename)
                try:
                    raw = external.read_bytes(filename)
                    if raw is not None and _parse(path, raw)[:2] == (name, cp):
                        return
                except UnsafePathError:
                    raise  # a link planted there: refused, not replaced quietly
                except (StorageError, ValueError):
                    pass  # unreadable or invalid: write it afresh
                with storage_context("register external consumer"):
                    external.write_atomic(filename, _encode(name, cp, time.time()), file_mode)
            if created or created_consumers:  # the new folders' entries in their parents
                consumers.fsync()
                root.fsync()


def unregister_external(log: LogFolder, name: str, checkpoint_file: str | None = None
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
    with folder_of(log) as root:
        consumers = _sub(root, CONSUMERS_DIR)
        if consumers is None:
            return []
        with consumers:
            external = _sub(consumers, EXTERNAL_DIR)
        if external is None:
            return []
        with external:
            if checkpoint_file is not None:
                targets = [_registration_name(name, os.path.abspath(checkpoint_file))]
            else:
                with storage_context("list consumer registrations"):
                    entries = external.names()
                targets = []
                for entry in sorted(entries):
                    stem, at, digest = entry.removesuffix(".json").rpartition("@")
                    if entry.endswith(".json") and at and stem == name and _HASH.fullmatch(
                            digest):
                        targets.append(entry)
            removed = []
            for entry in targets:
                with storage_context("remove consumer registration"):
                    if external.unlink(entry):  # a link is removed, not its target
                        removed.append(external.path_of(entry))
            if removed:
                external.fsync()
    return removed


def known_checkpoints(log: LogFolder) -> list[KnownConsumer]:
    """Every consumer retention must wait for: those checkpointing in ``<log>/consumers/``
    (sorted by name), then the registered external ones (sorted by name and checkpoint).

    Never raises for what it finds: an invalid registration, or a folder that cannot be
    listed, is an entry with ``error`` set (and the path), which retention treats as a
    consumer at offset 0. A registration naming a checkpoint in ``<log>/consumers/`` is left
    to the listing of that folder.
    """
    with folder_of(log) as root:
        where = root.path_of(CONSUMERS_DIR)
        try:
            consumers = _sub(root, CONSUMERS_DIR)
            if consumers is None:
                return []
        except EventPipeError as exc:  # a link, or no permission
            return [KnownConsumer("?", None, False, where,
                                  f"cannot list consumer checkpoints: {_reason(exc)} "
                                  f"[path={where}]")]
        with consumers:
            return _known_in(consumers)


def _known_in(consumers: Folder) -> list[KnownConsumer]:
    """known_checkpoints() of the open ``consumers`` folder."""
    folder = consumers.path
    try:
        names = sorted(n[:-5] for n in consumers.names() if n.endswith(".json"))
    except StorageError as exc:
        return [KnownConsumer("?", None, False, folder,
                              f"cannot list consumer checkpoints: {_reason(exc)} "
                              f"[path={folder}]")]
    out = [KnownConsumer(n, consumers.path_of(f"{n}.json"), False) for n in names]
    where = consumers.path_of(EXTERNAL_DIR)
    try:
        external = _sub(consumers, EXTERNAL_DIR)
        if external is None:
            return out
    except EventPipeError as exc:
        return [*out, KnownConsumer("?", None, True, where,
                                    f"cannot list consumer registrations: {_reason(exc)} "
                                    f"[path={where}]")]
    with external:
        try:
            entries = sorted(n for n in external.names() if n.endswith(".json"))
        except StorageError as exc:
            return [*out, KnownConsumer("?", None, True, where,
                                        f"cannot list consumer registrations: {_reason(exc)} "
                                        f"[path={where}]")]
        here = consumers.stat()
        registered = []
        for entry in entries:
            path = external.path_of(entry)
            guess = entry[:-5].rpartition("@")[0] or entry[:-5]  # for the report only
            try:
                raw = external.read_bytes(entry)
            except EventPipeError as exc:  # a link (never followed), or no permission
                registered.append(KnownConsumer(guess, None, True, path,
                                                "cannot read consumer registration: "
                                                f"{_reason(exc)} [path={path}]"))
                continue
            if raw is None:
                continue  # removed since the listing (forgotten)
            try:
                name, cp, _ = _parse(path, raw)
            except ValueError as exc:  # orjson.JSONDecodeError is a ValueError too
                registered.append(KnownConsumer(
                    guess, None, True, path, f"invalid consumer registration: {exc} "
                    f"[path={path}]"))
                continue
            if _same_folder(os.path.dirname(cp), here):
                continue  # the log's own consumers folder, by another path: listed above
            registered.append(KnownConsumer(name, cp, True, path))
    out.extend(sorted(registered, key=lambda k: (k.name, k.checkpoint or "")))
    return out


def _same_folder(path: str, st: os.stat_result) -> bool:
    try:
        other = os.stat(path)  # only compared: nothing in it is opened
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def consumer_positions(log: LogFolder, log_id: str) -> list[ConsumerPosition]:
    """Each known consumer with its loaded checkpoint, or why it has none (never raises for
    one consumer's files; see the module docstring for what retention makes of each)."""
    out = []
    with folder_of(log) as root:
        known_ones = known_checkpoints(root)
        consumers = None
        try:
            for known in known_ones:
                if known.error is not None or known.checkpoint is None:
                    out.append(ConsumerPosition(known, None, known.error or "no checkpoint path"))
                    continue
                try:
                    if not known.external and consumers is None:
                        consumers = _sub(root, CONSUMERS_DIR)
                    cp = _load_known(known, consumers)
                except EventPipeError as exc:  # corrupt, a link, unreadable (permission)
                    out.append(ConsumerPosition(known, None, str(exc)))
                    continue
                out.append(_checked(known, cp, log_id))
        finally:
            if consumers is not None:
                consumers.close()
    return out


def _load_known(known: KnownConsumer, consumers: Folder | None) -> Checkpoint | None:
    """The checkpoint of ``known``: in the log's consumers folder, or (external) in the folder
    its registration names, opened by that path; the file itself is never followed."""
    assert known.checkpoint is not None
    filename = os.path.basename(known.checkpoint)
    if not known.external:
        return load_checkpoint(consumers, filename) if consumers is not None else None
    folder = _sub_at(os.path.dirname(known.checkpoint))
    if folder is None:
        return None  # not checkpointed yet: its folder does not even exist
    with folder:
        return load_checkpoint(folder, filename)


def _sub_at(path: str) -> Folder | None:
    try:
        return Folder.open(path)
    except StorageError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


def _checked(known: KnownConsumer, cp: Checkpoint | None, log_id: str) -> ConsumerPosition:
    if cp is not None and cp.log_id != log_id:
        return ConsumerPosition(known, None, (
            f"checkpoint belongs to another log (log id {cp.log_id}, this log is "
            f"{log_id}) [path={known.checkpoint}]"))
    return ConsumerPosition(known, cp, None)


def describe(known: KnownConsumer) -> str:
    """``consumer 'name'`` plus, for an external one, where it checkpoints."""
    where = f" (external checkpoint {known.checkpoint})" if known.external and known.checkpoint \
        else ""
    return f"consumer {known.name!r}{where}"

