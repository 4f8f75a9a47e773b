"""Many writer processes at once, and writers killed with SIGKILL at random moments."""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from subprocess import PIPE, Popen

import orjson
import pytest

from eventpipe import EventLog

from .conftest import Children


def _check_log(path: Path) -> dict[str, list[int]]:
    """Offsets dense, every (writer, seq) once, batches whole; returns seqs per writer."""
    seqs: dict[str, list[int]] = defaultdict(list)
    seen: set[tuple[str, int]] = set()
    batch_counts: dict[tuple[str, int], int] = defaultdict(int)
    batch_sizes: dict[tuple[str, int], int] = {}
    with EventLog(path) as log:
        expected = 0
        for rec in log.read():
            assert rec.offset == expected
            expected += 1
            e = rec.event
            key = (e["w"], e["seq"])
            assert key not in seen, f"event {key} stored twice"
            seen.add(key)
            seqs[e["w"]].append(e["seq"])
            batch_counts[(e["w"], e["batch"])] += 1
            batch_sizes[(e["w"], e["batch"])] = e["size"]
        assert log.head == expected
    for batch, count in batch_counts.items():
        assert count == batch_sizes[batch], f"batch {batch} stored partly: {count}"
    for w, s in seqs.items():
        assert s == sorted(s), f"writer {w}'s events out of its own order"
    return seqs


def _acks(raw: bytes) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in (line.split() for line in raw.decode().splitlines())]


def test_four_writers_mixing_append_paths_with_rolls(log_path: Path, children: Children) -> None:
    EventLog(log_path, segment_max_bytes=2048).close()
    n = 3000
    procs = [children.worker("writer", str(log_path), f"w{k}", str(n), str(k), "2048")
             for k in range(4)]
    outputs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    seqs = _check_log(log_path)
    assert {w: len(s) for w, s in seqs.items()} == {f"w{k}": n for k in range(4)}
    for out in outputs:
        assert {seq for _, seq in _acks(out)} == set(range(n))
    with EventLog(log_path) as log:
        by_offset = {r.offset: (r.event["w"], r.event["seq"]) for r in log.read()}
        for k, out in enumerate(outputs):
            for offset, seq in _acks(out):
                assert by_offset[offset] == (f"w{k}", seq)
        segments = sorted(p.name for p in (log_path / "segments").iterdir())
    assert len(segments) > 20, "small segments must have rolled many times mid-run"


@pytest.mark.slow  # 8-13 s on a busy 2-cpu VM: 25 rounds of two writers killed mid-append
def test_writers_killed_at_random_moments(log_path: Path, children: Children) -> None:
    rng = random.Random(1234)
    EventLog(log_path, segment_max_bytes=4096).close()
    acked: dict[int, tuple[str, int]] = {}
    rounds = 25
    for r in range(rounds):
        procs = [children.worker("writer", str(log_path), f"r{r}w{k}", "100000", str(r * 10 + k),
                                 "4096") for k in range(2)]
        # Kill once each writer has acknowledged a random number of events.
        outs: list[list[bytes]] = [[] for _ in procs]

        def pump(i: int, target: int, procs: list[Popen[bytes]] = procs,
                 outs: list[list[bytes]] = outs) -> None:
            proc = procs[i]
            assert proc.stdout is not None
            got = 0
            while got < target:
                line = proc.stdout.readline()
                if not line:
                    return
                outs[i].append(line)
                got += 1
            proc.send_signal(signal.SIGKILL)
            outs[i].append(proc.stdout.read())

        threads = [threading.Thread(target=pump, args=(i, rng.randint(1, 400)))
                   for i in range(len(procs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, proc in enumerate(procs):
            assert proc.wait() == -signal.SIGKILL
            for offset, seq in _acks(b"".join(outs[i])):
                acked[offset] = (f"r{r}w{i}", seq)
        # After every round the log reads whole, and every acknowledged append is there.
        _check_log(log_path)
    with EventLog(log_path) as log:
        stored = {rec.offset: (rec.event["w"], rec.event["seq"]) for rec in log.read()}
        head = log.head
        # The next writer continues at the head: offsets are never reused.
        assert log.append({"w": "last", "seq": 0, "batch": 0, "size": 1}) == head
    missing = {o: v for o, v in acked.items() if stored.get(o) != v}
    assert not missing, f"acknowledged appends lost or moved: {list(missing.items())[:5]}"
    assert len(acked) >= rounds * 2  # each writer acknowledged at least one event a round
    # Whether a kill landed mid-write is chance: a torn tail is staged for certain in
    # test_writer_killed_between_its_write_and_its_commit below.


TORN_WRITER = r"""
import sys
from eventpipe import EventLog

path = sys.argv[1]
with EventLog(path, sync="none", compression=None, segment_max_bytes=1 << 40) as log:
    print("ready", flush=True)
    for b in range(300):  # batches of 1 MiB, in one pwrite each; killed long before the end
        log.append_many([{"b": f"{b:06d}", "k": k, "pad": "x" * 262000} for k in range(4)])
"""


def test_writer_killed_between_its_write_and_its_commit(
    log_path: Path, children: Children
) -> None:
    # A writer is stopped (SIGSTOP, then confirmed stopped) at a moment its batch's bytes are
    # in the segment but the header does not commit them yet, and killed there: the torn tail
    # is certain, not left to the chance of a kill landing mid-write.
    EventLog(log_path, sync="none", compression=None).close()
    line = len(orjson.dumps({"b": "000000", "k": 0, "pad": "x" * 262000})) + 1
    seg = log_path / "segments" / f"{0:020d}.jsonl"
    writer = children.popen([sys.executable, "-c", TORN_WRITER, str(log_path)])
    assert writer.stdout is not None and writer.stdout.readline() == b"ready\n"
    deadline = time.monotonic() + 60
    with EventLog(log_path) as reader:
        while True:
            assert writer.poll() is None, "the writer finished before it was caught mid-batch"
            assert time.monotonic() < deadline, "never caught the writer mid-batch"
            committed = reader.head
            if committed < 8 or seg.stat().st_size <= committed * line:
                continue  # let two batches commit first; then wait for bytes past the head
            os.kill(writer.pid, signal.SIGSTOP)
            _, status = os.waitpid(writer.pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status)
            head = reader.head  # frozen: these two reads agree with what the kill leaves
            size = seg.stat().st_size
            if size > head * line:
                break
            os.kill(writer.pid, signal.SIGCONT)  # it had committed meanwhile: try again
    writer.kill()
    assert writer.wait() == -signal.SIGKILL
    data = seg.read_bytes()
    tail = data[head * line:]
    assert tail and head >= 8 and head % 4 == 0
    # (Its options as the writer's: the default segment_max_bytes would roll here.)
    with EventLog(log_path, sync="none", compression=None, segment_max_bytes=1 << 40) as log:
        # Readers see the committed batches, whole, and nothing of the torn one.
        recs = list(log.read())
        assert [r.offset for r in recs] == list(range(head))
        assert [(r.event["b"], r.event["k"]) for r in recs] == [
            (f"{b:06d}", k) for b in range(head // 4) for k in range(4)]
        # The next writer cuts the torn bytes off, keeps them in quarantine/, and continues at
        # the head: no offset is reused.
        assert log.append({"after": True}) == head
        assert [r.event for r in log.read(head)] == [{"after": True}]
    assert seg.read_bytes() == data[: head * line] + b'{"after":true}\n'
    [kept] = list((log_path / "quarantine").iterdir())
    assert kept.read_bytes() == tail


def test_reader_process_during_concurrent_writers(log_path: Path, children: Children) -> None:
    EventLog(log_path, segment_max_bytes=1024).close()
    reader = children.worker("reader", str(log_path), stdin=PIPE)
    writers = [children.worker("writer", str(log_path), f"w{k}", "1500", str(k), "1024")
               for k in range(2)]
    assert reader.stdin is not None and reader.stdout is not None
    counts = []
    while any(w.poll() is None for w in writers):
        counts.append(int(reader.stdout.readline()))
        reader.stdin.write(b"\n")
        reader.stdin.flush()
    for w in writers:
        w.communicate()
        assert w.returncode == 0
    reader.stdin.close()
    assert reader.wait() == 0, "reader saw a gap, a partial event or a bad record"
    assert counts == sorted(counts)
    _check_log(log_path)
