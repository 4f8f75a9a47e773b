"""The stream consumer (issue 12): a consumer on a host without the log's files, folding the
stream the bridge wrote, against a real nats-server on loopback. Killed with SIGKILL at random
moments and restarted, it ends in exactly the state of a fold of the log; failed events are
dead-lettered once; a stream that does not continue, or a checkpoint of another log, is a typed
error and an exit code, with nothing applied past what is sound."""

# The fixtures are imported from tests/_nats.py and named as parameters: not redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventpipe import EventLog

from ._nats import (  # noqa: F401  (fixtures)
    NatsCluster,
    NatsServer,
    create_stream,
    free_port,
    nats_cluster,
    nats_server,
    publish_events,
    publish_log,
)
from ._wait import wait_until
from .conftest import ROOT, Children

STREAM = "ORDERS"

# The handler the consumer processes load: order-sensitive, so an event handled twice, skipped
# or out of order shows in the state. Events with "bad" fail (for on_error tests). A little
# slow, so that kills land in the middle of a catch-up.
HANDLER = '''
import time

def handle(state, event, offset):
    if event.get("bad"):
        raise ValueError(f"bad event at {offset}")
    state = state or {"n": 0, "sum": 0, "h": 0}
    state["n"] += 1
    state["sum"] += event["i"]
    state["h"] = (state["h"] * 31 + offset * 7 + event["i"]) % 2305843009213693951
    time.sleep(0.0002)
    return state

def timed(state, event, offset, t):
    state = state or []
    state.append([offset, t])
    return state
'''


def fold(log_path: Path, skip_bad: bool = True) -> Any:
    """The state a local consumer of the whole log ends in (the reference)."""
    state: Any = None
    with EventLog(log_path, create=False) as log:
        for r in log.read():
            if r.event.get("bad") and skip_bad:
                continue
            state = state or {"n": 0, "sum": 0, "h": 0}
            state["n"] += 1
            state["sum"] += r.event["i"]
            state["h"] = (state["h"] * 31 + r.offset * 7 + r.event["i"]) % 2305843009213693951
    return state


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture
def handler(tmp_path: Path) -> str:
    path = tmp_path / "handler.py"
    path.write_text(HANDLER)
    return str(path)


def append(log_path: Path, start: int, count: int, bad_every: int = 0) -> None:
    with EventLog(log_path, segment_max_bytes=8192) as log:
        log.append_many([{"i": i, **({"bad": True} if bad_every and i % bad_every == 7 else {})}
                         for i in range(start, start + count)])


def consume_cmd(url: str, handler: str, cpdir: Path, *extra: str, stream: str = STREAM,
                name: str = "remote", func: str = "handle") -> list[str]:
    return [sys.executable, "-m", "eventpipe", "consume-stream", "--nats", url, "--stream",
            stream, "--name", name, "--handler", f"{handler}:{func}", "--checkpoint-dir",
            str(cpdir), *extra]


def run_consumer(url: str, handler: str, cpdir: Path, *extra: str, stream: str = STREAM,
                 func: str = "handle") -> subprocess.CompletedProcess[str]:
    return subprocess.run(consume_cmd(url, handler, cpdir, "--catch-up", "--print-state",
                                      *extra, stream=stream, func=func),
                          capture_output=True, text=True, env=env(), timeout=120, check=False)


def checkpoint(cpdir: Path, name: str = "remote") -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads((cpdir / f"{name}.json").read_bytes())
    return doc


def dead_letters(path: Path) -> list[dict[str, Any]]:
    with EventLog(path, create=False) as log:
        return [r.event for r in log.read()]


# ------------------------------------------------------------------------------ the basics


def test_catch_up_folds_the_stream_as_a_consumer_folds_the_log(
        nats_server: NatsServer, tmp_path: Path, handler: str) -> None:
    log = tmp_path / "log"
    append(log, 0, 500)
    create_stream([nats_server.url], STREAM)
    publish_log([nats_server.url], STREAM, log)
    proc = run_consumer(nats_server.url, handler, tmp_path / "cp")
    assert proc.returncode == 0, proc.stderr
    assert orjson.loads(proc.stdout) == fold(log)
    assert "consumer remote: stopped at offset 500" in proc.stderr
    cp = checkpoint(tmp_path / "cp")
    with EventLog(log, create=False) as opened:
        assert cp["log_id"] == opened.log_id  # the source log's id, from the headers
    assert cp["offset"] == 500 and cp["segment"] == 500  # the stream sequence of offset 499
    # Once more: nothing new, the same state.
    again = run_consumer(nats_server.url, handler, tmp_path / "cp")
    assert again.returncode == 0, again.stderr
    assert orjson.loads(again.stdout) == fold(log)


def test_pass_time_gives_the_logs_append_times(nats_server: NatsServer, tmp_path: Path,
                                               handler: str) -> None:
    log = tmp_path / "log"
    for k in range(5):
        append(log, k * 20, 20)
    create_stream([nats_server.url], STREAM)
    publish_log([nats_server.url], STREAM, log)
    proc = run_consumer(nats_server.url, handler, tmp_path / "cp", "--pass-time",
                        func="timed")
    assert proc.returncode == 0, proc.stderr
    with EventLog(log, create=False) as opened:
        want = [[r.offset, r.time] for r in opened.read()]
    assert orjson.loads(proc.stdout) == want
    assert all(t is not None for _, t in want)


def test_the_library_class_follows_and_stops(nats_server: NatsServer, tmp_path: Path) -> None:
    import threading

    from eventpipe.jetstream import StreamConsumer

    log = tmp_path / "log"
    append(log, 0, 100)
    create_stream([nats_server.url], STREAM)
    publish_log([nats_server.url], STREAM, log)
    seen: list[int] = []

    def handle(state: Any, event: Any, offset: int) -> Any:
        seen.append(offset)
        return (state or 0) + event["i"]

    caught_up = threading.Event()
    with StreamConsumer([nats_server.url], STREAM, "lib", handle, 0,
                        checkpoint_dir=tmp_path / "cp", poll_interval=0.2,
                        on_caught_up=lambda c: caught_up.set()) as consumer:
        runner = threading.Thread(target=consumer.run)
        runner.start()
        try:
            assert caught_up.wait(30)
            append(log, 100, 50)
            publish_log([nats_server.url], STREAM, log, start=100)
            wait_until(lambda: consumer.offset == 150, "the new events handled")
        finally:
            consumer.stop()
            runner.join(30)
        assert not runner.is_alive()
        assert seen == list(range(150))
        assert consumer.state == sum(range(150))
    assert checkpoint(tmp_path / "cp", "lib")["offset"] == 150


def test_sigterm_and_sigint_stop_after_a_checkpoint(nats_server: NatsServer, tmp_path: Path,
                                                   handler: str, children: Children) -> None:
    log = tmp_path / "log"
    append(log, 0, 200)
    create_stream([nats_server.url], STREAM)
    publish_log([nats_server.url], STREAM, log)
    cpdir = tmp_path / "cp"
    for sig, code, head in ((signal.SIGTERM, 0, 200), (signal.SIGINT, 130, 210)):
        proc = children.popen(consume_cmd(nats_server.url, handler, cpdir,
                                          "--poll-interval", "0.2", "--checkpoint-every", "1"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env())
        wait_until(lambda: (cpdir / "remote.json").exists()
                   and checkpoint(cpdir)["offset"] == head, "caught up")  # noqa: B023
        # Events published now are handled by the running loop: its signal handlers are in.
        append(log, head, 10)
        publish_log([nats_server.url], STREAM, log, start=head)
        wait_until(lambda: checkpoint(cpdir)["offset"] == head + 10,  # noqa: B023
                   "the new events handled")
        proc.send_signal(sig)
        assert proc.wait(30) == code
        assert proc.stderr is not None
        said = proc.stderr.read().decode()
        assert f"stopped at offset {head + 10}" in said, said
    assert checkpoint(cpdir)["state"] == fold(log)


# ------------------------------------------------------------------- killed and restarted


def _kill_rounds(url: str, log: Path, handler: str, cpdir: Path, children: Children,
                 rounds: int, rng: random.Random, extra: list[str], bad_every: int) -> int:
    """Rounds of: more events appended and published, a consumer started and killed -9 at a
    random moment (some rounds let it finish). Returns how many kills came before the
    consumer was done."""
    cut_short = 0
    head = 0
    with EventLog(log, create=False) as opened:
        head = opened.head
    def offset() -> int:
        return int(checkpoint(cpdir)["offset"]) if (cpdir / "remote.json").exists() else 0

    for _ in range(rounds):
        more = rng.randint(200, 1200)
        append(log, head, more, bad_every)
        publish_log([url], STREAM, log, start=head)
        head += more
        before = offset()
        proc = children.popen(consume_cmd(url, handler, cpdir, *extra),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
        if rng.random() < 0.65:  # once it is under way (its checkpoint moved), soon after
            wait_until(lambda: offset() > before or proc.poll() is not None,  # noqa: B023
                       "the consumer under way")
            time.sleep(rng.uniform(0, 0.15))
        else:  # any moment, its startup included
            time.sleep(rng.uniform(0.05, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        done = (cpdir / "remote.json").exists() and checkpoint(cpdir)["offset"] == head
        cut_short += not done
    return cut_short


@pytest.mark.parametrize("policy", ["stop", "dead_letter"])
def test_killed_at_random_moments_it_ends_in_the_fold(
        nats_server: NatsServer, tmp_path: Path, handler: str, children: Children,
        policy: str) -> None:
    _soak(nats_server, tmp_path, handler, children, policy, rounds=10)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "dead_letter"])
def test_killed_at_random_moments_it_ends_in_the_fold_long(
        nats_server: NatsServer, tmp_path: Path, handler: str, children: Children,
        policy: str) -> None:
    _soak(nats_server, tmp_path, handler, children, policy, rounds=40)


def _soak(server: NatsServer, tmp_path: Path, handler: str, children: Children, policy: str,
          rounds: int) -> None:
    seed = int(os.environ.get("EVENTPIPE_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    log, cpdir, dead = tmp_path / "log", tmp_path / "cp", tmp_path / "dead"
    create_stream([server.url], STREAM)
    append(log, 0, 300)
    publish_log([server.url], STREAM, log)
    bad_every = 53 if policy == "dead_letter" else 0
    extra = ["--checkpoint-every", str(rng.choice([3, 7, 50])), "--poll-interval", "0.2"]
    if policy == "dead_letter":
        extra += ["--on-error", "dead_letter", "--dead-letter", str(dead), "--max-retries", "0"]
    cut_short = _kill_rounds(server.url, log, handler, cpdir, children, rounds, rng, extra,
                             bad_every)
    # About half the kills land before the consumer is done (fewer when a round brings few
    # events). "A third of 10" failed once in a full-suite run (its binomial tail is ~5% at
    # p=0.5); a fifth still checks that the soak really kills mid-run (tail ~1% at p=0.5).
    assert cut_short >= max(1, rounds // 5), \
        f"seed {seed}: only {cut_short} kills came mid-run"
    print(f"stream consumer soak ({policy}, seed {seed}): {rounds} kills -9, {cut_short} "
          "before it was done")
    final = subprocess.run(consume_cmd(server.url, handler, cpdir, "--catch-up",
                                       "--print-state", *extra),
                           capture_output=True, text=True, env=env(), timeout=300, check=False)
    assert final.returncode == 0, f"seed {seed}: {final.stderr}"
    assert orjson.loads(final.stdout) == fold(log), f"seed {seed}"
    with EventLog(log, create=False) as opened:
        head, log_id = opened.head, opened.log_id
        bad = [r.offset for r in opened.read() if r.event.get("bad")]
    assert checkpoint(cpdir)["offset"] == head
    print(f"  {head} events folded exactly once")
    if policy == "dead_letter":
        assert bad, "the test must make failing events"
        entries = dead_letters(dead)
        assert sorted(e["offset"] for e in entries) == bad, f"seed {seed}"  # each once
        assert {(e["consumer"], e["log_id"]) for e in entries} == {("remote", log_id)}


# ---------------------------------------------------------------------------- bad input


def test_a_checkpoint_of_another_log_is_refused(nats_server: NatsServer, tmp_path: Path,
                                                handler: str) -> None:
    url = nats_server.url
    one, two = tmp_path / "one", tmp_path / "two"
    append(one, 0, 30)
    append(two, 0, 40)
    create_stream([url], STREAM)
    create_stream([url], "OTHER")
    publish_log([url], STREAM, one)
    publish_log([url], "OTHER", two)
    cpdir = tmp_path / "cp"
    assert run_consumer(url, handler, cpdir).returncode == 0
    before = (cpdir / "remote.json").read_bytes()
    proc = run_consumer(url, handler, cpdir, stream="OTHER")
    assert proc.returncode == 3, proc.stderr
    assert "CheckpointMismatchError: checkpoint belongs to another log" in proc.stderr
    assert (cpdir / "remote.json").read_bytes() == before  # nothing applied


def test_a_gap_in_the_stream_stops_before_it(nats_server: NatsServer, tmp_path: Path,
                                            handler: str) -> None:
    url = nats_server.url
    create_stream([url], STREAM)
    line = [orjson.dumps({"i": i}) for i in range(4)]
    publish_events([url], STREAM, "L1", [(0, line[0], 1), (1, line[1], 2), (3, line[3], 3)])
    cpdir = tmp_path / "cp"
    proc = run_consumer(url, handler, cpdir)
    assert proc.returncode == 3, proc.stderr
    assert "StreamGapError" in proc.stderr and "offset 3 at sequence 3" in proc.stderr
    cp = checkpoint(cpdir)
    assert cp["offset"] == 2 and cp["state"]["n"] == 2  # 0 and 1, nothing past the gap
    again = run_consumer(url, handler, cpdir)  # and so it stays
    assert again.returncode == 3 and "StreamGapError" in again.stderr
    assert checkpoint(cpdir)["offset"] == 2


def test_an_overlap_and_a_foreign_message_are_refused(nats_server: NatsServer, tmp_path: Path,
                                                      handler: str) -> None:
    url = nats_server.url
    create_stream([url], STREAM)
    create_stream([url], "FOREIGN")
    line = [orjson.dumps({"i": i}) for i in range(3)]
    publish_events([url], STREAM, "L1", [(0, line[0], 1), (1, line[1], 2), (1, line[1], 2)])
    proc = run_consumer(url, handler, tmp_path / "cp")
    assert proc.returncode == 3, proc.stderr
    assert "StreamMismatchError" in proc.stderr and "goes back" in proc.stderr
    assert checkpoint(tmp_path / "cp")["offset"] == 2

    publish_events([url], "FOREIGN", "L1", [(0, line[0], 1)])
    import asyncio

    import nats

    async def plain() -> None:
        nc = await nats.connect(url)
        await nc.jetstream().publish("eventpipe.foreign", b'{"i": 1}')
        await nc.close()

    asyncio.run(plain())
    proc = run_consumer(url, handler, tmp_path / "cp2", stream="FOREIGN")
    assert proc.returncode == 3, proc.stderr
    assert "ForeignMessageError" in proc.stderr
    assert checkpoint(tmp_path / "cp2")["offset"] == 1


def test_a_stream_of_two_logs_is_refused(nats_server: NatsServer, tmp_path: Path,
                                        handler: str) -> None:
    url = nats_server.url
    create_stream([url], STREAM)
    line = orjson.dumps({"i": 0})
    publish_events([url], STREAM, "L1", [(0, line, 1), (1, line, 1)])
    publish_events([url], STREAM, "L2", [(2, line, 1)])
    proc = run_consumer(url, handler, tmp_path / "cp")
    assert proc.returncode == 3, proc.stderr
    assert "StreamMismatchError" in proc.stderr and "log L2" in proc.stderr
    assert checkpoint(tmp_path / "cp")["offset"] == 2


def test_unreachable_server_missing_stream_and_bad_usage(nats_server: NatsServer,
                                                         tmp_path: Path, handler: str) -> None:
    down = f"nats://127.0.0.1:{free_port()}"
    proc = run_consumer(down, handler, tmp_path / "cp")
    assert proc.returncode == 3 and "ServerUnavailableError" in proc.stderr, proc.stderr
    proc = run_consumer(nats_server.url, handler, tmp_path / "cp", stream="NOPE")
    assert proc.returncode == 3 and "StreamNotFoundError" in proc.stderr, proc.stderr
    assert not (tmp_path / "cp" / "remote.json").exists()
    proc = subprocess.run([sys.executable, "-m", "eventpipe", "consume-stream", "--nats",
                           nats_server.url, "--stream", STREAM, "--name", "x", "--handler",
                           f"{handler}:handle"], capture_output=True, text=True, env=env(),
                          timeout=60, check=False)
    assert proc.returncode == 2 and "--checkpoint-dir" in proc.stderr
    proc = run_consumer(nats_server.url, handler, tmp_path / "cp", "--on-error", "dead_letter")
    assert proc.returncode == 2 and "dead_letter" in proc.stderr, proc.stderr


def test_a_failing_handler_stops_at_the_event(nats_server: NatsServer, tmp_path: Path,
                                             handler: str) -> None:
    log = tmp_path / "log"
    append(log, 0, 30, bad_every=20)  # offset 7 and 27 fail
    create_stream([nats_server.url], STREAM)
    publish_log([nats_server.url], STREAM, log)
    proc = run_consumer(nats_server.url, handler, tmp_path / "cp")
    assert proc.returncode == 3, proc.stderr
    assert "HandlerError" in proc.stderr and "bad event at 7" in proc.stderr
    cp = checkpoint(tmp_path / "cp")
    assert cp["offset"] == 7 and cp["state"]["n"] == 7


def test_a_second_process_of_the_name_is_refused(nats_server: NatsServer, tmp_path: Path,
                                                 handler: str, children: Children) -> None:
    log = tmp_path / "log"
    append(log, 0, 10)
    create_stream([nats_server.url], STREAM)
    publish_log([nats_server.url], STREAM, log)
    cpdir = tmp_path / "cp"
    first = children.popen(consume_cmd(nats_server.url, handler, cpdir),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    wait_until((cpdir / "remote.json").exists, "the first consumer's checkpoint")
    second = run_consumer(nats_server.url, handler, cpdir)
    assert second.returncode == 3, second.stderr
    assert "ConsumerBusyError" in second.stderr
    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 0


# ------------------------------------------------------------- the whole way, and failures


def test_bridge_to_remote_consumer_and_mirror_while_a_writer_appends(
        nats_server: NatsServer, tmp_path: Path, handler: str, children: Children) -> None:
    """The real thing: `eventpipe bridge` publishing a log a writer appends to, a remote
    consumer and a mirror following the stream; both end where the log does."""
    url = nats_server.url
    log, mirror, cpdir = tmp_path / "log", tmp_path / "mirror", tmp_path / "cp"
    append(log, 0, 100)
    bridge = children.popen([sys.executable, "-m", "eventpipe", "bridge", str(log), "--nats",
                             url, "--stream", STREAM, "--create-stream"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    # The stream exists once the bridge checkpoints (a reader of a missing stream exits 3).
    wait_until((log / "consumers" / f"bridge-{STREAM}.json").exists, "the bridge's stream")
    consumer = children.popen(consume_cmd(url, handler, cpdir, "--poll-interval", "0.2"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env())
    mirrorer = children.popen([sys.executable, "-m", "eventpipe", "mirror", "--nats", url,
                               "--stream", STREAM, str(mirror), "--poll-interval", "0.2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env())
    for k in range(20):
        append(log, 100 + 25 * k, 25)
        time.sleep(0.02)
    total = 600

    def mirrored() -> bool:
        if not (mirror / "eventpipe.json").exists():
            return False
        with EventLog(mirror, create=False) as opened:
            return opened.head == total

    wait_until(mirrored, "the mirror caught up", timeout=60)
    wait_until(lambda: (cpdir / "remote.json").exists()
               and checkpoint(cpdir)["offset"] == total, "the consumer caught up", timeout=60)
    for proc in (bridge, consumer, mirrorer):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert checkpoint(cpdir)["state"] == fold(log)
    with EventLog(log, create=False) as a, EventLog(mirror, create=False) as b:
        assert [(r.offset, r.event, r.time) for r in a.read()] == [
            (r.offset, r.event, r.time) for r in b.read()]


def print_stderr(proc: subprocess.Popen[bytes], what: str) -> None:
    """Stop ``proc`` (SIGTERM) and print the end of its stderr, for a failing test's report."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    assert proc.stderr is not None
    print(f"{what} exited {proc.returncode}; stderr:",
          proc.stderr.read().decode(errors="replace")[-4000:])


def test_a_server_restart_is_waited_for(nats_server: NatsServer, tmp_path: Path,
                                        handler: str, children: Children) -> None:
    """The server killed -9 and started again: the consumer and the mirror read on from
    where they are, nothing twice or lost.

    Both must have connected before the first kill: a process whose first connection finds
    no server exits 3 (ServerUnavailableError, as README says), and waiting for the consumer
    alone let the kill land before the mirror had connected on a busy machine (issue 12: the
    mirror "did not read on"; it had exited 3)."""
    url = nats_server.url
    log, mirror, cpdir = tmp_path / "log", tmp_path / "mirror", tmp_path / "cp"
    append(log, 0, 200)
    create_stream([url], STREAM)
    publish_log([url], STREAM, log)
    consumer = children.popen(consume_cmd(url, handler, cpdir, "--poll-interval", "0.2",
                                          "--checkpoint-every", "10"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env())
    mirrorer = children.popen([sys.executable, "-m", "eventpipe", "mirror", "--nats", url,
                               "--stream", STREAM, str(mirror), "--poll-interval", "0.2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env())
    wait_until(lambda: (cpdir / "remote.json").exists()
               and checkpoint(cpdir)["offset"] == 200, "the consumer caught up")

    def mirrored(count: int) -> bool:
        assert mirrorer.poll() is None, f"the mirror exited {mirrorer.returncode}"
        if not (mirror / "eventpipe.json").exists():
            return False
        with EventLog(mirror, create=False) as opened:
            return opened.head == count

    try:
        wait_until(lambda: mirrored(200), "the mirror caught up")
    except BaseException:
        print_stderr(mirrorer, "mirror")
        raise
    for _ in range(2):
        nats_server.kill()
        time.sleep(0.5)
        nats_server.start()
        with EventLog(log, create=False) as opened:
            head = opened.head
        append(log, head, 100)
        publish_log([url], STREAM, log, start=head)
    wait_until(lambda: checkpoint(cpdir)["offset"] == 400, "the consumer read on", timeout=60)

    try:
        wait_until(lambda: mirrored(400), "the mirror read on", timeout=60)
    except BaseException:
        print_stderr(mirrorer, "mirror")
        raise
    for proc in (consumer, mirrorer):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert checkpoint(cpdir)["state"] == fold(log)
    with EventLog(log, create=False) as a, EventLog(mirror, create=False) as b:
        assert [(r.offset, r.event, r.time) for r in a.read()] == [
            (r.offset, r.event, r.time) for r in b.read()]


def test_without_nats_py_both_commands_say_what_to_install(tmp_path: Path,
                                                           handler: str) -> None:
    blocker = tmp_path / "blocker" / "nats"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no nats here')\n")
    hidden = dict(env(), PYTHONPATH=os.pathsep.join([str(blocker.parent), str(ROOT)]))
    for argv in (["consume-stream", "--nats", "nats://127.0.0.1:1", "--stream", STREAM,
                  "--name", "x", "--handler", f"{handler}:handle", "--checkpoint-dir",
                  str(tmp_path / "cp")],
                 ["mirror", "--nats", "nats://127.0.0.1:1", "--stream", STREAM,
                  str(tmp_path / "mirror")]):
        proc = subprocess.run([sys.executable, "-m", "eventpipe", *argv], capture_output=True,
                              text=True, env=hidden, timeout=60, check=False)
        assert proc.returncode == 2, proc.stderr
        assert "pip install eventpipe[nats]" in proc.stderr
    assert not (tmp_path / "mirror").exists()


def test_retry_rebuilds_the_state_a_failed_call_changed(nats_server: NatsServer,
                                                        tmp_path: Path) -> None:
    """on_error='retry': a handler that changes its state in place and then raises is
    retried on the state before the event (rebuilt from the checkpoint and the events kept
    since), so the end state is that of calls that all succeeded."""
    from eventpipe.jetstream import StreamConsumer

    log = tmp_path / "log"
    append(log, 0, 60)
    create_stream([nats_server.url], STREAM)
    publish_log([nats_server.url], STREAM, log)
    failures = {13: 2, 41: 1}

    def handle(state: Any, event: Any, offset: int) -> Any:
        state["seen"].append(offset)  # in place, before failing
        if failures.get(offset):
            failures[offset] -= 1
            raise RuntimeError(f"flaky at {offset}")
        return state

    with StreamConsumer(nats_server.url, STREAM, "r", handle, {"seen": []},
                        checkpoint_dir=tmp_path / "cp", on_error="retry", max_retries=3,
                        retry_backoff=0.01, checkpoint_every=25) as consumer:
        state = consumer.catch_up()
    assert state == {"seen": list(range(60))}
    assert checkpoint(tmp_path / "cp", "r")["state"] == state


def test_a_three_node_cluster_losing_the_stream_leader(nats_cluster: NatsCluster,
                                                       tmp_path: Path, handler: str,
                                                       children: Children) -> None:
    """An R3 stream whose leader is killed -9 (twice) while the consumer and the mirror read
    it: they read on from the new leader, nothing twice or lost."""
    urls = nats_cluster.urls
    log, mirror, cpdir = tmp_path / "log", tmp_path / "mirror", tmp_path / "cp"
    append(log, 0, 300)
    create_stream(urls, STREAM, replicas=3)
    publish_log(urls, STREAM, log)
    said = (tmp_path / "consumer.err").open("wb"), (tmp_path / "mirror.err").open("wb")
    consumer = children.popen(consume_cmd(",".join(urls), handler, cpdir, "--poll-interval",
                                          "0.2", "--checkpoint-every", "10"),
                              stdout=subprocess.DEVNULL, stderr=said[0], env=env())
    mirrorer = children.popen([sys.executable, "-m", "eventpipe", "mirror", "--nats",
                               ",".join(urls), "--stream", STREAM, str(mirror),
                               "--poll-interval", "0.2"],
                              stdout=subprocess.DEVNULL, stderr=said[1], env=env())
    for out in said:
        out.close()  # the children have their own descriptors

    def stderr() -> str:
        return "\n".join((tmp_path / f"{who}.err").read_text() for who in ("consumer", "mirror"))

    total = 300
    for _ in range(2):
        time.sleep(0.3)
        leader = nats_cluster.stream_leader(STREAM)
        leader.kill()
        nats_cluster.stream_leader(STREAM)  # a new one elected among the other two
        append(log, total, 200)
        publish_log(urls, STREAM, log, start=total)
        total += 200
        leader.start()
    nats_cluster.wait_ready()

    def mirrored() -> bool:
        if not (mirror / "eventpipe.json").exists():
            return False
        with EventLog(mirror, create=False) as opened:
            return opened.head == total

    try:
        wait_until(lambda: (cpdir / "remote.json").exists()
                   and checkpoint(cpdir)["offset"] == total, "the consumer read on", timeout=60)
        wait_until(mirrored, "the mirror read on", timeout=60)
    except BaseException:
        print(stderr())
        raise
    for proc in (consumer, mirrorer):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert checkpoint(cpdir)["state"] == fold(log)
    with EventLog(log, create=False) as a, EventLog(mirror, create=False) as b:
        assert [(r.offset, r.event, r.time) for r in a.read()] == [
            (r.offset, r.event, r.time) for r in b.read()]


def test_a_standby_takes_over_when_the_holder_dies(nats_server: NatsServer, tmp_path: Path,
                                                   handler: str, children: Children) -> None:
    log, cpdir = tmp_path / "log", tmp_path / "cp"
    append(log, 0, 100)
    create_stream([nats_server.url], STREAM)
    publish_log([nats_server.url], STREAM, log)
    first = children.popen(consume_cmd(nats_server.url, handler, cpdir, "--standby",
                                       "--poll-interval", "0.2"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    wait_until(lambda: (cpdir / "remote.json").exists()
               and checkpoint(cpdir)["offset"] == 100, "the first caught up")
    second = children.popen(consume_cmd(nats_server.url, handler, cpdir, "--standby",
                                        "--poll-interval", "0.2"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env())
    time.sleep(0.5)
    assert second.poll() is None  # standing by
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    append(log, 100, 50)
    publish_log([nats_server.url], STREAM, log, start=100)
    wait_until(lambda: checkpoint(cpdir)["offset"] == 150, "the standby took over")
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0
    assert checkpoint(cpdir)["state"] == fold(log)


@pytest.mark.parametrize("command", ["consume-stream", "mirror"])
def test_sd_notify_ready_status_watchdog_stopping(nats_server: NatsServer, tmp_path: Path,
                                                  handler: str, children: Children,
                                                  command: str) -> None:
    from ._sdnotify import fake_systemd

    log = tmp_path / "log"
    append(log, 0, 50)
    create_stream([nats_server.url], STREAM)
    publish_log([nats_server.url], STREAM, log)
    if command == "mirror":
        argv = [sys.executable, "-m", "eventpipe", "mirror", "--nats", nats_server.url,
                "--stream", STREAM, str(tmp_path / "mirror")]
    else:
        argv = consume_cmd(nats_server.url, handler, tmp_path / "cp")
    with fake_systemd(tmp_path, watchdog_usec=400_000) as (sock, sd_env):
        proc = children.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=sd_env)
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            seen += sock.recv(4096).decode().splitlines()
            if "READY=1" in seen and seen.count("WATCHDOG=1") >= 4:
                break
        assert "READY=1" in seen, seen
        assert seen.count("WATCHDOG=1") >= 4, seen  # idle, it keeps the watchdog fed
        assert any(m.startswith("STATUS=") and "50" in m for m in seen), seen
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in seen:
            seen += sock.recv(4096).decode().splitlines()
        assert proc.wait(30) == 0


def test_a_stream_rewritten_under_the_checkpoint_is_refused(nats_server: NatsServer,
                                                            tmp_path: Path,
                                                            handler: str) -> None:
    """The stream recreated with the same log's offsets but another event where the
    checkpoint was taken: the checkpoint's fingerprint says so, nothing is applied."""
    from ._nats import delete_stream

    url = nats_server.url
    line = [orjson.dumps({"i": i}) for i in range(10)]
    create_stream([url], STREAM)
    publish_events([url], STREAM, "L1", [(i, line[i], 1) for i in range(5)])
    cpdir = tmp_path / "cp"
    assert run_consumer(url, handler, cpdir).returncode == 0
    before = (cpdir / "remote.json").read_bytes()
    delete_stream([url], STREAM)
    create_stream([url], STREAM)
    other = orjson.dumps({"i": 40})
    publish_events([url], STREAM, "L1", [(i, other if i == 4 else line[i], 1)
                                         for i in range(8)])
    proc = run_consumer(url, handler, cpdir)
    assert proc.returncode == 3, proc.stderr
    assert "CheckpointMismatchError" in proc.stderr and "offset 4" in proc.stderr
    assert (cpdir / "remote.json").read_bytes() == before
