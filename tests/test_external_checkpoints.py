"""Consumers whose checkpoint_dir is outside the log are known to retention and status through
a registration file in the log (``consumers/external/``): retention never removes what such a
consumer still needs (issue 8, item 11: automatic retention pruned past one at offset 150, which
could then never resume), a registered consumer without a checkpoint or with an unreadable one
holds everything, an invalid registration is reported with its path, and ``eventpipe consumers
forget`` releases the hold."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from eventpipe import Consumer, EventLog
from eventpipe._registry import (
    KnownConsumer,
    known_checkpoints,
    register_external,
    registration_path,
)
from eventpipe._status import log_status

from ._main import Cli
from ._unprivileged import NOBODY, run_unprivileged
from .conftest import ROOT, Children

COUNTER = str(ROOT / "examples" / "counter_consumer.py") + ":handle"
SEG = 10  # events per segment: bases are multiples of 10


# ------------------------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["EVENTPIPE_COMPRESSION"] = "none"
    return env


def run(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    """``python -m eventpipe ARGS`` as a real process."""
    return subprocess.run([sys.executable, "-m", "eventpipe", *map(str, args)],
                          capture_output=True, timeout=120, env=_env(), check=False)


def consume_once(log: Path, name: str, checkpoint_dir: Path) -> dict[str, Any]:
    """Run the counter consumer as a real process until caught up; its final state."""
    proc = run("consume", log, "--name", name, "--handler", COUNTER, "--checkpoint-dir",
               checkpoint_dir, "--catch-up", "--print-state")
    assert proc.returncode == 0, proc.stderr.decode()
    state: dict[str, Any] = json.loads(proc.stdout)
    return state


def append(log: Path, count: int, first: int, **options: Any) -> None:
    """Append ``count`` events one by one (rolling every SEG), then finish the sealing work
    (checksums, compression and the automatic retention after each pass)."""
    with EventLog(log, segment_max_events=SEG, sync="none", **options) as lg:
        for i in range(first, first + count):
            lg.append({"i": i, "pad": "p" * 50})
        assert lg.finish_sealing(60)


def bases(log: Path) -> list[int]:
    """The base of every segment file (plain or gzip), oldest first."""
    return sorted({int(p.name[:20]) for p in (log / "segments").iterdir()
                   if re.fullmatch(r"\d{20}\.jsonl(\.gz)?", p.name)})


def external_at_150(log: Path, tmp_path: Path) -> Path:
    """A log of 300 events and consumer "ext" checkpointing in a folder outside it, at offset
    150 (a real process consumed the first 150), registered as consumer.py will do; returns
    its checkpoint file."""
    folder = tmp_path / "elsewhere"
    append(log, 150, 0)
    state = consume_once(log, "ext", folder)
    assert state["events"] == 150 and state["last_offset"] == 149
    checkpoint = folder / "ext.json"
    assert checkpoint.exists() and not (log / "consumers" / "ext.json").exists()
    # Stand-in for the call consumer.py makes at construction (wired in a later commit).
    register_external(str(log), "ext", str(checkpoint), 0o644, 0o755)
    append(log, 150, 150)
    assert bases(log)[0] == 0
    return checkpoint


def status_of(log: Path, name: str) -> dict[str, Any]:
    entries: list[dict[str, Any]] = log_status(log)["consumers"]
    [entry] = [c for c in entries if c["name"] == name]
    return entry


# --------------------------------------------------------------- retention waits for them


def test_automatic_retention_keeps_what_an_external_consumer_at_150_needs(
        log_path: Path, tmp_path: Path) -> None:
    external_at_150(log_path, tmp_path)
    # The retention after each compressor pass (blocking=False, from compress.state), with a
    # limit that alone would remove every sealed segment.
    append(log_path, 20, 300, retention_max_bytes=1)
    assert bases(log_path)[0] == 150, "removed what the external consumer still needs"
    with EventLog(log_path) as log:
        assert log.first_offset == 150
    state = consume_once(log_path, "ext", tmp_path / "elsewhere")  # resumes where it was
    assert (state["events"], state["last_offset"]) == (320, 319)


def test_explicit_prune_holds_back_for_an_external_consumer_and_status_lists_it(
        cli: Cli, log_path: Path, tmp_path: Path) -> None:
    checkpoint = external_at_150(log_path, tmp_path)
    r = cli("prune", log_path, "--before", "290")
    assert r.code == 0, r.err
    assert "removed 15 segments" in r.out and "log now starts at offset 150" in r.out
    assert (f"held back: segment 150 (offsets 150..159) and later: consumer 'ext' (external "
            f"checkpoint {checkpoint}) is at offset 150") in r.err
    assert bases(log_path)[0] == 150
    with EventLog(log_path) as log:  # the API says the same
        report = log.prune(max_bytes=1)
    assert report.removed == [] and report.first_offset == 150
    assert "consumer 'ext' (external checkpoint" in report.held_back[0]

    entry = status_of(log_path, "ext")
    assert entry["external"] is True and entry["checkpoint"] == str(checkpoint)
    assert entry["registration"] == registration_path(str(log_path), "ext", str(checkpoint))
    assert (entry["offset"], entry["lag"], entry["holds_retention_from"]) == (150, 150, 150)
    text = cli("status", log_path).out
    assert f"external checkpoint {checkpoint}" in text
    assert (state := consume_once(log_path, "ext", tmp_path / "elsewhere"))["events"] == 300
    assert state["last_offset"] == 299


def test_forget_releases_the_hold_and_keeps_the_checkpoint(
        cli: Cli, log_path: Path, tmp_path: Path) -> None:
    checkpoint = external_at_150(log_path, tmp_path)
    assert cli("prune", log_path, "--before", "290").code == 0
    assert bases(log_path)[0] == 150
    r = cli("consumers", "forget", log_path, "ext")
    assert r.code == 0, r.err
    reg = registration_path(str(log_path), "ext", str(checkpoint))
    assert r.out == f"forgot ext: removed {reg}\n"
    assert not os.path.exists(reg) and checkpoint.exists()
    assert [c["name"] for c in log_status(log_path)["consumers"]] == []
    r = cli("prune", log_path, "--before", "290")
    assert r.code == 0 and "held back" not in r.err
    assert bases(log_path)[0] == 290
    r = cli("consumers", "forget", log_path, "ext")
    assert r.code == 1 and "no registration of consumer 'ext'" in r.err


def test_forget_is_refused_while_the_consumer_runs(
        cli: Cli, log_path: Path, tmp_path: Path,
        children: Children) -> None:
    folder = tmp_path / "elsewhere"
    append(log_path, 30, 0)
    register_external(str(log_path), "live", str(folder / "live.json"), 0o644, 0o755)
    proc = children.popen([sys.executable, "-m", "eventpipe", "consume", str(log_path),
                           "--name", "live", "--handler", COUNTER, "--checkpoint-dir",
                           str(folder)], stderr=subprocess.PIPE, env=_env())
    deadline = time.monotonic() + 60
    while status_of(log_path, "live").get("offset") != 30 \
            or status_of(log_path, "live")["running_pids"] != [proc.pid]:
        assert proc.poll() is None, "the consumer exited"
        assert time.monotonic() < deadline, f"consumer not seen: {status_of(log_path, 'live')}"
        time.sleep(0.05)
    assert f"running (pid {proc.pid})" in cli("status", log_path).out
    r = cli("consumers", "forget", log_path, "live")
    assert r.code == 1 and f"is running (pid {proc.pid})" in r.err
    assert os.path.exists(registration_path(str(log_path), "live", str(folder / "live.json")))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert cli("consumers", "forget", log_path, "live").code == 0


def test_a_registered_consumer_without_a_checkpoint_holds_everything_until_forgotten(
        cli: Cli, log_path: Path, tmp_path: Path) -> None:
    append(log_path, 100, 0)
    checkpoint = tmp_path / "elsewhere" / "newbie.json"  # not written yet
    register_external(str(log_path), "newbie", str(checkpoint), 0o644, 0o755)
    with EventLog(log_path) as log:
        report = log.prune(before=90)
    assert report.removed == [] and report.first_offset == 0
    [why] = report.held_back
    assert f"consumer 'newbie' (external checkpoint {checkpoint}) is registered" in why
    assert "has not checkpointed yet" in why
    assert f"eventpipe consumers forget {log_path} newbie" in why
    entry = status_of(log_path, "newbie")
    assert entry["pending"] is True and entry["holds_retention_from"] == 0
    assert "offset" not in entry
    assert "newbie               no checkpoint yet" in cli("status", log_path).out
    assert cli("consumers", "forget", log_path, "newbie").code == 0
    with EventLog(log_path) as log:
        assert log.prune(before=90).removed == list(range(0, 90, SEG))


# ------------------------------------------------------------------ invalid or unreadable

def _planted(log: Path, tmp_path: Path, kind: str) -> Path:
    folder = log / "consumers" / "external"
    folder.mkdir(parents=True, exist_ok=True)
    good = {"format": "eventpipe-external-consumer", "version": 1, "name": "x",
            "checkpoint": str(tmp_path / "x.json"), "registered_at": 1.0}
    real_name = Path(registration_path(str(log), "x", str(tmp_path / "x.json"))).name
    if kind == "not-json":
        path, data = folder / real_name, b"{garbage"
    elif kind == "foreign":
        path, data = folder / "settings.json", json.dumps({"theme": "dark"}).encode()
    elif kind == "points-elsewhere":  # would make retention read any file it names
        path, data = folder / real_name, json.dumps({**good, "checkpoint": "/etc/passwd"}).encode()
    else:  # "renamed": valid content under a file name that does not match it
        path, data = folder / "x@000000000000.json", json.dumps(good).encode()
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", ["not-json", "foreign", "points-elsewhere", "renamed"])
def test_an_invalid_registration_is_reported_with_its_path_and_holds_everything(
        cli: Cli, log_path: Path, tmp_path: Path, kind: str) -> None:
    append(log_path, 100, 0)
    planted = _planted(log_path, tmp_path, kind)
    [known] = known_checkpoints(str(log_path))
    assert known.external and known.registration == str(planted)
    assert known.error is not None and known.error.startswith("invalid consumer registration")
    r = cli("status", log_path)
    assert r.code == 0, r.err
    assert "ERROR invalid consumer registration" in r.out and str(planted) in r.out
    r = cli("prune", log_path, "--before", "90")
    assert r.code == 0, r.err
    assert "removed 0 segments" in r.out
    assert str(planted) in r.err and "unknown position, taken as offset 0" in r.err
    assert bases(log_path)[0] == 0
    if kind != "foreign":  # named like a registration of "x": forget removes it
        assert cli("consumers", "forget", log_path, "x").code == 0
        assert not planted.exists()
        assert cli("prune", log_path, "--before", "90").code == 0
        assert bases(log_path)[0] == 90


def test_an_unreadable_external_checkpoint_holds_everything(shared_tmp: Path) -> None:
    log_path, folder = shared_tmp / "log", shared_tmp / "private"
    append(log_path, 100, 0)
    with Consumer(log_path, "secret", lambda s, e, o: s + 1, 0, checkpoint_dir=folder) as c:
        c.catch_up()
        assert c.offset == 100
    register_external(str(log_path), "secret", str(folder / "secret.json"), 0o644, 0o755)
    if os.geteuid() == 0:  # the pruner runs as nobody: it owns the log, not the checkpoint
        for dirpath, _dirs, files in os.walk(log_path):
            for p in [dirpath, *(os.path.join(dirpath, f) for f in files)]:
                os.chown(p, NOBODY, NOBODY)

    def prune() -> dict[str, Any]:
        with EventLog(log_path) as log:
            report = log.prune(before=90)
        return {"removed": report.removed, "held_back": report.held_back,
                "status": log_status(log_path)["consumers"]}

    folder.chmod(0o000)
    try:
        got = run_unprivileged(prune)
    finally:
        folder.chmod(0o755)
    assert got["removed"] == []
    [why] = got["held_back"]
    assert "consumer 'secret' (external checkpoint" in why
    assert "Permission denied" in why and str(folder / "secret.json") in why
    [entry] = got["status"]
    assert "Permission denied" in entry["error"] and entry["holds_retention_from"] == 0
    assert bases(log_path)[0] == 0


# ------------------------------------------------------------------------- registration

def test_registering_again_reads_and_rewrites_only_what_differs(
        log_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    EventLog(log_path).close()
    checkpoint = tmp_path / "a" / "c.json"
    before = time.time()
    register_external(str(log_path), "c", str(checkpoint), 0o640, 0o750)
    reg = Path(registration_path(str(log_path), "c", str(checkpoint)))
    assert reg.parent == log_path / "consumers" / "external"
    doc = json.loads(reg.read_bytes())
    assert (doc["name"], doc["checkpoint"]) == ("c", str(checkpoint))
    assert before <= doc["registered_at"] <= time.time()
    assert reg.stat().st_mode & 0o777 == 0o640
    assert reg.parent.stat().st_mode & 0o777 == 0o750
    assert (log_path / "consumers").stat().st_mode & 0o777 == 0o750
    first = reg.stat()

    monkeypatch.chdir(tmp_path)  # the same checkpoint by a relative path: nothing written
    register_external(str(log_path), "c", os.path.join("a", "c.json"), 0o640, 0o750)
    again = reg.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)

    reg.write_bytes(b"{damaged")  # invalid: written afresh
    register_external(str(log_path), "c", str(checkpoint), 0o640, 0o750)
    assert json.loads(reg.read_bytes())["checkpoint"] == str(checkpoint)

    other = tmp_path / "b" / "c.json"  # the same name with another folder: a second hold
    register_external(str(log_path), "c", str(other), 0o640, 0o750)
    # ... while one naming the log's own consumers/ folder is left to its listing
    register_external(str(log_path), "d", str(log_path / "consumers" / "d.json"), 0o640, 0o750)
    assert known_checkpoints(str(log_path)) == sorted(
        [KnownConsumer("c", str(p), True, registration_path(str(log_path), "c", str(p)))
         for p in (checkpoint, other)], key=lambda k: str(k.checkpoint))
    leftovers = [n for n in os.listdir(reg.parent) if ".tmp." in n]
    assert leftovers == []


def test_a_consumer_with_an_external_checkpoint_dir_registers_itself(
        log_path: Path, tmp_path: Path) -> None:
    append(log_path, 5, 0)
    folder = tmp_path / "elsewhere"
    with Consumer(log_path, "ext", lambda s, e, o: s + 1, 0, checkpoint_dir=folder) as c:
        c.catch_up()
    checkpoint = str(folder / "ext.json")
    assert known_checkpoints(str(log_path)) == [
        KnownConsumer("ext", checkpoint, True,
                      registration_path(str(log_path), "ext", checkpoint))]
