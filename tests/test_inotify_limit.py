"""Running out of inotify: say so (a warning, ``eventpipe status``) and need less of it.

fs.inotify.max_user_instances (128 by default) counts inotify instances per user. Past it a
notifier cannot watch and its waiters fall back to their poll interval, which nothing said. The
limit is reached for real here, never by mocking: a child process running as a spare uid (no
process, no passwd entry) opens inotify instances until the kernel refuses, so only that uid
is exhausted; the global sysctl is never touched, as other test sessions share this machine.
That needs root, to switch uid; exhausting the instances of the user running the tests would
break that user's other processes, so without root those tests are skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import pwd
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from eventpipe import EventLog
from eventpipe._changes import ChangeNotifier
from eventpipe._inotify import explain_failure, inotify_usage

from .conftest import ROOT, Children
from .test_notify import HINT_TIMEOUT, new_threads, pwrite, until

INOTIFY_LINK = "anon_inode:inotify"


def max_user_instances() -> int | None:
    try:
        return int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    except (OSError, ValueError):
        return None


def own_inotify_fds() -> int:
    """inotify instances open in this process."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd listdir itself used
            count += os.readlink(f"/proc/self/fd/{fd}") == INOTIFY_LINK
    return count


# --------------------------------------------------------------------------------------------
# A child process whose uid has no inotify instance left
# --------------------------------------------------------------------------------------------


def spare_uid() -> int:
    """A uid that owns no process and names no user: exhausting it disturbs nobody."""
    busy: set[int] = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):  # ended meanwhile
                busy.add(os.stat(f"/proc/{pid}").st_uid)
    # Start at a pid-dependent place so concurrent sessions rarely pick the same one.
    first = os.getpid() % 4000
    for step in range(4000):
        uid = 61000 + (first + step) % 4000
        if uid in busy:
            continue
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    pytest.skip("no spare uid in 61000..64999")


@dataclasses.dataclass
class Exhausted:
    uid: int
    limit: int
    log: Path  # an eventpipe log owned by uid; the child watches its head
    other: Path  # another directory owned by uid


@pytest.fixture
def exhausted() -> Iterator[Exhausted]:
    """Where a child running as a spare uid can exhaust that uid's inotify instances."""
    limit = max_user_instances()
    if os.geteuid() != 0:
        pytest.skip("needs root to exhaust a spare uid's inotify instances (those of this "
                    "user would fail its other processes)")
    if limit is None:
        pytest.skip("no /proc/sys/fs/inotify/max_user_instances")
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < limit + 64 or limit > 65536:
        pytest.skip(f"cannot open {limit} inotify instances in one process")
    uid = spare_uid()
    base = Path(tempfile.mkdtemp(prefix="eventpipe-inotify-"))
    try:
        log, other = base / "log", base / "other"
        with EventLog(log) as created:
            created.append({"n": 0})
        other.mkdir()
        for folder, _, files in os.walk(base):
            os.chown(folder, uid, uid)
            for name in files:
                os.chown(os.path.join(folder, name), uid, uid)
        yield Exhausted(uid, limit, log, other)
    finally:
        shutil.rmtree(base)


# Runs as the spare uid (switched by subprocess before exec, as systemd's User= does: the exec
# keeps the process dumpable, so the user's own `eventpipe status` can read its fds). Opens
# inotify instances until the kernel says EMFILE, then reports what notifiers do as JSON on
# one line, and keeps its instances until told on stdin.
EXHAUST = r"""
import ctypes, dataclasses, json, logging, os, resource, subprocess, sys
from watchdog.observers import inotify_c

log, other, mode, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, limit + 64), hard))

from eventpipe._inotify import inotify_usage
from eventpipe._changes import ChangeNotifier

warnings = []

class Keep(logging.Handler):
    def emit(self, record):
        warnings.append({"logger": record.name, "level": record.levelname,
                         "message": record.getMessage()})

logging.getLogger("eventpipe").addHandler(Keep(logging.WARNING))

fds = []
while True:
    fd = inotify_c.inotify_init()
    if fd < 0:
        err = ctypes.get_errno()
        break
    fds.append(fd)
out = {"uid": os.geteuid(), "created": len(fds), "errno": err}

def head_wakes(n):
    fd = os.open(os.path.join(log, "head"), os.O_RDWR)
    os.pwrite(fd, os.pread(fd, 8, 0), 0)  # the same bytes: a change for inotify only
    os.close(fd)
    return n.wait(5.0)

def status():
    run = [sys.executable, "-m", "eventpipe", "status"]
    doc = json.loads(subprocess.run(run + ["--json", log], check=True,
                                    capture_output=True).stdout)
    text = subprocess.run(run + [log], check=True, capture_output=True, text=True).stdout
    return doc["inotify"], text

if mode == "fallback":
    n = ChangeNotifier(log, poll_interval=0.25)
    n.start()
    n.start()  # idempotent: still one warning
    out.update(watching=n.watching, reason=n.fallback_reason, warnings=list(warnings))
    n.wake()
    out["woken"] = n.wait(5.0)
    out["quiet"] = n.wait(0.05)  # a plain timed wait now
    n.close()
    del warnings[:]
    with ChangeNotifier(log) as m:  # no poll interval known to it
        out.update(second_watching=m.watching, second_warnings=list(warnings))
    out["usage"] = dataclasses.asdict(inotify_usage())
    out["status"], out["status_text"] = status()
else:  # "share": free one instance; every notifier of this process shares it
    os.close(fds.pop())
    notifiers = [ChangeNotifier(log), ChangeNotifier(log), ChangeNotifier(other, "x")]
    for n in notifiers:
        n.start()
    out["watching"] = [n.watching for n in notifiers]
    out["reasons"] = [n.fallback_reason for n in notifiers]
    out["hinted"] = [head_wakes(n) for n in notifiers[:2]]
    out["warnings"] = list(warnings)
    out["usage"] = dataclasses.asdict(inotify_usage())
    out["status"], out["status_text"] = status()
print(json.dumps(out), flush=True)
sys.stdin.readline()  # hold the instances while the parent counts them
if mode == "share":
    for n in notifiers:
        n.close()
"""


def run_exhausted(children: Children, ex: Exhausted, mode: str,
                  check: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Run EXHAUST as ``ex.uid``; ``check`` its report while it still holds its instances."""
    proc = children.popen(
        [sys.executable, "-c", EXHAUST, str(ex.log), str(ex.other), mode, str(ex.limit)],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
        user=ex.uid, group=ex.uid, extra_groups=[])
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"child failed: {err.decode()}")
    report: dict[str, Any] = json.loads(line)
    try:
        check(report)
    finally:
        _, err = proc.communicate(b"\n", timeout=60)
    assert proc.returncode == 0, err.decode()
    return report


def test_no_instance_left_falls_back_with_one_warning_and_status_says_so(
        children: Children, exhausted: Exhausted) -> None:
    ex = exhausted

    def while_held(report: dict[str, Any]) -> None:
        # root sees the spare uid at its limit too.
        usage = inotify_usage(ex.uid)
        assert usage.instances_in_use >= ex.limit, usage
        assert usage.max_user_instances == ex.limit
        assert usage.warning is not None and "fall back to polling" in usage.warning

    report = run_exhausted(children, ex, "fallback", while_held)
    assert report["uid"] == ex.uid
    assert report["errno"] == errno.EMFILE
    assert report["created"] == ex.limit  # the uid had none before: it is a spare one

    # It falls back, and still works as a timed wait that wake() cuts short.
    assert report["watching"] is False
    assert report["woken"] is True and report["quiet"] is False
    reason = report["reason"]
    assert f"uid {ex.uid}" in reason and "inotify instances" in reason
    assert f"fs.inotify.max_user_instances = {ex.limit}" in reason

    # One warning for two start() calls, saying what, the cost, and the fix with the value.
    [warning] = report["warnings"]
    assert warning["level"] == "WARNING" and warning["logger"] == "eventpipe.notify"
    message = warning["message"]
    assert str(ex.log / "head") in message
    assert reason in message
    assert "polling every 0.25 s" in message
    assert f"sysctl -w fs.inotify.max_user_instances={max(1024, 2 * ex.limit)}" in message
    assert "/etc/sysctl.d/" in message
    # A notifier that was not told its poll interval says so in general terms.
    assert report["second_watching"] is False
    [second] = report["second_warnings"]
    assert "polling at its poll interval" in second["message"]

    # The user's own count, in process and through `eventpipe status`.
    usage = report["usage"]
    assert usage["uid"] == ex.uid
    assert usage["instances_in_use"] >= usage["max_user_instances"] == ex.limit
    status = report["status"]
    assert status["instances_in_use"] >= ex.limit == status["max_user_instances"]
    assert status["unreadable_processes"] == 0
    assert "at the limit" in status["warning"] and "fall back to polling" in status["warning"]
    text = report["status_text"]
    assert f"of {ex.limit} instances in use by uid {ex.uid}" in text
    assert "WARNING    " in text and "fs.inotify.max_user_instances" in text


def test_one_free_instance_serves_every_notifier_of_the_process(
        children: Children, exhausted: Exhausted) -> None:
    ex = exhausted

    def while_held(report: dict[str, Any]) -> None:
        # limit - 1 left by the child, plus the one its three notifiers share.
        assert inotify_usage(ex.uid).instances_in_use == ex.limit

    report = run_exhausted(children, ex, "share", while_held)
    assert report["created"] == ex.limit
    assert report["watching"] == [True, True, True], report["reasons"]
    assert report["hinted"] == [True, True]
    assert report["warnings"] == []
    assert report["usage"]["instances_in_use"] == ex.limit
    assert report["status"]["warning"] is not None


# --------------------------------------------------------------------------------------------
# The shared instance, in this process
# --------------------------------------------------------------------------------------------


def test_notifiers_share_one_instance_and_one_thread(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    fds_before, threads_before = own_inotify_fds(), set(threading.enumerate())
    n1, n2, n3 = ChangeNotifier(a), ChangeNotifier(a), ChangeNotifier(b)
    try:
        for n in (n1, n2, n3):
            n.start()
            assert n.watching, n.fallback_reason
        assert own_inotify_fds() == fds_before + 1
        assert len(new_threads(threads_before)) == 1
        # One watch on a, refcounted: both of its notifiers are woken, b's is not.
        pwrite(a / "head")
        assert n1.wait(HINT_TIMEOUT) and n2.wait(HINT_TIMEOUT)
        assert n3.wait(0.2) is False
        # Closing one of a's notifiers leaves a watched for the other.
        n1.close()
        pwrite(a / "head")
        assert n2.wait(HINT_TIMEOUT) is True
        # Deleting b ends b's notifier only.
        shutil.rmtree(b)
        until(lambda: not n3.watching)
        assert n2.watching
        pwrite(a / "head")
        assert n2.wait(HINT_TIMEOUT) is True
    finally:
        for n in (n1, n2, n3):
            n.close()
    # The last close stops the reader and closes the instance.
    assert own_inotify_fds() == fds_before
    assert new_threads(threads_before) == set()
    # And a later notifier starts afresh.
    with ChangeNotifier(a) as again:
        assert again.watching
        pwrite(a / "head")
        assert again.wait(HINT_TIMEOUT) is True
    assert own_inotify_fds() == fds_before


# The parent watches its folder; a forked child closes the inherited notifier and uses one of
# its own on another folder. Prints what both saw.
FORK = r"""
import json, os, sys, time
from eventpipe._changes import ChangeNotifier

mine, theirs = sys.argv[1], sys.argv[2]

def inotify_fds():
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        except OSError:
            pass  # the fd listdir used
    return count

def change(folder):
    with open(os.path.join(folder, "head"), "r+b") as f:
        f.write(b"x")

n = ChangeNotifier(mine)
n.start()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    out = {"inherited_watching": n.watching, "inherited_fds": inotify_fds()}
    n.close()
    with ChangeNotifier(theirs) as own:
        out["own_watching"] = own.watching
        change(theirs)
        out["own_hinted"] = own.wait(5.0)
    out["fds_after"] = inotify_fds()
    os.write(w, json.dumps(out).encode())
    os._exit(0)
os.close(w)
_, status = os.waitpid(pid, 0)
child = json.loads(os.read(r, 65536))
out = {"child": child, "status": status, "watching": n.watching, "early_hint": n.wait(0)}
change(mine)
out["hinted"] = n.wait(5.0)
n.close()
print(json.dumps(out))
"""


def test_a_forked_child_neither_uses_nor_disturbs_the_parents_instance(
        tmp_path: Path) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    for folder in (mine, theirs):
        folder.mkdir()
        (folder / "head").write_bytes(bytes(8))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", FORK, str(mine), str(theirs)], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    child = report["child"]
    # The child has no reader thread of its parent's, nor its fd.
    assert child["inherited_watching"] is False
    assert child["inherited_fds"] == 0
    assert child["own_watching"] is True and child["own_hinted"] is True
    assert child["fds_after"] == 0
    assert report["status"] == 0
    # Closing the inherited notifier in the child left the parent's watch alone.
    assert report["watching"] is True
    assert report["early_hint"] is False
    assert report["hinted"] is True


# --------------------------------------------------------------------------------------------
# Other fallbacks, and the status fields
# --------------------------------------------------------------------------------------------


def test_other_fallbacks_warn_once_with_a_readable_reason(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="eventpipe")
    with ChangeNotifier(tmp_path, notifications=False) as chosen:
        assert chosen.fallback_reason == "notifications=False"
    assert caplog.records == []  # polling on purpose is nothing to warn about

    missing = tmp_path / "missing"
    with ChangeNotifier(missing, poll_interval=2) as n:
        n.start()
        assert n.watching is False
        assert n.fallback_reason == (
            f"{missing}: inotify_add_watch: No such file or directory (ENOENT)")
    [record] = caplog.records
    assert (record.name, record.levelno) == ("eventpipe.notify", logging.WARNING)
    message = record.getMessage()
    assert n.fallback_reason in message and "polling every 2 s" in message
    assert "sysctl" not in message  # no limit to raise for this one


def test_watch_limit_is_explained_with_the_current_value() -> None:
    # Reaching max_user_watches for real takes about that many inodes (192k here), so the
    # explanation of ENOSPC is checked on the error inotify_add_watch gives.
    current = int(Path("/proc/sys/fs/inotify/max_user_watches").read_text())
    reason, remedy = explain_failure(
        OSError(errno.ENOSPC, "inotify_add_watch: No space left"), "/d")
    assert f"fs.inotify.max_user_watches = {current}" in reason
    assert remedy is not None
    assert f"sysctl -w fs.inotify.max_user_watches={max(524288, 2 * current)}" in remedy


def test_status_json_and_text_show_inotify_capacity(log_path: Path) -> None:
    with EventLog(log_path) as log:
        log.append({"n": 1})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = [sys.executable, "-m", "eventpipe", "status"]
    with ChangeNotifier(log_path):  # one instance of ours, at least, is in use
        doc = json.loads(subprocess.run([*run, "--json", str(log_path)], env=env, check=True,
                                        capture_output=True).stdout)
        text = subprocess.run([*run, str(log_path)], env=env, check=True, capture_output=True,
                              text=True).stdout
    inotify = doc["inotify"]
    assert set(inotify) == {"uid", "instances_in_use", "max_user_instances", "watches_in_use",
                            "max_user_watches", "unreadable_processes", "warning"}
    assert inotify["uid"] == os.geteuid()
    assert inotify["instances_in_use"] >= 1 and inotify["watches_in_use"] >= 1
    assert inotify["max_user_instances"] == max_user_instances()
    assert (inotify["warning"] is None) == (
        inotify["instances_in_use"] < 0.9 * inotify["max_user_instances"])
    # Other processes of this user may open or close instances between the two runs.
    assert re.search(rf"^inotify    \d+ of {inotify['max_user_instances']:,} instances in use "
                     rf"by uid {os.geteuid()} \([\d,]+ of [\d,]+ watches\)$", text, re.M)
