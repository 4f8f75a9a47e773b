"""Links planted in a shared log folder never steer a root process outside it (issue 15).

Run as root (CI is root), on a log owned by an unprivileged user, as the issue describes: the
owner (or any member of its group) plants a symbolic link, or a hard link, where eventpipe
expects a file or folder, pointing at a root-only victim. Then the library (told to trust the
owner, so what is tested is the link handling) and the CLI run as root. Every victim must be
byte-for-byte unchanged, nothing new may appear next to it, and the error must name the link.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from eventpipe import EventLog, EventPipeError, UnsafePathError
from eventpipe._checksum import sum_path
from eventpipe._segment import segment_path

from .conftest import ROOT

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="plants links as another user")


def snapshot(root: Path) -> dict[str, Any]:
    """Everything about the files and folders under ``root`` (links not followed)."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            content = p.read_bytes() if p.is_file() and not p.is_symlink() else None
            out[str(p)] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, content)
    return out


class Victims:
    """Root-only files and a folder outside the log, and a check that nothing touched them."""

    def __init__(self, base: Path) -> None:
        self.root = base / "victims"
        self.root.mkdir(mode=0o700)
        self.file = self.root / "secret"
        self.file.write_bytes(b"root:$6$precious:19000:0:99999:7:::\n" * 4)
        os.chmod(self.file, 0o600)
        self.folder = self.root / "private"
        self.folder.mkdir(mode=0o700)
        (self.folder / "keep").write_bytes(b"untouched")
        self.before = snapshot(self.root)

    def assert_untouched(self) -> None:
        assert snapshot(self.root) == self.before


def log_for_nobody(path: Path, **options: Any) -> None:
    """A log with two sealed segments (with checksums) and an active one, owned by nobody."""
    with EventLog(path, segment_max_events=10, compression=None, **options) as log:
        log.append_many([{"seq": i} for i in range(25)])
    # (close() finished the sealing work: segments 0 and 10 have their checksum files)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.lchown(name, NOBODY, NOBODY)


def plant(link: Path, target: Path) -> None:
    """What the log's owner can do: replace an entry with a symbolic link it owns."""
    if link.is_dir() and not link.is_symlink():
        for child in link.iterdir():
            child.unlink()
        link.rmdir()
    else:
        link.unlink(missing_ok=True)
    os.symlink(target, link)
    os.lchown(link, NOBODY, NOBODY)


@pytest.fixture
def victims(tmp_path: Path) -> Iterator[Victims]:
    v = Victims(tmp_path)
    yield v
    v.assert_untouched()


@pytest.fixture
def log_path() -> Iterator[Path]:
    # Outside pytest's root-only temp folders: the CLI, run as root, drops to the log's owner,
    # who must be able to reach it.
    base = Path(tempfile.mkdtemp(prefix="eventpipe-links-"))
    os.chmod(base, 0o755)
    try:
        path = base / "log"
        log_for_nobody(path)
        yield path
    finally:
        shutil.rmtree(base)


def library(path: Path) -> EventLog:
    return EventLog(path, segment_max_events=10, compression=None, trust_owner=True)


def using(path: Path, action: Callable[[EventLog], object]) -> Callable[[], None]:
    def run() -> None:
        with library(path) as log:
            action(log)

    return run


def active(log_path: Path) -> Path:
    return Path(segment_path(str(log_path / "segments"), 20))


def expect_refused(link: Path, action: Callable[[], object]) -> None:
    with pytest.raises(EventPipeError) as info:
        action()
    assert str(link) in str(info.value), info.value
    assert "symbolic link" in str(info.value) or isinstance(info.value, UnsafePathError)


# ------------------------------------------------------------------------------- library


@pytest.mark.parametrize("target", ["file", "folder"])
def test_active_segment_link(log_path: Path, victims: Victims, target: str) -> None:
    link = active(log_path)
    plant(link, victims.file if target == "file" else victims.folder)

    def append() -> None:
        with library(log_path) as log:
            log.append({"evil": True})

    expect_refused(link, append)


def test_header_link(log_path: Path, victims: Victims) -> None:
    plant(log_path / "head", victims.file)
    expect_refused(log_path / "head", using(log_path, lambda log: log.append({"x": 1})))


def test_metadata_link(log_path: Path, victims: Victims) -> None:
    plant(log_path / "eventpipe.json", victims.file)
    expect_refused(log_path / "eventpipe.json", lambda: library(log_path))


def test_writer_lock_link(log_path: Path, victims: Victims) -> None:
    plant(log_path / "writer.lock", victims.file)
    expect_refused(log_path / "writer.lock", using(log_path, lambda log: log.append({"x": 1})))


def test_segments_folder_link(log_path: Path, victims: Victims) -> None:
    plant(log_path / "segments", victims.folder)
    expect_refused(log_path / "segments", using(log_path, lambda log: list(log.read())))


def test_quarantine_link_with_a_torn_tail(log_path: Path, victims: Victims) -> None:
    # Torn bytes past the committed size make the next writer quarantine them: into a folder
    # it must not follow out of the log.
    with open(active(log_path), "ab") as f:
        f.write(b'{"torn":')
    plant(log_path / "quarantine", victims.folder)
    expect_refused(log_path / "quarantine", using(log_path, lambda log: log.append({"x": 1})))


def test_next_segment_link(log_path: Path, victims: Victims) -> None:
    # The file a roll will create: created exclusively, never opened through a link.
    link = Path(segment_path(str(log_path / "segments"), 30))
    plant(link, victims.file)
    with library(log_path) as log:
        with pytest.raises(EventPipeError) as info:
            log.append_many([{"seq": i} for i in range(10)])
        assert str(link) in str(info.value)
        assert log.head == 25  # nothing of the failed batch is visible


def test_compress_lock_link(log_path: Path, victims: Victims) -> None:
    plant(log_path / "compress.lock", victims.file)
    expect_refused(log_path / "compress.lock", using(log_path, lambda log: log.compress()))


@pytest.mark.parametrize("name", ["compress.state", "sum", "gz-temp", "sum-temp"])
def test_sealing_files_are_never_written_through(
        log_path: Path, victims: Victims, name: str) -> None:
    seg = log_path / "segments"
    links = {
        "compress.state": log_path / "compress.state",
        "sum": Path(sum_path(str(seg), 0)),
        "gz-temp": Path(segment_path(str(seg), 10, compressed=True) + ".tmp"),
        "sum-temp": Path(sum_path(str(seg), 10) + ".tmp"),
    }
    link = links[name]
    plant(link, victims.file)
    with library(log_path) as log:
        try:
            log.compress()
        except EventPipeError as exc:  # a .sum that is a link: named, and refused
            assert str(link) in str(exc)
        assert [r.event["seq"] for r in log.read(10, 20)] == list(range(10, 20))


def test_a_hard_link_is_never_written_through(log_path: Path, victims: Victims) -> None:
    # Made as root: fs.protected_hardlinks stops the owner linking a file it cannot write, but
    # a log must not depend on that sysctl.
    link = active(log_path)
    link.unlink()
    os.link(victims.file, link)
    expect_refused(link, using(log_path, lambda log: log.append({"x": 1})))
    link.unlink()  # the victim's link count back to one for the snapshot
    victims.before = snapshot(victims.root)


def test_a_link_swapped_in_and_out_while_root_appends(log_path: Path, victims: Victims) -> None:
    # The owner races the writer: the next segment's name flips between nothing and a link.
    stop = threading.Event()
    seg = log_path / "segments"

    def flip() -> None:
        while not stop.is_set():
            for base in (30, 40, 50, 60):
                link = Path(segment_path(str(seg), base))
                try:
                    os.symlink(victims.file, link)
                    os.unlink(link)
                except OSError:
                    pass

    flipper = threading.Thread(target=flip)
    flipper.start()
    refused = done = 0
    try:
        with library(log_path) as log:
            for i in range(400):
                try:
                    log.append({"i": i})
                    done += 1
                except EventPipeError:
                    refused += 1
    finally:
        stop.set()
        flipper.join()
    assert done > 0
    for base in (30, 40, 50, 60):  # a link left at the end must not count as a segment
        Path(segment_path(str(seg), base)).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------- CLI


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "eventpipe", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=120, check=False)


@pytest.mark.parametrize("command", ["append", "read", "compress", "verify", "status"])
def test_cli_as_root_never_follows_a_planted_link(
        log_path: Path, victims: Victims, command: str) -> None:
    link = active(log_path) if command != "compress" else log_path / "compress.lock"
    plant(link, victims.file)
    r = cli(command, str(log_path), stdin='{"evil": true}\n')
    if command == "status":  # reads no segment: must not fail, nor touch the victim
        assert r.returncode == 0, r.stderr
        return
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert str(link) in r.stderr + r.stdout, (r.stdout, r.stderr)


def test_cli_prune_removes_a_planted_link_not_its_target(
        log_path: Path, victims: Victims) -> None:
    link = Path(segment_path(str(log_path / "segments"), 0))
    plant(link, victims.file)
    r = cli("prune", str(log_path), "--before", "20", "--force")
    assert r.returncode == 0, r.stderr
    assert not link.is_symlink() and victims.file.exists()


def test_compressed_segment_link(log_path: Path, victims: Victims) -> None:
    with library(log_path) as log:
        assert log.compress() == 2  # segments 0 and 10 are gzip now
    link = Path(segment_path(str(log_path / "segments"), 0, compressed=True))
    plant(link, victims.file)
    expect_refused(link, using(log_path, lambda log: list(log.read(0, 5))))


def test_dead_letter_log_link(log_path: Path, victims: Victims,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A dead-letter log in the shared folder, owned by nobody, whose active segment is a link.
    from eventpipe import Consumer

    dlq = log_path.parent / "dlq"
    with EventLog(dlq, trust_owner=True) as log:
        log.append({"consumer": "earlier"})
    for dirpath, dirnames, filenames in os.walk(dlq):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.lchown(name, NOBODY, NOBODY)
    link = Path(segment_path(str(dlq / "segments"), 0))
    plant(link, victims.file)
    monkeypatch.setenv("EVENTPIPE_TRUST_OWNER", "1")

    def failing(state: int, event: Any, offset: int) -> int:
        raise ValueError("always")

    def consume() -> None:
        with Consumer(log_path, "c", failing, 0, on_error="dead_letter",
                      dead_letter=str(dlq), max_retries=0) as c:
            c.catch_up()

    expect_refused(link, consume)
