"""Run a command with its stderr on a pseudo-terminal: what a person at a terminal sees."""

from __future__ import annotations

import os
import pty
import subprocess


def stderr_on_a_terminal(cmd: list[str], env: dict[str, str],
                         timeout: float = 120) -> tuple[int, bytes, bytes]:
    """(exit code, stdout, what the terminal showed) of ``cmd`` run with its stderr on a pty
    (stdout is a pipe, as under ``| jq``)."""
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(cmd, stderr=terminal, stdout=subprocess.PIPE, env=env)
        os.close(terminal)
        terminal = -1
        shown = b""
        while True:
            try:
                data = os.read(controller, 4096)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            shown += data
        out = proc.stdout.read() if proc.stdout is not None else b""
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.wait(timeout), out, shown
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
