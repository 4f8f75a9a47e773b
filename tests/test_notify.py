"""ChangeNotifier contract: real directories, real writer processes, no mocks.

Hints have no observable side effect before someone waits, so a few tests look at the
notifier's private waiter state (through :func:`until`, bounded by a deadline) to make sure a
waiter is really blocked, or a hint really delivered, before acting.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest

from eventpipe._changes import ChangeNotifier

from ._wait import wait_until

HINT_TIMEOUT = 5.0  # only a broken notifier ever waits this long
PROMPT = 2.0  # a delivered hint must release a waiter well within this (generous for CI)
QUIET = 0.3  # how long "no hint" is watched for


def until(predicate: Callable[[], object], timeout: float = HINT_TIMEOUT) -> None:
    """Return once ``predicate()`` is truthy (polled every 1 ms); fail after ``timeout`` s."""
    wait_until(predicate, timeout=timeout, interval=0.001)


async def until_async(predicate: Callable[[], object]) -> None:
    """Yield to the loop until ``predicate()`` is truthy (bounded by HINT_TIMEOUT)."""
    async with asyncio.timeout(HINT_TIMEOUT):
        while not predicate():
            await asyncio.sleep(0)


def pwrite(path: Path | str, data: bytes = b"\x01" * 8) -> None:
    """Rewrite ``path`` in place, as a committing append rewrites ``head``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


def new_threads(before: set[threading.Thread]) -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t not in before and t.is_alive()}


def blocked_sync_waiters(n: ChangeNotifier) -> int:
    return n.waiting()[0]


def blocked_async_waiters(n: ChangeNotifier) -> int:
    return n.waiting()[1]


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    (tmp_path / "head").write_bytes(bytes(64))
    return tmp_path


# --------------------------------------------------------------------------------------------
# Contract shared by both modes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("notifications", [True, False], ids=["watchdog", "polling"])
class TestContract:
    @pytest.fixture
    def notifier(self, log_dir: Path, notifications: bool) -> Iterator[ChangeNotifier]:
        n = ChangeNotifier(log_dir, notifications=notifications)
        n.start()
        # inotify is part of every Linux kernel this targets: a fallback here is a bug.
        assert n.watching is notifications, n.fallback_reason
        try:
            yield n
        finally:
            n.close()

    @pytest.fixture
    def poke(
        self, notifier: ChangeNotifier, log_dir: Path, notifications: bool
    ) -> Callable[[], None]:
        """The way a writer signals in this mode: a real head rewrite, or wake()."""
        if notifications:
            return lambda: pwrite(log_dir / "head")
        return notifier.wake

    def test_wake_from_another_thread_releases_blocked_wait(self, notifier: ChangeNotifier) -> None:
        def wake_once_blocked() -> None:
            until(lambda: blocked_sync_waiters(notifier))
            notifier.wake()

        waker = threading.Thread(target=wake_once_blocked)
        waker.start()
        try:
            t0 = time.monotonic()
            assert notifier.wait(HINT_TIMEOUT) is True
            assert time.monotonic() - t0 < PROMPT
        finally:
            waker.join()
        assert blocked_sync_waiters(notifier) == 0

    def test_wait_without_activity_times_out(self, notifier: ChangeNotifier) -> None:
        t0 = time.monotonic()
        assert notifier.wait(QUIET) is False
        elapsed = time.monotonic() - t0
        assert QUIET * 0.95 <= elapsed < QUIET + PROMPT
        assert blocked_sync_waiters(notifier) == 0

    def test_zero_or_negative_timeout_only_polls(self, notifier: ChangeNotifier) -> None:
        assert notifier.wait(0) is False
        assert notifier.wait(-1.0) is False
        notifier.wake()
        assert notifier.wait(0) is True
        assert notifier.wait(0) is False

    def test_hint_before_wait_is_kept_and_coalesced(self, notifier: ChangeNotifier) -> None:
        notifier.wake()
        notifier.wake()
        t0 = time.monotonic()
        assert notifier.wait(HINT_TIMEOUT) is True
        assert time.monotonic() - t0 < PROMPT
        # Both wakes were one hint: the caller reads to the end after wait() returns anyway.
        assert notifier.wait(0) is False

    def test_concurrent_wakers(self, notifier: ChangeNotifier) -> None:
        stop = threading.Event()
        errors: list[BaseException] = []

        def waker() -> None:
            try:
                while not stop.is_set():
                    notifier.wake()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=waker) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            for _ in range(200):
                assert notifier.wait(HINT_TIMEOUT) is True
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert errors == []

    # Each round races the sender's signal against wait() registering, checking and going to
    # sleep. A signal that lands after the interpreter last looked for pending handlers but
    # before the thread sleeps cannot interrupt that sleep (a CPython limitation), so some
    # rounds cost one of wait()'s main-thread sleep slices: keep the round counts modest.
    @pytest.mark.parametrize(
        ("target", "rounds"),
        [("main-thread", 50), ("process", 20)],
    )
    def test_wake_from_signal_handler(
        self, notifier: ChangeNotifier, target: str, rounds: int
    ) -> None:
        # Python runs signal handlers on the main thread, here while it is inside wait():
        # the handler's wake() must neither deadlock on the notifier's lock nor be lost.
        assert threading.current_thread() is threading.main_thread()
        main_ident = threading.main_thread().ident
        assert main_ident is not None
        armed = threading.Event()
        stop = threading.Event()

        def sender() -> None:
            while armed.wait(HINT_TIMEOUT) and not stop.is_set():
                armed.clear()
                if target == "main-thread":
                    signal.pthread_kill(main_ident, signal.SIGUSR1)
                else:
                    os.kill(os.getpid(), signal.SIGUSR1)

        def handler(signum: int, frame: FrameType | None) -> None:
            notifier.wake()

        previous = signal.signal(signal.SIGUSR1, handler)
        thread = threading.Thread(target=sender)
        thread.start()
        try:
            for _ in range(rounds):
                armed.set()
                t0 = time.monotonic()
                assert notifier.wait(HINT_TIMEOUT) is True
                assert time.monotonic() - t0 < PROMPT
        finally:
            stop.set()
            armed.set()
            thread.join()
            signal.signal(signal.SIGUSR1, previous)

    def test_close_releases_blocked_waiter(self, notifier: ChangeNotifier) -> None:
        results: list[bool] = []
        waiter = threading.Thread(target=lambda: results.append(notifier.wait(None)))
        waiter.start()
        until(lambda: blocked_sync_waiters(notifier))
        notifier.close()
        waiter.join(PROMPT)
        assert not waiter.is_alive()
        assert results == [True]
        assert notifier.watching is False

    def test_lifecycle_is_idempotent(self, notifier: ChangeNotifier) -> None:
        before = set(threading.enumerate())
        notifier.start()
        assert new_threads(before) == set()
        notifier.close()
        notifier.close()
        with pytest.raises(RuntimeError):
            notifier.start()
        assert notifier.wait(0) is True  # close() posts a hint to release any waiter
        # Waiting after close still works, as a plain timed wait.
        assert notifier.wait(0.01) is False
        notifier.wake()
        assert notifier.wait(0) is True

    def test_wait_async_returns_after_change_from_thread(
        self, notifier: ChangeNotifier, poke: Callable[[], None]
    ) -> None:
        async def scenario() -> bool:
            task = asyncio.create_task(notifier.wait_async(HINT_TIMEOUT))
            await until_async(lambda: blocked_async_waiters(notifier))
            t0 = time.monotonic()
            await asyncio.to_thread(poke)
            result = await task
            assert time.monotonic() - t0 < PROMPT
            return result

        assert asyncio.run(scenario()) is True
        assert blocked_async_waiters(notifier) == 0

    def test_wait_async_does_not_block_the_loop(
        self, notifier: ChangeNotifier, poke: Callable[[], None]
    ) -> None:
        async def scenario() -> tuple[bool, int]:
            ticks = 0
            stop = asyncio.Event()

            async def ticker() -> None:
                nonlocal ticks
                while not stop.is_set():
                    ticks += 1
                    await asyncio.sleep(0.001)

            ticking = asyncio.create_task(ticker())
            waiting = asyncio.create_task(notifier.wait_async(HINT_TIMEOUT))
            # A wait_async that blocked the loop would stop the ticker until it timed out.
            await until_async(lambda: ticks >= 20)
            assert not waiting.done()
            ticks_before_poke = ticks
            await asyncio.to_thread(poke)
            result = await waiting
            stop.set()
            await ticking
            return result, ticks_before_poke

        result, ticks = asyncio.run(scenario())
        assert result is True
        assert ticks >= 20

    def test_wait_async_times_out(self, notifier: ChangeNotifier) -> None:
        async def scenario() -> tuple[bool, float]:
            t0 = time.monotonic()
            result = await notifier.wait_async(QUIET)
            return result, time.monotonic() - t0

        result, elapsed = asyncio.run(scenario())
        assert result is False
        # asyncio timers may fire up to one clock tick early.
        assert QUIET * 0.9 <= elapsed < QUIET + PROMPT
        assert blocked_async_waiters(notifier) == 0

    def test_wait_async_sees_earlier_hint(self, notifier: ChangeNotifier) -> None:
        notifier.wake()
        assert asyncio.run(notifier.wait_async(HINT_TIMEOUT)) is True
        assert asyncio.run(notifier.wait_async(0)) is False

    def test_wait_async_cancellation_is_clean(self, notifier: ChangeNotifier) -> None:
        async def scenario() -> None:
            task = asyncio.create_task(notifier.wait_async(None))
            await until_async(lambda: blocked_async_waiters(notifier))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert task.cancelled()
            # Unregistered: a later hint schedules nothing for the dead waiter...
            assert blocked_async_waiters(notifier) == 0
            # ...and is kept for the next waiter rather than swallowed.
            await asyncio.to_thread(notifier.wake)
            assert await notifier.wait_async(HINT_TIMEOUT) is True
            assert asyncio.all_tasks() == {asyncio.current_task()}

        asyncio.run(scenario())

    def test_cancel_racing_a_wake_keeps_the_hint(self, notifier: ChangeNotifier) -> None:
        async def scenario() -> None:
            task = asyncio.create_task(notifier.wait_async(None))
            await until_async(lambda: blocked_async_waiters(notifier))
            # The wake's resolution callback is queued but has not run when the cancel lands.
            notifier.wake()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0)  # let the queued callback run against the cancelled waiter
            assert blocked_async_waiters(notifier) == 0

        asyncio.run(scenario())
        assert notifier.wait(0) is True

    def test_context_manager_starts_and_closes(self, log_dir: Path, notifications: bool) -> None:
        before = set(threading.enumerate())
        with ChangeNotifier(log_dir, notifications=notifications) as n:
            assert n.watching is notifications
        assert n.watching is False
        assert new_threads(before) == set()


# --------------------------------------------------------------------------------------------
# Watchdog mode: real file changes
# --------------------------------------------------------------------------------------------


@pytest.fixture
def watched(log_dir: Path) -> Iterator[ChangeNotifier]:
    n = ChangeNotifier(log_dir)
    n.start()
    assert n.watching, n.fallback_reason
    assert n.fallback_reason is None
    try:
        yield n
    finally:
        n.close()


# Opens head, reports readiness, then on "go" rewrites it in place and reports when.
WRITER = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
print("ready", flush=True)
sys.stdin.readline()
t = time.monotonic()
os.pwrite(fd, b"\\x02" * 8, 0)
print(repr(t), flush=True)
sys.stdin.readline()
os.close(fd)
"""


def test_pwrite_from_another_process_wakes_promptly(watched: ChangeNotifier, log_dir: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, os.fspath(log_dir / "head")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        # A reader-style open is not a change: the inotify mask excludes open/close-nowrite.
        assert watched.wait(0) is False
        proc.stdin.write("go\n")
        proc.stdin.flush()
        t0 = time.monotonic()
        woke = watched.wait(HINT_TIMEOUT)
        t_woke = time.monotonic()
        t_written = float(proc.stdout.readline())  # CLOCK_MONOTONIC is system-wide on Linux
        proc.stdin.write("done\n")
        proc.stdin.close()
        assert proc.wait(HINT_TIMEOUT) == 0
    assert woke is True
    assert t_woke - t0 < PROMPT
    assert t_woke - t_written < PROMPT


def test_changes_to_other_files_do_not_wake(watched: ChangeNotifier, log_dir: Path) -> None:
    (log_dir / "sub").mkdir()
    for name in ("other", "head.tmp", "xhead", "HEAD", "sub/head"):
        pwrite(log_dir / name)
    (log_dir / "other").rename(log_dir / "other2")
    (log_dir / "other2").unlink()
    # Reading head is not a change either.
    assert (log_dir / "head").read_bytes() == bytes(64)
    assert watched.wait(QUIET) is False
    # The watch is alive, so the silence above was the filter, not a dead observer.
    pwrite(log_dir / "head")
    assert watched.wait(HINT_TIMEOUT) is True


def test_file_change_before_wait_is_kept(watched: ChangeNotifier, log_dir: Path) -> None:
    pwrite(log_dir / "head")
    until(lambda: watched.pending)  # delivered while nobody waits
    assert watched.wait(0) is True
    assert watched.wait(0) is False


def test_atomic_replace_into_place_wakes(watched: ChangeNotifier, log_dir: Path) -> None:
    (log_dir / "head.new").write_bytes(b"\x03" * 64)
    assert watched.wait(QUIET) is False  # writing the temporary file is not a hint
    os.replace(log_dir / "head.new", log_dir / "head")
    assert watched.wait(HINT_TIMEOUT) is True


def test_created_after_start_wakes(tmp_path: Path) -> None:
    with ChangeNotifier(tmp_path) as n:
        assert n.watching
        pwrite(tmp_path / "head")
        assert n.wait(HINT_TIMEOUT) is True


def test_custom_filename(log_dir: Path) -> None:
    with ChangeNotifier(log_dir, "tail") as n:
        pwrite(log_dir / "head")
        assert n.wait(QUIET) is False
        pwrite(log_dir / "tail")
        assert n.wait(HINT_TIMEOUT) is True


def test_close_joins_observer_threads(log_dir: Path) -> None:
    before = set(threading.enumerate())
    n = ChangeNotifier(log_dir)
    n.start()
    assert n.watching
    assert new_threads(before) != set()
    n.close()
    assert new_threads(before) == set()
    assert n.watching is False


def test_close_during_appends_is_quiet(log_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Closing races with in-flight inotify events; watchdog must not report that as an error.
    caplog.set_level(logging.DEBUG, logger="watchdog")
    fd = os.open(log_dir / "head", os.O_RDWR)

    def append(stop: threading.Event) -> None:
        while not stop.is_set():
            os.pwrite(fd, b"\x04", 0)

    try:
        for _ in range(20):
            before = set(threading.enumerate())
            stop = threading.Event()
            n = ChangeNotifier(log_dir)
            n.start()
            writer = threading.Thread(target=append, args=(stop,))
            writer.start()
            try:
                assert n.wait(HINT_TIMEOUT) is True
                n.close()
            finally:
                stop.set()
                writer.join()
            assert new_threads(before) == set()
    finally:
        os.close(fd)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_falls_back_when_directory_cannot_be_watched(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    with ChangeNotifier(tmp_path / "missing") as n:
        assert n.watching is False
        assert n.fallback_reason is not None and "missing" in n.fallback_reason
        assert new_threads(before) == set()
        assert n.wait(0.01) is False
        n.wake()
        assert n.wait(HINT_TIMEOUT) is True
    assert new_threads(before) == set()


def test_watchdog_disabled_means_no_thread(log_dir: Path) -> None:
    before = set(threading.enumerate())
    n = ChangeNotifier(log_dir, notifications=False)
    n.start()
    try:
        assert n.watching is False
        assert n.fallback_reason is not None
        assert new_threads(before) == set()
        pwrite(log_dir / "head")
        assert n.wait(QUIET) is False  # nothing watches the file: only the poll interval
    finally:
        n.close()


@pytest.mark.parametrize("name", ["", ".", "..", "sub/head"])
def test_filename_must_be_a_plain_name(log_dir: Path, name: str) -> None:
    with pytest.raises(ValueError):
        ChangeNotifier(log_dir, name)
