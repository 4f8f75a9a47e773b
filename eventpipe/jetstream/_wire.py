"""The wire format of an eventpipe log in a JetStream stream (shared by the bridge, the stream
consumer and the mirror).

One message per event, in offset order:

* payload: the event's stored JSON line, byte for byte (no newline);
* subject: the bridge's ``--subject`` (default ``eventpipe.<stream name lowercased>``);
* headers:

  ``Nats-Msg-Id: <log_id>:<offset>``
      the server's duplicate window drops a second copy (a retry of a publish that timed out
      but was stored is acked as a duplicate, never stored twice);
  ``Eventpipe-Log-Id: <log_id>`` and ``Eventpipe-Offset: <offset>``
      where the event comes from: readers map stream sequences to log offsets with these;
  ``Eventpipe-Time: <ns>``
      its append time (nanoseconds since the epoch, UTC); absent when the log does not know it;
  ``Nats-Expected-Last-Sequence: <stream sequence of offset - 1>``
      on every message but the first of the stream (what the bridge sends): the server
      refuses (error code 10071, "wrong last sequence") a message whose predecessor is not the
      stream's last message, so pipelined publishes can never leave a gap or reorder;
  ``Nats-Expected-Last-Msg-Id: <log_id>:<offset - 1>``
      the same check by message id (error code 10070), which :func:`msg_headers` gives when
      no sequence is known. The bridge does not use it: in a clustered stream a message
      checked this way that meets a leader change can fail on the replicas as they apply it
      ("critical write error: last msgid mismatch", seen with nats-server 2.15.1), which
      stops the stream; the sequence check is made by the leader before it proposes.

Readers must not rely on either expectation header: they are for the server.

The stream is the truth about how far the bridge got: :func:`last_position` reads its last
message, and the bridge resumes after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

from ..errors import EventPipeError

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

__all__ = [
    "API_ERR_WRONG_LAST_MSG_ID",
    "API_ERR_WRONG_LAST_SEQUENCE",
    "HDR_EXPECTED_LAST_MSG_ID",
    "HDR_EXPECTED_LAST_SEQ",
    "HDR_LOG_ID",
    "HDR_MSG_ID",
    "HDR_OFFSET",
    "HDR_TIME",
    "ForeignMessageError",
    "Position",
    "PublishError",
    "ServerUnavailableError",
    "StreamGapError",
    "StreamMismatchError",
    "StreamNotFoundError",
    "default_subject",
    "last_entry",
    "last_position",
    "msg_headers",
    "msg_id",
    "parse_headers",
]

HDR_MSG_ID = "Nats-Msg-Id"
HDR_EXPECTED_LAST_MSG_ID = "Nats-Expected-Last-Msg-Id"
HDR_EXPECTED_LAST_SEQ = "Nats-Expected-Last-Sequence"
HDR_LOG_ID = "Eventpipe-Log-Id"
HDR_OFFSET = "Eventpipe-Offset"
HDR_TIME = "Eventpipe-Time"

API_ERR_WRONG_LAST_MSG_ID = 10070
"""JetStream's error code for a publish whose Nats-Expected-Last-Msg-Id is not the stream's
last message id."""
API_ERR_WRONG_LAST_SEQUENCE = 10071
"""JetStream's error code for a publish whose Nats-Expected-Last-Sequence is not the stream's
last sequence."""


class StreamMismatchError(EventPipeError, ValueError):
    """A stream that does not continue this log: it holds another log's messages, messages
    eventpipe did not write, or offsets that do not follow the log's (``stream`` names it)."""

    def __init__(self, message: str, *, stream: str | None = None,
                 path: str | None = None, offset: int | None = None) -> None:
        self.stream = stream
        super().__init__(message, path=path, offset=offset)


class ForeignMessageError(StreamMismatchError):
    """A stream message without eventpipe's headers (or with malformed ones)."""


class StreamGapError(StreamMismatchError):
    """The stream and the log do not meet: the events between the stream's last one and the
    log's first stored one were removed by retention (``offset`` is the first one missing)."""


class StreamNotFoundError(EventPipeError, LookupError):
    """The stream does not exist (and was not to be created)."""

    def __init__(self, message: str, *, stream: str | None = None) -> None:
        self.stream = stream
        super().__init__(message)


class PublishError(EventPipeError, RuntimeError):
    """The server refused a message for a reason retrying cannot mend (a message over the
    stream's size limit, a permission, ...): ``offset`` is the event's."""


class ServerUnavailableError(EventPipeError, ConnectionError):
    """No NATS server of those given could be reached, or one refused us (``reason``: the
    last error the client saw, such as an authorization violation)."""

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        self.reason = reason
        super().__init__(message)


class Position(NamedTuple):
    """Where a stream stands: the log id and offset of its last message."""

    log_id: str
    offset: int


def default_subject(stream: str) -> str:
    """The subject a bridge publishes to when none is given: ``eventpipe.<stream lowercased>``."""
    return f"eventpipe.{stream.lower()}"


def msg_id(log_id: str, offset: int) -> str:
    """The ``Nats-Msg-Id`` of the event at ``offset`` of log ``log_id``."""
    return f"{log_id}:{offset}"


def msg_headers(log_id: str, offset: int, time_ns: int | None, first: bool,
                last_seq: int | None = None) -> dict[str, str]:
    """The headers of the message carrying event ``offset`` of log ``log_id``.

    ``first`` is true for the first message of the stream only (it has no predecessor to
    expect); every other message names its predecessor: by stream sequence
    (``Nats-Expected-Last-Sequence: last_seq``) when ``last_seq`` is given, else by message
    id (``Nats-Expected-Last-Msg-Id``).
    """
    headers = {
        HDR_MSG_ID: f"{log_id}:{offset}",
        HDR_LOG_ID: log_id,
        HDR_OFFSET: str(offset),
    }
    if time_ns is not None:
        headers[HDR_TIME] = str(time_ns)
    if not first:
        if last_seq is not None:
            headers[HDR_EXPECTED_LAST_SEQ] = str(last_seq)
        else:
            headers[HDR_EXPECTED_LAST_MSG_ID] = f"{log_id}:{offset - 1}"
    return headers


def parse_headers(headers: Mapping[str, str] | None, *, stream: str | None = None,
                  seq: int | None = None) -> tuple[str, int, int | None]:
    """``(log_id, offset, time_ns)`` from a message's headers (time None when absent).

    Raises :class:`ForeignMessageError` for a message eventpipe did not write: no headers, a
    missing log id or offset, or values that do not parse. ``stream`` and ``seq`` only name
    the message in the error.
    """
    where = f" (stream {stream}, sequence {seq})" if stream is not None else ""
    if not headers:
        raise ForeignMessageError(f"message without eventpipe headers{where}", stream=stream)
    log_id = headers.get(HDR_LOG_ID)
    raw_offset = headers.get(HDR_OFFSET)
    if not log_id or raw_offset is None:
        raise ForeignMessageError(
            f"message without {HDR_LOG_ID}/{HDR_OFFSET} headers{where}: "
            "not written by an eventpipe bridge", stream=stream)
    try:
        offset = int(raw_offset)
        raw_time = headers.get(HDR_TIME)
        time_ns = int(raw_time) if raw_time is not None else None
    except ValueError:
        raise ForeignMessageError(f"message with malformed eventpipe headers{where}: "
                                  f"{dict(headers)!r}", stream=stream) from None
    if offset < 0:
        raise ForeignMessageError(f"message with a negative offset{where}", stream=stream)
    return log_id, offset, time_ns


async def last_position(js: JetStreamContext, stream: str) -> Position | None:
    """The log id and offset of ``stream``'s last message; None when it never held one.

    Raises as :func:`last_entry`.
    """
    entry = await last_entry(js, stream)
    return None if entry is None else entry[0]


async def last_entry(js: JetStreamContext, stream: str) -> tuple[Position, int] | None:
    """The position of ``stream``'s last message and its stream sequence; None when the
    stream never held a message.

    Reads ``stream_info().state.last_seq`` then that message. Raises nats-py's errors for
    a missing stream (``nats.js.errors.NotFoundError``) or a server away,
    :class:`ForeignMessageError` for a last message eventpipe did not write, and
    :class:`StreamMismatchError` when the stream held messages but its last one is gone
    (purged, expired or deleted): where to resume can then not be told from the stream.
    """
    from nats.js.errors import NotFoundError

    info = await js.stream_info(stream)
    last_seq = info.state.last_seq
    if not last_seq:
        return None
    try:
        msg = await js.get_msg(stream, last_seq)
    except NotFoundError:
        raise StreamMismatchError(
            f"stream {stream} held {last_seq} messages but its last one is gone (purged, "
            "expired or deleted): where the log continues cannot be told from the stream",
            stream=stream) from None
    log_id, offset, _ = parse_headers(msg.headers, stream=stream, seq=last_seq)
    return Position(log_id, offset), last_seq
