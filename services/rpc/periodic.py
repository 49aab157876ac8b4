"""A coroutine run every N seconds in its own task, until stopped (heartbeats, polls)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


class Periodic:
    def __init__(self, tick: Callable[[], Awaitable[None]], interval_s: float,
                 name: str) -> None:
        self.tick = tick
        self.interval_s = interval_s
        self.name = name
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """First tick after one interval (callers usually tick once themselves first)."""
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.tick()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
