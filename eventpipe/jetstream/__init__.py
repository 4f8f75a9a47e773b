"""eventpipe beyond one host: a log's events in a NATS JetStream stream (``pip install
eventpipe[nats]``).

The core package never imports this one, nor ``nats``. The wire format (one message per
event, headers naming the log id and offset) is described in :mod:`eventpipe.jetstream._wire`.
"""

from ._wire import (
    ForeignMessageError,
    Position,
    StreamMismatchError,
    default_subject,
    last_position,
    msg_headers,
    msg_id,
    parse_headers,
)

__all__ = [
    "ForeignMessageError",
    "Position",
    "StreamMismatchError",
    "default_subject",
    "last_position",
    "msg_headers",
    "msg_id",
    "parse_headers",
]
