"""Dead letters: every entry fits, none is written twice, a bad dead_letter option fails early
(issue 8, items 8, 9 and 15)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from eventpipe import ConfigError, Consumer, EventLog

from .conftest import ROOT

MAX = 64 * 1024  # max_event_bytes of both logs in the size tests (the default is 1 MiB)


def skipping(bad: set[int], quote: bool = False) -> Any:
    """A handler that fails on the events whose ``seq`` is in ``bad`` (quoting the event in its
    error when asked) and otherwise counts and sums."""

    def handler(state: dict[str, Any], event: Any, offset: int) -> dict[str, Any]:
        if event["seq"] in bad:
            raise ValueError(f"cannot handle {event!r}" if quote else "cannot handle it")
        return {"n": state["n"] + 1, "sum": state["sum"] + event["seq"]}

    return handler


def entries(dlq: Path) -> list[dict[str, Any]]:
    with EventLog(dlq) as log:
        return [r.event for r in log.read()]


def test_an_error_quoting_a_large_event_is_cut_to_fit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: the entry (the event, plus an error quoting it) was over max_event_bytes, so
    # EventTooLargeError on every restart: the consumer was wedged.
    log_path, dlq = tmp_path / "log", tmp_path / "dlq"
    monkeypatch.setenv("EVENTPIPE_MAX_EVENT_BYTES", str(MAX))  # both logs open with it
    with EventLog(log_path) as log:
        log.append_many([{"seq": 0}, {"seq": 1, "blob": "x" * (MAX * 6 // 10)}, {"seq": 2}])
    with Consumer(log_path, "c", skipping({1}, quote=True), {"n": 0, "sum": 0},
                  on_error="dead_letter", dead_letter=str(dlq), max_retries=0) as c:
        assert c.catch_up() == {"n": 2, "sum": 2}
    [entry] = entries(dlq)
    assert entry["offset"] == 1 and entry["event"]["blob"] == "x" * (MAX * 6 // 10)
    assert entry["error"].startswith("ValueError: cannot handle {'seq': 1")
    assert entry["error"].endswith("...(cut)") and len(entry["error"]) < 5000


def test_an_event_too_large_to_quote_is_named_by_its_offset(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log_path, dlq = tmp_path / "log", tmp_path / "dlq"
    monkeypatch.setenv("EVENTPIPE_MAX_EVENT_BYTES", str(MAX))
    with EventLog(log_path) as log:
        log.append_many([{"seq": 0}, {"seq": 1, "blob": "y" * (MAX - 100)}, {"seq": 2}])
    with Consumer(log_path, "c", skipping({1}), {"n": 0, "sum": 0},
                  on_error="dead_letter", dead_letter=str(dlq), max_retries=0) as c:
        assert c.catch_up() == {"n": 2, "sum": 2}
    [entry] = entries(dlq)
    assert entry["offset"] == 1 and entry["event"] is None and "event_omitted" in entry
    with EventLog(log_path) as log:  # the entry says where to find it
        assert next(log.read(entry["offset"])).event["blob"] == "y" * (MAX - 100)


# A consumer that dead-letters event 5 and is killed (SIGKILL, by itself) the instant the
# dead-letter append returns: before the checkpoint that records it.
_KILLED_AFTER_APPEND = """
import os, signal, sys
from eventpipe import Consumer, EventLog
from tests.test_dead_letter import skipping
log_path, dlq_path = sys.argv[1:]
real_append = EventLog.append
def append(self, event):
    offset = real_append(self, event)
    if self.path == os.path.abspath(dlq_path):
        os.kill(os.getpid(), signal.SIGKILL)
    return offset
EventLog.append = append
with Consumer(log_path, "c", skipping({5}), {"n": 0, "sum": 0}, on_error="dead_letter",
              dead_letter=dlq_path, max_retries=0) as c:
    c.catch_up()
"""


@pytest.mark.parametrize("others", [0, 150])
def test_killed_after_the_dead_letter_append_writes_no_second_entry(
        tmp_path: Path, others: int) -> None:
    # Before: a restart looked for its entry among the last 100 only; with more appended by
    # others since, it wrote a second one.
    log_path, dlq = tmp_path / "log", tmp_path / "dlq"
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(10)])
    child = subprocess.run([sys.executable, "-c", _KILLED_AFTER_APPEND, str(log_path), str(dlq)],
                           check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert [e["offset"] for e in entries(dlq)] == [5]
    with EventLog(dlq) as shared:  # other consumers share the dead-letter log
        shared.append_many([{"consumer": "other", "offset": 5, "log_id": "x"}] * others)
    seen: list[int] = []

    def handler(state: dict[str, Any], event: Any, offset: int) -> dict[str, Any]:
        seen.append(offset)
        new: dict[str, Any] = skipping({5})(state, event, offset)
        return new

    with Consumer(log_path, "c", handler, {"n": 0, "sum": 0}, on_error="dead_letter",
                  dead_letter=str(dlq), max_retries=0) as c:
        # Exactly the state of an uninterrupted run, and the dead-lettered event is not
        # handled again (a handler that works now would otherwise count it).
        assert c.catch_up() == {"n": 9, "sum": 45 - 5}
    assert 5 not in seen
    mine = [e for e in entries(dlq) if e.get("consumer") == "c"]
    assert [e["offset"] for e in mine] == [5]


def test_dead_letter_must_not_be_the_consumed_log(tmp_path: Path) -> None:
    log_path = tmp_path / "log"
    EventLog(log_path).close()
    os.symlink(log_path, tmp_path / "alias")
    for target in (log_path, tmp_path / "alias"):
        with pytest.raises(ConfigError, match="is the consumed log") as exc:
            Consumer(log_path, "c", skipping(set()), {"n": 0, "sum": 0},
                     on_error="dead_letter", dead_letter=str(target))
        assert exc.value.option == "dead_letter"


def test_dead_letter_that_is_not_a_log_fails_at_construction(tmp_path: Path) -> None:
    log_path, folder = tmp_path / "log", tmp_path / "papers"
    EventLog(log_path).close()
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an eventpipe log") as exc:
        Consumer(log_path, "c", skipping(set()), {"n": 0, "sum": 0},
                 on_error="dead_letter", dead_letter=str(folder))
    assert exc.value.option == "dead_letter"
    assert sorted(os.listdir(folder)) == ["notes.txt"]


def test_absurd_retry_backoff_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="retry_backoff") as exc:
        Consumer(tmp_path / "log", "c", skipping(set()), {"n": 0, "sum": 0},
                 on_error="retry", retry_backoff=1e300)
    assert exc.value.option == "retry_backoff"


# ------------------------------------------ issue 11: dead-letter counts in status, consumers

COUNTING = str(ROOT / "examples" / "counter_consumer.py") + ":handle"
FAILS_ON_BAD = """
def handle(state, event, offset):
    if event.get("bad"):
        raise ValueError(f"bad event at {offset}")
    return (state or 0) + 1
"""


def _consume(log: Path, name: str, handler: str, *args: str | Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "eventpipe", "consume", str(log), "--name",
                           name, "--handler", handler, "--catch-up", *map(str, args)],
                          capture_output=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr.decode()


def _eventpipe(*args: str | Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "eventpipe", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_status_consumers_and_metrics_count_each_consumers_dead_letters(
        tmp_path: Path) -> None:
    """Consumers of two logs share one dead-letter log: each is shown its own entries (by
    consumed log and name), one without a dead-letter log shows none (null, not 0), and a
    dead-letter log replaced by another log is not counted."""
    import json

    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    a, b, dlq = tmp_path / "a", tmp_path / "b", tmp_path / "dlq"
    (tmp_path / "fails.py").write_text(FAILS_ON_BAD)
    handler = f"{tmp_path / 'fails.py'}:handle"
    with EventLog(a) as log:
        log.append_many([{"i": i, "bad": i in (2, 5, 7)} for i in range(10)])
    with EventLog(b) as log:
        log.append_many([{"i": i, "bad": i in (0, 1)} for i in range(4)])
    dead = ("--on-error", "dead_letter", "--dead-letter", dlq)
    _consume(a, "x", handler, *dead)
    _consume(b, "x", handler, *dead)  # the same name, another log: not a's x's entries
    with EventLog(a) as log:
        log.append({"i": 10, "bad": True})
    _consume(a, "z", handler, *dead)  # shares the dead-letter log: 4 entries of its own
    _consume(a, "plain", COUNTING)  # no dead-letter log
    assert len(entries(dlq)) == 3 + 2 + 4

    status = json.loads(_eventpipe("status", a, "--json"))
    by_name = {c["name"]: c for c in status["consumers"]}
    assert by_name["x"]["dead_letters"] == 3 and by_name["x"]["dead_letter_log"] == str(dlq)
    assert by_name["z"]["dead_letters"] == 4
    assert by_name["plain"]["dead_letters"] is None
    assert by_name["plain"]["dead_letter_log"] is None
    text = _eventpipe("status", a)
    assert f"dead letters: 3 in {dlq}" in text and f"dead letters: 4 in {dlq}" in text, text
    assert text.count("dead letters") == 2, text

    listed = json.loads(_eventpipe("consumers", a, "--json"))
    by_name = {c["name"]: c for c in listed["consumers"]}
    assert (by_name["x"]["dead_letters"], by_name["z"]["dead_letters"]) == (3, 4)
    assert by_name["plain"]["dead_letters"] is None
    assert f"dead letters: 3 in {dlq}" in _eventpipe("consumers", a)
    assert json.loads(_eventpipe("consumers", b, "--json"))["consumers"][0][
        "dead_letters"] == 2

    metrics = {}
    for family in text_string_to_metric_families(  # type: ignore[no-untyped-call]
            _eventpipe("status", a, "--format", "prometheus")):
        for s in family.samples:
            if s.name == "eventpipe_consumer_dead_letters":
                metrics[s.labels["consumer"]] = s.value
    assert metrics == {"x": 3, "z": 4}  # no sample for "plain": not known, not 0

    # Another log where the dead-letter log was: not counted (unknown), and status says so.
    for p in sorted(dlq.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    dlq.rmdir()
    with EventLog(dlq):
        pass
    status = json.loads(_eventpipe("status", a, "--json"))
    x = next(c for c in status["consumers"] if c["name"] == "x")
    assert (x["dead_letters"], x["dead_letter_log"]) == (None, str(dlq))
    assert f"dead letters: ? ({dlq} cannot be read, or holds another log now)" in _eventpipe(
        "status", a)



def test_a_checkpoint_names_its_dead_letter_log_and_older_ones_read_as_unknown(
        tmp_path: Path) -> None:
    import dataclasses

    from eventpipe import log_status
    from eventpipe._checkpoint import (
        FORMAT_VERSION,
        DeadLetterLog,
        load_checkpoint,
        save_checkpoint,
    )
    from eventpipe._layout import Folder

    log_path, dlq = tmp_path / "log", tmp_path / "dlq"
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(3)])
        with Consumer(log, "c", skipping({1}), {"n": 0, "sum": 0}, on_error="dead_letter",
                      dead_letter=dlq) as c:
            c.catch_up()
    with EventLog(dlq) as dl:
        dl_id = dl.log_id
    with Folder.open(str(log_path / "consumers")) as folder:
        cp = load_checkpoint(folder, "c.json", "c")
        assert cp is not None and cp.version == FORMAT_VERSION
        assert cp.dead_letter == DeadLetterLog(str(dlq), dl_id)
        assert b'"dead_letter":{' in (log_path / "consumers" / "c.json").read_bytes()
        # `consumer reset` keeps it named.
        _eventpipe("consumer", "reset", log_path, "c", "--to-offset", "1", "--keep-state")
        again = load_checkpoint(folder, "c.json", "c")
        assert again is not None and again.offset == 1 and again.dead_letter == cp.dead_letter
        # A version 2 checkpoint written before the field existed: the same bytes without it.
        save_checkpoint(folder, "c.json", dataclasses.replace(cp, dead_letter=None), 0o644)
        assert b"dead_letter\":{" not in (log_path / "consumers" / "c.json").read_bytes()
        old = load_checkpoint(folder, "c.json", "c")
    assert old is not None and old.dead_letter is None and old.offset == cp.offset
    (entry,) = log_status(log_path)["consumers"]
    assert (entry["dead_letters"], entry["dead_letter_log"]) == (None, None)
