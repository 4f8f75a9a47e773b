"""`eventpipe demo`, the README's main job, runs its pipeline and reports an honest verdict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_runs_writers_and_consumers_and_checks_them(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "eventpipe", "demo", "--seconds", "2", "--writers", "2",
         "--rate", "5000", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK:" in proc.stderr and "dead-lettered exactly once" in proc.stderr
    # Its files stay for a look with `eventpipe status`.
    status = subprocess.run([sys.executable, "-m", "eventpipe", "status", "--json",
                             str(tmp_path / "events")], capture_output=True, text=True,
                            timeout=60, check=True)
    assert '"balances"' in status.stdout and '"lag": 0' in status.stdout
