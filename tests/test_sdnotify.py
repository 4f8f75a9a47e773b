"""SystemdNotifier against real unix datagram sockets standing in for systemd's notify socket."""

from __future__ import annotations

import errno
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import eventpipe._systemd
from eventpipe._systemd import MAX_MESSAGE_BYTES, SystemdNotifier

RECV_TIMEOUT = 5.0  # generous: only a broken implementation ever waits this long


@dataclass
class Receiver:
    """A bound datagram socket plus the NOTIFY_SOCKET value that reaches it."""

    sock: socket.socket
    notify_socket: str
    path: Path | None  # None for an abstract-namespace socket

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.notify_socket, **extra}


def _bind_path(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.fspath(path))
    return sock


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Receiver]:
    if request.param == "path":
        path = tmp_path / "notify.sock"
        rx = Receiver(_bind_path(path), os.fspath(path), path)
    else:
        # A random name: the abstract namespace is shared by everything on the host.
        name = f"eventpipe-test-{secrets.token_hex(8)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("\0" + name)
        rx = Receiver(sock, "@" + name, None)
    try:
        yield rx
    finally:
        rx.sock.close()


def recv(sock: socket.socket) -> bytes:
    sock.settimeout(RECV_TIMEOUT)
    return sock.recv(MAX_MESSAGE_BYTES * 2)


def assert_nothing_pending(sock: socket.socket) -> None:
    # A local sendto() has queued the datagram before it returns, so a non-blocking read
    # that finds nothing proves nothing was sent; no waiting needed.
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(MAX_MESSAGE_BYTES)


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}])
def test_disabled_without_notify_socket(environ: dict[str, str]) -> None:
    environ = {**environ, "WATCHDOG_USEC": "1000000"}
    with SystemdNotifier(environ) as n:
        assert not n.enabled
        assert n.ready() is False
        assert n.status("hello") is False
        assert n.stopping() is False
        assert n.watchdog() is False
        assert n.notify("X=1") is False
        assert n.watchdog_interval is None
        assert n.maybe_ping_watchdog(now=100.0) is False
        assert n.last_error is None
        n.close()
    n.close()


@pytest.mark.parametrize("value", ["relative/notify.sock", "vsock:2:1234", "notify.sock"])
def test_unsupported_address_disables_and_records(value: str) -> None:
    with SystemdNotifier({"NOTIFY_SOCKET": value}) as n:
        assert not n.enabled
        assert n.ready() is False
        assert isinstance(n.last_error, OSError)
        assert n.last_error.errno == errno.EAFNOSUPPORT


def test_basic_messages(receiver: Receiver) -> None:
    with SystemdNotifier(receiver.env()) as n:
        assert n.enabled
        assert n.ready() is True
        assert recv(receiver.sock) == b"READY=1"
        assert n.status("consuming orders: 12 events/s") is True
        assert recv(receiver.sock) == b"STATUS=consuming orders: 12 events/s"
        assert n.stopping() is True
        assert recv(receiver.sock) == b"STOPPING=1"
        assert n.watchdog() is True
        assert recv(receiver.sock) == b"WATCHDOG=1"
        assert n.notify("READY=1", "STATUS=up", "MAINPID=42") is True
        assert recv(receiver.sock) == b"READY=1\nSTATUS=up\nMAINPID=42"
        assert n.last_error is None
    assert_nothing_pending(receiver.sock)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("line one\nline two", b"STATUS=line one line two"),
        ("a\r\nb\rc\n", b"STATUS=a b c "),
        ("\n\n", b"STATUS=  "),
        ("caf\u00e9 \u2713", "STATUS=caf\u00e9 \u2713".encode()),
        ("", b"STATUS="),
    ],
)
def test_status_sanitises_newlines(receiver: Receiver, text: str, expected: bytes) -> None:
    with SystemdNotifier(receiver.env()) as n:
        assert n.status(text) is True
    assert recv(receiver.sock) == expected


def test_status_truncated_to_systemd_limit(receiver: Receiver) -> None:
    with SystemdNotifier(receiver.env()) as n:
        assert n.status("x" * 10_000) is True
        # Two-byte characters: the cut must not leave half of one behind.
        assert n.status("\u00e9" * 3_000) is True
    long_ascii = recv(receiver.sock)
    assert len(long_ascii) == MAX_MESSAGE_BYTES
    assert long_ascii == b"STATUS=" + b"x" * (MAX_MESSAGE_BYTES - len(b"STATUS="))
    long_utf8 = recv(receiver.sock)
    assert len(long_utf8) <= MAX_MESSAGE_BYTES
    assert long_utf8.decode("utf-8") == "STATUS=" + "\u00e9" * ((MAX_MESSAGE_BYTES - 7) // 2)


def test_status_unencodable_text_does_not_raise(receiver: Receiver) -> None:
    with SystemdNotifier(receiver.env()) as n:
        assert n.status("bad \udcff name") is True
    assert recv(receiver.sock) == b"STATUS=bad ? name"


@pytest.mark.parametrize("fields", [(), ("READY=1\nSTOPPING=1",), ("READY",), ("=1",)])
@pytest.mark.parametrize("enabled", [True, False])
def test_malformed_fields_raise_even_when_disabled(
    receiver: Receiver, fields: tuple[str, ...], enabled: bool
) -> None:
    with SystemdNotifier(receiver.env() if enabled else {}) as n, pytest.raises(ValueError):
        n.notify(*fields)
    assert_nothing_pending(receiver.sock)


def test_negative_send_timeout_rejected() -> None:
    with pytest.raises(ValueError, match="send_timeout"):
        SystemdNotifier({}, send_timeout=-1.0)


@pytest.mark.parametrize(
    ("extra", "interval"),
    [
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "500"}, 0.00025),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": ""}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "1.5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(
    receiver: Receiver, extra: dict[str, str], interval: float | None
) -> None:
    with SystemdNotifier(receiver.env(**extra)) as n:
        assert n.watchdog_interval == interval


def test_watchdog_pid_mismatch_stops_pings(receiver: Receiver) -> None:
    env = receiver.env(WATCHDOG_USEC="2000000", WATCHDOG_PID=str(os.getpid() + 1))
    with SystemdNotifier(env) as n:
        assert n.maybe_ping_watchdog(now=100.0) is False
        assert n.maybe_ping_watchdog(now=1e9) is False
    assert_nothing_pending(receiver.sock)


def test_maybe_ping_watchdog_rate_limits(receiver: Receiver) -> None:
    with SystemdNotifier(receiver.env(WATCHDOG_USEC="2000000")) as n:  # interval 1.0 s
        assert n.maybe_ping_watchdog(now=100.0) is True  # first call always pings
        assert recv(receiver.sock) == b"WATCHDOG=1"
        assert n.maybe_ping_watchdog(now=100.0) is False
        assert n.maybe_ping_watchdog(now=100.5) is False
        assert n.maybe_ping_watchdog(now=100.999) is False
        assert_nothing_pending(receiver.sock)
        assert n.maybe_ping_watchdog(now=101.0) is True  # exactly one interval later
        assert recv(receiver.sock) == b"WATCHDOG=1"
        assert n.maybe_ping_watchdog(now=101.5) is False
        assert n.maybe_ping_watchdog(now=105.0) is True  # a long gap pings once, not four times
        assert recv(receiver.sock) == b"WATCHDOG=1"
        assert n.maybe_ping_watchdog(now=105.1) is False
    assert_nothing_pending(receiver.sock)


def test_maybe_ping_watchdog_default_clock(receiver: Receiver) -> None:
    with SystemdNotifier(receiver.env(WATCHDOG_USEC=str(3600 * 1_000_000))) as n:
        assert n.maybe_ping_watchdog() is True
        assert n.maybe_ping_watchdog() is False
    assert recv(receiver.sock) == b"WATCHDOG=1"
    assert_nothing_pending(receiver.sock)


def test_manual_watchdog_restarts_interval(receiver: Receiver) -> None:
    with SystemdNotifier(receiver.env(WATCHDOG_USEC=str(3600 * 1_000_000))) as n:
        assert n.watchdog() is True  # stamped with time.monotonic()
        assert n.maybe_ping_watchdog() is False
    assert recv(receiver.sock) == b"WATCHDOG=1"
    assert_nothing_pending(receiver.sock)


def test_maybe_ping_without_watchdog_sends_nothing(receiver: Receiver) -> None:
    with SystemdNotifier(receiver.env()) as n:
        assert n.watchdog_interval is None
        assert n.maybe_ping_watchdog(now=100.0) is False
    assert_nothing_pending(receiver.sock)


def test_send_after_receiver_closed(receiver: Receiver) -> None:
    n = SystemdNotifier(receiver.env(WATCHDOG_USEC="2000000"))
    with n:
        assert n.ready() is True
        assert recv(receiver.sock) == b"READY=1"
        receiver.sock.close()
        assert n.status("still here") is False
        assert isinstance(n.last_error, OSError)
        assert n.last_error.errno == errno.ECONNREFUSED
        assert n.stopping() is False
        assert n.watchdog() is False
        assert n.maybe_ping_watchdog(now=1.0) is False
        assert n.enabled  # the notifier itself is fine; only the peer is gone
    assert not n.enabled


def test_send_after_socket_unlinked_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    env = {"NOTIFY_SOCKET": os.fspath(path), "WATCHDOG_USEC": "2000000"}
    with SystemdNotifier(env) as n:
        rx = _bind_path(path)
        rx.close()
        path.unlink()
        assert n.ready() is False
        assert isinstance(n.last_error, FileNotFoundError)
        # A failed ping does not count against the interval: the next call retries at once.
        assert n.maybe_ping_watchdog(now=200.0) is False
        failure = n.last_error
        rx = _bind_path(path)  # the manager came back (e.g. daemon-reexec)
        try:
            assert n.maybe_ping_watchdog(now=200.1) is True
            assert recv(rx) == b"WATCHDOG=1"
            assert n.maybe_ping_watchdog(now=200.2) is False
            assert n.last_error is failure  # kept until the next failure, for inspection
        finally:
            rx.close()


def test_full_receiver_queue_times_out_instead_of_blocking(receiver: Receiver) -> None:
    with SystemdNotifier(receiver.env(), send_timeout=0.05) as n:
        # Nobody reads: the receiver's queue (net.unix.max_dgram_qlen) or the sender's
        # buffer fills within a few hundred datagrams, after which a send must give up.
        for i in range(100_000):
            started = time.monotonic()
            if not n.status(f"message {i}"):
                elapsed = time.monotonic() - started
                break
        else:
            pytest.fail("the queue never filled")
        assert isinstance(n.last_error, BlockingIOError)
        assert elapsed < 2.0
        assert recv(receiver.sock) == b"STATUS=message 0"


def test_closed_notifier_is_inert(receiver: Receiver) -> None:
    n = SystemdNotifier(receiver.env(WATCHDOG_USEC="2000000"))
    assert n.enabled
    assert receiver.notify_socket.replace("@", "\\x00") in repr(n)
    n.close()
    n.close()
    assert not n.enabled
    assert "closed" in repr(n)
    assert n.ready() is False
    assert n.watchdog_interval is None
    assert n.maybe_ping_watchdog(now=1.0) is False
    assert n.last_error is None
    assert_nothing_pending(receiver.sock)


CHILD = """
import importlib.util, sys
# Loaded by file path so this test does not depend on the rest of the package importing.
spec = importlib.util.spec_from_file_location("sdnotify_under_test", sys.argv[1])
assert spec is not None and spec.loader is not None
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
with module.SystemdNotifier() as notifier:
    sys.exit(0 if notifier.ready() else 3)
"""


def test_child_process_reports_ready(receiver: Receiver) -> None:
    # SO_PASSCRED makes the kernel attach the sender's pid, as systemd uses to attribute
    # notifications; it proves the datagram came from the child, not from this process.
    receiver.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    env["NOTIFY_SOCKET"] = receiver.notify_socket
    module_file = eventpipe._systemd.__file__
    assert module_file is not None
    with subprocess.Popen([sys.executable, "-c", CHILD, module_file], env=env) as proc:
        assert proc.wait(timeout=60) == 0
    receiver.sock.settimeout(RECV_TIMEOUT)
    ucred = struct.Struct("3i")  # struct ucred: pid, uid, gid
    data, ancdata, _, _ = receiver.sock.recvmsg(MAX_MESSAGE_BYTES, socket.CMSG_SPACE(ucred.size))
    assert data == b"READY=1"
    creds = [
        ucred.unpack(cdata[: ucred.size])
        for level, kind, cdata in ancdata
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
    ]
    assert [pid for pid, _, _ in creds] == [proc.pid]
