"""Managing a log's consumers: ``consumers`` (list them), ``consumer show``, ``consumer reset``,
``consumer delete`` and ``consumer forget`` (``consumers forget`` is the same command).

Everything here works from the log folder alone, as ``status`` does: the consumers are those
:func:`eventpipe._registry.known_checkpoints` finds (checkpoints in ``<log>/consumers/`` and
registered external ones). ``reset`` and ``delete`` take the consumer's name lock for their
whole run (:class:`eventpipe._namelock.NameLock`), so a consumer cannot start meanwhile, and
are refused (exit 3) while a process holds it.

What a reset writes is the checkpoint the consumer would have written after handling the event
before the new offset (:func:`eventpipe._consumer.checkpoint_at`): that event's position and
CRC, read from the log. The consumer resumes from it as from any checkpoint, and ``verify``
checks it like any other; the checkpoint format is unchanged. A checkpoint pairs a state with
the offset it belongs to, so a reset that moves the offset needs the state that belongs at the
new one: ``--state JSON``, or ``--keep-state`` to carry the current one over knowingly (as
Kafka's offset-only reset does). Without either it is refused (exit 2) rather than guessing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from .._deadletter import DeadLetterCounts
from .._status import openers
from .._timeindex import parse_time
from ..errors import ConfigError, EventPipeError, StorageError
from ._common import EXIT_ERROR, EXIT_FAILED, EXIT_OK, EXIT_USAGE, err, write_json

if TYPE_CHECKING:
    from .._log import EventLog
    from .._registry import ConsumerPosition

__all__ = ["add_commands", "legacy_alias"]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``consumers`` and ``consumer show|reset|delete|forget``."""
    # Long on purpose: one declaration per command and flag, read top to bottom as the
    # --help pages they make; there is no logic here to split.
    p = sub.add_parser(
        "consumers", help="list the consumers a log knows of: offset, lag, state, pid",
        description="List every consumer the log knows of (checkpoints in <log>/consumers and "
                    "registered external ones): offset, lag in events, state size, last "
                    "checkpoint, the pid holding the name, standbys waiting for it, its "
                    "entries in its dead-letter log (when its checkpoint names one), and the "
                    "error of a checkpoint that cannot be read. (`eventpipe consumers forget "
                    "PATH NAME` is `eventpipe consumer forget`.)")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_consumers)

    p = sub.add_parser("consumer", help="show, reset, delete or forget one consumer")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def one(action: str, help: str, description: str) -> argparse.ArgumentParser:
        q = actions.add_parser(action, help=help, description=description)
        q.add_argument("path")
        q.add_argument("name")
        q.add_argument("--checkpoint", metavar="FILE",
                       help="the consumer checkpointing in FILE (when one name has several)")
        return q

    q = one("show", "its state (JSON) and checkpoint facts",
            "Print a consumer's checkpoint facts and its state (JSON).")
    q.add_argument("--json", action="store_true")
    _database_flags(q)
    q.set_defaults(func=cmd_show)

    q = one("reset", "move its checkpoint to another offset (refused while it runs)",
            "Rewrite a consumer's checkpoint at another offset. A checkpoint pairs the state "
            "with the offset it belongs to: moving the offset needs --state JSON (the state "
            "that belongs there) or --keep-state (carry the current one over). The previous "
            "checkpoint is kept as NAME.json.prev. Refused (exit 3) while a process holds the "
            "name. To start over with the consumer's own initial state, delete it instead.")
    to = q.add_mutually_exclusive_group(required=True)
    to.add_argument("--to-earliest", action="store_true",
                    help="the first stored offset (retention may have removed older ones)")
    to.add_argument("--to-latest", action="store_true", help="the head: skip everything")
    to.add_argument("--to-offset", type=int, metavar="N")
    to.add_argument("--to-time", metavar="TIME",
                    help="the first event appended at or after TIME (ISO 8601, local time "
                         "without a zone; --to-time=-15m ago; @EPOCH; now)")
    state = q.add_mutually_exclusive_group()
    state.add_argument("--state", metavar="JSON", help="the state at the new offset")
    state.add_argument("--keep-state", action="store_true",
                       help="keep the current state (it then no longer matches the events "
                            "before the offset: your call)")
    q.add_argument("--dry-run", action="store_true", help="say what would change, write nothing")
    _database_flags(q)
    q.add_argument("--reset-hook", metavar="MODULE:FUNCTION",
                   help="with --sqlite/--postgres: hook(conn, consumer, offset) makes the "
                        "tables those of the events before the new offset, in the transaction "
                        "that moves the position (without one the reset is refused)")
    q.set_defaults(func=cmd_reset)

    q = one("delete", "remove its checkpoint and registration (refused while it runs)",
            "Remove a consumer's checkpoint (and NAME.json.prev, .corrupt, .owner, .error; the "
            "lock file unless another process has it open) and, for an external one, its "
            "registration: retention stops waiting for it, and a consumer started under the "
            "name again begins afresh. Refused (exit 3) while a process holds the name.")
    q.set_defaults(func=cmd_delete)

    q = one("forget", "remove an external consumer's registration (retention stops waiting)",
            "Remove the registration of a consumer whose checkpoint lives outside the log "
            "(checkpoint_dir), so retention no longer keeps events for it. The checkpoint "
            "itself is left alone. Refused while the consumer runs. Exit 1 when there is no "
            "such registration.")
    q.set_defaults(func=cmd_forget)


def _database_flags(q: argparse.ArgumentParser) -> None:
    """--sqlite/--postgres: a consumer whose position lives in a database (issue 13)."""
    db = q.add_mutually_exclusive_group()
    db.add_argument("--sqlite", metavar="DB", help="the consumer keeps its state in this "
                    "SQLite database (eventpipe consume --sqlite)")
    db.add_argument("--postgres", metavar="DSN", help="... in this PostgreSQL database")


def legacy_alias(argv: list[str]) -> list[str]:
    """``consumers forget PATH NAME ...`` (what ``status`` and ``prune`` messages print) as
    ``consumer forget PATH NAME ...``; ``consumers PATH`` itself lists the consumers (so
    ``consumers forget`` lists a log folder named ``forget`` only when nothing but options
    follows)."""
    if argv[:2] == ["consumers", "forget"] and any(not a.startswith("-") for a in argv[2:]):
        return ["consumer", *argv[1:]]
    return argv


# ------------------------------------------------------------------------------ facts


def _lock_path(checkpoint: str, name: str) -> str:
    return os.path.join(os.path.dirname(checkpoint), f"{name}.lock")


def _waiters(path: str) -> list[int]:
    """PIDs blocked in flock() on ``path`` (the "->" lines of /proc/locks)."""
    try:
        st = os.stat(path, follow_symlinks=False)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out = set()
    for line in lines:
        parts = line.split()
        if len(parts) >= 7 and parts[1] == "->" and parts[2] == "FLOCK" and parts[6] == dev:
            out.add(int(parts[5]))
    return sorted(out)


def _entry(pos: ConsumerPosition, head: int, now: float, *, with_state: bool = False,
           dead_letters: DeadLetterCounts | None = None,
           log: EventLog | None = None) -> dict[str, Any]:
    """One consumer's facts, JSON-ready (see ``eventpipe consumers --help``).

    ``dead_letters``, shared by the entries of one listing, reads each dead-letter log once.
    """
    from .._status import flock_holders

    known, cp = pos.consumer, pos.checkpoint
    entry: dict[str, Any] = {"name": known.name, "external": known.external,
                             "checkpoint": known.checkpoint}
    if known.external:
        entry["registration"] = known.registration
    if cp is not None:
        entry.update(offset=cp.offset, lag=max(0, head - cp.offset),
                     state_bytes=len(orjson.dumps(cp.state)),
                     last_checkpoint=cp.updated_at,
                     last_checkpoint_iso=time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                                       time.localtime(cp.updated_at)),
                     checkpoint_age_seconds=round(now - cp.updated_at, 3))
    else:
        entry.update(offset=None, lag=None, state_bytes=None, last_checkpoint=None,
                     checkpoint_age_seconds=None)
    behind = log.lag_seconds(cp.offset, now=now) if log is not None and cp is not None else None
    entry["lag_seconds"] = None if behind is None else round(behind, 3)
    entry["pending"] = bool(pos.pending)
    entry["error"] = pos.error
    entry["holds_retention_from"] = pos.hold
    pids: list[int] = []
    standbys: list[int] = []
    if known.checkpoint is not None:
        lock = _lock_path(known.checkpoint, known.name)
        pids = flock_holders(lock)
        opened, _ = openers(lock)
        standbys = sorted((set(opened) | set(_waiters(lock))) - set(pids))
    entry["running_pid"] = pids[0] if pids else None
    entry["running_pids"] = pids
    entry["standby_pids"] = standbys
    entry.update((dead_letters or DeadLetterCounts()).fields(cp))
    if with_state and cp is not None:
        entry.update(log_id=cp.log_id, version=cp.version, segment=cp.segment,
                     position=cp.position, fingerprint=cp.fingerprint,
                     dead_letter_from=cp.dead_letter_from, state=cp.state)
    return entry


def cmd_consumers(args: argparse.Namespace) -> int:
    from .._log import EventLog
    from .._registry import consumer_positions

    now = time.time()
    with EventLog(args.path, create=False) as log:
        head = log.head
        dead_letters = DeadLetterCounts()
        entries = [_entry(pos, head, now, dead_letters=dead_letters, log=log)
                   for pos in consumer_positions(log.folder, log.log_id)]
        path = log.path
    if args.json:
        write_json({"path": path, "head": head, "consumers": entries}, indent=True)
        return EXIT_OK
    if not entries:
        print(f"no consumers known in {path} (head {head:,})")
        return EXIT_OK
    print(f"{'NAME':<20} {'OFFSET':>12} {'LAG':>10} {'BEHIND':>9} {'STATE':>10}  "
          f"{'CHECKPOINT':<16} {'PID':>7}  STANDBYS")
    for e in entries:
        pid = str(e["running_pid"]) if e["running_pid"] is not None else "-"
        standbys = ",".join(map(str, e["standby_pids"])) or "-"
        if e["offset"] is None:
            why = e["error"] or "no checkpoint yet"
            print(f"{e['name']:<20} {'-':>12} {'-':>10} {'-':>9} {'-':>10}  {'-':<16} "
                  f"{pid:>7}  {standbys}")
            print(f"  {'ERROR' if e['error'] else 'note'}: {why}")
        else:
            age = f"{e['checkpoint_age_seconds']:.1f}s ago"
            behind = "?" if e["lag_seconds"] is None else f"{e['lag_seconds']:.1f}s"
            print(f"{e['name']:<20} {e['offset']:>12,} {e['lag']:>10,} {behind:>9} "
                  f"{e['state_bytes']:>9,}B  {age:<16} {pid:>7}  {standbys}")
        if e["dead_letter_log"] is not None:
            print(f"  dead letters: {e['dead_letters']:,} in {e['dead_letter_log']}"
                  if e["dead_letters"] is not None else
                  f"  dead letters: ? ({e['dead_letter_log']} cannot be read, or holds "
                  "another log now)")
        if e["external"]:
            print(f"  external checkpoint {e['checkpoint']}")
    return EXIT_OK


# ------------------------------------------------------------------------ one consumer


@dataclass
class _Target:
    """One consumer's checkpoint: the folder it lives in and, if external, its registration."""

    name: str
    checkpoint: str  # the file's path (for messages; opened relative to its folder)
    external: bool
    registration: str | None

    @property
    def filename(self) -> str:
        return os.path.basename(self.checkpoint)


class _Refused(Exception):
    """A command refused with a message and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _target(log: Any, name: str, checkpoint: str | None) -> _Target:
    """The consumer ``name`` of ``log`` (its in-log checkpoint, or its one registration, or
    the one for ``checkpoint``); _Refused when there is none, or several to choose from."""
    from .._checkpoint import checkpoint_file
    from .._layout import CONSUMERS_DIR
    from .._registry import known_checkpoints

    filename = checkpoint_file(name)  # ConfigError (exit 2) for an invalid name
    wanted = os.path.abspath(checkpoint) if checkpoint is not None else None
    found: list[_Target] = []
    inside = os.path.join(log.path, CONSUMERS_DIR, filename)
    try:
        with log.folder.sub(CONSUMERS_DIR) as consumers:
            here = any(consumers.lstat(n) is not None for n in (filename, filename + ".prev"))
    except EventPipeError:
        here = False
    if here and wanted in (None, inside):
        found.append(_Target(name, inside, False, None))
    for k in known_checkpoints(log.folder):
        if k.external and k.name == name and k.checkpoint is not None \
                and wanted in (None, k.checkpoint):
            found.append(_Target(name, k.checkpoint, True, k.registration))
    if not found:
        raise _Refused(f"no consumer {name!r} in {log.path}"
                       + (f" with checkpoint {wanted}" if wanted else ""), EXIT_FAILED)
    if len(found) > 1:
        raise _Refused(f"consumer {name!r} has {len(found)} checkpoints: "
                       f"{', '.join(t.checkpoint for t in found)}; choose one with --checkpoint",
                       EXIT_USAGE)
    return found[0]


@contextlib.contextmanager
def _folder_of(log: Any, target: _Target, create: bool = False) -> Iterator[Any]:
    """The open folder of ``target``'s checkpoint (the log's own is never reached through a
    link; an external one is opened by the path its registration names, as a consumer does)."""
    from .._fsutil import make_dirs
    from .._layout import CONSUMERS_DIR, Folder

    if not target.external:
        folder = log.folder.sub(CONSUMERS_DIR)
    else:
        where = os.path.dirname(target.checkpoint)
        if create and not os.path.isdir(where):
            make_dirs(where, log.config.dir_mode)
        folder = Folder.open(where)
    with folder:
        yield folder


@contextlib.contextmanager
def _holding_name(folder: Any, target: _Target, mode: int, doing: str) -> Iterator[Any]:
    """The consumer's name lock, held for the block; _Refused (exit 3) while another process
    holds it. Nothing is written when refused."""
    from .._namelock import NameLock

    lock = NameLock(folder, target.name, mode)
    try:
        if not lock.try_acquire():
            raise _Refused(f"consumer {target.name!r} is running ({lock.holder()}): stop it "
                           f"first; nothing was {doing}", EXIT_ERROR)
        yield lock
    finally:
        lock.release()


def _refusals(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            code: int = func(args)
            return code
        except _Refused as exc:
            err(str(exc))
            return exc.code

    run.__doc__ = func.__doc__
    return run


@_refusals
def cmd_show(args: argparse.Namespace) -> int:
    from .._log import EventLog
    from ._dbconsume import cmd_db_show, store_from

    if (store := store_from(args)) is not None:
        return cmd_db_show(args, store)
    from .._registry import ConsumerPosition, KnownConsumer, consumer_positions

    now = time.time()
    with EventLog(args.path, create=False) as log:
        target = _target(log, args.name, args.checkpoint)
        head, first = log.head, log.first_offset
        pos = next((p for p in consumer_positions(log.folder, log.log_id)
                    if p.consumer.name == target.name
                    and p.consumer.checkpoint == target.checkpoint), None)
        if pos is None:  # only a .prev left (a damaged checkpoint set aside, or a delete)
            pos = ConsumerPosition(KnownConsumer(target.name, target.checkpoint, False), None,
                                   "no checkpoint (only the previous one, .prev, is left)")
        entry = _entry(pos, head, now, with_state=True, log=log)
    entry.update(head=head, first_offset=first)
    if args.json:
        write_json(entry, indent=True)
        return EXIT_OK if pos.error is None else EXIT_ERROR
    for key in ("name", "checkpoint", "registration", "offset", "lag", "lag_seconds", "head",
                "first_offset",
                "state_bytes", "last_checkpoint_iso", "checkpoint_age_seconds", "segment",
                "position", "fingerprint", "dead_letter_from", "dead_letter_log",
                "dead_letters", "version", "running_pid",
                "standby_pids", "pending", "error"):
        if key in entry and entry[key] not in (None, [], False):
            print(f"{key:<22} {entry[key]}")
    if "state" in entry:
        print("state")
        sys.stdout.flush()
        write_json(entry["state"], indent=True)
    return EXIT_OK if pos.error is None else EXIT_ERROR


def _current(folder: Any, target: _Target, log_id: str) -> tuple[Any, str | None]:
    """The consumer's checkpoint (or None), and why it cannot be used (unreadable, another
    log's) if so."""
    from .._checkpoint import load_checkpoint

    try:
        cp = load_checkpoint(folder, target.filename, target.name)
    except EventPipeError as exc:
        return None, str(exc)
    if cp is not None and cp.log_id != log_id:
        return None, f"its checkpoint belongs to another log (log id {cp.log_id})"
    return cp, None


def _plan(args: argparse.Namespace, folder: Any, target: _Target, log_id: str, to: int,
          new_state: Any) -> tuple[str, Any, str]:
    """What a reset to ``to`` does: (where the consumer is now, the state it gets, how), or
    _Refused (exit 2) when moving the offset without --state or --keep-state."""
    cp, problem = _current(folder, target, log_id)
    if cp is not None and isinstance(cp.state, dict) and "eventpipe_db_consumer" in cp.state:
        raise _Refused(
            f"consumer {target.name!r} keeps its state in "
            f"{cp.state['eventpipe_db_consumer'].get('database')}: its checkpoint here only "
            "holds its place for retention; reset it with --sqlite/--postgres and "
            "--reset-hook", EXIT_USAGE)
    was = f"offset {cp.offset:,}" if cp is not None else (
        f"no usable checkpoint ({problem})" if problem else "no checkpoint")
    if args.state is None and not args.keep_state and (cp is None or cp.offset != to):
        raise _Refused(
            f"consumer {target.name!r} is at {was}: a reset to offset {to:,} needs the "
            "state that belongs there (--state JSON), or --keep-state to carry the "
            "current one over (to start over with the consumer's own initial state, "
            "use `eventpipe consumer delete`)", EXIT_USAGE)
    if args.state is not None:
        return was, new_state, "state replaced"
    if cp is None:
        raise _Refused(f"consumer {target.name!r} has {was}: there is no state to keep; "
                       "give one with --state JSON", EXIT_USAGE)
    return was, cp.state, "state kept"


@_refusals
def cmd_reset(args: argparse.Namespace) -> int:
    from .._checkpoint import remove_temp_files, save_checkpoint
    from .._consumer import checkpoint_at
    from .._log import EventLog
    from .._status import flock_holders
    from ._dbconsume import cmd_db_reset, store_from

    if (store := store_from(args)) is not None:
        return cmd_db_reset(args, store)
    new_state: Any = None
    if args.state is not None:
        try:
            new_state = orjson.loads(args.state)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"--state is not JSON: {exc}", option="state") from None
    when = None
    if args.to_time is not None:
        try:
            when = parse_time(args.to_time)
        except ValueError as exc:
            raise ConfigError(f"--to-time: {exc}", option="to-time") from None
    with EventLog(args.path, create=False) as log:
        target = _target(log, args.name, args.checkpoint)
        if when is not None:
            to = max(log.first_offset, log.offset_at(when))
        else:
            to = log.first_offset if args.to_earliest else log.head if args.to_latest \
                else args.to_offset
        with _folder_of(log, target, create=not args.dry_run) as folder:
            # Decided once before taking the name (a refusal writes nothing, not even the
            # lock's owner note) and again holding it (a consumer may have run meanwhile).
            was, state, how = _plan(args, folder, target, log.log_id, to, new_state)
            checkpoint_at(log, target.name, to, state)  # OffsetOutOfRangeError if out
            if args.dry_run:
                pids = flock_holders(_lock_path(target.checkpoint, target.name))
                if pids:
                    raise _Refused(f"consumer {target.name!r} is running (pid "
                                   f"{', '.join(map(str, pids))}): a reset would be refused",
                                   EXIT_ERROR)
                print(f"would reset consumer {target.name}: {was} -> offset {to:,} ({how}, "
                      f"{len(orjson.dumps(state))} bytes); nothing was written")
                return EXIT_OK
            with _holding_name(folder, target, log.config.file_mode, "reset"):
                was, state, how = _plan(args, folder, target, log.log_id, to, new_state)
                remove_temp_files(folder, target.filename)
                # The dead-letter log the consumer named stays named (status counts there).
                current, _ = _current(folder, target, log.log_id)
                save_checkpoint(folder, target.filename, dataclasses.replace(
                    checkpoint_at(log, target.name, to, state),
                    dead_letter=current.dead_letter if current is not None else None),
                    log.config.file_mode)
    print(f"reset consumer {target.name}: {was} -> offset {to:,} ({how}); the previous "
          f"checkpoint is kept as {target.filename}.prev")
    return EXIT_OK


@_refusals
def cmd_delete(args: argparse.Namespace) -> int:
    from .._checkpoint import remove_temp_files
    from .._log import EventLog
    from .._registry import unregister_external

    removed: list[str] = []
    with EventLog(args.path, create=False) as log:
        target = _target(log, args.name, args.checkpoint)
        with contextlib.ExitStack() as stack:
            try:
                folder = stack.enter_context(_folder_of(log, target))
            except StorageError as exc:
                if not target.external or exc.errno != errno.ENOENT:
                    raise
                folder = None  # an external folder that is gone: only the registration left
            kept = None
            if folder is not None:
                with _holding_name(folder, target, log.config.file_mode, "deleted"):
                    remove_temp_files(folder, target.filename)
                    for suffix in ("", ".prev", ".corrupt"):
                        if folder.unlink(target.filename + suffix):
                            removed.append(folder.path_of(target.filename + suffix))
                    for note in (f"{target.name}.owner", f"{target.name}.error"):
                        if folder.unlink(note):
                            removed.append(folder.path_of(note))
                    lock = folder.path_of(f"{target.name}.lock")
                    others, complete = openers(lock)
                    others = [p for p in others if p != os.getpid()]
                    # Unlinking a lock file another process has open would split the name: a
                    # standby waiting on the old file and a new consumer on a new one could
                    # both hold it. So it goes only when nobody else can have it open. (A
                    # consumer opening it in the instant between this look and the unlink
                    # is refused the name, since we hold it; only a standby started right
                    # then would wait on the removed file.)
                    if others or not complete:
                        kept = (f"kept {lock}: " + (f"pid {', '.join(map(str, others))} "
                                                    "has it open (a standby?)" if others else
                                                    "other users' processes cannot be seen"))
                    elif folder.unlink(f"{target.name}.lock"):
                        removed.append(lock)
                folder.fsync()
        if target.external:
            removed += unregister_external(log.folder, target.name, target.checkpoint)
    for path in removed:
        print(f"deleted {args.name}: removed {path}")
    if kept:
        err(kept)
    return EXIT_OK


def cmd_forget(args: argparse.Namespace) -> int:
    from .._log import EventLog
    from .._registry import known_checkpoints, unregister_external
    from .._status import flock_holders

    with EventLog(args.path, create=False) as log:
        root = log.path
    wanted = os.path.abspath(args.checkpoint) if args.checkpoint is not None else None
    mine = [k for k in known_checkpoints(root) if k.external and k.name == args.name
            and k.checkpoint is not None and wanted in (None, k.checkpoint)]
    for k in mine:
        assert k.checkpoint is not None
        pids = flock_holders(_lock_path(k.checkpoint, args.name))
        if pids:
            err(f"consumer {args.name!r} (checkpoint {k.checkpoint}) is running (pid "
                f"{', '.join(map(str, pids))}): stop it first; nothing was forgotten")
            return EXIT_FAILED
    removed = unregister_external(root, args.name, args.checkpoint)
    if not removed:
        inside = os.path.join(root, "consumers", f"{args.name}.json")
        if os.path.exists(inside):
            err(f"consumer {args.name!r} checkpoints inside the log ({inside}), it is not "
                f"registered: `eventpipe consumer delete {root} {args.name}` removes it")
        else:
            err(f"no registration of consumer {args.name!r}"
                + (f" with checkpoint {wanted}" if wanted else ""))
        return EXIT_FAILED
    for path in removed:
        print(f"forgot {args.name}: removed {path}")
    return EXIT_OK
