"""Every command against README's rules, as real processes: the exit code table, the texts a
user reads, the handler lookup of the ``eventpipe`` script, log lines and their journal
priorities.

README's table: 0 success; 1 a check failed or input was rejected; 2 bad usage or option;
3 an eventpipe error (no log at PATH among them); 130 SIGINT (``consume`` too, after its final
checkpoint); ``consume`` stopped by SIGTERM exits 0 (a service's normal stop), ``append``
143 (what it had read is committed, the rest of its input is not).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from eventpipe import Consumer, EventLog
from eventpipe._status import log_status

from ._wait import wait_until
from .conftest import ROOT, Children

COUNTER = str(ROOT / "examples" / "counter_consumer.py") + ":handle"
SCRIPT = Path(sys.executable).parent / "eventpipe"  # the console script [project.scripts] makes
# Internals a command line user must never read (issue 11).
INTERNALS = ("(create=False)", "(keyword argument)", "eventpipe_handler_", "Traceback")


@pytest.fixture(autouse=True)
def _plain_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    """No background compression (children inherit it): nothing logs behind a test's back."""
    monkeypatch.setenv("EVENTPIPE_COMPRESSION", "none")
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run(*args: str | Path, stdin: bytes = b"", cwd: Path | None = None,
        script: bool = False, **env: str) -> subprocess.CompletedProcess[bytes]:
    """``python -m eventpipe ARGS`` (or the ``eventpipe`` script) as a real process."""
    cmd = [str(SCRIPT)] if script else [sys.executable, "-m", "eventpipe"]
    return subprocess.run([*cmd, *map(str, args)], input=stdin, capture_output=True,
                          timeout=120, env=_env(**env), cwd=cwd, check=False)


def start(children: Children, *args: str | Path, **env: str) -> subprocess.Popen[bytes]:
    return children.popen([sys.executable, "-m", "eventpipe", *map(str, args)],
                          stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(**env))


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    """LOG: 10 events, an external consumer ``ext``; MISSING: nothing there; NOTLOG: a folder
    of other files; BROKEN: a log whose eventpipe.json is gone."""
    log = tmp_path / "log"
    with EventLog(log, segment_max_events=4) as opened:  # sealed segments, for prune
        opened.append_many([{"type": "t", "i": i} for i in range(10)])
    with Consumer(log, "ext", lambda s, e, o: (s or 0) + 1,
                  checkpoint_dir=tmp_path / "elsewhere") as consumer:
        consumer.catch_up()
    not_a_log = tmp_path / "notes"
    not_a_log.mkdir()
    (not_a_log / "notes.txt").write_text("hello")
    broken = tmp_path / "broken"
    with EventLog(broken) as opened:
        opened.append({"i": 0})
    (broken / "eventpipe.json").unlink()
    return {"LOG": log, "MISSING": tmp_path / "missing", "NOTLOG": not_a_log,
            "BROKEN": broken}


# (argv, stdin, exit code, what stderr says): every command, each exit code it can give
# without a signal. Upper-case words are the paths of the fixture above.
CASES = [
    # append
    (["append", "LOG"], b'{"a": 1}\n', 0, ""),
    (["append", "LOG"], b"nope\n", 1, "line 1: not JSON"),
    (["append"], b"", 2, "the following arguments are required: path"),
    (["append", "NOTLOG"], b"{}\n", 3, "NotAnEventLogError: directory is not empty"),
    # read
    (["read", "LOG"], b"", 0, ""),
    (["read", "LOG", "--from", "one"], b"", 2, "invalid int value"),
    (["read", "LOG", "--from", "11"], b"", 3, "offset=11"),
    (["read", "MISSING"], b"", 3, "no eventpipe log at MISSING"),
    (["read", "NOTLOG"], b"", 3, "no eventpipe log at NOTLOG"),
    # consume
    (["consume", "LOG", "--name", "c", "--handler", COUNTER, "--catch-up"], b"", 0,
     "consumer c: stopped at offset 10"),
    (["consume", "LOG", "--name", "c", "--handler", COUNTER, "--checkpoint-every", "0"], b"", 2,
     "eventpipe: --checkpoint-every must be"),
    (["consume", "LOG", "--name", "c", "--handler", "nowhere_xyz:handle"], b"", 2,
     "No module named 'nowhere_xyz' in the current folder or on PYTHONPATH"),
    (["consume", "LOG", "--name", "c", "--handler", COUNTER.replace(":handle", ":nope")], b"",
     2, "counter_consumer.py has no attribute 'nope'"),
    (["consume", "LOG", "--name", "c"], b"", 2, "the following arguments are required: "
     "--handler"),
    (["consume", "MISSING", "--name", "c", "--handler", COUNTER, "--catch-up"], b"", 3,
     "no eventpipe log at MISSING"),
    # status
    (["status", "LOG"], b"", 0, ""),
    (["status"], b"", 2, "the following arguments are required: path"),
    (["status", "MISSING"], b"", 3, "no eventpipe log at MISSING"),
    # verify
    (["verify", "LOG"], b"", 0, "checkpoints: ok"),
    (["verify", "BROKEN"], b"", 1, "problem(s)"),
    (["verify", "LOG", "--bogus"], b"", 2, "unrecognized arguments: --bogus"),
    (["verify", "MISSING"], b"", 3, "no eventpipe log at MISSING"),
    (["verify", "NOTLOG"], b"", 3, "no eventpipe log at NOTLOG"),
    # prune
    (["prune", "LOG", "--before", "0"], b"", 0, ""),
    (["prune", "LOG"], b"", 2, "prune needs --max-age, --max-bytes or --before"),
    (["prune", "MISSING", "--before", "1"], b"", 3, "no eventpipe log at MISSING"),
    # compress
    (["compress", "LOG"], b"", 0, ""),
    (["compress"], b"", 2, "the following arguments are required: path"),
    (["compress", "MISSING"], b"", 3, "no eventpipe log at MISSING"),
    # consumers forget
    (["consumers", "forget", "LOG", "ext"], b"", 0, ""),
    (["consumers", "forget", "LOG", "nobody"], b"", 1, "no registration of consumer 'nobody'"),
    (["consumers", "forget", "LOG"], b"", 2, " error: "),
    (["consumers", "forget", "MISSING", "ext"], b"", 3, "no eventpipe log at MISSING"),
    # consumers, consumer show|reset|delete (tests/test_consumers_cli.py has the details)
    (["consumers", "LOG"], b"", 0, ""),
    (["consumers", "MISSING"], b"", 3, "no eventpipe log at MISSING"),
    (["consumer", "show", "LOG", "ext"], b"", 0, ""),
    (["consumer", "show", "LOG", "nobody"], b"", 1, "no consumer 'nobody'"),
    (["consumer", "show", "LOG", "../x"], b"", 2, "invalid"),
    (["consumer", "reset", "LOG", "ext"], b"", 2, " error: "),
    (["consumer", "reset", "MISSING", "ext", "--to-latest"], b"", 3,
     "no eventpipe log at MISSING"),
    (["consumer", "delete", "MISSING", "ext"], b"", 3, "no eventpipe log at MISSING"),
    (["status", "LOG", "--format", "prometheus"], b"", 0, ""),
    # bridge (tests/test_bridge.py runs it against real servers)
    (["bridge", "LOG"], b"", 2, "the following arguments are required: --nats, --stream"),
    (["bridge", "LOG", "--nats", "nats://127.0.0.1:1", "--stream", "a.b"], b"", 2,
     "stream name 'a.b' is invalid"),
    (["bridge", "MISSING", "--nats", "nats://127.0.0.1:1", "--stream", "S"], b"", 3,
     "no eventpipe log at MISSING"),
    (["bridge", "LOG", "--nats", "nats://127.0.0.1:1", "--stream", "S"], b"", 3,
     "ServerUnavailableError: cannot connect to NATS"),
    # consume-stream and mirror (tests/test_stream_consumer.py and tests/test_mirror.py run
    # them against real servers); the checkpoint folder of consume-stream is NOTLOG's
    (["consume-stream"], b"", 2, "the following arguments are required: --nats, --stream, "
     "--name, --handler, --checkpoint-dir"),
    (["consume-stream", "--nats", "nats://127.0.0.1:1", "--stream", "a.b", "--name", "c",
      "--handler", COUNTER, "--checkpoint-dir", "NOTLOG"], b"", 2,
     "stream name 'a.b' is invalid"),
    (["consume-stream", "--nats", "nats://127.0.0.1:1", "--stream", "S", "--name", "c",
      "--handler", COUNTER, "--checkpoint-dir", "NOTLOG"], b"", 3,
     "ServerUnavailableError: cannot connect to NATS"),
    (["mirror", "MISSING"], b"", 2, "the following arguments are required: --nats, --stream"),
    (["mirror", "MISSING", "--nats", "nats://127.0.0.1:1", "--stream", "a.b"], b"", 2,
     "stream name 'a.b' is invalid"),
    (["mirror", "MISSING", "--nats", "nats://127.0.0.1:1", "--stream", "S"], b"", 3,
     "ServerUnavailableError: cannot connect to NATS"),
    (["mirror", "LOG", "--nats", "nats://127.0.0.1:1", "--stream", "S"], b"", 3,
     "MirrorMismatchError"),
    # demo (--help only: the demo itself runs for seconds; tests/test_demo.py runs it)
    (["demo", "--help"], b"", 0, ""),
    (["demo", "--seconds", "soon"], b"", 2, "invalid float value"),
    # the program itself
    (["--version"], b"", 0, ""),
    ([], b"", 2, "usage: eventpipe"),
]


@pytest.mark.parametrize(("argv", "stdin", "code", "says"), CASES,
                         ids=[f"{' '.join(c[0][:2]) or 'none'}-{c[2]}" for c in CASES])
def test_every_command_exits_as_readme_says(paths: dict[str, Path], argv: list[str],
                                            stdin: bytes, code: int, says: str) -> None:
    def filled(text: str) -> str:
        return re.sub(r"\b[A-Z]{3,}\b", lambda m: str(paths.get(m[0], m[0])), text)

    proc = run(*map(filled, argv), stdin=stdin)
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert filled(says) in err
    for internal in INTERNALS:
        assert internal not in err, err
    if code != 0 and "usage" not in err:
        assert err.startswith("eventpipe: "), err
    assert not paths["MISSING"].exists()  # no command creates a log it was not asked to


def test_consume_creates_a_missing_log_only_when_asked(tmp_path: Path) -> None:
    log = tmp_path / "new"
    proc = run("consume", log, "--name", "c", "--handler", COUNTER, "--catch-up")
    assert (proc.returncode, proc.stderr) == (3, f"eventpipe: no eventpipe log at {log}\n"
                                                 .encode())
    assert not log.exists()
    proc = run("consume", log, "--name", "c", "--handler", COUNTER, "--catch-up", "--create")
    assert proc.returncode == 0, proc.stderr
    assert (log / "eventpipe.json").exists()


# ------------------------------------------------------------------------------- signals


def _consuming(children: Children, log: Path) -> subprocess.Popen[bytes]:
    """A following consumer ``c`` of ``log``, once it has caught up (its signal handlers are
    in place then: run() installs them before the first catch-up)."""
    proc = start(children, "consume", log, "--name", "c", "--handler", COUNTER)

    def caught_up() -> bool:
        assert proc.poll() is None, proc.communicate()[1]
        [c] = [c for c in log_status(log)["consumers"] if c["name"] == "c"] or [None]
        return c is not None and c["running_pids"] == [proc.pid] and c["lag"] == 0

    wait_until(caught_up, what="the consumer to catch up", timeout=60)
    return proc


@pytest.mark.parametrize(("sig", "code", "says"), [
    (signal.SIGINT, 130, "consumer c: interrupted (SIGINT), stopped at offset 10"),
    (signal.SIGTERM, 0, "consumer c: stopped at offset 10"),
])
def test_consume_stopped_by_a_signal(paths: dict[str, Path], children: Children,
                                     sig: signal.Signals, code: int, says: str) -> None:
    proc = _consuming(children, paths["LOG"])
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err.decode()
    assert says in err.decode()
    assert b"Traceback" not in err
    # Either way it checkpointed: a restart handles nothing twice.
    again = run("consume", paths["LOG"], "--name", "c", "--handler", COUNTER, "--catch-up",
                "--print-state")
    assert again.returncode == 0 and orjson.loads(again.stdout)["events"] == 10


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_append_waiting_for_input_stopped_by_a_signal(paths: dict[str, Path],
                                                      children: Children,
                                                      sig: signal.Signals, code: int) -> None:
    proc = start(children, "append", paths["LOG"])
    assert proc.stdin is not None
    proc.stdin.write(b'{"i": 10}\n')
    proc.stdin.flush()
    wait_until(lambda: log_status(paths["LOG"])["head"] == 11, what="the first line")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err.decode()
    assert b"Traceback" not in err


def test_read_follow_stopped_by_sigint(paths: dict[str, Path], children: Children) -> None:
    proc = start(children, "read", paths["LOG"], "--follow", "--from", "9")
    assert proc.stdout is not None
    assert proc.stdout.readline() == b'{"type":"t","i":9}\n'
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (130, b"")


# ------------------------------------------------------------- read --follow past the head


def test_read_follow_from_past_the_head_waits_for_that_offset(paths: dict[str, Path],
                                                              children: Children) -> None:
    """As ``tail -f`` waits for a file to grow: offsets 10 and 11 come, 12 is printed."""
    proc = start(children, "read", paths["LOG"], "--follow", "--from", "12", "--to", "14",
                 "--with-offsets", "--poll-interval", "0.05")
    with EventLog(paths["LOG"]) as log:
        log.append_many([{"i": 10}, {"i": 11}])
        wait_until(lambda: proc.poll() is None and log.head == 12, what="two appends")
        log.append_many([{"i": 12}, {"i": 13}, {"i": 14}])
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (0, b""), err.decode()
    assert out == b'{"offset":12,"event":{"i":12}}\n{"offset":13,"event":{"i":13}}\n'


def test_read_without_follow_past_the_head_is_still_an_error(paths: dict[str, Path]) -> None:
    proc = run("read", paths["LOG"], "--from", "12")
    assert proc.returncode == 3 and b"offset=12" in proc.stderr


# ------------------------------------------------------------------------------ handlers


@pytest.mark.parametrize("script", [False, True], ids=["python -m eventpipe", "eventpipe"])
def test_a_handler_module_in_the_current_folder(paths: dict[str, Path], tmp_path: Path,
                                                script: bool) -> None:
    """README: ``--handler h:count`` finds h.py in the current folder under the script too
    (whose sys.path[0] is its own folder, where ``python -m`` has the current folder)."""
    if script and not SCRIPT.exists():
        pytest.skip("the eventpipe script is not installed next to this Python")
    here = tmp_path / "here"
    here.mkdir()
    (here / "h.py").write_text("import helper_of_h\n\n"
                               "def count(state, event, offset):\n"
                               "    return helper_of_h.plus_one(state or 0)\n")
    (here / "helper_of_h.py").write_text("def plus_one(n):\n    return n + 1\n")
    proc = run("consume", paths["LOG"], "--name", "h", "--handler", "h:count", "--catch-up",
               "--print-state", cwd=here, script=script)
    assert proc.returncode == 0, proc.stderr.decode()
    assert orjson.loads(proc.stdout) == 10


def test_a_failing_handler_shows_its_traceback(paths: dict[str, Path], tmp_path: Path) -> None:
    handler = tmp_path / "fails.py"
    handler.write_text("def handle(state, event, offset):\n"
                       "    return event['missing']\n")
    proc = run("consume", paths["LOG"], "--name", "f", "--handler", f"{handler}:handle",
               "--catch-up")
    err = proc.stderr.decode()
    assert proc.returncode == 3, err
    assert err.startswith("eventpipe: HandlerError: ") and "KeyError: 'missing'" in err
    assert f'File "{handler}", line 2, in handle' in err  # where, for the journal too
    assert "eventpipe_handler_" not in err


def test_a_handler_module_whose_import_is_missing_names_it(paths: dict[str, Path],
                                                            tmp_path: Path) -> None:
    # The missing name is a prefix of the handler's: still the import's fault, not the handler's.
    (tmp_path / "handy_things.py").write_text("import handy\n")
    proc = run("consume", paths["LOG"], "--name", "b", "--handler", "handy_things:handle",
               "--catch-up", cwd=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert ("cannot load handler 'handy_things:handle': ModuleNotFoundError: No module named "
            "'handy'") in err
    assert f'File "{tmp_path / "handy_things.py"}", line 1' in err


def test_a_handler_module_that_fails_to_import_shows_where(paths: dict[str, Path],
                                                           tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("x = 1\nraise RuntimeError('no config')\n")
    proc = run("consume", paths["LOG"], "--name", "b", "--handler", "bad:handle",
               "--catch-up", cwd=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "cannot load handler 'bad:handle': RuntimeError: no config" in err
    assert f'File "{tmp_path / "bad.py"}", line 2' in err


# ------------------------------------------------------------------------- log lines


def _torn(log: Path) -> None:
    """Leave bytes past the committed end of the active segment (a writer killed mid-write):
    the next writer quarantines them and logs a warning."""
    segment = sorted((log / "segments").glob("*.jsonl"))[-1]  # the active one
    with open(segment, "ab") as f:
        f.write(b'{"torn": tr')


def _journal_run(*args: str | Path, matching: bool = True,
                 stdin: bytes = b"") -> tuple[int, str]:
    """Run with stderr on a pipe that JOURNAL_STREAM names (as systemd sets it for the
    journal's stream), or names another file (a child whose stderr was redirected)."""
    read_end, write_end = os.pipe()
    st = os.fstat(write_end if matching else 0)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "eventpipe", *map(str, args)],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=write_end,
                                env=_env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"))
        os.close(write_end)
        write_end = -1
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
        with os.fdopen(read_end, "rb") as stream:
            read_end = -1
            text = stream.read().decode()
        return proc.wait(timeout=60), text
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)


def test_log_lines_reach_stderr_without_priorities_off_systemd(paths: dict[str, Path]) -> None:
    _torn(paths["LOG"])
    proc = run("append", paths["LOG"], stdin=b'{"i": 10}\n')
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert err.startswith("eventpipe: warning: ") and "uncommitted bytes" in err, err
    assert not err.startswith("<")


def test_under_systemd_each_line_carries_its_syslog_priority(paths: dict[str, Path]) -> None:
    """journald's SyslogLevelPrefix: ``<4>`` warning, ``<6>`` info, ``<3>`` error, on every
    line of a message (a traceback's too), so ``journalctl -p warning`` selects them."""
    _torn(paths["LOG"])
    code, err = _journal_run("append", paths["LOG"], stdin=b'{"i": 10}\n')  # recovers first
    assert code == 0, err
    assert "<4>eventpipe: warning: " in err and "uncommitted bytes" in err, err
    assert all(line.startswith("<") for line in err.splitlines()), err

    code, err = _journal_run("prune", paths["LOG"], "--before", "5", "--force")
    assert code == 0, err
    assert f"<6>eventpipe: {paths['LOG']}: retention removed 1 segment(s) (offsets 0..3" in err
    code, err = _journal_run("read", paths["LOG"], "--from", "99")
    assert (code, err.splitlines()[0][:15]) == (3, "<3>eventpipe: o"), err

    code, err = _journal_run("read", paths["LOG"], "--from", "99", matching=False)
    assert code == 3 and err.startswith("eventpipe: "), err  # not the journal: no prefix


def test_a_handler_traceback_in_the_journal_is_all_at_error_priority(
        paths: dict[str, Path], tmp_path: Path) -> None:
    handler = tmp_path / "fails.py"
    handler.write_text("def handle(state, event, offset):\n    return 1 / 0\n")
    code, err = _journal_run("consume", paths["LOG"], "--name", "f", "--handler",
                             f"{handler}:handle", "--catch-up")
    assert code == 3, err
    lines = err.splitlines()
    assert lines[0].startswith("<3>eventpipe: HandlerError: ")
    assert all(line.startswith("<3>") for line in lines), err
    assert any(f'File "{handler}", line 2' in line for line in lines), err


def test_retention_says_what_it_removed(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with EventLog(log, segment_max_events=5) as opened:
        opened.append_many([{"i": i} for i in range(20)])
    proc = run("prune", log, "--before", "10")
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert f"eventpipe: {log}: retention removed 2 segment(s) (offsets 0..9, " in err
    assert "the log now starts at offset 10" in err


def test_prune_of_a_log_without_sealed_segments(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with EventLog(log) as opened:
        opened.append_many([{"i": i} for i in range(10)])
    proc = run("prune", log, "--before", "0")
    assert proc.returncode == 0, proc.stderr.decode()


def test_a_bad_input_line_is_named_by_its_line_and_column(paths: dict[str, Path]) -> None:
    """orjson's own "line 1 column N" right after our "line 2" would mislead."""
    proc = run("append", paths["LOG"], stdin=b'{"a": 1}\n{"a" 2}\n')
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "eventpipe: line 2: not JSON (" in err and " at column 6); nothing of it" in err
    assert "line 1" not in err
    proc = run("consume", paths["LOG"], "--name", "c", "--handler", COUNTER,
               "--initial-state", "{x")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "--initial-state is not JSON: " in err, err
    assert err.rstrip().endswith("at column 2") and "line 1" not in err
