"""Checkpoints refuse what is not theirs, fall back to the previous one, clean up after kills,
and hold only states that read back unchanged (issue 8, items 13 and 14)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from eventpipe import CheckpointError, ConfigError, Consumer, EventLog, StateNotStorableError

from ._workers import INITIAL, fold
from .conftest import ROOT


def two_checkpoints(log_path: Path, name: str = "c") -> Path:
    """A log of 20 events and consumer ``name`` checkpointed at 10 (kept as .prev) and 20."""
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(10)])
        with Consumer(log, name, fold, INITIAL) as c:
            c.catch_up()
            log.append_many([{"seq": i} for i in range(10, 20)])
            c.catch_up()
    return log_path / "consumers" / f"{name}.json"


def resume(log_path: Path, name: str = "c") -> dict[str, Any]:
    with Consumer(log_path, name, fold, INITIAL) as c:
        state: dict[str, Any] = c.catch_up()
        return state


EXACT = {"next": 20, "n": 20, "sum": sum(range(20))}


@pytest.mark.parametrize("version", [True, 0, -1, 3, "2", None])
def test_a_checkpoint_version_must_be_a_known_integer(log_path: Path, version: Any) -> None:
    cp = two_checkpoints(log_path)
    (log_path / "consumers" / "c.json.prev").unlink()
    doc = json.loads(cp.read_bytes())
    doc["version"] = version
    cp.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="unsupported checkpoint version"):
        Consumer(log_path, "c", fold, INITIAL)


def test_another_consumers_checkpoint_is_not_adopted(log_path: Path) -> None:
    cp = two_checkpoints(log_path, "first")
    (log_path / "consumers" / "second.json").write_bytes(cp.read_bytes())
    why = "it is consumer 'first''s checkpoint, not 'second''s"
    with pytest.raises(CheckpointError, match=re.escape(why)):
        Consumer(log_path, "second", fold, INITIAL)


def test_an_edited_checkpoint_is_refused_by_its_checksum(log_path: Path) -> None:
    cp = two_checkpoints(log_path)
    (log_path / "consumers" / "c.json.prev").unlink()
    doc = json.loads(cp.read_bytes())
    doc["offset"] = 15  # with the state of offset 20: events 15..19 would count twice
    cp.write_text(json.dumps(doc))
    before = cp.read_bytes()
    with pytest.raises(CheckpointError, match="checksum mismatch") as exc:
        Consumer(log_path, "c", fold, INITIAL)
    assert exc.value.path == str(cp) and cp.read_bytes() == before


@pytest.mark.parametrize("damage", ["edit", "truncate"])
def test_a_damaged_checkpoint_resumes_from_the_previous_one(
        log_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    cp = two_checkpoints(log_path)
    if damage == "edit":
        doc = json.loads(cp.read_bytes())
        doc["offset"] = 15
        cp.write_text(json.dumps(doc))
    else:
        cp.write_bytes(cp.read_bytes()[:30])
    damaged = cp.read_bytes()
    with caplog.at_level(logging.WARNING, logger="eventpipe"):
        assert resume(log_path) == EXACT  # from .prev (offset 10): 10..19 handled once
    assert "resuming from the previous checkpoint c.json.prev (offset 10)" in caplog.text
    assert (log_path / "consumers" / "c.json.corrupt").read_bytes() == damaged
    assert json.loads(cp.read_bytes())["offset"] == 20
    assert resume(log_path) == EXACT  # and the next start is an ordinary one


def test_version_1_checkpoints_are_still_read(log_path: Path) -> None:
    cp = two_checkpoints(log_path)
    doc = json.loads(cp.read_bytes())
    for key in ("checksum", "dead_letter_from"):
        del doc[key]
    doc["version"] = 1
    cp.write_text(json.dumps(doc))
    assert resume(log_path) == EXACT


# A consumer with a big state, killed (SIGKILL) while it writes a checkpoint: the temp file
# is left behind, at most once per pid.
_KILLED_IN_CHECKPOINT = """
import os, signal, sys
from eventpipe import Consumer
real_write = os.write
def write(fd, data):
    if len(data) < 50_000:  # not a checkpoint
        return real_write(fd, data)
    real_write(fd, data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
os.write = write  # what Folder.write_atomic writes checkpoints with
def handler(state, event, offset):
    return {"blob": "z" * 100_000, "n": state["n"] + 1}
with Consumer(sys.argv[1], "c", handler, {"blob": "", "n": 0}) as c:
    c.catch_up()
"""


def test_temp_files_of_killed_checkpoint_writes_are_removed(log_path: Path) -> None:
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(5)])
    folder = log_path / "consumers"
    for _ in range(3):  # each start removes what the kill before it left (once 84 MB in all)
        child = subprocess.run([sys.executable, "-c", _KILLED_IN_CHECKPOINT, str(log_path)],
                               check=False, cwd=ROOT, capture_output=True, text=True,
                               timeout=60)
        assert child.returncode == -signal.SIGKILL, child.stderr
        left = [n for n in os.listdir(folder) if ".tmp." in n]
        assert len(left) == 1 and left[0].startswith("c.json.tmp.")
    (folder / "c.json.prev.tmp.4242").write_bytes(b"{}")  # a kill between link and rename
    (folder / "c.owner.tmp.4242").write_bytes(b"{}")  # a kill while taking the name
    (folder / "other.json.tmp.4242").write_bytes(b"{}")  # another consumer's: not ours
    with Consumer(log_path, "c", lambda s, e, o: s + 1, 0) as c:
        assert c.catch_up() == 5
    assert sorted(n for n in os.listdir(folder) if ".tmp." in n) == ["other.json.tmp.4242"]


class Colour:
    """Not JSON at all."""


@pytest.mark.parametrize(("value", "why"), [
    ((1, 2), "state['bad'] is a tuple"),
    ({1, 2}, "state['bad'] is a set"),
    (datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC), "state['bad'] is a datetime"),
    (uuid.UUID(int=7), "state['bad'] is a UUID"),
    (float("nan"), "state['bad'] is nan"),
    (1 << 70, "beyond 64 bits"),
    (Colour(), "state['bad'] is a Colour"),
    ({3: "x"}, "state['bad'] has a key of type int"),
])
def test_a_state_that_cannot_be_stored_names_the_event(
        log_path: Path, value: Any, why: str) -> None:
    # Before: datetimes, UUIDs, tuples, NaN and int keys were stored as something else (the
    # restarted consumer resumed with another state); sets and the rest failed at the next
    # checkpoint without saying which event did it.
    with EventLog(log_path) as log:
        log.append_many([{"seq": i} for i in range(100)])

    def handler(state: dict[str, Any], event: Any, offset: int) -> dict[str, Any]:
        state["n"] += 1
        if offset == 37:
            state["bad"] = value
        return state

    with Consumer(log_path, "c", handler, {"n": 0}, checkpoint_every=30) as c:
        with pytest.raises(StateNotStorableError, match=re.escape(why)) as exc:
            c.catch_up()
        assert exc.value.offset == 37
        assert "after the event at offset 37" in str(exc.value)
        # Rewound to the last checkpoint, which holds only storable states.
        assert c.offset == 30 and c.state == {"n": 30}
    assert json.loads((log_path / "consumers" / "c.json").read_bytes())["offset"] == 30


def test_an_initial_state_that_cannot_be_stored_is_a_config_error(log_path: Path) -> None:
    with pytest.raises(ConfigError, match="initial_state cannot be stored") as exc:
        Consumer(log_path, "c", fold, {"at": (1, 2)})
    assert exc.value.option == "initial_state"
