"""eventpipe beyond one host: a log's events in a NATS JetStream stream (``pip install
eventpipe[nats]``).

:class:`Bridge` publishes a log's events, in offset order and exactly once, to a stream
(``eventpipe bridge``). On any other host, :class:`StreamConsumer` folds that stream as
:class:`eventpipe.Consumer` folds a log (``eventpipe consume-stream``), and :class:`Mirror`
keeps a local log identical to it (``eventpipe mirror``). The core package never imports this
one, nor ``nats``. The wire format (one message per event, headers naming the log id and
offset) is described in :mod:`eventpipe.jetstream._wire`.
"""

from ._bridge import Bridge, subject_matches
from ._mirror import Mirror
from ._remote import StreamConsumer
from ._source import MirrorMismatchError
from ._wire import (
    ForeignMessageError,
    Position,
    PublishError,
    ServerUnavailableError,
    StreamGapError,
    StreamMismatchError,
    StreamNotFoundError,
    default_subject,
    last_entry,
    last_position,
    msg_headers,
    msg_id,
    parse_headers,
)

__all__ = [
    "Bridge",
    "ForeignMessageError",
    "Mirror",
    "MirrorMismatchError",
    "Position",
    "PublishError",
    "ServerUnavailableError",
    "StreamConsumer",
    "StreamGapError",
    "StreamMismatchError",
    "StreamNotFoundError",
    "default_subject",
    "last_entry",
    "last_position",
    "msg_headers",
    "msg_id",
    "parse_headers",
    "subject_matches",
]
