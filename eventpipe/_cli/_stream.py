"""Reading a JetStream stream on any host (``eventpipe[nats]``): ``consume-stream`` runs a
stream consumer, ``mirror`` keeps a local log identical to the stream.

nats-py is imported only when a command runs: the rest of the command line never needs it.
The handler and the consumer options are handled as ``consume`` handles them.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

from ._common import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, err
from ._consume import (
    add_consumer_arguments,
    consumer_options,
    initial_state,
    load_handler,
    stopped,
)
from ._nats import add_nats_arguments, have_nats, servers


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``consume-stream`` and ``mirror``; defaults come from the environment a
    systemd unit sets, as for ``consume`` and ``bridge``."""
    _add_consume_stream(sub)
    _add_mirror(sub)


def _nats_options(p: argparse.ArgumentParser) -> None:
    add_nats_arguments(p)
    p.add_argument("--catch-up", action="store_true",
                   help="stop once what the stream holds now is done instead of following")
    p.add_argument("--poll-interval", type=float,
                   help="longest wait of one fetch for new messages (default 1 s)")


def _add_consume_stream(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    env = os.environ
    p = sub.add_parser(
        "consume-stream", help="run a consumer on a JetStream stream (on any host)",
        description="Run a consumer on a stream written by `eventpipe bridge`, with the "
                    "handler, checkpoint and on_error policies of `consume`, its checkpoint "
                    "in a local --checkpoint-dir; until SIGTERM/SIGINT (or, with --catch-up, "
                    "once done). Needs pip install eventpipe[nats]. --nats, --stream, --name, "
                    "--handler, --initial-state and --checkpoint-dir default to "
                    "$EVENTPIPE_NATS, $EVENTPIPE_STREAM, $EVENTPIPE_CONSUMER_NAME, "
                    "$EVENTPIPE_HANDLER, $EVENTPIPE_INITIAL_STATE and "
                    "$EVENTPIPE_CHECKPOINT_DIR. Exits 0 when stopped by SIGTERM, 130 by "
                    "SIGINT (both after a final checkpoint), 3 for an unreachable server, a "
                    "missing stream, a checkpoint of another log or a stream that does not "
                    "continue.")
    _nats_options(p)
    add_consumer_arguments(p, "--name", "--handler", helps={
        "--name": "the consumer name",
        "--handler": "MODULE:FUNCTION or FILE.py:FUNCTION (as for consume)"})
    p.add_argument("--checkpoint-dir", required="EVENTPIPE_CHECKPOINT_DIR" not in env,
                   default=env.get("EVENTPIPE_CHECKPOINT_DIR"),
                   help="local folder of the consumer's checkpoint")
    add_consumer_arguments(
        p, "--initial-state", "--standby", "--print-state", "--checkpoint-every",
        "--checkpoint-interval", "--on-error", "--max-retries", "--retry-backoff",
        "--dead-letter", "--pass-time",
        helps={"--dead-letter": "local log path for events the handler fails on"})
    p.set_defaults(func=cmd_consume_stream)


def _add_mirror(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    env = os.environ
    p = sub.add_parser(
        "mirror", help="keep a local log identical to a JetStream stream",
        description="Keep the log at PATH (created if missing) identical to a stream written "
                    "by `eventpipe bridge`: same events, offsets and append times, resuming "
                    "after its own head; until SIGTERM/SIGINT (or, with --catch-up, once "
                    "done). Local consumers then run on PATH. Needs pip install "
                    "eventpipe[nats]. PATH, --nats and --stream default to "
                    "$EVENTPIPE_LOG_PATH, $EVENTPIPE_NATS and $EVENTPIPE_STREAM. Exits 0 when "
                    "stopped by SIGTERM, 130 by SIGINT, 3 for an unreachable server, a missing "
                    "stream, a PATH that is not a mirror of that stream's log, or a stream "
                    "that does not continue.")
    p.add_argument("path", nargs="?" if env.get("EVENTPIPE_LOG_PATH") else None,
                   default=env.get("EVENTPIPE_LOG_PATH"))
    _nats_options(p)
    p.add_argument("--batch", type=int, default=1024,
                   help="messages fetched at once (default 1024)")
    p.set_defaults(func=cmd_mirror)


def cmd_consume_stream(args: argparse.Namespace) -> int:
    from .._checkpoint import validate_name
    from .._config import CONSUMER_OPTIONS, resolve

    if not have_nats("consume-stream"):
        return EXIT_USAGE
    from ..jetstream import StreamConsumer

    options = {"checkpoint_dir": args.checkpoint_dir, **consumer_options(args, (
        "checkpoint_every", "checkpoint_interval", "poll_interval", "on_error", "max_retries",
        "retry_backoff", "dead_letter"))}
    resolve(CONSUMER_OPTIONS, options)  # the command line first (exit 2), then the rest
    validate_name(args.name)
    handler = load_handler(args.handler)
    initial = initial_state(args)
    with StreamConsumer(servers(args.nats), args.stream, args.name, handler, initial,
                        **options) as consumer:
        state = consumer.catch_up() if args.catch_up else consumer.run()
        return stopped(args, state, consumer.offset, consumer.stopped_by == signal.SIGINT)


def cmd_mirror(args: argparse.Namespace) -> int:
    if not have_nats("mirror"):
        return EXIT_USAGE
    from ..jetstream import Mirror
    from ..jetstream._mirror import check_stream

    options: dict[str, Any] = {"batch": args.batch}
    if args.poll_interval is not None:
        options["poll_interval"] = args.poll_interval
    if not os.path.lexists(args.path):
        # Mirror creates the log: first make sure there is a stream to fill it from (an
        # unreachable server or a missing stream leaves nothing behind).
        check_stream(servers(args.nats), args.stream, **options)
    with Mirror(args.path, servers(args.nats), args.stream, **options) as mirror:
        if args.catch_up:
            mirror.catch_up()
        else:
            mirror.run()
        where = f"mirror {mirror.log.path}: head {mirror.head} ({mirror.appended} appended)"
        if mirror.stopped_by == signal.SIGINT:
            err(f"{where}, interrupted (SIGINT)")
            return EXIT_INTERRUPTED
        err(where)
    return EXIT_OK
