"""The ``bridge`` command: publish a log to a NATS JetStream stream (``eventpipe[nats]``).

nats-py is imported only when the command runs: the rest of the command line never needs it.
"""

from __future__ import annotations

import argparse
import os
import signal

from ._common import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, err

_TRUE = ("1", "true", "yes", "on")
_MISSING_NATS = "needs nats-py: pip install eventpipe[nats]"


def add_nats_arguments(p: argparse.ArgumentParser) -> None:
    """--nats and --stream, defaulting to $EVENTPIPE_NATS and $EVENTPIPE_STREAM (every NATS
    command has them)."""
    env = os.environ
    p.add_argument("--nats", required="EVENTPIPE_NATS" not in env,
                   default=env.get("EVENTPIPE_NATS"), metavar="URL[,URL...]",
                   help="NATS server URLs (nats://[user:pass@]host:port), comma-separated")
    p.add_argument("--stream", required="EVENTPIPE_STREAM" not in env,
                   default=env.get("EVENTPIPE_STREAM"), help="the JetStream stream")


def servers(text: str) -> list[str]:
    """--nats: the URLs, comma-separated."""
    return [url.strip() for url in text.split(",") if url.strip()]


def have_nats(command: str) -> bool:
    """Whether nats-py can be imported; if not, says so for ``command``."""
    try:
        import nats  # noqa: F401  (only to say what is missing)
    except ImportError:
        err(f"{command} {_MISSING_NATS}")
        return False
    return True


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``bridge``; its defaults come from the environment a systemd unit sets."""
    env = os.environ
    p = sub.add_parser(
        "bridge", help="publish a log's events, exactly once, to a NATS JetStream stream",
        description="Publish every event of the log at PATH, in offset order and exactly once, "
                    "to a JetStream stream, following the log until SIGTERM/SIGINT; on start "
                    "(and after a failure) resume after the stream's last message. Needs "
                    "pip install eventpipe[nats]. PATH, --nats, --stream and --subject default "
                    "to $EVENTPIPE_LOG_PATH, $EVENTPIPE_NATS, $EVENTPIPE_STREAM and "
                    "$EVENTPIPE_SUBJECT (as set by a systemd EnvironmentFile). Exits 0 when "
                    "stopped by SIGTERM, 130 by SIGINT, 3 for an unreachable server, a refused "
                    "login, a missing stream or one that does not continue this log.")
    p.add_argument("path", nargs="?" if env.get("EVENTPIPE_LOG_PATH") else None,
                   default=env.get("EVENTPIPE_LOG_PATH"))
    add_nats_arguments(p)
    p.add_argument("--subject", default=env.get("EVENTPIPE_SUBJECT") or None,
                   help="the subject to publish to (default: eventpipe.<stream lowercased>)")
    p.add_argument("--name", default=env.get("EVENTPIPE_BRIDGE_NAME") or None,
                   help="the bridge's consumer name in the log (default bridge-<stream>)")
    p.add_argument("--create-stream", action="store_true",
                   default=env.get("EVENTPIPE_CREATE_STREAM", "").lower() in _TRUE,
                   help="create the stream (for --subject) if it does not exist")
    p.add_argument("--replicas", type=int,
                   default=env.get("EVENTPIPE_REPLICAS") or "1",
                   help="replicas of a stream --create-stream creates (default 1)")
    p.add_argument("--standby", action="store_true",
                   default=env.get("EVENTPIPE_STANDBY", "").lower() in _TRUE,
                   help="wait for the name if another bridge holds it")
    p.add_argument("--window", type=int, default=env.get("EVENTPIPE_WINDOW") or "256",
                   help="publishes awaiting their ack at once (default 256)")
    p.add_argument("--from-first-stored", action="store_true",
                   help="start an empty stream at the log's first stored offset when "
                        "retention removed older events (otherwise an error)")
    p.add_argument("--ack-timeout", type=float, default=5.0,
                   help="seconds to wait for each ack before retrying (default 5)")
    p.add_argument("--poll-interval", type=float, default=1.0)
    p.add_argument("--no-notifications", action="store_true")
    p.set_defaults(func=cmd_bridge)


def cmd_bridge(args: argparse.Namespace) -> int:
    if not have_nats("bridge"):
        return EXIT_USAGE
    from ..jetstream import Bridge

    with Bridge(args.path, servers(args.nats), args.stream, subject=args.subject,
                create_stream=args.create_stream, replicas=args.replicas, window=args.window,
                name=args.name, standby=args.standby, from_first_stored=args.from_first_stored,
                ack_timeout=args.ack_timeout, poll_interval=args.poll_interval,
                notifications=not args.no_notifications) as bridge:
        bridge.run()  # says where it stopped (the eventpipe.bridge logger, on stderr)
        if bridge.stopped_by == signal.SIGINT:
            err(f"bridge {bridge.name}: interrupted (SIGINT)")
            return EXIT_INTERRUPTED
    return EXIT_OK
