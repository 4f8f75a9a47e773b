"""A consumer handler module: counts events, in total and by their "type" (or "name") field.

Run it from the command line (``--catch-up`` stops once everything is handled; without it the
consumer follows the log until SIGTERM or Ctrl-C)::

    eventpipe consume /var/lib/eventpipe/events --name counter \\
        --handler examples/counter_consumer.py:handle --catch-up --print-state

or under systemd as ``eventpipe-consumer@counter.service`` (the template in ``systemd/``),
whose EnvironmentFile names the handler as ``MODULE:FUNCTION``, importable through PYTHONPATH::

    # /etc/eventpipe/counter.env (from systemd/example.env)
    EVENTPIPE_LOG_PATH=/var/lib/eventpipe/events
    EVENTPIPE_HANDLER=counter_consumer:handle
    PYTHONPATH=/opt/myapp/examples

    systemctl enable --now eventpipe-consumer@counter

The state is checkpointed with the consumer's position after every batch, so a restarted
consumer goes on from where it stopped and counts every event exactly once.

    python examples/counter_consumer.py    # shows the first form on a temporary log
"""

from __future__ import annotations

from typing import Any


def handle(state: dict[str, Any] | None, event: Any, offset: int) -> dict[str, Any]:
    """Count ``event`` into ``state`` (None before the first event); returns the new state."""
    if state is None:
        state = {"events": 0, "by_type": {}, "last_offset": None}
    state["events"] += 1
    kind = event.get("type", event.get("name", "?")) if isinstance(event, dict) else "?"
    state["by_type"][str(kind)] = state["by_type"].get(str(kind), 0) + 1
    state["last_offset"] = offset
    return state


if __name__ == "__main__":
    import os
    import subprocess
    import sys
    import tempfile

    from eventpipe import EventLog

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "events")
        with EventLog(path) as log:
            log.append_many([{"type": t} for t in ("click", "view", "click", "buy", "click")])
        cmd = [sys.executable, "-m", "eventpipe", "consume", path, "--name", "counter",
               "--handler", f"{__file__}:handle", "--catch-up", "--print-state"]
        print("$ eventpipe consume", path, "--name counter --handler",
              "examples/counter_consumer.py:handle --catch-up --print-state", flush=True)
        sys.exit(subprocess.run(cmd, check=False).returncode)
