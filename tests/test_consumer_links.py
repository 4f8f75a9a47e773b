"""Issue 15, consumer side: links planted in ``<log>/consumers/`` never steer a root consumer.

An unprivileged user (``nobody``) who may write in the log plants symbolic links (and, where
the kernel lets root make one, a hard link) to files and folders of a root-only "victim"
folder; then root runs consumers, ``eventpipe consume``, ``status`` and ``verify``. Every test
checks that each victim file is unchanged (content, mode, owner, link count, mtime, and atime
where the filesystem updates it, i.e. it was not even read), that no file appeared in the
victim folder, and that the error names the link.

Each test runs with two layouts: the log owned by nobody (root trusts it with
EVENTPIPE_TRUST_OWNER; the ``eventpipe`` command, run by root, becomes nobody before it opens
the log), and the group-shared one, owned by root with nobody in its group (setgid folders
2770, files 0660): there the command stays root, and only the refusal of links protects it.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eventpipe import Consumer, ConsumerBusyError, EventLog, UnsafePathError
from eventpipe._registry import consumer_positions, registration_path

from .conftest import ROOT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")

NOBODY = 65534  # user nobody, and group nogroup
LAYOUTS = ("owned-by-nobody", "shared-with-nobody")
SECRET = b"root only: never read or written by eventpipe\n"


def count(state: int, event: Any, offset: int) -> int:
    return state + 1


class Victim:
    """A root-only folder (0700) of root-only files (0600) outside the log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(mode=0o700)
        self.secret = path / "secret"
        self.secret.write_bytes(SECRET)
        self.owner = path / "owner.json"  # a note an owner-file reader would quote
        self.owner.write_bytes(b'{"pid": 1, "host": "root-secret-host", "since": "never"}')
        for f in (self.secret, self.owner):
            f.chmod(0o600)
            os.utime(f, (1_000_000, 2_000_000))  # atime before mtime: a read updates atime
        self.missing = path / "created-through-a-link"
        self.atime_counts = _reads_update_atime(path.parent)
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        """Everything about the folder and its files that a write (or a read) would change."""
        out: dict[str, Any] = {}
        st = os.lstat(self.path)
        out["."] = (sorted(os.listdir(self.path)), st.st_mode, st.st_uid, st.st_mtime_ns)
        for name in sorted(os.listdir(self.path)):
            p = self.path / name
            st = os.lstat(p)
            data = p.read_bytes()
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # undo our own read
            out[name] = (data, stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_nlink,
                         st.st_mtime_ns, st.st_atime_ns if self.atime_counts else None)
        return out

    def retake(self) -> None:
        """Take the reference snapshot again (after root made a hard link, which changes a
        link count)."""
        self.before = self.snapshot()

    def assert_untouched(self) -> None:
        assert self.snapshot() == self.before


def _reads_update_atime(where: Path) -> bool:
    probe = where / "atime-probe"
    probe.write_bytes(b"x")
    os.utime(probe, (1_000_000, 2_000_000))
    probe.read_bytes()
    updated = os.stat(probe).st_atime != 1_000_000
    probe.unlink()
    return updated


def as_nobody(script: str, *args: str | Path) -> None:
    """Run a shell script as ``nobody`` (no supplementary groups): what the log's other users
    may do."""
    subprocess.run(["sh", "-euc", script, "sh", *map(str, args)], check=True, cwd="/",
                   user=NOBODY, group=NOBODY, extra_groups=[], timeout=30,
                   env={"PATH": "/usr/bin:/bin"})


def plant_link(target: str | Path, link: Path) -> None:
    as_nobody('rm -rf -- "$2"; ln -s -- "$1" "$2"', target, link)


class Setup:
    def __init__(self, base: Path, layout: str) -> None:
        self.base = base
        self.layout = layout
        self.log = base / "log"
        self.consumers = self.log / "consumers"
        self.ext = base / "ext"  # an operator's checkpoint_dir outside the log
        self.victim = Victim(base / "victim")

    def share(self, path: Path) -> None:
        """Let nobody write everything under ``path`` (a folder), as the layout does."""
        shared = self.layout == "shared-with-nobody"
        for folder, dirs, files in os.walk(path):
            for name in [".", *dirs, *files]:
                p = os.path.join(folder, name)
                os.lchown(p, 0 if shared else NOBODY, NOBODY)
                if shared and not os.path.islink(p):
                    os.chmod(p, 0o2770 if os.path.isdir(p) else 0o660)


@pytest.fixture(params=LAYOUTS)
def setup(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    """A log of 3 events, consumer ``c`` checkpointed at 1 and 3 (so .prev exists), that nobody
    may write in (see the module docstring); a root-only victim folder beside it."""
    # Root is told to trust a log nobody owns (the ownership rule would refuse the folder
    # before any link in it is reached): even then, no link inside it may be followed. Set in
    # os.environ, so the CLI subprocesses have it too.
    monkeypatch.setenv("EVENTPIPE_TRUST_OWNER", "1")
    base = Path(tempfile.mkdtemp(prefix="eventpipe-links-"))
    try:
        base.chmod(0o755)  # mkdtemp makes it 0700: nobody could not reach the log
        with EventLog(base / "log") as log:
            log.append({"n": 0})
            with Consumer(log, "c", count, 0) as c:
                c.catch_up()
            log.append_many([{"n": 1}, {"n": 2}])
            with Consumer(log, "c", count, 0) as c:
                assert c.catch_up() == 3
        s = Setup(base, request.param)
        assert (s.consumers / "c.json.prev").exists()
        s.share(s.log)
        yield s
    finally:
        shutil.rmtree(base)


def consume(s: Setup, name: str = "c", **options: Any) -> int:
    with Consumer(str(s.log), name, count, 0, **options) as c:
        result: int = c.catch_up()
    return result


def assert_refused(exc: pytest.ExceptionInfo[UnsafePathError], link: Path) -> None:
    assert exc.value.path == str(link)
    assert str(link) in str(exc.value)


# ---------------------------------------------------------------------- library, as root


def test_consumers_folder_linked_to_a_root_folder(setup: Setup) -> None:
    plant_link(setup.victim.path, setup.consumers)
    with pytest.raises(UnsafePathError, match="is a symbolic link") as exc:
        consume(setup)
    assert_refused(exc, setup.consumers)
    setup.victim.assert_untouched()  # before: c.lock, c.owner and c.json were created there


def test_checkpoint_linked_to_a_root_file(setup: Setup) -> None:
    link = setup.consumers / "c.json"
    plant_link(setup.victim.secret, link)
    with pytest.raises(UnsafePathError, match="is a symbolic link") as exc:
        consume(setup)
    assert_refused(exc, link)
    setup.victim.assert_untouched()  # before: read (a CheckpointError quoting its parse)


def test_previous_checkpoint_linked_to_a_root_file(setup: Setup) -> None:
    # A damaged checkpoint makes the consumer resume from .prev: the link is not read.
    as_nobody('printf garbage > "$1"', setup.consumers / "c.json")
    link = setup.consumers / "c.json.prev"
    plant_link(setup.victim.secret, link)
    with pytest.raises(UnsafePathError, match="is a symbolic link") as exc:
        consume(setup)
    assert_refused(exc, link)
    assert (setup.consumers / "c.json").read_bytes() == b"garbage"  # nothing set aside
    setup.victim.assert_untouched()


@pytest.mark.parametrize("target", ["secret", "missing"])
def test_lock_file_linked_to_a_root_file(setup: Setup, target: str) -> None:
    link = setup.consumers / "c.lock"
    plant_link(getattr(setup.victim, target), link)
    with pytest.raises(UnsafePathError, match="is a symbolic link") as exc:
        consume(setup)
    assert_refused(exc, link)
    # before: the file was opened read-write and chmod'ed 0644 (or created in the folder)
    setup.victim.assert_untouched()


def test_lock_file_hard_linked_to_a_root_file(setup: Setup) -> None:
    link = setup.consumers / "c.lock"
    link.unlink()
    try:  # as nobody, fs.protected_hardlinks (and the victim folder's mode) refuse it
        as_nobody('ln -- "$1" "$2"', setup.victim.secret, link)
    except subprocess.CalledProcessError:
        os.link(setup.victim.secret, link)  # as root: the case the code must still refuse
    setup.victim.retake()
    with pytest.raises(UnsafePathError, match="2 hard links") as exc:
        consume(setup)
    assert_refused(exc, link)
    setup.victim.assert_untouched()  # before: chmod'ed 0644 through the link


def test_owner_note_linked_to_a_root_file_is_not_quoted(setup: Setup) -> None:
    # The holder's note is read only when the name is taken: by a refused second consumer.
    with Consumer(str(setup.log), "c", count, 0):
        link = setup.consumers / "c.owner"
        plant_link(setup.victim.owner, link)
        with pytest.raises(ConsumerBusyError) as exc:
            consume(setup)
    assert "root-secret-host" not in str(exc.value)  # before: quoted from the victim
    assert "an unknown process" in str(exc.value)
    setup.victim.assert_untouched()
    # Taking the name again replaces the link (never writes through it).
    assert consume(setup) == 3
    assert not (setup.consumers / "c.owner").is_symlink()
    setup.victim.assert_untouched()


def test_temp_file_name_linked_while_the_consumer_runs(setup: Setup) -> None:
    # The next checkpoint's temp file is <name>.tmp.<pid>; plant it after the consumer's
    # start-up removed stale temps, from inside the handler.
    link = setup.consumers / f"c.json.tmp.{os.getpid()}"

    def plant_then_count(state: int, event: Any, offset: int) -> int:
        if not link.is_symlink():
            plant_link(setup.victim.secret, link)
        return state + 1

    with EventLog(str(setup.log)) as log:
        log.append({"n": 3})
    with Consumer(str(setup.log), "c", plant_then_count, 0) as c:
        assert c.catch_up() == 4
    assert not link.is_symlink() and not link.exists()
    setup.victim.assert_untouched()  # before: the checkpoint was written into the victim


def test_external_registrations_folder_linked_to_a_root_folder(setup: Setup) -> None:
    link = setup.consumers / "external"
    plant_link(setup.victim.path, link)
    with pytest.raises(UnsafePathError, match="is a symbolic link") as exc:
        consume(setup, checkpoint_dir=str(setup.ext))
    assert_refused(exc, link)
    setup.victim.assert_untouched()  # before: the registration was written there


def test_registration_temp_file_linked_to_a_root_file(setup: Setup) -> None:
    registration = Path(registration_path(str(setup.log), "c", str(setup.ext / "c.json")))
    as_nobody('mkdir -p -- "$1"', registration.parent)
    link = registration.parent / f"{registration.name}.tmp.{os.getpid()}"
    plant_link(setup.victim.secret, link)
    assert consume(setup, checkpoint_dir=str(setup.ext)) == 3  # the stale name is removed
    assert not link.is_symlink() and registration.is_file()
    setup.victim.assert_untouched()  # before: the registration was written into the victim


def test_link_inside_an_external_checkpoint_folder(setup: Setup) -> None:
    # The folder is the operator's (reached through a link if they made one); links inside
    # it are refused like those in the log.
    setup.ext.mkdir()
    setup.share(setup.ext)
    operator_link = setup.base / "ext-link"
    operator_link.symlink_to(setup.ext)
    link = setup.ext / "c.json"
    plant_link(setup.victim.secret, link)
    with pytest.raises(UnsafePathError, match="is a symbolic link") as exc:
        consume(setup, checkpoint_dir=str(operator_link))
    assert exc.value.path == str(operator_link / "c.json")
    setup.victim.assert_untouched()


def test_retention_reads_no_linked_registration_or_external_checkpoint(setup: Setup) -> None:
    # Consumer e checkpoints in ext/ (registered in the log); nobody links its checkpoint, and
    # plants a registration of a consumer d that is a link.
    assert consume(setup, "e", checkpoint_dir=str(setup.ext)) == 3
    setup.share(setup.log)  # the new consumers/external/ too
    setup.share(setup.ext)
    checkpoint = setup.ext / "e.json"
    plant_link(setup.victim.secret, checkpoint)
    registration = Path(registration_path(str(setup.log), "d", str(setup.ext / "d.json")))
    plant_link(setup.victim.owner, registration)
    with EventLog(str(setup.log)) as log:
        positions = {p.consumer.name: p for p in consumer_positions(str(setup.log), log.log_id)}
    assert sorted(positions) == ["c", "d", "e"]
    assert positions["c"].hold == 3  # the in-log checkpoint, still read
    for name, link in (("d", registration), ("e", checkpoint)):
        assert positions[name].hold == 0  # unknown position: retention keeps everything
        assert "is a symbolic link; refusing to follow it" in str(positions[name].error)
        assert f"[path={link}]" in str(positions[name].error)
    setup.victim.assert_untouched()  # before: both were read


@pytest.mark.timeout(30)
def test_fifos_planted_in_consumers_are_refused_without_blocking(setup: Setup) -> None:
    # Opening a FIFO for reading blocks until a writer comes: a FIFO planted as a checkpoint
    # or a registration would hang the consumer, or retention in a writer's compressor.
    checkpoint = setup.consumers / "c.json"
    registration = Path(registration_path(str(setup.log), "d", str(setup.ext / "d.json")))
    as_nobody('rm -f -- "$1"; mkfifo -- "$1"; mkdir -p -- "$2"; mkfifo -- "$3"',
              checkpoint, registration.parent, registration)
    with pytest.raises(UnsafePathError, match="is not a regular file") as exc:
        consume(setup)
    assert_refused(exc, checkpoint)
    with EventLog(str(setup.log)) as log:
        positions = {p.consumer.name: p for p in consumer_positions(str(setup.log), log.log_id)}
    assert positions["d"].hold == 0 and "is not a regular file" in str(positions["d"].error)
    setup.victim.assert_untouched()


# ------------------------------------------------------------------------------ CLI, as root


def eventpipe(setup: Setup, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "eventpipe", *map(str, args)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60, check=False)
    if setup.layout == "shared-with-nobody":
        assert "running as" not in r.stderr  # root's own folder: the command stayed root
    return r


@pytest.mark.parametrize("planted", ["consumers", "c.json", "c.lock"])
def test_cli_consume_refuses_a_link(setup: Setup, planted: str) -> None:
    link = setup.log / planted if planted == "consumers" else setup.consumers / planted
    plant_link(setup.victim.secret if planted != "consumers" else setup.victim.path, link)
    handler = setup.base / "handler.py"
    handler.write_text("def count(state, event, offset):\n    return state + 1\n")
    r = eventpipe(setup, "consume", setup.log, "--name", "c", "--handler", f"{handler}:count",
                  "--initial-state", "0", "--catch-up")
    assert r.returncode == 3, r.stderr
    assert "UnsafePathError: is a symbolic link; refusing to follow it" in r.stderr
    assert f"[path={link}]" in r.stderr
    setup.victim.assert_untouched()


def test_cli_status_and_verify_report_a_linked_checkpoint(setup: Setup) -> None:
    # Both report every consumer: a link is that consumer's error (status exits 0 and says
    # retention keeps everything for it; verify counts it as a problem, exit 1).
    link = setup.consumers / "c.json"
    plant_link(setup.victim.secret, link)
    r = eventpipe(setup, "status", setup.log)
    assert r.returncode == 0, r.stderr
    assert "is a symbolic link; refusing to follow it" in r.stdout and str(link) in r.stdout
    setup.victim.assert_untouched()
    r = eventpipe(setup, "verify", setup.log)
    assert r.returncode == 1, r.stderr
    assert f"{link}: is a symbolic link; refusing to follow it" in r.stdout
    setup.victim.assert_untouched()


def test_cli_status_and_verify_report_a_linked_consumers_folder(setup: Setup) -> None:
    plant_link(setup.victim.path, setup.consumers)
    r = eventpipe(setup, "status", setup.log)
    assert r.returncode == 0, r.stderr
    assert "cannot list consumer checkpoints: is a symbolic link" in r.stdout
    assert str(setup.consumers) in r.stdout
    r = eventpipe(setup, "verify", setup.log)
    assert r.returncode == 1, r.stderr
    assert f"{setup.consumers}: is a symbolic link; refusing to follow it" in r.stdout
    setup.victim.assert_untouched()
