"""Metrics: a log's status (see :mod:`eventpipe._status`) as OpenMetrics text for Prometheus.

Gauges only (every value is read from the directory now, none is counted by this process), each
labelled with the log's path, consumers' also with the consumer's name. Consumer lag is the
figure operators alert on. Serve it with node_exporter's textfile collector: a timer that runs
``eventpipe status PATH --format prometheus > /var/lib/node_exporter/eventpipe.prom.tmp`` and
renames the file into place.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["openmetrics"]

# (name, help, value from a status report); all gauges.
_LOG_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("eventpipe_head", "Events ever appended (the next offset to assign).", "head"),
    ("eventpipe_first_offset", "The first offset still stored.", "first_offset"),
    ("eventpipe_segments", "Segment files on disk.", "segments.count"),
    ("eventpipe_segment_bytes", "Bytes of segment files on disk.", "segments.bytes"),
    ("eventpipe_quarantined_files", "Files of torn tails kept in quarantine/.",
     "quarantined_files"),
    ("eventpipe_writers", "Processes with the log open for appending.", "writers_open"),
    ("eventpipe_unsealed_segments", "Sealed segments without a checksum yet.",
     "sealing.without_checksum"),
    ("eventpipe_damaged_segments", "Segments the sealing pass found damaged.",
     "sealing.damaged"),
    ("eventpipe_inotify_instances", "inotify instances of the user running status.",
     "inotify.instances_in_use"),
    ("eventpipe_inotify_max_user_instances", "The per-user inotify instance limit.",
     "inotify.max_user_instances"),
)
_CONSUMER_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("eventpipe_consumer_offset", "The consumer's next offset to handle (its checkpoint).",
     "offset"),
    ("eventpipe_consumer_lag_events", "Events committed and not yet checkpointed as handled.",
     "lag"),
    # No sample when the time of the next event is not known (written before times).
    ("eventpipe_consumer_lag_seconds",
     "Seconds since the consumer's next unhandled event was appended (0: none waits).",
     "lag_seconds"),
    ("eventpipe_consumer_checkpoint_age_seconds", "Seconds since the last checkpoint.",
     "checkpoint_age_seconds"),
    ("eventpipe_consumer_running", "Processes holding the consumer's name now.",
     "running_pids"),
    ("eventpipe_consumer_error", "1 when the consumer's checkpoint cannot be read or used.",
     "error"),
    # No sample for a consumer whose count is not known (no dead-letter log, or unreadable).
    ("eventpipe_consumer_dead_letters",
     "The consumer's entries in its dead-letter log (those still stored).", "dead_letters"),
)


def openmetrics(report: dict[str, Any]) -> str:
    """The OpenMetrics text exposition of a :func:`~eventpipe.log_status` report."""
    return "".join(_lines(report))


def _lines(report: dict[str, Any]) -> Iterator[str]:
    log = _label(report["path"])
    for name, text, key in _LOG_GAUGES:
        value = _number(_get(report, key))
        if value is None:
            continue
        yield f"# TYPE {name} gauge\n# HELP {name} {text}\n{name}{{log={log}}} {value}\n"
    consumers = report.get("consumers") or []
    for name, text, key in _CONSUMER_GAUGES:
        samples = []
        for c in consumers:
            value = _number(c.get(key)) if key != "error" else (1 if c.get("error") else 0)
            if value is not None:
                samples.append(f"{name}{{log={log},consumer={_label(c['name'])}}} {value}\n")
        if samples:
            yield f"# TYPE {name} gauge\n# HELP {name} {text}\n" + "".join(samples)
    yield "# EOF\n"


def _get(report: dict[str, Any], dotted: str) -> Any:
    value: Any = report
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _number(value: Any) -> int | float | None:
    """A sample value: numbers as they are, lists by their length, nothing else."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    if isinstance(value, list):
        return len(value)
    return None


def _label(text: str) -> str:
    """A quoted label value (backslash, double quote and newline escaped)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'
