"""Shared fixtures: temporary logs, child processes that are always reaped, leak checks."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._main import Cli, in_process

ROOT = Path(__file__).resolve().parent.parent

# A shell starts background jobs (`cmd &`, nohup) with SIGINT ignored, and an ignored signal
# stays ignored in every child: the tests that stop processes with SIGINT would then wait in
# vain. A Python handler, unlike SIG_IGN, is reset to the default in an exec'd child.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
WORKERS = Path(__file__).resolve().parent / "_workers.py"


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    """Where a test's log lives (not created yet)."""
    return tmp_path / "log"


class Children:
    """Starts child processes and kills and reaps every one of them at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def worker(self, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        """Run ``tests/_workers.py ARGS`` in a new Python process."""
        return self.popen([sys.executable, str(WORKERS), *args], **kwargs)

    def popen(self, cmd: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("bufsize", 0)  # so select() on a child's stdout sees every line
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        kwargs.setdefault("env", env)
        proc: subprocess.Popen[bytes] = subprocess.Popen(cmd, **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def reap(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream is not None:
                    stream.close()


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary folder an unprivileged user can reach (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="eventpipe-shared-"))
    path.chmod(0o755)
    if os.geteuid() == 0:  # the child will run as another user
        assert all(os.stat(p).st_mode & stat.S_IXOTH for p in [path, *path.parents]), \
            f"{path} is not reachable by other users"
    try:
        yield path
    finally:
        for dirpath, _dirs, _files in os.walk(path):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(path)


@pytest.fixture
def children() -> Iterator[Children]:
    kids = Children()
    try:
        yield kids
    finally:
        kids.reap()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads running (an unclosed log, notifier or writer)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2.0
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """``main(argv)`` in this process, stdout and stderr captured as text."""
    return in_process(monkeypatch, capsys)
