#!/usr/bin/env python3
"""Project tasks, needing only Python 3.11+: each makes ./.venv and installs what it needs.

    python3 dev.py demo [ARGS...]   the main job: a writer/consumer pipeline demo
    python3 dev.py test [PYTEST ARGS...]   lint, type checks, then the whole test suite
    python3 dev.py bench [NAME]     run benchmarks/ (prints tables with baselines)
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
STAMP = VENV / ".installed"


def ensure_venv(extras: str) -> None:
    """Create .venv and install the project with ``extras`` unless already done."""
    if not PY.exists():
        print(f"dev.py: creating {VENV}", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    want = f"{extras}:{(ROOT / 'pyproject.toml').stat().st_mtime_ns}"
    if STAMP.exists() and STAMP.read_text() == want:
        return
    print(f"dev.py: installing eventpipe[{extras}] into {VENV}", file=sys.stderr)
    subprocess.run(
        [str(PY), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e",
         f".[{extras}]"],
        cwd=ROOT, check=True,
    )
    STAMP.write_text(want)


def run(*cmd: str) -> int:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, cwd=ROOT, check=False).returncode


def main(argv: list[str]) -> int:
    task, args = (argv[0], argv[1:]) if argv else ("help", [])
    if task == "demo":
        ensure_venv("dev")
        return run(str(PY), "-m", "eventpipe", "demo", *args)
    if task == "test":
        ensure_venv("dev,bench")
        bin_ = VENV / "bin"
        for cmd in (
            (str(bin_ / "ruff"), "check", "."),
            (str(bin_ / "mypy"),),
        ):
            if rc := run(*cmd):
                return rc
        return run(str(PY), "-m", "pytest", *args)
    if task == "bench":
        ensure_venv("dev,bench")
        names = args or sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py"))
        for name in names:
            if rc := run(str(PY), str(ROOT / "benchmarks" / name)):
                return rc
        return 0
    print(__doc__, file=sys.stderr)
    return 0 if task in ("help", "-h", "--help") else 2


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main(sys.argv[1:]))
