"""Background tasks' shutdown, one way for every part that runs some."""
from __future__ import annotations

import asyncio
import contextlib

__all__ = ["cancel_tasks"]


async def cancel_tasks(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel background tasks, wait for each to end (whatever it raised), and forget them."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    tasks.clear()
