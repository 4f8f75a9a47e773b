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
