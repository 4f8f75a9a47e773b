"""The command line: in-process through ``main([...])``, and as real processes for pipes/signals.

Exit codes under test (cli.py's docstring): 0 success; 1 a check failed or input was rejected;
2 bad usage or option; 3 an eventpipe error; 130 SIGINT.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventpipe import Consumer, EventLog, HandlerError
from eventpipe._checksum import BLOCK_BYTES
from eventpipe._cli import main
from eventpipe._segment import list_segments
from eventpipe._status import log_status

from ._wait import wait_until
from ._workers import rewrite_checkpoint
from .conftest import ROOT, Children

COUNTER = str(ROOT / "examples" / "counter_consumer.py") + ":handle"
BLOCK = BLOCK_BYTES  # a sealed segment has a CRC per block of this many bytes


@pytest.fixture(autouse=True)
def _plain_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    """No background compression: tests compress explicitly where they want gzip segments.

    Set in os.environ, so the CLI subprocesses inherit it too.
    """
    monkeypatch.setenv("EVENTPIPE_COMPRESSION", "none")


@dataclass
class Result:
    code: int
    out: bytes
    err: str

    @property
    def text(self) -> str:
        return self.out.decode()


class Cli:
    """Runs ``main(argv)`` in this process with the given stdin; captures stdout and stderr."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture[bytes]) -> None:
        self._monkeypatch = monkeypatch
        self._capsys = capsys

    def __call__(self, *args: str | Path, stdin: bytes = b"") -> Result:
        self._monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        self._capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse: usage errors, --help, --version
            code = exc.code if isinstance(exc.code, int) else 0
        out, err = self._capsys.readouterr()
        return Result(code, out, err.decode())


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]) -> Cli:
    return Cli(monkeypatch, capsysbinary)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run(*args: str | Path, stdin: bytes = b"", timeout: float = 60) -> Result:
    """``python -m eventpipe ARGS`` as a real process."""
    proc = subprocess.run([sys.executable, "-m", "eventpipe", *map(str, args)], input=stdin,
                          capture_output=True, timeout=timeout, env=_env(), check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr.decode())


def start(children: Children, *args: str | Path) -> subprocess.Popen[bytes]:
    """``python -m eventpipe ARGS`` in the background (killed and reaped at teardown)."""
    return children.popen([sys.executable, "-m", "eventpipe", *map(str, args)],
                          stderr=subprocess.PIPE, env=_env())


def read_line(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "child printed nothing in time"
    line = proc.stdout.readline()
    assert line, f"child exited (rc={proc.wait()})"
    return line


def fill(path: Path, count: int, first: int = 0, **options: Any) -> None:
    """Append ``count`` events ``{"i": first.., "pad": ...}`` (about 36 bytes each)."""
    with EventLog(path, **options) as log:
        log.append_many([{"i": i, "pad": "x" * 20} for i in range(first, first + count)])


def lines(*events: Any) -> bytes:
    return b"".join(orjson.dumps(e) + b"\n" for e in events)


def stored(path: Path) -> list[Any]:
    with EventLog(path) as log:
        return [r.event for r in log.read()]


def segment_files(path: Path) -> list[Path]:
    return sorted(p for p in (path / "segments").iterdir() if ".jsonl" in p.name)


def bases(path: Path) -> list[int]:
    return [int(p.name.split(".")[0]) for p in segment_files(path)]


# ------------------------------------------------------------------------------------ append


def test_append_prints_offsets_and_stores_compact_events(cli: Cli, log_path: Path) -> None:
    r = cli("append", log_path, stdin=b'{"a": 1}\n\n  [1, 2]  \n"text"\n')
    assert (r.code, r.out, r.err) == (0, b"0\n1\n2\n", "")
    r = cli("append", log_path, stdin=b'{"b":\t2}')  # no final newline
    assert (r.code, r.out) == (0, b"3\n")
    assert stored(log_path) == [{"a": 1}, [1, 2], "text", {"b": 2}]
    assert run("read", log_path).out == b'{"a":1}\n[1,2]\n"text"\n{"b":2}\n'


@pytest.mark.parametrize("bad", [b"nope", b'{"a": 1', b'{"a":1} {"b":2}', b"\xff\xfe",
                                 b"{'single': 'quotes'}", b'{"a": NaN}'])
def test_append_stops_at_a_bad_line_naming_it(cli: Cli, log_path: Path, bad: bytes) -> None:
    r = cli("append", log_path, stdin=b'{"ok": 1}\n\n{"ok": 2}\n' + bad + b'\n{"ok": 3}\n')
    assert r.code == 1
    assert "line 4: not JSON" in r.err
    assert "nothing of it was written" in r.err
    assert "stopped at line 4: 2 events written before it" in r.err
    assert r.out == b"0\n1\n"
    assert stored(log_path) == [{"ok": 1}, {"ok": 2}]  # nothing of the bad line or after it


def test_append_bad_first_line_writes_nothing(cli: Cli, log_path: Path) -> None:
    r = cli("append", log_path, stdin=b"{oops}\n{}\n")
    assert (r.code, r.out) == (1, b"")
    assert "line 1" in r.err
    assert stored(log_path) == []


def test_append_skip_bad_goes_on_and_reports(cli: Cli, log_path: Path) -> None:
    r = cli("append", log_path, "--skip-bad",
            stdin=b'{"n": 1}\nbad\n{"n": 2}\n[1,\n{"n": 3}\n')
    assert r.code == 1  # input was rejected, even though the rest went in
    assert r.out == b"0\n1\n2\n"
    assert "line 2: not JSON" in r.err and "line 4: not JSON" in r.err
    assert "3 events written, 2 lines rejected" in r.err
    assert stored(log_path) == [{"n": 1}, {"n": 2}, {"n": 3}]


def test_append_json_summary(cli: Cli, log_path: Path) -> None:
    r = cli("append", log_path, "--json", stdin=lines({"n": 1}, {"n": 2}))
    assert r.code == 0
    assert json.loads(r.out) == {"written": 2, "first_offset": 0, "rejected": 0}
    r = cli("append", log_path, "--json", "--skip-bad", stdin=b'{"n": 3}\nbad\n{"n": 4}\n')
    assert r.code == 1
    assert json.loads(r.out) == {"written": 2, "first_offset": 2, "rejected": 1}
    assert "line 2" in r.err
    r = cli("append", log_path, "--json", stdin=b"")
    assert (r.code, json.loads(r.out)) == (0, {"written": 0, "first_offset": None,
                                               "rejected": 0})


def test_append_rejects_lines_it_cannot_store_by_line_number(cli: Cli, log_path: Path) -> None:
    deep = b"[" * 300 + b"]" * 300  # valid JSON, nested deeper than orjson writes
    huge = orjson.dumps({"a": "x" * (1 << 20)})  # over max_event_bytes
    r = cli("append", log_path, stdin=b"{}\n" + deep + b"\n{}\n")
    assert r.code == 1
    assert "line 2: cannot be stored" in r.err and "stopped at line 2" in r.err
    r = cli("append", log_path, "--skip-bad", stdin=b"[1]\n" + huge + b"\n[2]\n" + deep)
    assert r.code == 1
    assert f"line 2: event is {len(huge)} bytes encoded, over max_event_bytes=" in r.err
    assert "line 4: cannot be stored" in r.err
    assert "Traceback" not in r.err
    assert stored(log_path) == [{}, [1], [2]]


def test_append_json_summary_also_when_stopped(cli: Cli, log_path: Path) -> None:
    r = cli("append", log_path, "--json", stdin=b'{"n": 1}\nbad\n{"n": 2}\n')
    assert r.code == 1
    assert json.loads(r.out) == {"written": 1, "first_offset": 0, "rejected": 1}
    assert "line 2" in r.err


def test_append_large_input_in_batches(cli: Cli, log_path: Path) -> None:
    r = cli("append", log_path, stdin=lines(*({"i": i} for i in range(2500))))
    assert r.code == 0
    assert r.out == b"".join(b"%d\n" % i for i in range(2500))
    assert stored(log_path) == [{"i": i} for i in range(2500)]


def test_append_as_a_real_pipe(log_path: Path) -> None:
    r = run("append", log_path, stdin=lines(*({"i": i} for i in range(5))))
    assert (r.code, r.out) == (0, b"0\n1\n2\n3\n4\n")


# -------------------------------------------------------------------------------------- read


@pytest.fixture
def ten(log_path: Path) -> Path:
    with EventLog(log_path) as log:
        log.append_many([{"i": i} for i in range(10)])
    return log_path


def _events(*offsets: int) -> bytes:
    return b"".join(b'{"i":%d}\n' % i for i in offsets)


def _with_offsets(*offsets: int) -> bytes:
    return b"".join(b'{"offset":%d,"event":{"i":%d}}\n' % (i, i) for i in offsets)


@pytest.mark.parametrize(("args", "expected"), [
    ((), _events(*range(10))),
    (("--from", "3"), _events(*range(3, 10))),
    (("--from", "3", "--to", "6"), _events(3, 4, 5)),
    (("--to", "2"), _events(0, 1)),
    (("--from", "-2"), _events(8, 9)),
    (("--from", "-100"), _events(*range(10))),
    (("--from", "10"), b""),
    (("--from", "5", "--to", "3"), b""),
    (("--from", "9", "--to", "100"), _events(9)),
    (("--with-offsets", "--from", "4", "--to", "7"), _with_offsets(4, 5, 6)),
    (("--with-offsets", "--from", "-1"), _with_offsets(9)),
])
def test_read_ranges_exactly(cli: Cli, ten: Path, args: tuple[str, ...],
                             expected: bytes) -> None:
    r = cli("read", ten, *args)
    assert (r.code, r.out, r.err) == (0, expected, "")


def test_read_beyond_the_head_is_an_error(cli: Cli, ten: Path) -> None:
    r = cli("read", ten, "--from", "11")
    assert (r.code, r.out) == (3, b"")
    assert "beyond the head (10)" in r.err and "offset=11" in r.err


@pytest.mark.parametrize("flag", [(), ("--with-offsets",)])
def test_read_never_prints_a_damaged_event(cli: Cli, ten: Path, flag: tuple[str, ...]) -> None:
    seg = ten / "segments" / f"{0:020d}.jsonl"
    data = seg.read_bytes()
    seg.write_bytes(data.replace(b'{"i":6}', b'{"i"#6}'))  # same length, not JSON, no NUL
    r = cli("read", ten, *flag)
    assert r.code == 3 and "offset=6" in r.err and "not valid JSON" in r.err
    assert len(r.out.splitlines()) == 6 and b"#" not in r.out


def test_read_with_offsets_is_json_lines(cli: Cli, ten: Path) -> None:
    out = cli("read", ten, "--with-offsets").text.splitlines()
    assert [json.loads(line) for line in out] == [{"offset": i, "event": {"i": i}}
                                                  for i in range(10)]


def test_read_a_gzip_compressed_log(cli: Cli, log_path: Path) -> None:
    fill(log_path, 200, segment_max_bytes=1000)
    plain = cli("read", log_path, "--with-offsets").out
    r = cli("compress", log_path)
    assert r.code == 0
    m = re.fullmatch(rb"compressed (\d+) segments\n", r.out)
    assert m is not None, r.out
    compressed = int(m.group(1))
    files = segment_files(log_path)
    assert compressed == len(files) - 1 > 3
    assert all(f.name.endswith(".jsonl.gz") for f in files[:-1])
    assert files[-1].name.endswith(".jsonl")  # the active segment stays plain
    assert cli("read", log_path, "--with-offsets").out == plain
    middle = bases(log_path)[2] + 3  # inside a gzip segment
    r = cli("read", log_path, "--from", str(middle), "--to", str(middle + 40))
    assert r.out == b"".join(orjson.dumps({"i": i, "pad": "x" * 20}) + b"\n"
                             for i in range(middle, middle + 40))
    assert cli("verify", log_path).code == 0


def test_read_follow_piped_into_head_ends(log_path: Path, children: Children) -> None:
    # The log holds 3 events when the pipeline starts; head exits once 2 more arrive, and the
    # follower must then end too. (head holds its output until it exits, so the pipeline gives
    # no sign of progress: the appends come after a pause, and the test holds either way.)
    with EventLog(log_path) as log:
        log.append_many([{"i": i} for i in range(3)])
        cmd = (f"{sys.executable} -m eventpipe read --follow {log_path} | head -5; "
               'echo "eventpipe exited with ${PIPESTATUS[0]}" >&2')
        pipeline = children.popen(["bash", "-c", cmd], stderr=subprocess.PIPE, env=_env())
        time.sleep(0.5)
        log.append_many([{"i": 3}, {"i": 4}, {"i": 5}])
        out, err = pipeline.communicate(timeout=30)
    assert pipeline.returncode == 0
    assert out == _events(0, 1, 2, 3, 4)
    assert "eventpipe exited with 0" in err.decode()
    assert "Traceback" not in err.decode() and "Broken pipe" not in err.decode()


def test_read_follow_ends_when_its_reader_goes_away_while_idle(ten: Path,
                                                              children: Children) -> None:
    # Nothing more is appended: the follower must notice the closed pipe without a write.
    follower = start(children, "read", ten, "--follow", "--from", "8")
    assert [read_line(follower) for _ in range(2)] == [b'{"i":8}\n', b'{"i":9}\n']
    assert follower.stdout is not None
    follower.stdout.close()
    assert follower.wait(timeout=10) == 0
    assert follower.stderr is not None
    err = follower.stderr.read()
    assert b"Traceback" not in err and b"Broken pipe" not in err, err.decode()


def test_read_follow_into_head_of_a_longer_log_ends_at_once(ten: Path) -> None:
    proc = subprocess.run(f"{sys.executable} -m eventpipe read --follow {ten} | head -5",
                          shell=True, capture_output=True, timeout=30, env=_env(), check=False)
    assert proc.returncode == 0
    assert proc.stdout == _events(0, 1, 2, 3, 4)
    assert b"Traceback" not in proc.stderr


def test_read_follow_sees_new_events_and_sigint_exits_130(ten: Path,
                                                          children: Children) -> None:
    follower = start(children, "read", ten, "--follow", "--from", "-1", "--with-offsets")
    assert read_line(follower) == _with_offsets(9)
    with EventLog(ten) as log:
        for i in (10, 11):
            log.append({"i": i})
            assert read_line(follower) == _with_offsets(i)
    follower.send_signal(signal.SIGINT)
    _, err = follower.communicate(timeout=30)
    assert follower.returncode == 130
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err.decode()


@pytest.mark.parametrize("seed", range(3))
def test_read_follow_sigint_at_random_moments_exits_130(log_path: Path, children: Children,
                                                        seed: int) -> None:
    # While streaming a backlog, while waiting, and in between: always 130, never a traceback.
    rng = random.Random(seed)
    fill(log_path, 50_000)
    follower = start(children, "read", log_path, "--follow")
    assert read_line(follower).startswith(b'{"i":0,')
    time.sleep(rng.uniform(0.0, 0.3))
    follower.send_signal(signal.SIGINT)
    _, err = follower.communicate(timeout=30)
    assert follower.returncode == 130
    assert b"Traceback" not in err, err.decode()


def test_read_follow_with_to_ends_by_itself(ten: Path, children: Children) -> None:
    follower = start(children, "read", ten, "--follow", "--from", "8", "--to", "12")
    assert [read_line(follower) for _ in range(2)] == [b'{"i":8}\n', b'{"i":9}\n']
    with EventLog(ten) as log:
        log.append_many([{"i": i} for i in range(10, 15)])
    out, err = follower.communicate(timeout=30)
    assert (follower.returncode, out, err) == (0, b'{"i":10}\n{"i":11}\n', b"")


# ------------------------------------------------------------------------------------ status


def test_status_text_and_json(cli: Cli, log_path: Path) -> None:
    fill(log_path, 100, segment_max_bytes=1000)
    before = time.time()
    assert cli("consume", log_path, "--name", "counter", "--handler", COUNTER,
               "--catch-up").code == 0
    fill(log_path, 20, first=100)
    r = cli("status", log_path, "--json")
    assert r.code == 0
    doc = json.loads(r.out)
    files = segment_files(log_path)
    assert doc["path"] == str(log_path)
    assert doc["head"] == 120
    assert doc["first_offset"] == 0
    assert doc["segments"] == {"count": len(files), "plain": len(files), "compressed": 0,
                               "bytes": sum(f.stat().st_size for f in files)}
    [counter] = doc["consumers"]
    assert counter["name"] == "counter"
    assert (counter["offset"], counter["lag"], counter["running_pids"]) == (100, 20, [])
    assert before <= counter["last_checkpoint"] <= time.time()
    assert 0 <= counter["checkpoint_age_seconds"] < 60
    assert doc["writers_holding_lock"] == []
    assert doc["quarantined_files"] == 0

    text = cli("status", log_path).text
    assert f"log        {log_path}" in text
    assert "head       120 events (first stored offset 0)" in text
    assert f"segments   {len(files)} (0 gzip, {len(files)} plain)" in text
    assert "writers    none with the log open for appending, none holding the writer lock" in text
    assert re.search(r"counter +offset +100 +lag +20 \(\d+\.\ds\) +checkpoint \d+\.\d+s ago"
                     r" +stopped", text)


_HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_status_lists_writers_and_running_consumers(cli: Cli, log_path: Path,
                                                    children: Children) -> None:
    fill(log_path, 5)
    holder = children.popen([sys.executable, "-c", _HOLD_LOCK, str(log_path / "writer.lock")],
                            stdin=subprocess.PIPE)
    assert read_line(holder) == b"locked\n"
    consumer = start(children, "consume", log_path, "--name", "live", "--handler", COUNTER)

    def running() -> bool:
        return any(c["running_pids"] == [consumer.pid]
                   for c in log_status(log_path)["consumers"])

    wait_until(running, what="the consumer to hold its name")
    doc = json.loads(cli("status", log_path, "--json").out)
    assert doc["writers_holding_lock"] == [holder.pid]
    assert doc["consumers"][0]["name"] == "live"
    assert doc["consumers"][0]["lag"] == 0
    text = cli("status", log_path).text
    assert (f"writers    {holder.pid} with the log open for appending, {holder.pid} holding "
            "the writer lock") in text
    assert f"running (pid {consumer.pid})" in text
    assert holder.stdin is not None
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0
    consumer.send_signal(signal.SIGTERM)
    _, err = consumer.communicate(timeout=30)
    assert consumer.returncode == 0
    assert b"consumer live: stopped at offset 5" in err
    assert json.loads(cli("status", log_path, "--json").out)["writers_holding_lock"] == []


def test_status_shows_a_streaming_append_as_a_writer(cli: Cli, log_path: Path,
                                                      children: Children) -> None:
    # It holds the writer lock only while it commits, so "holding the lock" missed it.
    fill(log_path, 1)
    writer = children.popen([sys.executable, "-m", "eventpipe", "append", str(log_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert writer.stdin is not None
    writer.stdin.write(b'{"n": 1}\n')
    writer.stdin.flush()
    wait_until(lambda: writer.pid in log_status(log_path)["writers_open"],
               what="the streaming append to open the log for appending")
    assert f"writers    {writer.pid} with the log open" in cli("status", log_path).text
    writer.stdin.close()
    assert writer.wait(timeout=30) == 0
    assert log_status(log_path)["writers_open"] == []


def test_status_of_a_missing_log_creates_nothing(cli: Cli, tmp_path: Path) -> None:
    r = cli("status", tmp_path / "typo")
    assert r.code == 3
    assert r.err == f"eventpipe: no eventpipe log at {tmp_path / 'typo'}\n"
    assert not (tmp_path / "typo").exists()


# ------------------------------------------------------------------------------------ verify


@pytest.fixture(scope="module")
def sealed_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log with two sealed plain segments (~200 KB each, with checksum sidecars) + active."""
    path = tmp_path_factory.mktemp("verify") / "log"
    with EventLog(path, compression=None, segment_max_bytes=200_000) as log:
        log.append_many([{"name": f"event{i}", "account": f"acct-{i % 20:02d}", "amount": i}
                         for i in range(9000)])
        sealed = bases(path)[:-1]
        assert len(sealed) == 2
        # Checksums are written by a background thread after a roll: wait for them.
        wait_until(lambda: all((path / "segments" / f"{b:020d}.sum").exists() for b in sealed),
                   what="checksum sidecars")
    return path


@pytest.fixture
def copy(sealed_log: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "log"
    shutil.copytree(sealed_log, dest)
    return dest


def test_verify_healthy_log(cli: Cli, copy: Path) -> None:
    r = cli("verify", copy)
    assert (r.code, r.out) == (0, b"")
    assert "verified 3 segments, 9000 events, 0 checkpoints: ok" in r.err
    doc = json.loads(cli("verify", copy, "--json").out)
    assert doc["ok"] is True and doc["problems"] == []
    assert (doc["segments"], doc["events"], doc["head"]) == (3, 9000, 9000)


def _flip(path: Path, position: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ mask]))


def _letter_positions(content: bytes) -> list[int]:
    """Positions of letters inside JSON strings ("event123" values), where a case flip
    leaves every line valid JSON."""
    return [m.start(1) + k for m in re.finditer(rb'"name":"(event)', content) for k in range(5)]


@pytest.mark.parametrize("seed", range(4))
def test_verify_finds_one_flipped_byte_in_a_sealed_segment(cli: Cli, copy: Path,
                                                           seed: int) -> None:
    rng = random.Random(seed)
    seg = rng.choice(segment_files(copy)[:-1])
    base = int(seg.name.split(".")[0])
    content = seg.read_bytes()
    # One arbitrary byte and mask, and one letter flipped in case (valid JSON remains).
    cases = [(rng.randrange(len(content)), rng.randrange(1, 256), False),
             (rng.choice(_letter_positions(content)), 0x20, True)]
    for position, mask, stays_valid in cases:
        _flip(seg, position, mask)
        if stays_valid:
            assert all(orjson.loads(line) for line in seg.read_bytes().splitlines())
        r = cli("verify", copy)
        start_ = position // BLOCK * BLOCK
        first_event = base + content.count(b"\n", 0, start_)
        assert r.code == 1, (position, mask)
        assert (f"{seg}: offset {first_event} content differs from its checksum in bytes "
                f"{start_}..{start_ + BLOCK - 1}") in r.text, (position, mask, r.text)
        assert "problem(s)" in r.err
        doc = json.loads(cli("verify", copy, "--json").out)
        assert doc["ok"] is False
        assert {"path": str(seg), "offset": first_event} in [
            {"path": p["path"], "offset": p["offset"]} for p in doc["problems"]]
        _flip(seg, position, mask)  # and back: healthy again
        assert cli("verify", copy).code == 0


def _compress(path: Path) -> list[Path]:
    with EventLog(path) as log:
        assert log.compress() == 2
    gz = [p for p in segment_files(path) if p.name.endswith(".gz")]
    assert len(gz) == 2
    return gz


@pytest.mark.parametrize("seed", range(4))
def test_verify_finds_a_flipped_byte_in_a_gzip_segment(cli: Cli, copy: Path,
                                                       seed: int) -> None:
    rng = random.Random(seed)
    seg = rng.choice(_compress(copy))
    size = seg.stat().st_size
    # Bytes 4..9 of the gzip header (mtime, flags, OS) describe nothing of the content and are
    # covered by no checksum; every other byte is.
    for position in (rng.randrange(10, size), rng.randrange(0, 4),
                     rng.randrange(size - 8, size)):
        _flip(seg, position, 0xFF)
        r = cli("verify", copy)
        assert r.code == 1, position
        assert str(seg) in r.text, (position, r.text)
        _flip(seg, position, 0xFF)
    assert cli("verify", copy).code == 0


def test_verify_finds_a_truncated_gzip_segment(cli: Cli, copy: Path) -> None:
    seg = _compress(copy)[0]
    with open(seg, "r+b") as f:
        f.truncate(seg.stat().st_size // 2)
    r = cli("verify", copy)
    assert r.code == 1
    assert re.search(rf"{re.escape(str(seg))}: offset \d+ gzip data damaged .*truncated", r.text)
    problems = json.loads(cli("verify", copy, "--json").out)["problems"]
    assert [p["path"] for p in problems] == [str(seg)]


def test_verify_a_live_log_whose_segments_are_compressed_or_pruned_meanwhile(
        cli: Cli, copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another process compresses (or prunes) sealed segments between verify's listing of the
    # segments and its reading them: not a problem, and certainly not a traceback.
    real = list_segments
    seen: list[int] = []

    def then(action: str) -> Any:
        def listing(folder: str) -> Any:
            segs = real(folder)
            if not seen:
                seen.append(1)
                with EventLog(copy) as log:
                    if action == "compress":
                        log.compress()
                    else:
                        log.prune(before=bases(copy)[1], force=True)
            return segs
        return listing

    monkeypatch.setattr("eventpipe._verify.list_segments", then("compress"))
    r = cli("verify", copy)
    assert (r.code, r.out) == (0, b""), r.err
    assert "verified 3 segments, 9000 events" in r.err
    assert [p.name.endswith(".gz") for p in segment_files(copy)] == [True, True, False]
    seen.clear()
    monkeypatch.setattr("eventpipe._verify.list_segments", then("prune"))
    r = cli("verify", copy)
    assert (r.code, r.out) == (0, b""), r.err
    assert "verified 2 segments" in r.err


def _checkpoint(path: Path, name: str, upto: int) -> Path:
    """Leave consumer ``name`` checkpointed at offset ``upto``: its handler fails there."""

    def handler(state: int, event: Any, offset: int) -> int:
        if offset == upto:
            raise RuntimeError("stop here")
        return state + 1

    with Consumer(path, name, handler, 0) as c:
        with contextlib.suppress(HandlerError):
            c.catch_up()
        assert c.offset == upto
    return path / "consumers" / f"{name}.json"


def test_verify_finds_a_corrupt_checkpoint(cli: Cli, copy: Path) -> None:
    cp = _checkpoint(copy, "broken", 100)
    assert cli("verify", copy).code == 0
    cp.write_bytes(cp.read_bytes()[:40])
    r = cli("verify", copy)
    assert r.code == 1
    assert f"{cp}: checkpoint is corrupt" in r.text
    assert "verified 3 segments, 9000 events, 1 checkpoints: 1 problem(s)" in r.err


def test_verify_finds_a_checkpoint_ahead_of_the_head(cli: Cli, copy: Path) -> None:
    cp = _checkpoint(copy, "ahead", 9000)
    rewrite_checkpoint(cp, offset=9005)
    r = cli("verify", copy)
    assert r.code == 1
    assert f"{cp}: offset 9005 checkpoint is ahead of the head 9000" in r.text


def test_verify_finds_a_changed_event_under_a_checkpoint(cli: Cli, copy: Path) -> None:
    # The active segment has no checksum yet; the checkpoint's fingerprint of the event it was
    # taken after still catches a change there, even one that leaves valid JSON.
    cp = _checkpoint(copy, "fp", 8999)
    active = segment_files(copy)[-1]
    content = active.read_bytes()
    last = content.rstrip(b"\n").rsplit(b"\n", 2)[-2]  # event 8998, the one before the head-1
    assert orjson.loads(last)["name"] == "event8998"
    _flip(active, content.rindex(last) + last.index(b"event8998"), 0x20)
    r = cli("verify", copy)
    assert r.code == 1
    assert f"{cp}: offset 8998 the event this checkpoint was taken after has changed" in r.text


# ------------------------------------------------------------------------------------- prune


@pytest.fixture
def small_segments(log_path: Path) -> Path:
    fill(log_path, 300, compression=None, segment_max_bytes=1000)
    assert len(bases(log_path)) > 8
    return log_path


def _prune(cli: Cli, path: Path, *args: str) -> dict[str, Any]:
    r = cli("prune", path, "--json", *args)
    assert r.code == 0, r.err
    report: dict[str, Any] = json.loads(r.out)
    return report


def test_prune_before_and_then_reading_the_removed_range(cli: Cli,
                                                         small_segments: Path) -> None:
    b = bases(small_segments)
    size = sum(f.stat().st_size for f in segment_files(small_segments)[:3])
    r = cli("prune", small_segments, "--before", str(b[3] + 1))  # segment 3 ends after that
    assert r.code == 0
    assert r.text == f"removed 3 segments ({size} bytes); log now starts at offset {b[3]}\n"
    assert bases(small_segments) == b[3:]
    assert not any(p.name.startswith(f"{b[0]:020d}") for p in (small_segments
                                                               / "segments").iterdir())
    r = cli("read", small_segments, "--from", "0")
    assert (r.code, r.out) == (3, b"")
    assert "OffsetOutOfRangeError" not in r.err  # a clean message, not a class name
    assert f"before the first stored segment ({b[3]})" in r.err
    assert run("read", small_segments, "--from", str(b[3] - 1)).code == 3
    # Without --from, read starts at the first stored event.
    r = cli("read", small_segments, "--with-offsets")
    assert r.code == 0
    assert json.loads(r.text.splitlines()[0])["offset"] == b[3]
    assert len(r.text.splitlines()) == 300 - b[3]
    # "The last 1000" of a pruned log are those still stored.
    assert cli("read", small_segments, "--from", "-1000").out == cli("read", small_segments).out
    assert cli("verify", small_segments).code == 0


def test_prune_max_bytes(cli: Cli, small_segments: Path) -> None:
    files = segment_files(small_segments)
    total = sum(f.stat().st_size for f in files)
    keep = total - files[0].stat().st_size - files[1].stat().st_size
    report = _prune(cli, small_segments, "--max-bytes", str(keep))
    b = [int(f.name.split(".")[0]) for f in files]
    assert report["removed"] == b[:2]
    assert report["first_offset"] == b[2]
    assert report["bytes_removed"] == total - keep
    assert sum(f.stat().st_size for f in segment_files(small_segments)) == keep


def test_prune_max_age(cli: Cli, small_segments: Path) -> None:
    files = segment_files(small_segments)
    old = time.time() - 3600
    # Segments without time indexes (as written before eventpipe kept times) go by their
    # file times; tests/test_retention.py checks that event times win where they exist.
    for f in files[:4] + files[5:6]:
        os.utime(f, (old, old))
        (f.parent / (f.name.split(".")[0] + ".times")).unlink()
    # files[5] is not removed: only the oldest run goes
    report = _prune(cli, small_segments, "--max-age", "1800")
    assert report["removed"] == [int(f.name.split(".")[0]) for f in files[:4]]
    assert len(segment_files(small_segments)) == len(files) - 4


def test_prune_is_held_back_by_a_consumer_unless_forced(cli: Cli, log_path: Path) -> None:
    fill(log_path, 100, compression=None, segment_max_bytes=1000)
    assert cli("consume", log_path, "--name", "counter", "--handler", COUNTER,
               "--catch-up").code == 0
    fill(log_path, 200, first=100, compression=None, segment_max_bytes=1000)
    b = bases(log_path)
    k = max(i for i, base in enumerate(b) if base <= 100)  # the segment holding offset 100
    assert 0 < k < 6 and b[k] < 100

    dry = _prune(cli, log_path, "--before", str(b[6]), "--dry-run")
    assert dry["removed"] == b[:k] and bases(log_path) == b
    report = _prune(cli, log_path, "--before", str(b[6]))
    assert report["removed"] == b[:k]
    assert report["first_offset"] == b[k]
    [note] = report["held_back"]
    assert f"segment {b[k]} (offsets {b[k]}..{b[k + 1] - 1}) and later" in note
    assert "consumer 'counter' is at offset 100" in note
    r = cli("prune", log_path, "--before", str(b[6]))
    assert r.code == 0
    assert "removed 0 segments" in r.text
    assert f"held back: segment {b[k]}" in r.err and "consumer 'counter'" in r.err
    # What the consumer has not processed is still there.
    r = cli("read", log_path, "--from", "100", "--to", "101")
    assert (r.code, r.out) == (0, b'{"i":100,"pad":"xxxxxxxxxxxxxxxxxxxx"}\n')

    report = _prune(cli, log_path, "--before", str(b[6]), "--force")
    assert report["removed"] == b[k:6] and report["held_back"] == []
    assert bases(log_path) == b[6:]
    # A reader positioned in the removed range gets OffsetOutOfRangeError: exit 3.
    for offset in ("0", "100", str(b[6] - 1)):
        r = cli("read", log_path, "--from", offset)
        assert r.code == 3 and f"before the first stored segment ({b[6]})" in r.err
    assert cli("read", log_path, "--from", str(b[6]), "--to", str(b[6] + 1)).code == 0


def test_prune_force_strands_a_consumer_which_then_fails_cleanly(cli: Cli,
                                                                 small_segments: Path) -> None:
    _checkpoint(small_segments, "slow", 10)
    b = bases(small_segments)
    report = _prune(cli, small_segments, "--before", str(b[4]), "--force")
    assert report["removed"] == b[:4]
    r = cli("consume", small_segments, "--name", "slow", "--handler", COUNTER, "--catch-up")
    assert r.code == 3
    assert "offset=10" in r.err and "Traceback" not in r.err


def test_prune_needs_a_criterion(cli: Cli, small_segments: Path) -> None:
    r = cli("prune", small_segments)
    assert r.code == 2
    assert "--max-age, --max-bytes or --before" in r.err


# ----------------------------------------------------------------------------------- consume


def test_consume_catch_up_print_state(cli: Cli, log_path: Path) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"type": "a"}, {"type": "b"}, {"type": "a"}])
    r = cli("consume", log_path, "--name", "counter", "--handler", COUNTER, "--catch-up",
            "--print-state")
    assert r.code == 0
    assert json.loads(r.out) == {"events": 3, "by_type": {"a": 2, "b": 1}, "last_offset": 2}
    assert "consumer counter: stopped at offset 3" in r.err
    r = cli("consume", log_path, "--name", "other", "--handler", COUNTER, "--catch-up",
            "--print-state", "--initial-state", '{"events": 10, "by_type": {}, '
            '"last_offset": null}')
    assert json.loads(r.out)["events"] == 13


def test_consume_takes_everything_from_the_environment(log_path: Path) -> None:
    """As the systemd unit runs it: PATH, --handler and --name from EVENTPIPE_* variables."""
    with EventLog(log_path) as log:
        log.append_many([{"type": "a"}, {"type": "b"}])
    env = {**_env(), "EVENTPIPE_LOG_PATH": str(log_path), "EVENTPIPE_HANDLER": COUNTER,
           "EVENTPIPE_CONSUMER_NAME": "shared"}
    proc = subprocess.run([sys.executable, "-m", "eventpipe", "consume", "--catch-up"],
                          capture_output=True, timeout=60, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (log_path / "consumers" / "shared.json").exists()


def test_consume_module_handler_from_pythonpath(log_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fill(log_path, 4)
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "examples"))
    r = run("consume", log_path, "--name", "c", "--handler", "counter_consumer:handle",
            "--catch-up", "--print-state")
    assert r.code == 0, r.err
    assert json.loads(r.out)["events"] == 4


@pytest.mark.parametrize(("spec", "message"), [
    ("no-colon", "must look like MODULE:FUNCTION"),
    (":handle", "must look like MODULE:FUNCTION"),
    ("no_such_module_xyz:handle", "No module named 'no_such_module_xyz'"),
    (str(ROOT / "examples" / "counter_consumer.py") + ":nope", "has no attribute 'nope'"),
    ("/nonexistent/handler.py:handle", "No such file or directory"),
    ("os:sep", "is not callable"),
    ("SYNTAX", "SyntaxError"),
])
def test_consume_bad_handler_exits_2(cli: Cli, log_path: Path, tmp_path: Path, spec: str,
                                     message: str) -> None:
    if spec == "SYNTAX":
        broken = tmp_path / "broken.py"
        broken.write_text("def handle(state, event, offset)\n    return state\n")
        spec = f"{broken}:handle"
    r = cli("consume", log_path, "--name", "c", "--handler", spec, "--catch-up")
    assert r.code == 2
    assert r.err.startswith("eventpipe: ")
    assert "handler" in r.err and message in r.err, r.err
    assert "Traceback" not in r.err


def test_consume_bad_options_exit_2(cli: Cli, log_path: Path) -> None:
    fill(log_path, 1)
    base = ("consume", log_path, "--name", "c", "--handler", COUNTER, "--catch-up")
    r = cli(*base, "--initial-state", "{nope")
    assert (r.code, "--initial-state is not JSON" in r.err) == (2, True)
    r = cli(*base, "--checkpoint-every", "0")
    assert (r.code, r.err.startswith("eventpipe: --checkpoint-every ")) == (2, True), r.err
    assert "keyword argument" not in r.err
    r = cli("consume", log_path, "--name", "../escape", "--handler", COUNTER, "--catch-up")
    assert (r.code, "consumer name '../escape' is invalid" in r.err) == (2, True)
    r = cli(*base, "--on-error", "dead_letter")
    assert (r.code, "dead_letter" in r.err) == (2, True)


def test_consume_busy_name_exits_3_naming_the_holder(log_path: Path,
                                                     children: Children) -> None:
    fill(log_path, 7)
    first = start(children, "consume", log_path, "--name", "counter", "--handler", COUNTER)
    wait_until(lambda: (log_path / "consumers" / "counter.json").exists()
               and log_status(log_path)["consumers"][0]["running_pids"] == [first.pid],
               what="the first consumer to hold the name")
    r = run("consume", log_path, "--name", "counter", "--handler", COUNTER, "--catch-up")
    assert r.code == 3
    assert "ConsumerBusyError" in r.err and "already running" in r.err
    assert f"pid {first.pid} on " in r.err
    assert "Traceback" not in r.err
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=30)
    assert first.returncode == 0
    assert b"consumer counter: stopped at offset 7" in err
    r = run("consume", log_path, "--name", "counter", "--handler", COUNTER, "--catch-up",
            "--print-state")
    assert r.code == 0 and json.loads(r.out)["events"] == 7  # resumed, nothing twice


def test_consume_handler_error_exits_3_with_the_offset(cli: Cli, log_path: Path,
                                                       tmp_path: Path) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"n": 1}, {"n": 0}, {"n": 2}])
    handler = tmp_path / "divide.py"
    handler.write_text("def handle(state, event, offset):\n"
                       "    return (state or 0) + 1 / event['n']\n")
    r = cli("consume", log_path, "--name", "div", "--handler", f"{handler}:handle",
            "--catch-up")
    assert r.code == 3
    assert "HandlerError" in r.err and "ZeroDivisionError" in r.err and "offset=1" in r.err


# -------------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize(("argv", "code", "message"), [
    ([], 2, "usage: eventpipe"),
    (["read"], 2, "the following arguments are required: path"),
    (["frobnicate", "x"], 2, "invalid choice: 'frobnicate'"),
    (["read", "LOG", "--from", "one"], 2, "invalid int value"),
    (["--version"], 0, ""),
])
def test_usage_errors_exit_2_and_version_0(log_path: Path, argv: list[str], code: int,
                             message: str) -> None:
    r = run(*[str(log_path) if a == "LOG" else a for a in argv])
    assert r.code == code
    assert message in r.err
    assert "Traceback" not in r.err
    if argv == ["--version"]:
        assert r.out.startswith(b"eventpipe ")


def test_bad_option_from_the_environment_exits_2(cli: Cli, ten: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTPIPE_SYNC", "sometimes")
    r = cli("read", ten)
    assert r.code == 2
    assert "EVENTPIPE_SYNC" in r.err


def test_eventpipe_errors_exit_3(cli: Cli, tmp_path: Path) -> None:
    not_a_log = tmp_path / "stuff"
    not_a_log.mkdir()
    (not_a_log / "notes.txt").write_text("hello")
    argvs: list[list[str | Path]] = [["read", not_a_log], ["append", not_a_log],
                                     ["prune", not_a_log, "--before", "1"]]
    for argv in argvs:
        r = cli(*argv, stdin=b"{}\n")
        assert r.code == 3, argv
        if argv[0] == "append":  # would create a log: refuses a folder holding other files
            assert "NotAnEventLogError" in r.err and str(not_a_log) in r.err
        else:
            assert r.err == f"eventpipe: no eventpipe log at {not_a_log}\n"
    assert [p.name for p in not_a_log.iterdir()] == ["notes.txt"]  # untouched


def test_verify_of_a_log_without_its_metadata_exits_1(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "segments").mkdir()  # something of a log: verify judges it
    r = cli("verify", tmp_path)
    assert r.code == 1
    assert "eventpipe.json: metadata unreadable" in r.text


def test_verify_of_a_folder_holding_no_log_exits_3(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    for path in (tmp_path, tmp_path / "typo", tmp_path / "notes.txt"):
        r = cli("verify", path)
        assert (r.code, r.err) == (3, f"eventpipe: no eventpipe log at {path}\n")


def test_corrupt_log_exits_3(cli: Cli, ten: Path) -> None:
    (ten / "head").write_bytes(b"\0" * 32)
    r = cli("read", ten)
    assert r.code == 3
    assert "CorruptLogError" in r.err


def test_status_says_what_stopped_a_consumer_until_it_goes_on(
        cli: Cli, log_path: Path, tmp_path: Path) -> None:
    fill(log_path, 5)
    handler = tmp_path / "picky.py"
    handler.write_text("import os\n"
                       "def count(state, event, offset):\n"
                       "    if offset == 3 and not os.environ.get('FIXED'):\n"
                       "        raise KeyError('events')\n"
                       "    return (state or 0) + 1\n")
    r = cli("consume", log_path, "--name", "picky", "--handler", f"{handler}:count",
            "--catch-up")
    assert r.code == 3
    doc = json.loads(cli("status", log_path, "--json").out)
    [entry] = doc["consumers"]
    assert entry["offset"] == 3 and "KeyError" in entry["last_stop"]["error"]
    assert entry["last_stop"]["offset"] == 3
    assert "stopped by: " in cli("status", log_path).text
    os.environ["FIXED"] = "1"
    try:
        assert cli("consume", log_path, "--name", "picky", "--handler", f"{handler}:count",
                   "--catch-up").code == 0
    finally:
        del os.environ["FIXED"]
    [entry] = json.loads(cli("status", log_path, "--json").out)["consumers"]
    assert entry["offset"] == 5 and "last_stop" not in entry
