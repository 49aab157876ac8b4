"""One asyncio task's lifecycle, written once: start it, later cancel it and wait for it.

Used by the engine loop, the Redis writers, the prompt-cache publisher and `Periodic`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any


class BackgroundTask:
    """Holds at most one running task. `stop()` cancels it and waits until it has
    finished (its CancelledError swallowed); stopping a task never started is a no-op."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._task: asyncio.Task | None = None

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, coro: Coroutine[Any, Any, Any],
              on_done: Callable[[asyncio.Task], None] | None = None) -> None:
        self._task = asyncio.create_task(coro, name=self.name)
        if on_done is not None:
            self._task.add_done_callback(on_done)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
