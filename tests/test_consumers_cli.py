"""Managing consumers from the command line (issue 11): ``consumers`` lists them, ``consumer
show`` prints one, ``consumer reset`` moves its checkpoint (refused while the name is held; the
state must be given or knowingly kept), ``consumer delete`` removes it, and a new consumer can
start at the latest offset or a given one (``start``, ``EVENTPIPE_START``).

Running consumers are real processes (``python -m eventpipe consume``); the commands under test
run in this process through ``main([...])``, exit codes checked against README's table.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from eventpipe import Consumer, EventLog
from eventpipe._registry import registration_path
from eventpipe._status import log_status

from ._main import Cli
from ._wait import wait_until
from .conftest import ROOT, Children

COUNTER = str(ROOT / "examples" / "counter_consumer.py") + ":handle"
SEG = 10  # events per segment


@pytest.fixture(autouse=True)
def _plain_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTPIPE_COMPRESSION", "none")  # children inherit it


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def consume(log: Path, name: str, *args: str | Path, **env: str) -> Any:
    """Run the counter consumer as a real process until caught up; its final state."""
    proc = subprocess.run([sys.executable, "-m", "eventpipe", "consume", str(log), "--name",
                           name, "--handler", COUNTER, "--catch-up", "--print-state",
                           *map(str, args)],
                          capture_output=True, timeout=120, env=_env(**env), check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def running(children: Children, log: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    """A consumer following the log in a child process (``--standby`` in ``args`` for one
    that waits for the name)."""
    return children.popen([sys.executable, "-m", "eventpipe", "consume", str(log), "--name",
                           name, "--handler", COUNTER, "--poll-interval", "0.05", *args],
                          stderr=subprocess.PIPE, env=_env())


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def append(log: Path, count: int) -> None:
    with EventLog(log, segment_max_events=SEG, sync="none") as lg:
        first = lg.head
        lg.append_many([{"i": i, "type": "t"} for i in range(first, first + count)])


def entry(cli: Cli, log: Path, name: str) -> dict[str, Any]:
    r = cli("consumers", log, "--json")
    assert r.code == 0, r.err
    [found] = [c for c in r.json()["consumers"] if c["name"] == name]
    return dict(found)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def holding(cli: Cli, log: Path, name: str, pid: int) -> None:
    wait_until(lambda: (log / "consumers" / f"{name}.json").exists()
               and entry(cli, log, name)["running_pid"] == pid,
               what=f"pid {pid} to hold consumer {name!r}", timeout=60)


# ----------------------------------------------------------------------------- consumers


def test_consumers_lists_offset_lag_state_checkpoint_pid_standbys_and_errors(
        cli: Cli, log_path: Path, tmp_path: Path, children: Children) -> None:
    append(log_path, 30)
    consume(log_path, "done")
    consume(log_path, "ext", "--checkpoint-dir", tmp_path / "elsewhere")
    append(log_path, 5)
    (log_path / "consumers" / "broken.json").write_text('{"format": "nope"}')
    live = running(children, log_path, "live")
    holding(cli, log_path, "live", live.pid)
    standby = running(children, log_path, "live", "--standby")
    wait_until(lambda: entry(cli, log_path, "live")["standby_pids"] == [standby.pid],
               what="the standby to be seen", timeout=60)

    doc = cli("consumers", log_path, "--json").json()
    assert doc["head"] == 35
    by_name = {c["name"]: c for c in doc["consumers"]}
    assert set(by_name) == {"done", "ext", "broken", "live"}
    done = by_name["done"]
    state = json.loads((log_path / "consumers" / "done.json").read_bytes())["state"]
    assert (done["offset"], done["lag"], done["external"]) == (30, 5, False)
    assert done["state_bytes"] == len(json.dumps(state, separators=(",", ":")))
    assert 0 <= done["checkpoint_age_seconds"] < 600 and done["last_checkpoint"] > 0
    assert (done["running_pid"], done["standby_pids"], done["error"]) == (None, [], None)
    ext = by_name["ext"]
    assert ext["external"] and ext["offset"] == 30 and ext["lag"] == 5
    assert ext["checkpoint"] == str(tmp_path / "elsewhere" / "ext.json")
    assert ext["registration"] == registration_path(str(log_path), "ext", ext["checkpoint"])
    broken = by_name["broken"]
    assert broken["offset"] is None and "corrupt" in broken["error"]
    assert broken["holds_retention_from"] == 0
    assert by_name["live"]["running_pid"] == live.pid
    assert by_name["live"]["standby_pids"] == [standby.pid]

    text = cli("consumers", log_path)
    assert text.code == 0
    [line] = [ln for ln in text.out.splitlines() if ln.startswith("live ")]
    assert str(live.pid) in line and str(standby.pid) in line
    assert "ERROR" in text.out and "corrupt" in text.out
    assert f"external checkpoint {ext['checkpoint']}" in text.out
    stop(live)
    stop(standby)


def test_consumers_of_a_missing_log_exit_3_and_of_an_empty_one_list_none(
        cli: Cli, log_path: Path, tmp_path: Path) -> None:
    r = cli("consumers", tmp_path / "nothing")
    assert r.code == 3 and not (tmp_path / "nothing").exists()
    append(log_path, 1)
    r = cli("consumers", log_path)
    assert r.code == 0 and "no consumers" in r.out
    assert cli("consumers", log_path, "--json").json()["consumers"] == []


# -------------------------------------------------------------------------------- show


def test_show_prints_the_state_and_checkpoint_facts(cli: Cli, log_path: Path) -> None:
    append(log_path, 12)
    consume(log_path, "c")
    r = cli("consumer", "show", log_path, "c", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["state"] == {"events": 12, "by_type": {"t": 12}, "last_offset": 11}
    assert (doc["offset"], doc["lag"], doc["head"], doc["first_offset"]) == (12, 0, 12, 0)
    assert doc["segment"] == 10 and doc["position"] > 0 and isinstance(doc["fingerprint"], int)
    assert doc["version"] == 2 and doc["running_pid"] is None
    text = cli("consumer", "show", log_path, "c")
    assert text.code == 0
    assert "offset" in text.out and '"last_offset": 11' in text.out
    r = cli("consumer", "show", log_path, "nobody")
    assert r.code == 1 and "no consumer 'nobody'" in r.err
    r = cli("consumer", "show", log_path, "../x")
    assert r.code == 2 and "invalid" in r.err


def test_one_name_in_two_folders_needs_checkpoint_to_choose(
        cli: Cli, log_path: Path, tmp_path: Path) -> None:
    append(log_path, 3)
    consume(log_path, "twice")
    consume(log_path, "twice", "--checkpoint-dir", tmp_path / "b")
    r = cli("consumer", "show", log_path, "twice")
    assert r.code == 2 and "--checkpoint" in r.err
    r = cli("consumer", "show", log_path, "twice", "--checkpoint", tmp_path / "b" / "twice.json",
            "--json")
    assert r.code == 0 and r.json()["external"] is True


# ------------------------------------------------------------------------------- reset


def test_reset_and_delete_are_refused_while_the_name_is_held_then_done(
        cli: Cli, log_path: Path, children: Children) -> None:
    append(log_path, 30)
    live = running(children, log_path, "c")
    holding(cli, log_path, "c", live.pid)
    wait_until(lambda: entry(cli, log_path, "c")["offset"] == 30, what="the catch-up")
    before = snapshot(log_path / "consumers")
    fresh = '{"events": 0, "by_type": {}, "last_offset": 19}'
    r = cli("consumer", "reset", log_path, "c", "--to-offset", "20", "--state", fresh)
    assert r.code == 3 and "is running" in r.err and f"pid {live.pid}" in r.err, r.err
    assert "nothing was reset" in r.err
    r = cli("consumer", "reset", log_path, "c", "--to-offset", "20", "--state", fresh,
            "--dry-run")
    assert r.code == 3 and f"pid {live.pid}" in r.err
    r = cli("consumer", "delete", log_path, "c")
    assert r.code == 3 and "nothing was deleted" in r.err
    assert snapshot(log_path / "consumers") == before
    stop(live)

    r = cli("consumer", "reset", log_path, "c", "--to-offset", "20", "--state", fresh)
    assert r.code == 0, r.err
    assert "offset 30 -> offset 20" in r.out
    shown = cli("consumer", "show", log_path, "c", "--json").json()
    assert (shown["offset"], shown["state"]["events"]) == (20, 0)
    # A real consumer resumes at 20 with the state given (it checks the event at 19 as after
    # any checkpoint), and handles 20..29 once each.
    state = consume(log_path, "c")
    assert state == {"events": 10, "by_type": {"t": 10}, "last_offset": 29}
    assert cli("verify", log_path).code == 0

    r = cli("consumer", "delete", log_path, "c")
    assert r.code == 0, r.err
    assert not any(p.name.startswith("c.") for p in (log_path / "consumers").iterdir())
    assert cli("consumers", log_path, "--json").json()["consumers"] == []
    assert consume(log_path, "c")["events"] == 30  # begins afresh


def test_dry_run_says_what_would_change_and_writes_nothing(cli: Cli, log_path: Path) -> None:
    append(log_path, 15)
    consume(log_path, "c")
    before = snapshot(log_path / "consumers")
    r = cli("consumer", "reset", log_path, "c", "--to-latest", "--keep-state", "--dry-run")
    assert r.code == 0, r.err
    assert "would reset consumer c: offset 15 -> offset 15" in r.out
    r = cli("consumer", "reset", log_path, "c", "--to-earliest", "--state", "null", "--dry-run")
    assert r.code == 0 and "offset 15 -> offset 0 (state replaced" in r.out
    assert "nothing was written" in r.out
    assert snapshot(log_path / "consumers") == before  # not even a lock or owner file


def test_a_reset_that_moves_the_offset_needs_the_state_or_keep_state(
        cli: Cli, log_path: Path) -> None:
    append(log_path, 10)
    consume(log_path, "c")
    before = snapshot(log_path / "consumers")
    r = cli("consumer", "reset", log_path, "c", "--to-offset", "4")
    assert r.code == 2 and "--state JSON" in r.err and "--keep-state" in r.err
    r = cli("consumer", "reset", log_path, "c", "--to-offset", "4", "--state", "{bad")
    assert r.code == 2 and "--state is not JSON" in r.err
    r = cli("consumer", "reset", log_path, "c", "--to-offset", "4", "--state", "1",
            "--keep-state")
    assert r.code == 2  # one or the other
    r = cli("consumer", "reset", log_path, "c")
    assert r.code == 2  # where to is required
    r = cli("consumer", "reset", log_path, "c", "--to-offset", "11", "--keep-state")
    assert r.code == 3 and "beyond the head" in r.err
    assert snapshot(log_path / "consumers") == before
    r = cli("consumer", "reset", log_path, "c", "--to-offset", "4", "--keep-state")
    assert r.code == 0 and "state kept" in r.out
    # The kept state (10 events) now sits at offset 4: the events from 4 are counted again.
    assert consume(log_path, "c")["events"] == 16
    # Resetting to where it already is needs no state.
    assert cli("consumer", "reset", log_path, "c", "--to-latest").code == 0


def test_reset_to_earliest_frees_a_consumer_stuck_behind_a_forced_prune(
        cli: Cli, log_path: Path) -> None:
    append(log_path, 5)
    consume(log_path, "slow")
    append(log_path, 25)
    r = cli("prune", log_path, "--before", "20", "--force")
    assert r.code == 0 and "log now starts at offset 20" in r.out
    stuck = subprocess.run([sys.executable, "-m", "eventpipe", "consume", str(log_path),
                            "--name", "slow", "--handler", COUNTER, "--catch-up"],
                           capture_output=True, timeout=120, env=_env(), check=False)
    assert stuck.returncode == 3, stuck.stderr.decode()
    r = cli("consumer", "reset", log_path, "slow", "--to-earliest", "--keep-state")
    assert r.code == 0 and "offset 5 -> offset 20" in r.out, r.err
    # The event before 20 is gone: nothing to compare, as for any checkpoint retention passed.
    state = consume(log_path, "slow")
    assert state["events"] == 5 + 10 and state["last_offset"] == 29
    assert cli("verify", log_path).code == 0


def test_reset_replaces_an_unreadable_checkpoint(cli: Cli, log_path: Path) -> None:
    append(log_path, 6)
    consume(log_path, "c")
    cp = log_path / "consumers" / "c.json"
    cp.write_bytes(cp.read_bytes().replace(b'"offset":6', b'"offset":3'))
    assert "corrupt" in entry(cli, log_path, "c")["error"]
    assert cli("consumer", "show", log_path, "c").code == 3
    r = cli("consumer", "reset", log_path, "c", "--to-offset", "3", "--keep-state")
    assert r.code == 2 and "no state to keep" in r.err
    r = cli("consumer", "reset", log_path, "c", "--to-offset", "3", "--state",
            '{"events": 3, "by_type": {}, "last_offset": 2}')
    assert r.code == 0, r.err
    assert consume(log_path, "c")["events"] == 6


# ------------------------------------------------------------------------------ delete


def test_delete_of_an_external_consumer_removes_its_registration(
        cli: Cli, log_path: Path, tmp_path: Path) -> None:
    append(log_path, 8)
    folder = tmp_path / "elsewhere"
    consume(log_path, "ext", "--checkpoint-dir", folder)
    registration = registration_path(str(log_path), "ext", str(folder / "ext.json"))
    assert os.path.exists(registration)
    r = cli("consumer", "delete", log_path, "ext")
    assert r.code == 0, r.err
    assert f"removed {folder / 'ext.json'}" in r.out and f"removed {registration}" in r.out
    assert not os.path.exists(registration) and not (folder / "ext.json").exists()
    assert log_status(log_path)["consumers"] == []
    r = cli("consumer", "delete", log_path, "ext")
    assert r.code == 1 and "no consumer 'ext'" in r.err


def test_delete_is_refused_while_held_and_keeps_a_lock_file_another_process_has_open(
        cli: Cli, log_path: Path, children: Children) -> None:
    append(log_path, 3)
    consume(log_path, "c")
    proc = running(children, log_path, "c")
    holding(cli, log_path, "c", proc.pid)
    standby = running(children, log_path, "c", "--standby")
    wait_until(lambda: entry(cli, log_path, "c")["standby_pids"] == [standby.pid],
               what="the standby", timeout=60)
    assert cli("consumer", "delete", log_path, "c").code == 3
    stop(proc)
    holding(cli, log_path, "c", standby.pid)  # the standby took over
    assert cli("consumer", "delete", log_path, "c").code == 3
    stop(standby)
    # Nobody holds the name, but a process has the lock file open (as a standby would):
    # unlinking it would let that process and a new consumer hold the name on two files.
    lock = log_path / "consumers" / "c.lock"
    with open(lock, "rb") as held_open:
        other = children.popen(["sleep", "60"], stdin=held_open)
    r = cli("consumer", "delete", log_path, "c")
    assert r.code == 0, r.err
    assert lock.exists() and f"kept {lock}: pid {other.pid} has it open" in r.err
    assert not (log_path / "consumers" / "c.json").exists()
    other.kill()
    other.wait()
    assert cli("consumers", log_path, "--json").json()["consumers"] == []


def test_forget_under_both_spellings(cli: Cli, log_path: Path, tmp_path: Path) -> None:
    append(log_path, 2)
    consume(log_path, "a", "--checkpoint-dir", tmp_path / "a")
    consume(log_path, "b", "--checkpoint-dir", tmp_path / "b")
    assert cli("consumer", "forget", log_path, "a").code == 0
    assert cli("consumers", "forget", log_path, "b", "--checkpoint",
               tmp_path / "b" / "b.json").code == 0
    assert cli("consumers", log_path, "--json").json()["consumers"] == []
    assert (tmp_path / "a" / "a.json").exists()  # the checkpoint is left alone
    r = cli("consumers", "forget", log_path)
    assert r.code == 2 and "required: name" in r.err


# ------------------------------------------------------------------------------- start


def test_a_new_consumer_starts_at_the_latest_offset(cli: Cli, log_path: Path) -> None:
    append(log_path, 20)
    assert consume(log_path, "tail", EVENTPIPE_START="latest") is None  # nothing handled
    assert entry(cli, log_path, "tail")["offset"] == 20
    append(log_path, 3)
    # Its checkpoint was written at the start: the next run goes on from 20, whatever its
    # start option says.
    state = consume(log_path, "tail", EVENTPIPE_START="latest")
    assert state == {"events": 3, "by_type": {"t": 3}, "last_offset": 22}


def test_a_new_consumer_starts_at_an_offset_without_checking_the_one_before(
        cli: Cli, log_path: Path) -> None:
    append(log_path, 20)
    state = consume(log_path, "mid", EVENTPIPE_START="13")
    assert state == {"events": 7, "by_type": {"t": 7}, "last_offset": 19}
    # An existing checkpoint wins over start.
    append(log_path, 1)
    assert consume(log_path, "mid", EVENTPIPE_START="0")["events"] == 8
    bad = subprocess.run([sys.executable, "-m", "eventpipe", "consume", str(log_path),
                          "--name", "far", "--handler", COUNTER, "--catch-up"],
                         capture_output=True, timeout=120,
                         env=_env(EVENTPIPE_START="99"), check=False)
    assert bad.returncode == 3 and b"beyond the head" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "eventpipe", "consume", str(log_path),
                          "--name", "far", "--handler", COUNTER, "--catch-up"],
                         capture_output=True, timeout=120,
                         env=_env(EVENTPIPE_START="soon"), check=False)
    assert bad.returncode == 2 and b"EVENTPIPE_START" in bad.stderr


def test_start_in_the_library(log_path: Path) -> None:
    seen: list[int] = []

    def handler(state: Any, event: Any, offset: int) -> Any:
        seen.append(offset)
        return state + 1

    # "latest" on an empty log is offset 0, fixed all the same: a restart before the first
    # checkpoint does not skip what was appended meanwhile.
    append(log_path, 0)
    with Consumer(log_path, "new", handler, 0, start="latest"):
        pass
    append(log_path, 25)
    with Consumer(log_path, "new", handler, 0, start="latest") as c:
        assert c.catch_up() == 25 and seen == list(range(25))
    seen.clear()

    with Consumer(log_path, "a", handler, 0, start="latest"):
        pass  # constructed only: the start is fixed all the same
    append(log_path, 2)
    with Consumer(log_path, "a", handler, 0) as c:
        assert c.catch_up() == 2 and seen == [25, 26]
    seen.clear()
    with Consumer(log_path, "b", handler, 100, start=24) as c:
        assert c.catch_up() == 103 and seen == [24, 25, 26]
    with EventLog(log_path) as log:
        assert log.prune(before=20, force=True).first_offset == 20
    seen.clear()
    with Consumer(log_path, "c", handler, 0) as c:  # "earliest": the first stored offset
        assert c.catch_up() == 7 and seen == list(range(20, 27))
    with pytest.raises(Exception, match="before the first stored offset 20"):
        Consumer(log_path, "d", handler, 0, start=5)
    with pytest.raises(Exception, match="start"):
        Consumer(log_path, "d", handler, 0, start="sometime")


def test_the_start_flag(cli: Cli, log_path: Path) -> None:
    append(log_path, 10)
    state = consume(log_path, "flagged", "--start", "7")
    assert state == {"events": 3, "by_type": {"t": 3}, "last_offset": 9}
    assert consume(log_path, "late", "--start", "latest") is None
    bad = subprocess.run([sys.executable, "-m", "eventpipe", "consume", str(log_path),
                          "--name", "x", "--handler", COUNTER, "--catch-up", "--start", "soon"],
                         capture_output=True, timeout=120, env=_env(), check=False)
    assert bad.returncode == 2 and b"--start" in bad.stderr


SLOW_HANDLER = """
import time
def count(state, event, offset):
    time.sleep(0.0005)
    return (state or 0) + 1
"""


def test_catch_up_shows_progress_on_a_terminal(log_path: Path, tmp_path: Path) -> None:
    import os
    import pty

    append(log_path, 3000)
    (tmp_path / "slow.py").write_text(SLOW_HANDLER)
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "eventpipe", "consume", str(log_path), "--name", "slow",
             "--handler", f"{tmp_path / 'slow.py'}:count", "--catch-up",
             "--checkpoint-every", "500"],
            stderr=terminal, stdout=subprocess.DEVNULL, env=_env())
        os.close(terminal)
        shown = b""
        while True:
            try:
                data = os.read(controller, 4096)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            shown += data
        assert proc.wait(120) == 0, shown
    finally:
        os.close(controller)
    assert b"/3,000 events, " in shown and b"/s" in shown and b"s left" in shown, shown
