"""A log replaced under a running consumer or follower: followed when it is a copy of the
same log, a clear error otherwise, never a silent stall or another log's events folded in
(issue 8, item 10)."""

from __future__ import annotations

import ctypes
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eventpipe import CheckpointMismatchError, Consumer, EventLog, LogReplacedError

from ._wait import wait_until
from ._workers import INITIAL, fold

DEADLINE = 20.0


class Running:
    """A consumer's run() in a thread; ``error`` is what it raised."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.consumer.run()
        except BaseException as exc:  # handed to the test
            self.error = exc

    def stop(self) -> None:
        self.consumer.stop()
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive()


@pytest.fixture
def running(log_path: Path, tmp_path: Path) -> Iterator[Running]:
    """Consumer "c" (checkpoints outside the log, so they outlive it) caught up on 10 events,
    polling every 50 ms."""
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(10)])
    consumer = Consumer(log_path, "c", fold, INITIAL, poll_interval=0.05,
                        checkpoint_dir=str(tmp_path / "cps"))
    run = Running(consumer)
    try:
        wait_until(lambda: consumer.offset == 10, "caught up")
        yield run
    finally:
        if run.thread.is_alive():
            run.stop()
        consumer.close()


def replace_file(path: Path, content: bytes) -> None:
    """What rsync and most deploy tools do: write a new file beside it, rename it over."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(content)
    os.rename(tmp, path)


def test_a_header_replaced_by_a_copy_of_itself_is_followed(
        running: Running, log_path: Path) -> None:
    # Before: the consumer kept reading the old (unlinked) header: no new event was ever seen,
    # lag stayed 0, nothing was raised.
    replace_file(log_path / "head", (log_path / "head").read_bytes())
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(10, 15)])
    wait_until(lambda: running.consumer.offset == 15, "the new events are handled")
    running.stop()
    assert running.error is None
    assert running.consumer.state == {"next": 15, "n": 15, "sum": sum(range(15))}


def exchange(a: Path, b: Path) -> None:
    """Swap two folders in one step (renameat2 RENAME_EXCHANGE), so an observer never sees
    the path empty: removing the old log and creating the new one left a moment the
    consumer could look in (it then said, rightly, that the log was gone: 2 runs in 6)."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_a_log_removed_and_created_again_stops_the_consumer(
        running: Running, log_path: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    with EventLog(other) as log:
        log.append_many([{"seq": 100 + i} for i in range(30)])
    exchange(other, log_path)
    shutil.rmtree(other)  # the old log, now at the other name
    running.thread.join(DEADLINE)
    assert not running.thread.is_alive()
    assert isinstance(running.error, LogReplacedError)
    assert "replaced by another one" in str(running.error)
    # Nothing of the new log was folded in; the checkpoint still names the old log.
    assert running.consumer.state == {"next": 10, "n": 10, "sum": 45}
    running.consumer.close()
    with pytest.raises(CheckpointMismatchError, match="another log"):
        Consumer(log_path, "c", fold, INITIAL, checkpoint_dir=str(tmp_path / "cps"))


def test_a_log_removed_stops_the_consumer(running: Running, log_path: Path) -> None:
    shutil.rmtree(log_path)
    running.thread.join(DEADLINE)
    assert not running.thread.is_alive()
    assert isinstance(running.error, LogReplacedError)
    assert "header file is gone" in str(running.error)


def test_a_header_cut_back_in_place_stops_the_consumer(
        running: Running, log_path: Path) -> None:
    # cp over an existing file keeps its inode: the header reads fine, with a head behind us.
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(10, 12)])
    wait_until(lambda: running.consumer.offset == 12, "caught up again")
    older = log_path.parent / "older"
    shutil.copytree(log_path, older)
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(12, 20)])
    wait_until(lambda: running.consumer.offset == 20, "caught up")
    with open(log_path / "head", "r+b") as f:  # same inode, older content
        f.write((older / "head").read_bytes())
    running.thread.join(DEADLINE)
    assert not running.thread.is_alive()
    assert isinstance(running.error, CheckpointMismatchError)
    assert "went back to 12, behind offset 20" in str(running.error)


def test_a_follower_follows_a_replaced_header(log_path: Path) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(3)])
        follower = log.follow(0, poll_interval=0.05)
        seen: list[Any] = []

        def follow() -> None:
            for record in follower:
                seen.append(record.event["seq"])

        thread = threading.Thread(target=follow)
        thread.start()
        try:
            wait_until(lambda: len(seen) == 3, "the first events are read")
            replace_file(log_path / "head", (log_path / "head").read_bytes())
            with EventLog(log_path) as writer:
                writer.append_many([{"seq": i} for i in range(3, 6)])
            wait_until(lambda: len(seen) == 6, "the events after the replacement are read")
        finally:
            follower.stop()
            thread.join(DEADLINE)
    assert seen == list(range(6))
