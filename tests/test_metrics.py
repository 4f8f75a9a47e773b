"""``status --format prometheus`` as OpenMetrics text, checked by prometheus_client's parser."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.openmetrics.parser import text_string_to_metric_families

from eventpipe import Consumer, EventLog, log_status
from eventpipe._metrics import openmetrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):  # type: ignore[no-untyped-call]
        assert family.type == "gauge", family.name
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_log_and_consumer_figures_parse_as_openmetrics(tmp_path: Path) -> None:
    path = tmp_path / 'log "quoted" \\ path'
    with EventLog(path, segment_max_events=3) as log:
        log.append_many([{"i": i} for i in range(10)])
        with Consumer(log, "behind", lambda s, e, o: s + 1, 0) as c:
            c.catch_up()
        log.append_many([{"i": i} for i in range(10, 17)])
    (path / "consumers" / "broken.json").write_bytes(b"{not json")
    got = samples(openmetrics(log_status(path)))
    log_label = ("log", str(path))
    assert got[("eventpipe_head", (log_label,))] == 17
    assert got[("eventpipe_segments", (log_label,))] == 6
    behind = tuple(sorted([("consumer", "behind"), log_label]))
    assert got[("eventpipe_consumer_offset", behind)] == 10
    assert got[("eventpipe_consumer_lag_events", behind)] == 7
    assert got[("eventpipe_consumer_running", behind)] == 0
    assert got[("eventpipe_consumer_error", behind)] == 0
    broken = tuple(sorted([("consumer", "broken"), log_label]))
    assert got[("eventpipe_consumer_error", broken)] == 1


def test_status_command_prints_them(tmp_path: Path) -> None:
    import subprocess
    import sys

    from .conftest import ROOT

    path = tmp_path / "log"
    with EventLog(path) as log:
        log.append_many([{"i": i} for i in range(5)])
    proc = subprocess.run([sys.executable, "-m", "eventpipe", "status", str(path),
                           "--format", "prometheus"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert samples(proc.stdout)[("eventpipe_head", (("log", str(path)),))] == 5


def test_dead_letter_counts_only_where_known(tmp_path: Path) -> None:
    path, dlq = tmp_path / "log", tmp_path / "dlq"

    def fails_on_odd(state: int, event: dict[str, int], offset: int) -> int:
        if event["i"] % 2:
            raise ValueError("odd")
        return state + 1

    with EventLog(path) as log:
        log.append_many([{"i": i} for i in range(7)])
        with Consumer(log, "dl", fails_on_odd, 0, on_error="dead_letter",
                      dead_letter=dlq) as c:
            c.catch_up()
        with Consumer(log, "none", lambda s, e, o: s + 1, 0) as c:
            c.catch_up()
    got = samples(openmetrics(log_status(path)))
    counts = {dict(labels)["consumer"]: v for (name, labels), v in got.items()
              if name == "eventpipe_consumer_dead_letters"}
    assert counts == {"dl": 3}  # "none" has no dead-letter log: no sample, not 0
