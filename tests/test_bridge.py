"""The forward bridge, log -> JetStream stream (issue 12), against real nats-servers on loopback:
exactly once through kill -9 of the bridge and of cluster nodes, typed errors and exit codes for
bad input, and the bridge's lag where operators look for consumers."""

# The fixtures are imported from tests/_nats.py and named as parameters: not redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventpipe import EventLog

from ._nats import (  # noqa: F401  (fixtures)
    NatsCluster,
    NatsServer,
    free_port,
    nats_cluster,
    nats_server,
    require_nats,
)
from ._wait import wait_until
from .conftest import ROOT, Children

STREAM = "ORDERS"

# Appends batches of 1..20 events with short pauses until COUNT events are in, or the file
# STOP exists: a writer that keeps appending while the bridge is killed and restarted.
WRITER = """
import os, random, sys, time
from eventpipe import EventLog
path, wid, count, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rng = random.Random(wid)
n = 0
with EventLog(path, segment_max_bytes=64 * 1024, sync="none") as log:
    while n < count and not os.path.exists(stop):
        k = min(count - n, rng.randint(1, 20))
        log.append_many([{"w": wid, "n": n + i, "pad": "x" * rng.randint(0, 200)}
                         for i in range(k)])
        n += k
        time.sleep(rng.uniform(0, 0.004))
"""


@dataclass
class Message:
    seq: int
    headers: dict[str, str]
    data: bytes


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def bridge_cmd(log: Path, urls: list[str], *extra: str, stream: str = STREAM) -> list[str]:
    return [sys.executable, "-m", "eventpipe", "bridge", str(log), "--nats", ",".join(urls),
            "--stream", stream, *extra]


def run_bridge(log: Path, urls: list[str], *extra: str, stream: str = STREAM,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A bridge that is expected to stop by itself (an error)."""
    return subprocess.run(bridge_cmd(log, urls, *extra, stream=stream), capture_output=True,
                          text=True, env=env(), timeout=timeout, check=False)


def start_bridge(children: Children, log: Path, urls: list[str], *extra: str,
                 stream: str = STREAM, stderr: Any = None) -> subprocess.Popen[bytes]:
    return children.popen(bridge_cmd(log, urls, *extra, stream=stream),
                          stdout=subprocess.DEVNULL,
                          stderr=stderr if stderr is not None else subprocess.DEVNULL)


def stop_bridge(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    proc.send_signal(sig)
    return proc.wait(30)


async def _with_js(urls: list[str], work: Any, **connect: Any) -> Any:
    import nats

    async def quiet(exc: Exception) -> None:  # a node killed on purpose is no news
        return None

    nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=3,
                            error_cb=quiet, **connect)
    try:
        return await work(nc.jetstream(timeout=5))
    finally:
        await nc.close()


def stream_count(urls: list[str], stream: str = STREAM) -> int:
    """Messages in the stream now (-1 while it does not exist or no server answers)."""
    async def count(js: Any) -> int:
        return int((await js.stream_info(stream)).state.messages)

    try:
        return int(asyncio.run(_with_js(urls, count)))
    except Exception:
        return -1


def stream_messages(urls: list[str], stream: str = STREAM) -> list[Message]:
    """Every message of the stream, in stream order (an ordered consumer)."""
    async def read(js: Any) -> list[Message]:
        info = await js.stream_info(stream)
        total = info.state.messages
        subjects = info.config.subjects
        sub = await js.subscribe(subjects[0], ordered_consumer=True, stream=stream)
        out: list[Message] = []
        try:
            while len(out) < total:
                msg = await sub.next_msg(timeout=10)
                out.append(Message(msg.metadata.sequence.stream, dict(msg.headers or {}),
                                   msg.data))
        finally:
            await sub.unsubscribe()
        return out

    result: list[Message] = asyncio.run(_with_js(urls, read))
    return result


def publish_raw(urls: list[str], subject: str, data: bytes,
                headers: dict[str, str] | None = None) -> None:
    async def pub(js: Any) -> None:
        await js.publish(subject, data, headers=headers)

    asyncio.run(_with_js(urls, pub))


def add_stream(urls: list[str], stream: str = STREAM, subject: str = "eventpipe.orders",
               replicas: int = 1) -> None:
    async def add(js: Any) -> None:
        await js.add_stream(name=stream, subjects=[subject], num_replicas=replicas)

    asyncio.run(_with_js(urls, add))


def check_exactly_once(log_path: Path, messages: list[Message]) -> None:
    """The stream holds every event of the log once, in offset order, with its headers."""
    with EventLog(log_path, create=False) as log:
        head, log_id = log.head, log.log_id
        lines = list(log.read_raw())
        times = [r.time for r in log.read()]
    offsets = [int(m.headers["Eventpipe-Offset"]) for m in messages]
    missing = sorted(set(range(head)) - set(offsets))
    assert len(offsets) == len(set(offsets)), "an offset is in the stream twice"
    assert not missing, f"offsets missing from the stream: {missing[:20]}"
    assert offsets == list(range(head)), "the stream is not in offset order"
    assert [m.seq for m in messages] == list(range(1, head + 1))
    for offset, m in enumerate(messages):
        assert m.data == lines[offset]
        assert m.headers["Eventpipe-Log-Id"] == log_id
        assert m.headers["Nats-Msg-Id"] == f"{log_id}:{offset}"
        assert m.headers.get("Eventpipe-Time") == (None if times[offset] is None
                                                    else str(times[offset]))
        if offset:
            assert m.headers["Nats-Expected-Last-Sequence"] == str(m.seq - 1)
        else:
            assert "Nats-Expected-Last-Sequence" not in m.headers


def bridge_state(log_path: Path, name: str = f"bridge-{STREAM}") -> dict[str, Any]:
    raw = (log_path / "consumers" / f"{name}.json").read_bytes()
    doc: dict[str, Any] = orjson.loads(raw)
    return doc


def append(log_path: Path, n: int, start: int = 0) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"i": start + i} for i in range(n)])


# ------------------------------------------------------------------------- exactly once


def test_bridge_publishes_a_growing_log_once(nats_server: NatsServer, children: Children,
                                             log_path: Path) -> None:
    append(log_path, 500)
    urls = [nats_server.url]
    bridge = start_bridge(children, log_path, urls, "--create-stream")
    wait_until(lambda: stream_count(urls) == 500, "the backlog in the stream")
    append(log_path, 300, 500)  # followed, by notification
    wait_until(lambda: stream_count(urls) == 800, "new events in the stream")
    assert stop_bridge(bridge) == 0
    check_exactly_once(log_path, stream_messages(urls))
    # Started again, it resumes after the stream's last message: nothing is published twice.
    append(log_path, 10, 800)
    proc = start_bridge(children, log_path, urls, stderr=subprocess.PIPE)
    wait_until(lambda: stream_count(urls) == 810, "the new events")
    assert stop_bridge(proc) == 0
    assert proc.stderr is not None
    assert "stopped at offset 810 (10 published, 0 duplicates dropped, 0 retries)" in \
        proc.stderr.read().decode()
    check_exactly_once(log_path, stream_messages(urls))
    # The bridge's checkpoint names the last event's place as one read from the log would.
    from eventpipe._consumer import checkpoint_at

    cp = bridge_state(log_path)
    with EventLog(log_path, create=False) as log:
        want = checkpoint_at(log, f"bridge-{STREAM}", 810, None)
    assert (cp["offset"], cp["segment"], cp["position"], cp["fingerprint"]) == (
        810, want.segment, want.position, want.fingerprint)
    verify = subprocess.run([sys.executable, "-m", "eventpipe", "verify", str(log_path)],
                            capture_output=True, text=True, env=env(), check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_the_server_away_and_back(nats_server: NatsServer, children: Children,
                                  log_path: Path) -> None:
    """The only server killed (kill -9) and restarted while events arrive: the bridge waits,
    reconnects and goes on from the stream's last message."""
    urls = [nats_server.url]
    append(log_path, 100)
    bridge = start_bridge(children, log_path, urls, "--create-stream", "--ack-timeout", "1")
    wait_until(lambda: stream_count(urls) == 100, "the events in the stream")
    nats_server.kill()
    append(log_path, 50, 100)
    time.sleep(random.uniform(0, 1.5))  # a random while away
    nats_server.start()
    wait_until(lambda: stream_count(urls) == 150, "the events after the server came back")
    assert bridge.poll() is None
    assert stop_bridge(bridge) == 0
    check_exactly_once(log_path, stream_messages(urls))


def _soak(rounds: int, nats_server: NatsServer, children: Children, tmp_path: Path,
          log_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    urls = [nats_server.url]
    EventLog(log_path).close()
    stop = tmp_path / "stop-writers"
    writers = [children.popen([sys.executable, "-c", WRITER, str(log_path), f"w{w}",
                               str(1_000_000), str(stop)], stdout=subprocess.DEVNULL)
               for w in range(2)]
    killed_with_acks = 0
    for r in range(rounds):
        bridge = start_bridge(children, log_path, urls, "--create-stream", "--window",
                              str(rng.choice([1, 16, 256])))
        before = stream_count(urls)
        # A random moment while it publishes: once the stream grows (a slow start on a busy
        # machine would otherwise eat the whole random wait), then up to 0.6 s more.
        wait_until(lambda: stream_count(urls) > before or bridge.poll() is not None,  # noqa: B023
                   "the bridge publishing", timeout=60)
        assert bridge.poll() is None, f"the bridge exited in round {r}"
        time.sleep(rng.uniform(0.0, 0.6))
        mid = stream_count(urls)
        bridge.send_signal(signal.SIGKILL)
        bridge.wait()
        killed_with_acks += stream_count(urls) > mid
        assert all(w.poll() is None for w in writers), f"a writer died in round {r}"
    stop.touch()
    for w in writers:
        assert w.wait(60) == 0
    with EventLog(log_path, create=False) as log:
        head = log.head
    bridge = start_bridge(children, log_path, urls)
    wait_until(lambda: stream_count(urls) == head, f"all {head} events in the stream",
               timeout=120)
    assert stop_bridge(bridge) == 0
    check_exactly_once(log_path, stream_messages(urls))
    state = bridge_state(log_path)["state"]
    assert state["last_acked"] == head - 1
    verify = subprocess.run([sys.executable, "-m", "eventpipe", "verify", str(log_path)],
                            capture_output=True, text=True, env=env(), check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr  # checkpoints included
    # Every kill lands after the bridge began publishing; in most the stream was still
    # growing at the kill (acks in flight). A few may find a lull (writers paused): counted.
    print(f"soak: {rounds} rounds, {head} events, every kill after publishing began, "
          f"{killed_with_acks} with the stream still growing at the kill, "
          f"{state['duplicates']} duplicates dropped (counted by runs that checkpointed)")


def test_bridge_killed_at_random_moments_short(nats_server: NatsServer, children: Children,
                                               tmp_path: Path, log_path: Path) -> None:
    _soak(10, nats_server, children, tmp_path, log_path, seed=12)


@pytest.mark.slow
def test_bridge_killed_at_random_moments_soak(nats_server: NatsServer, children: Children,
                                              tmp_path: Path, log_path: Path) -> None:
    _soak(40, nats_server, children, tmp_path, log_path, seed=1212)


def _cluster_run(nats_cluster: NatsCluster, children: Children, tmp_path: Path,
                 log_path: Path, rounds: int, seed: int) -> None:
    """Writers append while the bridge publishes to an R3 stream; each round kills one node
    (odd rounds: the stream's leader) with SIGKILL and restarts it once the bridge went on."""
    rng = random.Random(seed)
    urls = nats_cluster.urls
    EventLog(log_path).close()
    stop = tmp_path / "stop-writer"
    writer = children.popen([sys.executable, "-c", WRITER, str(log_path), "w", "10000000",
                             str(stop)], stdout=subprocess.DEVNULL)
    with (tmp_path / "bridge.err").open("wb") as errors:
        bridge = start_bridge(children, log_path, urls, "--create-stream", "--replicas", "3",
                              "--ack-timeout", "2", stderr=errors)

    def progress(what: str) -> None:
        now = max(stream_count(urls), 0)
        wait_until(lambda: stream_count(urls) > now + 200, what, timeout=60)

    progress("the bridge publishing")
    for r in range(rounds):
        leader = nats_cluster.stream_leader(STREAM)
        victim = leader if r % 2 else rng.choice(
            [s for s in nats_cluster.servers if s is not leader])
        time.sleep(rng.uniform(0, 0.5))  # a random moment
        victim.kill()
        if victim is leader:
            nats_cluster.stream_leader(STREAM)  # a new one among the other two
        progress(f"progress in round {r} with {victim.name} down")
        victim.start()
        progress(f"progress in round {r} after {victim.name} came back")
    stop.touch()
    assert writer.wait(120) == 0
    nats_cluster.wait_ready()
    with EventLog(log_path, create=False) as log:
        head = log.head
    wait_until(lambda: stream_count(urls) == head, f"all {head} events in the stream",
               timeout=120)
    assert stop_bridge(bridge) == 0, (tmp_path / "bridge.err").read_text()
    check_exactly_once(log_path, stream_messages(urls))
    # Every replica holds them all (the restarted nodes caught up), and none stopped the
    # stream (a pipelined Nats-Expected-Last-Msg-Id meeting a leader change once did).
    for server in nats_cluster.servers:
        wait_until(lambda s=server: stream_count([s.url]) == head,  # type: ignore[misc]
                   f"{server.name} holding all {head} events")
        assert "critical write error" not in server.tail(10**8), server.name
    state = bridge_state(log_path)["state"]
    retries = (tmp_path / "bridge.err").read_text().count("resuming from the stream")
    print(f"cluster: {rounds} node kills, {head} events, {retries} retries, "
          f"{state['duplicates']} duplicates dropped")


def test_three_node_cluster_node_and_leader_killed(nats_cluster: NatsCluster,
                                                   children: Children, tmp_path: Path,
                                                   log_path: Path) -> None:
    _cluster_run(nats_cluster, children, tmp_path, log_path, rounds=2, seed=3)


@pytest.mark.slow
def test_three_node_cluster_many_kills(nats_cluster: NatsCluster, children: Children,
                                       tmp_path: Path, log_path: Path) -> None:
    _cluster_run(nats_cluster, children, tmp_path, log_path, rounds=10, seed=33)


# ---------------------------------------------------------------------------- bad input


def test_unreachable_server(log_path: Path) -> None:
    require_nats()
    append(log_path, 3)
    result = run_bridge(log_path, [f"nats://127.0.0.1:{free_port()}"])
    assert result.returncode == 3, result.stderr
    assert "ServerUnavailableError" in result.stderr
    assert "no server reachable" in result.stderr


def test_missing_stream_without_create_stream(nats_server: NatsServer, log_path: Path) -> None:
    append(log_path, 3)
    result = run_bridge(log_path, [nats_server.url])
    assert result.returncode == 3, result.stderr
    assert f"StreamNotFoundError: stream {STREAM} does not exist" in result.stderr
    assert stream_count([nats_server.url]) == -1  # nothing created


def test_stream_of_another_log(nats_server: NatsServer, children: Children,
                               tmp_path: Path) -> None:
    urls = [nats_server.url]
    first, second = tmp_path / "a", tmp_path / "b"
    append(first, 5)
    append(second, 7)
    bridge = start_bridge(children, first, urls, "--create-stream")
    wait_until(lambda: stream_count(urls) == 5, "the first log in the stream")
    assert stop_bridge(bridge) == 0
    result = run_bridge(second, urls)
    assert result.returncode == 3, result.stderr
    assert "StreamMismatchError" in result.stderr
    assert "holds events of another log" in result.stderr
    assert stream_count(urls) == 5
    check_exactly_once(first, stream_messages(urls))


def test_stream_with_a_message_eventpipe_did_not_write(nats_server: NatsServer,
                                                       log_path: Path) -> None:
    urls = [nats_server.url]
    append(log_path, 3)
    add_stream(urls)
    publish_raw(urls, "eventpipe.orders", b"hello", {"Other": "header"})
    result = run_bridge(log_path, urls)
    assert result.returncode == 3, result.stderr
    assert "ForeignMessageError" in result.stderr
    assert "not written by an eventpipe bridge" in result.stderr
    assert stream_count(urls) == 1


def test_stream_that_does_not_take_the_subject(nats_server: NatsServer, children: Children,
                                               log_path: Path) -> None:
    urls = [nats_server.url]
    append(log_path, 3)
    add_stream(urls, subject="other.>")
    result = run_bridge(log_path, urls)
    assert result.returncode == 3, result.stderr
    assert "does not take subject eventpipe.orders" in result.stderr
    assert stream_count(urls) == 0
    # Given a subject it takes, it publishes there.
    bridge = start_bridge(children, log_path, urls, "--subject", "other.orders.x")
    wait_until(lambda: stream_count(urls) == 3, "the events in the stream")
    assert stop_bridge(bridge) == 0
    check_exactly_once(log_path, stream_messages(urls))


def test_a_message_the_stream_refuses(nats_server: NatsServer, log_path: Path) -> None:
    urls = [nats_server.url]

    async def add(js: Any) -> None:
        await js.add_stream(name=STREAM, subjects=["eventpipe.orders"], max_msg_size=1000)

    asyncio.run(_with_js(urls, add))
    with EventLog(log_path) as log:
        log.append_many([{"i": 0}, {"i": 1}, {"big": "x" * 1000}, {"i": 3}])
    result = run_bridge(log_path, urls)
    assert result.returncode == 3, result.stderr
    assert "PublishError" in result.stderr and "offset=2" in result.stderr, result.stderr
    assert "message size exceeds maximum" in result.stderr
    assert "Traceback" not in result.stderr and "never retrieved" not in result.stderr
    assert stream_count(urls) == 2


def test_auth_failure(tmp_path: Path, log_path: Path) -> None:
    server = NatsServer(require_nats(), tmp_path / "nats" / "n1",
                        extra=["--user", "bridge", "--pass", "s3cret"])
    server.start()
    try:
        append(log_path, 4)
        wrong = server.url.replace("nats://", "nats://bridge:wrong@")
        for urls in ([server.url], [wrong]):
            result = run_bridge(log_path, urls, "--create-stream")
            assert result.returncode == 3, result.stderr
            assert "ServerUnavailableError" in result.stderr
            assert "authorization failed" in result.stderr
        right = server.url.replace("nats://", "nats://bridge:s3cret@")
        assert stream_count([right]) == -1  # nothing was created
    finally:
        server.kill()


def test_missing_log_and_busy_name(nats_server: NatsServer, children: Children,
                                   tmp_path: Path, log_path: Path) -> None:
    urls = [nats_server.url]
    result = run_bridge(tmp_path / "nothing", urls, "--create-stream")
    assert result.returncode == 3
    assert "no eventpipe log at" in result.stderr
    assert not (tmp_path / "nothing").exists()
    append(log_path, 3)
    bridge = start_bridge(children, log_path, urls, "--create-stream")
    wait_until(lambda: stream_count(urls) == 3, "the first bridge publishing")
    result = run_bridge(log_path, urls)
    assert result.returncode == 3
    assert "ConsumerBusyError" in result.stderr
    # A standby takes over when the first dies, and carries on.
    standby = start_bridge(children, log_path, urls, "--standby")
    bridge.send_signal(signal.SIGKILL)
    bridge.wait()
    append(log_path, 2, 3)
    wait_until(lambda: stream_count(urls) == 5, "the standby publishing")
    assert stop_bridge(standby, signal.SIGINT) == 130
    check_exactly_once(log_path, stream_messages(urls))


def test_retention_gap_needs_from_first_stored(nats_server: NatsServer, children: Children,
                                               log_path: Path) -> None:
    urls = [nats_server.url]
    with EventLog(log_path, segment_max_bytes=1024) as log:
        log.append_many([{"i": i, "pad": "x" * 100} for i in range(100)])
        log.finish_sealing()
        log.prune(before=50)
        first, head = log.first_offset, log.head
    assert 0 < first < head
    result = run_bridge(log_path, urls, "--create-stream")
    assert result.returncode == 3, result.stderr
    assert "StreamGapError" in result.stderr and "--from-first-stored" in result.stderr
    assert stream_count(urls) == 0
    bridge = start_bridge(children, log_path, urls, "--from-first-stored")
    wait_until(lambda: stream_count(urls) == head - first, "the stored events in the stream")
    assert stop_bridge(bridge) == 0
    messages = stream_messages(urls)
    assert [int(m.headers["Eventpipe-Offset"]) for m in messages] == list(range(first, head))
    assert "Nats-Expected-Last-Sequence" not in messages[0].headers


def test_without_nats_py_the_command_says_what_to_install(log_path: Path) -> None:
    append(log_path, 1)
    code = ("import sys; sys.modules['nats'] = None; from eventpipe._cli import main; "
            f"sys.exit(main(['bridge', {str(log_path)!r}, '--nats', 'nats://x', "
            "'--stream', 'S']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env(), check=False, timeout=60)
    assert result.returncode == 2
    assert "pip install eventpipe[nats]" in result.stderr


# ----------------------------------------------------------------------- what operators see


def test_status_and_consumers_show_the_bridge_lag(nats_server: NatsServer, children: Children,
                                                  log_path: Path) -> None:
    urls = [nats_server.url]
    append(log_path, 20)
    bridge = start_bridge(children, log_path, urls, "--create-stream")
    wait_until(lambda: stream_count(urls) == 20, "the events in the stream")
    assert stop_bridge(bridge) == 0
    append(log_path, 7, 20)
    out = subprocess.run([sys.executable, "-m", "eventpipe", "consumers", str(log_path),
                          "--json"], capture_output=True, text=True, env=env(), check=True)
    doc = orjson.loads(out.stdout)
    rows = doc if isinstance(doc, list) else doc.get("consumers", doc)
    mine = [c for c in rows if c.get("name") == f"bridge-{STREAM}"]
    assert mine and mine[0]["offset"] == 20 and mine[0]["lag"] == 7, out.stdout
    status = subprocess.run([sys.executable, "-m", "eventpipe", "status", str(log_path)],
                            capture_output=True, text=True, env=env(), check=True).stdout
    line = next(x for x in status.splitlines() if f"bridge-{STREAM}" in x)
    assert "lag" in line and " 7 " in line, line
    state = bridge_state(log_path)["state"]
    assert state == {"stream": STREAM, "last_acked": 19, "duplicates": 0}


def test_systemd_status_line(nats_server: NatsServer, children: Children, tmp_path: Path,
                             log_path: Path) -> None:
    from ._sdnotify import fake_systemd

    urls = [nats_server.url]
    append(log_path, 12)
    with fake_systemd(tmp_path, 2_000_000) as (sock, environ):
        bridge = children.popen(bridge_cmd(log_path, urls, "--create-stream"), env=environ,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            seen.extend(sock.recv(4096).decode().splitlines())
            if f"STATUS=bridge bridge-{STREAM} -> {STREAM}: offset 12, lag 0" in seen \
                    and "WATCHDOG=1" in seen:
                break
        assert "READY=1" in seen
        assert f"STATUS=bridge bridge-{STREAM} -> {STREAM}: offset 12, lag 0" in seen, seen
        assert "WATCHDOG=1" in seen
        assert stop_bridge(bridge) == 0
        rest = []
        sock.settimeout(5)
        while "STOPPING=1" not in rest:
            rest.extend(sock.recv(4096).decode().splitlines())


def test_library_bridge_in_a_thread(nats_server: NatsServer, log_path: Path) -> None:
    import threading

    from eventpipe.jetstream import Bridge

    urls = [nats_server.url]
    append(log_path, 50)
    with Bridge(log_path, urls, STREAM, create_stream=True, window=8) as bridge:
        thread = threading.Thread(target=bridge.run)
        thread.start()
        try:
            wait_until(lambda: stream_count(urls) == 50, "the events in the stream")
            append(log_path, 5, 50)
            wait_until(lambda: bridge.last_acked == 54, "the new events acked")
            assert bridge.lag == 0
        finally:
            bridge.stop()
            thread.join(30)
        assert not thread.is_alive()
        assert bridge.published == 55 and bridge.duplicates == 0
    check_exactly_once(log_path, stream_messages(urls))
