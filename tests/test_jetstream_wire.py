"""The wire format of a log in a JetStream stream (issue 12): headers, the stream's last
position, and the server's refusal of a message whose predecessor is not the stream's last."""

from __future__ import annotations

import asyncio

import pytest

from ._nats import NatsServer, nats_server  # noqa: F401  (fixture)


def test_headers_round_trip() -> None:
    from eventpipe.jetstream import msg_headers, parse_headers

    first = msg_headers("abc", 0, 123, first=True)
    assert first == {"Nats-Msg-Id": "abc:0", "Eventpipe-Log-Id": "abc", "Eventpipe-Offset": "0",
                     "Eventpipe-Time": "123"}
    later = msg_headers("abc", 7, None, first=False)
    assert later["Nats-Expected-Last-Msg-Id"] == "abc:6"
    assert "Nats-Expected-Last-Sequence" not in later
    by_seq = msg_headers("abc", 7, 9, False, 41)
    assert by_seq["Nats-Expected-Last-Sequence"] == "41"
    assert "Nats-Expected-Last-Msg-Id" not in by_seq
    assert "Eventpipe-Time" not in later
    assert parse_headers(first) == ("abc", 0, 123)
    assert parse_headers(later) == ("abc", 7, None)


@pytest.mark.parametrize("headers", [None, {}, {"Eventpipe-Log-Id": "x"},
                                     {"Eventpipe-Log-Id": "x", "Eventpipe-Offset": "one"},
                                     {"Eventpipe-Log-Id": "x", "Eventpipe-Offset": "-1"}])
def test_foreign_headers_are_a_typed_error(headers: dict[str, str] | None) -> None:
    from eventpipe import EventPipeError
    from eventpipe.jetstream import ForeignMessageError, StreamMismatchError, parse_headers

    with pytest.raises(ForeignMessageError) as info:
        parse_headers(headers, stream="S", seq=3)
    assert isinstance(info.value, StreamMismatchError)
    assert isinstance(info.value, EventPipeError)


def test_last_position_and_the_servers_order_check(nats_server: NatsServer) -> None:  # noqa: F811
    import nats
    from nats.js.errors import APIError

    from eventpipe.jetstream import (
        ForeignMessageError,
        Position,
        last_entry,
        last_position,
        msg_headers,
    )
    from eventpipe.jetstream._wire import API_ERR_WRONG_LAST_MSG_ID, API_ERR_WRONG_LAST_SEQUENCE

    async def main() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="S", subjects=["eventpipe.s"])
            assert await last_position(js, "S") is None
            await js.publish("eventpipe.s", b'{"a":0}', headers=msg_headers("L", 0, 5, True))
            await js.publish("eventpipe.s", b'{"a":1}', headers=msg_headers("L", 1, 6, False))
            assert await last_position(js, "S") == Position("L", 1)
            # A gap (offset 3 after 1) is refused by the server.
            with pytest.raises(APIError) as info:
                await js.publish("eventpipe.s", b"{}", headers=msg_headers("L", 3, 6, False))
            assert info.value.err_code == API_ERR_WRONG_LAST_MSG_ID
            # A repeat of a stored message is a duplicate, not a second copy.
            ack = await js.publish("eventpipe.s", b'{"a":1}',
                                   headers=msg_headers("L", 1, 6, False))
            assert ack.duplicate
            assert (await js.stream_info("S")).state.messages == 2
            # The same by stream sequence (what the bridge sends).
            with pytest.raises(APIError) as info:
                await js.publish("eventpipe.s", b"{}", headers=msg_headers("L", 2, 6, False, 1))
            assert info.value.err_code == API_ERR_WRONG_LAST_SEQUENCE
            await js.publish("eventpipe.s", b'{"a":2}', headers=msg_headers("L", 2, 7, False, 2))
            assert await last_entry(js, "S") == (Position("L", 2), 3)
            await js.publish("eventpipe.s", b"plain")
            with pytest.raises(ForeignMessageError):
                await last_position(js, "S")
        finally:
            await nc.close()

    asyncio.run(main())


def test_the_core_never_imports_nats() -> None:
    import subprocess
    import sys

    from .conftest import ROOT

    subprocess.run([sys.executable, "-c",
                    "import eventpipe, eventpipe._cli, sys; assert 'nats' not in sys.modules"],
                   cwd=ROOT, check=True)
