"""``eventpipe consume --sqlite DB`` / ``--postgres DSN``: a consumer whose state lives in a
database (issue 13, :class:`eventpipe._dbstate.DbConsumer`); and the store a ``consumer show``
or ``reset`` of such a consumer names."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import ConfigError
from ._common import EXIT_INTERRUPTED, EXIT_OK, err


def store_from(args: argparse.Namespace) -> Any:
    """The StateStore that ``--sqlite`` or ``--postgres`` names (None for neither)."""
    if getattr(args, "sqlite", None):
        from .._dbstate import SqliteStore

        return SqliteStore(args.sqlite,
                           synchronous=getattr(args, "sqlite_synchronous", None) or "FULL")
    if getattr(args, "postgres", None):
        from ..postgres import PostgresStore

        return PostgresStore(args.postgres)
    return None


def consume_into_database(args: argparse.Namespace, handler: Any,
                          options: dict[str, Any]) -> int:
    from .._dbstate import DbConsumer
    from .._log import EventLog
    from ._consume import _catch_up_progress, _noting_sigint

    for flag, given in (("--initial-state", args.initial_state is not None),
                        ("--print-state", args.print_state),
                        ("--checkpoint-dir", args.checkpoint_dir is not None)):
        if given:
            raise ConfigError(f"{flag} does not apply to a consumer whose state is in a "
                              "database", option=flag.lstrip("-").replace("-", "_"))
    options = dict(options)
    commit_every = options.pop("checkpoint_every", None)
    commit_interval = options.pop("checkpoint_interval", None)
    store = store_from(args)
    with EventLog(args.path, create=args.create) as log, \
            DbConsumer(log, args.name, handler, store=store, commit_every=commit_every,
                       commit_interval=commit_interval, **options) as consumer, \
            _noting_sigint() as interrupted:
        if args.catch_up:
            with _catch_up_progress(consumer, sys.stderr):
                consumer.catch_up()
        else:
            consumer.run()
        if interrupted():
            err(f"consumer {args.name}: interrupted (SIGINT), stopped at offset "
                f"{consumer.offset}")
            return EXIT_INTERRUPTED
        err(f"consumer {args.name}: stopped at offset {consumer.offset} ({store.where})")
    return EXIT_OK


def cmd_db_show(args: argparse.Namespace, store: Any) -> int:
    """``consumer show --sqlite/--postgres``: the stored position and what it means."""
    from .._dbstate import db_position
    from .._log import EventLog
    from .._namelock import NameLock
    from ._common import EXIT_ERROR, write_json

    with EventLog(args.path, create=False) as log:
        try:
            pos = db_position(store, args.name)
        finally:
            store.close()
        head = log.head
        holder = None
        if log.folder.lstat("consumers") is not None:
            with log.folder.sub("consumers") as folder:
                lock = NameLock(folder, args.name, log.config.file_mode)
                try:
                    if lock.try_acquire():
                        lock.release()
                    else:
                        holder = lock.holder()
                finally:
                    lock.release()
        entry: dict[str, Any] = {
            "name": args.name, "store": store.kind, "database": store.where,
            "table": store.table, "offset": None if pos is None else pos.next_offset,
            "lag": None if pos is None else max(0, head - pos.next_offset),
            "head": head, "first_offset": log.first_offset,
            "last_commit": None if pos is None else pos.updated_at,
            "fingerprint": None if pos is None else pos.fingerprint,
            "dead_letter_from": None if pos is None else pos.dead_letter_from,
            "running": holder,
            "error": None if pos is None or pos.log_id == log.log_id else
            f"its position belongs to another log (log id {pos.log_id})",
        }
    if pos is None:
        entry["error"] = f"no position of consumer {args.name!r} in {store.where}"
    if args.json:
        write_json(entry, indent=True)
    else:
        for key, value in entry.items():
            if value is not None:
                print(f"{key:<22} {value}")
    return EXIT_OK if entry["error"] is None else EXIT_ERROR


def cmd_db_reset(args: argparse.Namespace, store: Any) -> int:
    """``consumer reset --sqlite/--postgres``: through the user's reset hook, or refused."""
    from .._dbstate import reset_db_consumer
    from .._log import EventLog
    from .._timeindex import parse_time
    from ._consume import load_handler

    if args.state is not None or args.keep_state:
        raise ConfigError("--state/--keep-state do not apply to a consumer whose state is in "
                          "a database (its reset hook changes its tables)", option="state")
    hook = load_handler(args.reset_hook) if args.reset_hook else None
    with EventLog(args.path, create=False) as log:
        if args.to_time is not None:
            try:
                to = max(log.first_offset, log.offset_at(parse_time(args.to_time)))
            except ValueError as exc:
                raise ConfigError(f"--to-time: {exc}", option="to-time") from None
        else:
            to = log.first_offset if args.to_earliest else log.head if args.to_latest \
                else args.to_offset
        if args.dry_run:
            print(f"would reset consumer {args.name} in {store.where} to offset {to:,} "
                  f"{'through ' + args.reset_hook if hook else '(refused: no --reset-hook)'}; "
                  "nothing was written")
            store.close()
            return EXIT_OK
        try:
            pos = reset_db_consumer(log, args.name, store, to, hook)
        finally:
            store.close()
    print(f"reset consumer {args.name} in {store.where}: offset {pos.next_offset:,} "
          f"(tables changed by {args.reset_hook})")
    return EXIT_OK
