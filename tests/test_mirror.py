"""The mirror (issue 12): log -> stream -> mirror log gives the same events, offsets and append
times, across a mirror killed -9 and restarted mid-way, segment rolls and gzip; a folder that
is not a mirror of the stream's log, a stream with a gap or one behind the mirror are typed
errors and exit codes with nothing appended. Real nats-servers on loopback."""

# The fixtures are imported from tests/_nats.py and named as parameters: not redefinitions.
# ruff: noqa: F811

from __future__ import annotations

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

from eventpipe import Consumer, EventLog

from ._nats import (  # noqa: F401  (fixtures)
    NatsServer,
    create_stream,
    nats_server,
    publish_events,
    publish_log,
)
from ._wait import wait_until
from .conftest import ROOT, Children

STREAM = "ORDERS"


def env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **extra)


# The mirror log's own segments roll often and are gzipped (the source's roll elsewhere).
MIRROR_ENV = {"EVENTPIPE_SEGMENT_MAX_BYTES": "6000", "EVENTPIPE_COMPRESSION": "gzip"}


def mirror_cmd(url: str, path: Path, *extra: str, stream: str = STREAM) -> list[str]:
    return [sys.executable, "-m", "eventpipe", "mirror", "--nats", url, "--stream", stream,
            str(path), *extra]


def run_mirror(url: str, path: Path, *extra: str,
               stream: str = STREAM) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mirror_cmd(url, path, "--catch-up", *extra, stream=stream),
                          capture_output=True, text=True, env=env(**MIRROR_ENV), timeout=300,
                          check=False)


def records(path: Path) -> list[tuple[int, Any, int | None]]:
    with EventLog(path, create=False) as log:
        return [(r.offset, r.event, r.time) for r in log.read()]


def head(path: Path) -> int:
    with EventLog(path, create=False) as log:
        return log.head


def append(path: Path, start: int, count: int, batches: int = 1) -> None:
    """``count`` events in ``batches`` batches (each its own append time), in a log whose
    segments roll every few KiB and are gzipped once sealed."""
    rng = random.Random(start)
    with EventLog(path, segment_max_bytes=4096, compression="gzip") as log:
        per = max(1, count // batches)
        i = start
        while i < start + count:
            k = min(per, start + count - i)
            log.append_many([{"i": n, "pad": "x" * rng.randint(0, 80)}
                             for n in range(i, i + k)])
            i += k
            time.sleep(0.0015)  # times are kept per batch at most once a millisecond


def gz_segments(path: Path) -> int:
    return len(list((path / "segments").glob("*.jsonl.gz")))


def test_round_trip_same_events_offsets_and_times(nats_server: NatsServer,
                                                  tmp_path: Path) -> None:
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    append(src, 0, 600, batches=40)
    create_stream([nats_server.url], STREAM)
    publish_log([nats_server.url], STREAM, src)
    proc = run_mirror(nats_server.url, mirror)
    assert proc.returncode == 0, proc.stderr
    assert "head 600 (600 appended)" in proc.stderr
    want = records(src)
    assert records(mirror) == want
    assert len({t for _, _, t in want}) >= 40  # the batches' times, kept to the nanosecond
    # More later: it continues after its own head.
    append(src, 600, 150, batches=5)
    publish_log([nats_server.url], STREAM, src, start=600)
    proc = run_mirror(nats_server.url, mirror)
    assert proc.returncode == 0, proc.stderr
    assert "(150 appended)" in proc.stderr
    assert records(mirror) == records(src)
    # Status shows what it follows; verify finds the mirror sound.
    status = subprocess.run([sys.executable, "-m", "eventpipe", "status", str(mirror),
                             "--format", "json"], capture_output=True, text=True, env=env(),
                            timeout=60, check=False)
    assert status.returncode == 0, status.stderr
    assert '"mirror"' in status.stdout
    cp = orjson.loads((mirror / "consumers" / "mirror.json").read_bytes())
    with EventLog(src, create=False) as opened:
        assert cp["state"] == {"source_log_id": opened.log_id, "stream": STREAM}
    assert cp["offset"] == 750
    verify = subprocess.run([sys.executable, "-m", "eventpipe", "verify", str(mirror)],
                            capture_output=True, text=True, env=env(), timeout=60, check=False)
    assert verify.returncode == 0, verify.stderr + verify.stdout


def test_a_local_consumer_of_the_mirror_ends_as_one_of_the_source(nats_server: NatsServer,
                                                                  tmp_path: Path) -> None:
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    append(src, 0, 300, batches=7)
    create_stream([nats_server.url], STREAM)
    publish_log([nats_server.url], STREAM, src)
    assert run_mirror(nats_server.url, mirror).returncode == 0

    def handle(state: Any, event: Any, offset: int, t: int | None) -> Any:
        return [*state, [offset, event["i"], t]]

    states = []
    for path in (src, mirror):
        with Consumer(path, "c", handle, [], pass_time=True) as consumer:
            states.append(consumer.catch_up())
    assert states[0] == states[1] and len(states[0]) == 300


def test_killed_mid_way_and_restarted_it_continues_exactly(
        nats_server: NatsServer, tmp_path: Path, children: Children) -> None:
    _soak(nats_server, tmp_path, children, rounds=8)


@pytest.mark.slow
def test_killed_mid_way_and_restarted_it_continues_exactly_long(
        nats_server: NatsServer, tmp_path: Path, children: Children) -> None:
    _soak(nats_server, tmp_path, children, rounds=30)


def _soak(nats_server: NatsServer, tmp_path: Path, children: Children, rounds: int) -> None:
    seed = int(os.environ.get("EVENTPIPE_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    create_stream([nats_server.url], STREAM)
    total = 0
    cut_short = 0

    def copied() -> int:
        return head(mirror) if (mirror / "eventpipe.json").exists() else 0

    for _ in range(rounds):
        more = rng.randint(500, 3000)
        append(src, total, more, batches=rng.randint(1, 60))
        publish_log([nats_server.url], STREAM, src, start=total)
        total += more
        before = copied()
        proc = children.popen(mirror_cmd(nats_server.url, mirror, "--batch",
                                         str(rng.choice([16, 128, 1024]))),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=env(**MIRROR_ENV))
        if rng.random() < 0.65:  # once it is under way (its head moved), soon after
            wait_until(lambda: copied() > before or proc.poll() is not None,  # noqa: B023
                       "the mirror under way")
            time.sleep(rng.uniform(0, 0.1))
        else:  # any moment, its startup included
            time.sleep(rng.uniform(0.05, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        cut_short += not (mirror / "eventpipe.json").exists() or head(mirror) < total
    last = run_mirror(nats_server.url, mirror)
    assert last.returncode == 0, f"seed {seed}: {last.stderr}"
    assert records(mirror) == records(src), f"seed {seed}"
    assert cut_short >= rounds // 4, f"seed {seed}: only {cut_short} kills came mid-way"
    assert gz_segments(mirror) > 0 and gz_segments(src) > 0
    print(f"mirror soak (seed {seed}): {rounds} kills -9, {cut_short} mid-way; {total} "
          f"events, {gz_segments(mirror)} gzip segments in the mirror: identical")


def test_it_follows_the_stream_and_stops_on_sigterm(nats_server: NatsServer, tmp_path: Path,
                                                    children: Children) -> None:
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    append(src, 0, 100)
    create_stream([nats_server.url], STREAM)
    publish_log([nats_server.url], STREAM, src)
    proc = children.popen(mirror_cmd(nats_server.url, mirror, "--poll-interval", "0.2"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env=env(**MIRROR_ENV))
    wait_until(lambda: (mirror / "eventpipe.json").exists() and head(mirror) == 100,
               "the mirror caught up")
    for k in range(3):
        append(src, 100 + 50 * k, 50, batches=3)
        publish_log([nats_server.url], STREAM, src, start=100 + 50 * k)
    wait_until(lambda: head(mirror) == 250, "the mirror followed")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert proc.stderr is not None
    assert "head 250" in proc.stderr.read().decode()
    assert records(mirror) == records(src)


# ---------------------------------------------------------------------------- bad input


def test_a_missing_stream_is_refused_and_nothing_is_created(nats_server: NatsServer,
                                                             tmp_path: Path,
                                                             children: Children) -> None:
    """No stream (or no server): exit 3 with the typed error, and no empty log left behind,
    whether catching up or following."""
    mirror = tmp_path / "mirror"
    proc = run_mirror(nats_server.url, mirror, stream="NOPE")
    assert proc.returncode == 3, proc.stderr
    assert "StreamNotFoundError: stream NOPE does not exist" in proc.stderr
    following = children.popen(mirror_cmd(nats_server.url, mirror, stream="NOPE"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=env(**MIRROR_ENV))
    assert following.wait(60) == 3
    assert following.stderr is not None
    assert b"StreamNotFoundError" in following.stderr.read()
    nats_server.kill()
    proc = run_mirror(nats_server.url, mirror)
    assert proc.returncode == 3, proc.stderr
    assert "ServerUnavailableError" in proc.stderr
    assert not mirror.exists()


def test_a_folder_holding_another_log_is_refused(nats_server: NatsServer,
                                                 tmp_path: Path) -> None:
    src, other = tmp_path / "src", tmp_path / "other"
    append(src, 0, 20)
    append(other, 0, 5)
    create_stream([nats_server.url], STREAM)
    publish_log([nats_server.url], STREAM, src)
    before = records(other)
    proc = run_mirror(nats_server.url, other)
    assert proc.returncode == 3, proc.stderr
    assert "MirrorMismatchError" in proc.stderr and "is not a mirror" in proc.stderr
    assert records(other) == before


def test_a_mirror_of_another_log_is_refused(nats_server: NatsServer, tmp_path: Path) -> None:
    one, two, mirror = tmp_path / "one", tmp_path / "two", tmp_path / "mirror"
    append(one, 0, 30)
    append(two, 0, 60)
    create_stream([nats_server.url], STREAM)
    create_stream([nats_server.url], "OTHER")
    publish_log([nats_server.url], STREAM, one)
    publish_log([nats_server.url], "OTHER", two)
    assert run_mirror(nats_server.url, mirror).returncode == 0
    proc = run_mirror(nats_server.url, mirror, stream="OTHER")
    assert proc.returncode == 3, proc.stderr
    assert "MirrorMismatchError" in proc.stderr and "another log's stream" in proc.stderr
    assert records(mirror) == records(one)


def test_a_mirror_ahead_of_the_stream_is_refused(nats_server: NatsServer,
                                                 tmp_path: Path) -> None:
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    append(src, 0, 40)
    create_stream([nats_server.url], STREAM)
    create_stream([nats_server.url], "SHORT", subject="eventpipe.short")
    publish_log([nats_server.url], STREAM, src)
    publish_log([nats_server.url], "SHORT", src, stop=25)
    assert run_mirror(nats_server.url, mirror).returncode == 0
    proc = run_mirror(nats_server.url, mirror, stream="SHORT")
    assert proc.returncode == 3, proc.stderr
    assert "MirrorMismatchError" in proc.stderr and "ahead of the stream" in proc.stderr
    assert head(mirror) == 40


def test_a_gap_in_the_stream_appends_nothing_past_it(nats_server: NatsServer,
                                                    tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    create_stream([nats_server.url], STREAM)
    line = [orjson.dumps({"i": i}) for i in range(4)]
    publish_events([nats_server.url], STREAM, "L1",
                   [(0, line[0], 10), (1, line[1], 20), (3, line[3], 30)])
    proc = run_mirror(nats_server.url, mirror)
    assert proc.returncode == 3, proc.stderr
    assert "StreamGapError" in proc.stderr
    assert records(mirror) == [(0, {"i": 0}, 10), (1, {"i": 1}, 20)]
    proc = run_mirror(nats_server.url, mirror)  # and so it stays
    assert proc.returncode == 3 and "StreamGapError" in proc.stderr
    assert head(mirror) == 2


def test_a_stream_that_no_longer_starts_at_zero_cannot_start_a_mirror(
        nats_server: NatsServer, tmp_path: Path) -> None:
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    append(src, 0, 30)
    create_stream([nats_server.url], STREAM)
    publish_log([nats_server.url], STREAM, src, start=10)
    proc = run_mirror(nats_server.url, mirror)
    assert proc.returncode == 3, proc.stderr
    assert "StreamGapError" in proc.stderr and "starts at offset 10" in proc.stderr
    assert head(mirror) == 0


def test_one_mirror_process_per_log(nats_server: NatsServer, tmp_path: Path,
                                    children: Children) -> None:
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    append(src, 0, 10)
    create_stream([nats_server.url], STREAM)
    publish_log([nats_server.url], STREAM, src)
    first = children.popen(mirror_cmd(nats_server.url, mirror), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=env())
    wait_until(lambda: (mirror / "eventpipe.json").exists() and head(mirror) == 10,
               "the first mirror")
    proc = run_mirror(nats_server.url, mirror)
    assert proc.returncode == 3 and "ConsumerBusyError" in proc.stderr, proc.stderr
    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 0


def test_a_stream_rewritten_under_the_mirror_is_refused(nats_server: NatsServer,
                                                        tmp_path: Path) -> None:
    from ._nats import delete_stream

    url, mirror = nats_server.url, tmp_path / "mirror"
    line = [orjson.dumps({"i": i}) for i in range(10)]
    create_stream([url], STREAM)
    publish_events([url], STREAM, "L1", [(i, line[i], 1) for i in range(5)])
    assert run_mirror(url, mirror).returncode == 0
    delete_stream([url], STREAM)
    create_stream([url], STREAM)
    publish_events([url], STREAM, "L1", [(i, orjson.dumps({"i": -i}) if i == 4 else line[i], 1)
                                         for i in range(8)])
    proc = run_mirror(url, mirror)
    assert proc.returncode == 3, proc.stderr
    assert "MirrorMismatchError" in proc.stderr and "offset 4 differs" in proc.stderr
    assert head(mirror) == 5
