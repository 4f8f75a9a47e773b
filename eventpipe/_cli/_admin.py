"""The commands that look after a log: status, verify, prune, compress."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ..errors import ConfigError
from ._common import EXIT_FAILED, EXIT_OK, err, progress_printer, write_json


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``status``, ``verify``, ``prune`` and ``compress``."""
    p = sub.add_parser("status", help="head, segments, consumers and writers")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="the same as --format json")
    p.add_argument("--format", choices=("text", "json", "prometheus"), default="text",
                   help="prometheus: OpenMetrics text for a scraper (node_exporter's textfile "
                        "collector)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "verify", help="check every segment and checkpoint, and the log's layout",
        description="Check every segment and checkpoint, and what lies in the log folder: "
                    "symbolic links, files hard-linked elsewhere, FIFOs and devices, entries "
                    "of other owners, world-writable files or folders, setuid files (problems, "
                    "exit 1) and permissions beyond the log's file_mode (warnings; set "
                    "EVENTPIPE_FILE_MODE to the log's mode).")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("prune", help="remove old sealed segments (retention)")
    p.add_argument("path")
    p.add_argument("--max-age", type=float, help="seconds: remove segments sealed longer ago")
    p.add_argument("--max-bytes", type=int, help="keep at most this many bytes of segments")
    p.add_argument("--before", type=int, help="remove segments wholly before this offset")
    p.add_argument("--force", action="store_true",
                   help="also remove what known consumers have not processed yet")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("compress", help="gzip every sealed segment now")
    p.add_argument("path")
    p.set_defaults(func=cmd_compress)


def cmd_status(args: argparse.Namespace) -> int:
    from .._status import format_status, log_status

    report = log_status(args.path)
    if args.json or args.format == "json":
        write_json(report, indent=True)
    elif args.format == "prometheus":
        from .._metrics import openmetrics

        sys.stdout.write(openmetrics(report))
    else:
        sys.stdout.write(format_status(report))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from .._verify import verify_log

    problems, summary = verify_log(args.path, progress=_progress(args, "segments"))
    warnings = summary.pop("warnings", [])
    if args.json:
        doc = {"ok": not problems, "problems": [p._asdict() for p in problems],
               "warnings": [w._asdict() for w in warnings], **summary}
        write_json(doc, indent=True)
    else:
        for p in problems:
            where = f" offset {p.offset}" if p.offset is not None else ""
            print(f"{p.path}:{where} {p.problem}")
        for w in warnings:
            print(f"{w.path}: warning: {w.problem}")
        verdict = "ok" if not problems else f"{len(problems)} problem(s)"
        if warnings:
            verdict += f", {len(warnings)} warning(s)"
        err(f"verified {summary['segments']} segments, {summary['events']} events, "
            f"{summary['checkpoints']} checkpoints: {verdict}")
    return EXIT_OK if not problems else EXIT_FAILED


def _progress(args: argparse.Namespace, unit: str) -> Callable[[int, int], None] | None:
    """The progress line, on a terminal only, and never beside a JSON report."""
    if getattr(args, "json", False) or not sys.stderr.isatty():
        return None
    return progress_printer(sys.stderr, unit)


def cmd_prune(args: argparse.Namespace) -> int:
    from .._log import EventLog
    from .._retention import prune

    if args.max_age is None and args.max_bytes is None and args.before is None:
        raise ConfigError("prune needs --max-age, --max-bytes or --before", option="prune")
    with EventLog(args.path, create=False) as log:
        # EventLog.prune with a progress line: the retention call it makes.
        report = prune(log, max_age=args.max_age, max_bytes=args.max_bytes,
                       before=args.before, force=args.force, dry_run=args.dry_run,
                       on_progress=_progress(args, "segments removed"))
    if args.json:
        write_json(report._asdict())
    else:
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {len(report.removed)} segments ({report.bytes_removed} bytes); "
              f"log now starts at offset {report.first_offset}")
        for note in report.held_back:
            err(f"held back: {note}")
    return EXIT_OK


def cmd_compress(args: argparse.Namespace) -> int:
    from .._log import EventLog

    with EventLog(args.path, create=False) as log:
        # EventLog.compress with a progress line: the pass it runs.
        done = log._compression().run_pass(blocking=True, compress=True,
                                           on_progress=_progress(args, "segments compressed"))
    print(f"compressed {done} segments")
    return EXIT_OK
