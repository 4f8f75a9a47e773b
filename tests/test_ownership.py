"""Issue 15's ownership rule and layout check, with real processes of real users.

Root (CI runs as root) and unprivileged uids without passwd entries (61234 and up, run with
``subprocess``'s ``user=``/``group=``, that is setresuid and setresgid in the child):

- ``eventpipe`` commands run by root on a log another user owns become that user first;
- the library, as root, refuses such a log unless ``trust_owner``;
- a root-owned log is root's as before;
- two users of one group share one log (the deployment README describes);
- ``eventpipe verify`` names links, hard links, foreign owners, world-writable folders.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventpipe import ConfigError, EventLog, LogConfig, UnsafePathError
from eventpipe._ownership import check_owner, drop_to_owner

from .conftest import ROOT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")

OWNER = 61234  # owns the log in most tests
ALICE, BOB, SHARED_GID = 61235, 61236, 61300  # two users of one group
STRANGER = 61299  # neither owner nor in the group

HANDLER = """\
import os

def handle(state, event, offset):
    # Runs in the consumer: who is it, and can it read a root-only file?
    seen = None
    if "secret" in event:
        try:
            with open(event["secret"], "rb"):
                seen = "read"
        except PermissionError:
            seen = "denied"
    return [*(state or []), {"uids": list(os.getresuid()), "gids": list(os.getresgid()),
                             "groups": os.getgroups(), "secret": seen}]
"""


@pytest.fixture
def base() -> Iterator[Path]:
    """A folder every uid may enter (pytest's tmp_path is root's alone: 0700)."""
    path = Path(tempfile.mkdtemp(prefix="eventpipe-owner-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def run(*args: str | Path, uid: int | None = None, gid: int | None = None,
        stdin: bytes = b"", env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[bytes]:
    """``python -m eventpipe ARGS`` as ``uid``/``gid`` (no supplementary groups), or as root."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EVENTPIPE_")}
    environ["PYTHONPATH"] = str(ROOT)
    environ.update(env or {})
    if uid is not None and gid is None:
        gid = uid
    return subprocess.run(
        [sys.executable, "-m", "eventpipe", *map(str, args)], input=stdin,
        capture_output=True, timeout=120, cwd="/", env=environ, check=False,
        user=uid, group=gid, extra_groups=None if uid is None else [])


def events(*ns: int, **extra: str) -> bytes:
    return b"".join(json.dumps({"n": n, **extra}).encode() + b"\n" for n in ns)


def owners(path: Path) -> dict[str, tuple[int, int]]:
    """(uid, gid) of the folder and of everything in it, by relative path."""
    found = {".": (path.stat().st_uid, path.stat().st_gid)}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            found[str(p.relative_to(path))] = (st.st_uid, st.st_gid)
    return found


def snapshot(path: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Mode, owner and content of everything under ``path``."""
    seen: dict[str, tuple[int, int, bytes | None]] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
            seen[str(p)] = (st.st_mode, st.st_uid, data)
    return seen


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr.decode())
    return proc.stderr.decode()


@pytest.fixture
def owned_log(base: Path) -> Path:
    """A log created by uid OWNER (one event), in a folder OWNER owns."""
    home = base / "owner"
    home.mkdir()
    os.chown(home, OWNER, OWNER)
    log = home / "log"
    ok(run("append", log, uid=OWNER, stdin=events(0)))
    assert set(owners(log).values()) == {(OWNER, OWNER)}
    return log


# ------------------------------------------------------------------------- the CLI drops


def test_root_append_runs_as_the_owner(owned_log: Path) -> None:
    proc = run("append", owned_log, stdin=events(1, 2, 3),
               env={"EVENTPIPE_SEGMENT_MAX_EVENTS": "1"})  # new segment files: created now
    err = ok(proc)
    assert proc.stdout == b"1\n2\n3\n"
    assert err.count(f"running as uid {OWNER} and gid {OWNER}, the owner of {owned_log}") == 1
    tree = owners(owned_log)
    assert len([n for n in tree if n.startswith("segments/")]) >= 4
    assert set(tree.values()) == {(OWNER, OWNER)}, tree
    # The owner goes on using it: nothing in it became root's.
    ok(run("append", owned_log, uid=OWNER, stdin=events(4)))
    out = run("read", owned_log, uid=OWNER)
    ok(out)
    assert [json.loads(line)["n"] for line in out.stdout.splitlines()] == [0, 1, 2, 3, 4]


def test_root_consume_compress_prune_run_as_the_owner(owned_log: Path, base: Path) -> None:
    secret = base / "root-only"
    secret.write_bytes(b"root's\n")
    secret.chmod(0o600)
    handler = base / "handler.py"
    handler.write_text(HANDLER)
    handler.chmod(0o644)
    ok(run("append", owned_log, uid=OWNER, env={"EVENTPIPE_SEGMENT_MAX_EVENTS": "1"},
           stdin=events(1, 2, secret=str(secret))))
    proc = run("consume", owned_log, "--name", "c", "--handler", f"{handler}:handle",
               "--catch-up", "--print-state")
    err = ok(proc)
    assert f"running as uid {OWNER}" in err
    state = json.loads(proc.stdout)
    # Real, effective and saved ids are the owner's, root's groups are gone, and the
    # handler (events 1 and 2 carry the path of a root-only file) may not read root's files.
    me = {"uids": [OWNER] * 3, "gids": [OWNER] * 3, "groups": [OWNER]}
    assert state == [{**me, "secret": None}, {**me, "secret": "denied"},
                     {**me, "secret": "denied"}]
    ok(run("compress", owned_log))
    ok(run("prune", owned_log, "--before", "1"))
    ok(run("status", owned_log))
    assert (owned_log / "consumers" / "c.json").exists()
    assert set(owners(owned_log).values()) == {(OWNER, OWNER)}, owners(owned_log)


def test_root_append_where_the_log_does_not_exist_yet(base: Path) -> None:
    home = base / "owner"
    home.mkdir()
    os.chown(home, OWNER, OWNER)
    log = home / "new" / "log"
    err = ok(run("append", log, stdin=events(0)))
    assert f"the owner of {home} (where {log} would be created)" in err
    assert set(owners(home).values()) == {(OWNER, OWNER)}


def test_a_link_planted_by_the_owner_reaches_nothing_of_roots(owned_log: Path,
                                                              base: Path) -> None:
    # Whatever the library does with links, the command works as the owner: a link to a
    # root-only file is a link to a file the process may not open.
    victims = base / "victims"
    victims.mkdir(mode=0o700)
    victim = victims / "shadow"
    victim.write_bytes(b"root:$6$...:19000::::::\n" * 4)
    victim.chmod(0o600)
    before = snapshot(victims)
    head = owned_log / "head"
    head.unlink()
    head.symlink_to(victim)
    os.lchown(head, OWNER, OWNER)
    proc = run("append", owned_log, stdin=events(1))
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert str(head) in proc.stderr.decode()
    assert snapshot(victims) == before


def test_a_link_on_the_way_decides_who_runs(owned_log: Path, base: Path) -> None:
    # A link root made (the operator's) to the owner's log: the owner's log, as the owner.
    alias = base / "ops-alias"
    alias.symlink_to(owned_log)
    err = ok(run("append", alias, stdin=events(1)))
    assert f"running as uid {OWNER} and gid {OWNER}, the owner of {alias};" in err
    assert "the link" not in err
    # A link the owner made, to a log of root's: it goes there with the owner's rights only.
    rootlog = base / "private" / "rootlog"
    ok(run("append", rootlog, stdin=events(0)))
    (base / "private").chmod(0o700)
    before = snapshot(base / "private")
    planted = owned_log.parent / "redirect"
    planted.symlink_to(rootlog)
    os.lchown(planted, OWNER, OWNER)
    proc = run("append", planted, stdin=events(1))
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert f"the owner of the link {planted} on the way to {planted}" in proc.stderr.decode()
    assert snapshot(base / "private") == before


def test_root_commands_on_roots_own_log_stay_root(base: Path) -> None:
    log = base / "rootlog"
    err = ok(run("append", log, stdin=events(0, 1)))
    assert "running as" not in err
    assert set(owners(log).values()) == {(0, 0)}
    with EventLog(log) as opened:  # the library, as root, on root's log
        assert opened.head == 2


def test_drop_refuses_a_folder_of_group_root_without_another_group(base: Path) -> None:
    home = base / "owner"
    home.mkdir()
    os.chown(home, OWNER, 0)  # OWNER has no passwd entry, so no primary group to take
    proc = run("append", home / "log", stdin=events(0))
    assert proc.returncode == 3
    assert "group root" in proc.stderr.decode() and str(home) in proc.stderr.decode()
    assert list(home.iterdir()) == []


def test_drop_to_owner_does_nothing_for_root_owned_folders(base: Path) -> None:
    assert drop_to_owner(base) is None  # in this (root) process: nothing changed
    assert os.geteuid() == 0


# ------------------------------------------------------------------- the library refuses


def test_check_owner_refuses_root_on_a_foreign_folder(owned_log: Path) -> None:
    st = os.stat(owned_log)
    with pytest.raises(UnsafePathError) as exc:
        check_owner(st, str(owned_log), trust=False)
    assert exc.value.path == str(owned_log)
    assert f"owned by uid {OWNER}" in str(exc.value)
    assert isinstance(exc.value, PermissionError)
    check_owner(st, str(owned_log), trust=True)
    check_owner(os.stat(owned_log.parent.parent), str(owned_log.parent.parent), trust=False)
    # Not root: never refused (users of one group share logs one of them made).
    code = ("import os, sys; from eventpipe._ownership import check_owner; "
            "check_owner(os.stat(sys.argv[1]), sys.argv[1], trust=False); print('fine')")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, str(owned_log)], user=STRANGER,
                          group=STRANGER, extra_groups=[], capture_output=True, env=env,
                          timeout=60, cwd="/", check=False)
    assert proc.stdout == b"fine\n", proc.stderr


def test_eventlog_as_root_refuses_a_log_another_user_owns(
        owned_log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(owned_log)
    with pytest.raises(UnsafePathError) as exc:
        EventLog(owned_log)
    assert exc.value.path == str(owned_log) and f"uid {OWNER}" in str(exc.value)
    with pytest.raises(UnsafePathError):
        EventLog(owned_log, create=False)
    assert snapshot(owned_log) == before  # refused before anything was read or written
    with EventLog(owned_log, trust_owner=True) as log:
        assert [r.event["n"] for r in log.read()] == [0]
    monkeypatch.setenv("EVENTPIPE_TRUST_OWNER", "1")
    with EventLog(owned_log) as log:
        assert log.config.trust_owner is True and log.head == 1


def test_trust_owner_option_parses_as_a_boolean(monkeypatch: pytest.MonkeyPatch) -> None:
    assert LogConfig.from_options({}).trust_owner is False
    assert LogConfig.from_options({}, {"EVENTPIPE_TRUST_OWNER": "yes"}).trust_owner is True
    assert LogConfig.from_options({"trust_owner": True}).trust_owner is True
    with pytest.raises(ConfigError, match="EVENTPIPE_TRUST_OWNER"):
        LogConfig.from_options({}, {"EVENTPIPE_TRUST_OWNER": "maybe"})
    with pytest.raises(ConfigError, match="trust_owner"):
        LogConfig.from_options({"trust_owner": 1})


def test_default_modes_are_owner_write_group_read(base: Path) -> None:
    old = os.umask(0)  # modes are exact, whatever the umask
    try:
        with EventLog(base / "log", segment_max_events=1) as log:
            log.append_many([{"n": 0}, {"n": 1}])
            log.compress()
    finally:
        os.umask(old)
    for dirpath, _dirnames, filenames in os.walk(base / "log"):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o750, dirpath
        for name in filenames:
            p = Path(dirpath, name)
            assert stat.S_IMODE(p.stat().st_mode) == 0o640, p
    assert stat.S_IMODE((base / "log" / "head").stat().st_mode) == 0o640


# ----------------------------------------------------------------- the group-shared log


def test_two_users_of_one_group_share_a_log(base: Path) -> None:
    shared = base / "shared"
    shared.mkdir()
    os.chown(shared, ALICE, SHARED_GID)
    shared.chmod(0o2770)
    log = shared / "orders"
    mode = {"EVENTPIPE_FILE_MODE": "0660", "EVENTPIPE_SEGMENT_MAX_EVENTS": "3"}
    handler = base / "count.py"
    handler.write_text("def handle(state, event, offset):\n    return (state or 0) + 1\n")
    handler.chmod(0o644)

    def member(uid: int, *args: str | Path, stdin: bytes = b"",
               ) -> subprocess.CompletedProcess[bytes]:
        return run(*args, uid=uid, gid=SHARED_GID, env=mode, stdin=stdin)

    ok(member(ALICE, "append", log, stdin=events(0, 1, 2, 3)))
    ok(member(BOB, "append", log, stdin=events(4, 5, 6)))
    for uid, name in ((ALICE, "a"), (BOB, "b"), (BOB, "a")):
        proc = member(uid, "consume", log, "--name", name, "--handler", f"{handler}:handle",
                      "--catch-up", "--print-state")
        ok(proc)
        assert json.loads(proc.stdout) == 7  # bob resumes alice's "a" from its checkpoint
    ok(member(ALICE, "append", log, stdin=events(7)))
    ok(member(BOB, "compress", log))
    out = member(BOB, "read", log)
    ok(out)
    assert [json.loads(line)["n"] for line in out.stdout.splitlines()] == list(range(8))
    tree = owners(log)
    assert {uid for uid, _ in tree.values()} == {ALICE, BOB}
    assert {gid for _, gid in tree.values()} == {SHARED_GID}
    # Root works in it as alice, its owner, in the group: bob can still use what it made.
    err = ok(run("append", log, stdin=events(8), env=mode))
    assert f"running as uid {ALICE} and gid {SHARED_GID}" in err
    ok(member(BOB, "append", log, stdin=events(9)))
    # A member's files are no foreign owner's: verify finds nothing wrong.
    proc = run("verify", log, "--json", env=mode)
    ok(proc)
    doc = json.loads(proc.stdout)
    assert (doc["ok"], doc["problems"], doc["warnings"], doc["events"]) == (True, [], [], 10)


# ---------------------------------------------------------------------- verify's layout


def test_verify_a_clean_log(owned_log: Path) -> None:
    proc = run("verify", owned_log)
    assert "ok" in ok(proc) and proc.stdout == b""
    doc = json.loads(run("verify", owned_log, "--json").stdout)
    assert (doc["ok"], doc["problems"], doc["warnings"]) == (True, [], [])


def test_verify_names_links_hard_links_foreign_owners_and_open_folders(
        owned_log: Path, base: Path) -> None:
    outside = base / "outside"
    outside.mkdir()
    (outside / "file").write_bytes(b"elsewhere\n")
    planted = {
        "symlink": owned_log / "segments" / "00000000000000000099.jsonl",
        "hardlink": owned_log / "writer.lock",
        "world_writable": owned_log / "segments",
        "foreign_owner": owned_log / "stray",
        "special_file": owned_log / "fifo",
        "setuid": owned_log / "tool",
    }
    planted["symlink"].symlink_to(outside / "file")
    os.link(planted["hardlink"], outside / "writer.lock.alias")
    planted["world_writable"].chmod(0o777)
    planted["foreign_owner"].write_bytes(b"")
    os.chown(planted["foreign_owner"], STRANGER, STRANGER)
    planted["foreign_owner"].chmod(0o640)
    os.mkfifo(planted["special_file"], 0o640)
    planted["setuid"].write_bytes(b"#!/bin/sh\n")
    planted["setuid"].chmod(0o4740)
    proc = run("verify", owned_log, "--json")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False
    found = {(p["kind"], p["path"]) for p in doc["problems"]}
    for kind, path in planted.items():
        assert (kind, str(path)) in found, (kind, doc["problems"])
    assert {kind for kind, _ in found} == set(planted)
    # The segments folder also gives more than the log's mode: a warning, with its path.
    assert [(w["kind"], w["path"]) for w in doc["warnings"]] == [
        ("mode", str(planted["world_writable"]))]
    # Text: one line per problem, each naming its path.
    text = run("verify", owned_log)
    assert text.returncode == 1
    lines = text.stdout.decode().splitlines()
    for path in planted.values():
        assert any(line.startswith(f"{path}:") for line in lines), (path, lines)
    assert "6 problem(s), 1 warning(s)" in text.stderr.decode()


def test_verify_reads_nothing_through_a_link(base: Path) -> None:
    # The active segment and the header replaced by links to FIFOs outside the log: opening
    # either through the link would block verify for good (nothing ever writes to them).
    log = base / "log"
    ok(run("append", log, stdin=events(0, 1)))
    for name in ("head", "segments/00000000000000000000.jsonl"):
        original = (log / name).read_bytes()
        fifo = base / name.replace("/", "-")
        os.mkfifo(fifo)
        (log / name).unlink()
        (log / name).symlink_to(fifo)
        proc = run("verify", log, "--json")
        assert proc.returncode == 1, proc.stderr
        problems = json.loads(proc.stdout)["problems"]
        assert {"kind": "symlink", "path": str(log / name)}.items() <= problems[0].items()
        assert any("refusing to follow" in p["problem"] for p in problems[1:]), problems
        (log / name).unlink()
        (log / name).write_bytes(original)
    ok(run("verify", log))
