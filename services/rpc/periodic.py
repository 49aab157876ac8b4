"""A coroutine run every N seconds in its own task, until stopped (heartbeats, polls)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from worker.vocab.tasks import BackgroundTask


class Periodic:
    def __init__(self, tick: Callable[[], Awaitable[None]], interval_s: float,
                 name: str) -> None:
        self.tick = tick
        self.interval_s = interval_s
        self.name = name
        self._task = BackgroundTask(name)

    def start(self) -> None:
        """First tick after one interval (callers usually tick once themselves first)."""
        self._task.start(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.tick()

    async def stop(self) -> None:
        await self._task.stop()
