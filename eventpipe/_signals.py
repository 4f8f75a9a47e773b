"""Stopping a runner on SIGTERM and SIGINT: the handlers every blocking ``run()`` installs."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

__all__ = ["stop_on_loop_signals", "stop_on_signals"]


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


@contextlib.contextmanager
def stop_on_loop_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """:func:`stop_on_signals` for a run in the running event loop: ``on_signal(signum)`` on
    SIGTERM and SIGINT, through the loop, while the block runs (in the main thread only)."""
    loop = asyncio.get_running_loop()
    installed: list[int] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (int(signal.SIGTERM), int(signal.SIGINT)):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
