"""The benchmark scripts run and report every row (a smoke test: no timing is asserted).

Speed is judged by reading their tables (see benchmarks/README.md), never by a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(("script", "args", "rows"), [
    ("bench_storage.py", ["--quick", "--runs", "1", "--big", "20000"], 11),
    ("bench_consumer.py", ["--quick", "--runs", "1", "--big", "20000", "--only", "1,3,4"], 3),
    ("bench_segments.py", ["--quick", "--runs", "1"], 2),
    ("bench_bridge.py", ["--quick", "--runs", "1"], 4),
    ("bench_dbstate.py", ["--quick", "--runs", "1"], 3),
    ("bench_groupcommit.py", ["--quick", "--runs", "1"], 4),
    ("bench_flush_floor.py", ["--quick", "--runs", "1"], 6),
])
def test_benchmark_script_reports_every_row(
    tmp_path: Path, script: str, args: list[str], rows: int
) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--json", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    labels = {r["label"].rstrip("abcdefgh") for r in doc["results"]}
    assert len(labels) == rows, labels
    assert doc["environment"]["cpus"] >= 1
    for result in doc["results"]:
        assert result["verdict"] in ("PASS", "FAIL", "info", "skipped"), result
