"""The asyncio loop's stalls, measured beside the code under test."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator


@contextlib.asynccontextmanager
async def loop_gaps() -> AsyncIterator[list[float]]:
    """Time the running loop's turns while the block runs; yields the list of gaps it fills.

    A task sleeps 1 ms at a time and appends how long each sleep really took, so code that
    holds the loop shows as one long gap: ``max(gaps)`` is the longest stall. The list is
    empty until the task has run once. On leaving the block the task ends after its next tick.
    """
    gaps: list[float] = []
    ticking = True

    async def ticker() -> None:
        last = time.monotonic()
        while ticking:
            await asyncio.sleep(0.001)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    try:
        yield gaps
    finally:
        ticking = False
        await tick
