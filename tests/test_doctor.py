"""``eventpipe doctor``: what a consumer unit will run with, checked before systemd runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from eventpipe import EventLog
from eventpipe._cli._doctor import hidden_by_protect_home

from .conftest import ROOT

HANDLER = "def count(state, event, offset):\n    return (state or 0) + 1\n"


def doctor(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("EVENTPIPE_")}
    full.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", "eventpipe", "doctor", *args],
                          capture_output=True, text=True, env=full, timeout=60, check=False)


def test_a_deployment_that_will_work(tmp_path: Path) -> None:
    log = tmp_path / "log"
    EventLog(log).close()
    (tmp_path / "h.py").write_text(HANDLER)
    r = doctor(EVENTPIPE_LOG_PATH=str(log), EVENTPIPE_HANDLER=f"{tmp_path / 'h.py'}:count",
               EVENTPIPE_INITIAL_STATE="0", EVENTPIPE_CHECKPOINT_EVERY="1000")
    lines = dict(line.split(":", 1) for line in r.stdout.splitlines())
    for check in ("log", "handler", "initial state", "options"):
        assert f"ok       {check}" in lines, r.stdout
    assert "EVENTPIPE_CHECKPOINT_EVERY" in lines["ok       options"]
    # The python line depends on where this machine's python lives (under /root here).
    python_ok = not hidden_by_protect_home(sys.executable)
    assert r.returncode == (0 if python_ok else 1), r.stdout


def test_each_problem_is_named(tmp_path: Path) -> None:
    r = doctor(str(tmp_path / "missing"), EVENTPIPE_HANDLER="nosuchmodule:f",
               EVENTPIPE_INITIAL_STATE="{oops", EVENTPIPE_ON_ERROR="sometimes")
    assert r.returncode == 1
    out = r.stdout
    assert "PROBLEM  log: no eventpipe log at" in out or "PROBLEM  log:" in out
    assert "PROBLEM  handler: nosuchmodule:f" in out
    assert "PROBLEM  initial state: not JSON" in out
    assert "PROBLEM  options:" in out and "on_error" in out


def test_what_protect_home_hides() -> None:
    assert hidden_by_protect_home("/root/.pyenv/versions/3.11.7/bin/python3.11")
    assert hidden_by_protect_home("/home/ann/venv/bin/python")
    assert not hidden_by_protect_home("/usr/bin/python3")
    assert not hidden_by_protect_home("/opt/eventpipe/venv/bin/../lib")
    assert not hidden_by_protect_home("/rootless/python")
