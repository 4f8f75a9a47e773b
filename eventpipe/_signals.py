"""Stopping a runner on SIGTERM and SIGINT: the handlers every blocking ``run()`` installs."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["stop_on_signals"]


def stop_on_signals(stop: Callable[[], None]) -> Callable[[], None]:
    """Call ``stop()`` on SIGTERM and SIGINT until the returned function puts the previous
    handlers back. Only the main thread may set handlers: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous: dict[int, Any] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, on_signal)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
