"""Every example program and every README code block runs, as a real process, and says so."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eventpipe import EventLog

from .conftest import ROOT

EXAMPLES = ROOT / "examples"
README = ROOT / "README.md"
TIMEOUT = 60

# What each example must print (substrings of its stdout). An example not listed here still
# has to run and exit 0.
EXPECTED_OUTPUT: dict[str, list[str]] = {
    "bare_minimum.py": [
        "state after 20 events: {'count': 20, 'last': 'event19'}",
        "resumed at offset 20 with state {'count': 20, 'last': 'event19'}",
        "after one more event: {'count': 21, 'last': 'event20'}",
    ],
    "pipeline.py": [
        "6000 events from 3 writer processes",
        "consumer balances     offset 6000  state matches a fold of the log",
        "consumer type-counts  offset 6000  state matches a fold of the log",
        "as expected",
        "verdict: OK",
    ],
    "counter_consumer.py": ['{"events":5,"by_type":{"click":3,"view":1,"buy":1},"last_offset":4}'],
    "async_follow.py": ["offset 0: event 0", "offset 9: event 9", "writer exited with 0"],
    "orders_read_model.py": ["never going back", "read model matches a fold of the log"],
}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _runnable_examples() -> list[Path]:
    return sorted(p for p in EXAMPLES.glob("*.py")
                  if re.search(r"^if __name__ == ['\"]__main__['\"]:", p.read_text(), re.M))


def test_every_example_with_expectations_exists() -> None:
    runnable = {p.name for p in _runnable_examples()}
    assert set(EXPECTED_OUTPUT) <= runnable


@pytest.mark.parametrize("example", _runnable_examples(), ids=lambda p: p.name)
def test_example_runs(example: Path, tmp_path: Path) -> None:
    # cwd is a scratch folder: an example must not depend on being run from the repository.
    # TMPDIR too, to see that it removes its temporary files.
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    proc = subprocess.run([sys.executable, str(example)], cwd=cwd, env=_env(TMPDIR=str(tmp)),
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.strip(), "an example should show what it does"
    for needle in EXPECTED_OUTPUT.get(example.name, []):
        assert needle in proc.stdout, f"{needle!r} missing from:\n{proc.stdout}"
    assert list(cwd.iterdir()) == [], "an example should write nothing to the working directory"
    assert list(tmp.iterdir()) == [], "an example should remove its temporary files"


def _fill(path: Path, events: list[dict[str, str]]) -> None:
    with EventLog(path) as log:
        log.append_many(events)


def _consume(*args: str, env: dict[str, str] | None = None) -> tuple[dict[str, object], str]:
    proc = subprocess.run([sys.executable, "-m", "eventpipe", "consume", *args], cwd=ROOT,
                          env=env or _env(), capture_output=True, text=True, timeout=TIMEOUT,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    state: dict[str, object] = json.loads(proc.stdout)
    return state, proc.stderr


def test_counter_consumer_through_the_cli_resumes_from_its_checkpoint(log_path: Path) -> None:
    _fill(log_path, [{"type": "a"}, {"type": "b"}, {"name": "c"}, {"type": "a"}])
    args = (str(log_path), "--name", "counter", "--handler",
            "examples/counter_consumer.py:handle", "--catch-up", "--print-state")
    state, err = _consume(*args)
    assert state == {"events": 4, "by_type": {"a": 2, "b": 1, "c": 1}, "last_offset": 3}
    assert "consumer counter: stopped at offset 4" in err
    _fill(log_path, [{"type": "b"}])
    state, err = _consume(*args)
    assert state == {"events": 5, "by_type": {"a": 2, "b": 2, "c": 1}, "last_offset": 4}
    assert "stopped at offset 5" in err


def test_counter_consumer_as_the_systemd_unit_configures_it(log_path: Path) -> None:
    # The unit's EnvironmentFile: log path and MODULE:FUNCTION handler found via PYTHONPATH.
    _fill(log_path, [{"type": "x"}] * 3)
    env = _env(EVENTPIPE_LOG_PATH=str(log_path), EVENTPIPE_HANDLER="counter_consumer:handle")
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES), env["PYTHONPATH"]])
    state, _ = _consume("--name", "counter", "--catch-up", "--print-state", env=env)
    assert state == {"events": 3, "by_type": {"x": 3}, "last_offset": 2}


# ------------------------------------------------------------------------------- README

_FENCE = re.compile(r"^```[ \t]*(?:python3?|py)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def _readme_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block in README.md; [] without a README."""
    if not README.exists():
        return []
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _FENCE.finditer(text)]


README_BLOCKS = _readme_blocks()


@pytest.mark.parametrize("block", README_BLOCKS or [None],
                         ids=lambda b: f"README.md:{b[0]}" if b else "no-python-blocks")
def test_readme_python_block_runs(block: tuple[int, str] | None, tmp_path: Path) -> None:
    if block is None:
        # Passes only if README.md really has no Python blocks (not if the pattern missed one).
        text = README.read_text() if README.exists() else ""
        assert not re.search(r"^```[ \t]*(py|python)", text, re.M | re.I)
        return
    line, code = block
    script = tmp_path / "block.py"
    script.write_text(code)
    work = tmp_path / "cwd"
    work.mkdir()  # a clean temporary directory, as the blocks may assume
    proc = subprocess.run([sys.executable, str(script)], cwd=work, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, (
        f"README.md block at line {line} failed:\n{code}\nstdout:\n{proc.stdout}\n"
        f"stderr:\n{proc.stderr}")
