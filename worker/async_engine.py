"""The in-process async engine API: add a request → async stream of TokenChunks; abort.

One asyncio task owns the LLMEngine. Adds and aborts are queued as control tasks and
applied only between steps; each step runs in a worker thread so the event loop (and
later the gRPC server on it) stays responsive while the model computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from worker.engine import LLMEngine, TokenChunk
from worker.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._control: list[Callable[[], None]] = []
        self._wakeup = asyncio.Event()
        self._streams: dict[str, asyncio.Queue[TokenChunk]] = {}
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[TokenChunk]:
        """Stream the request's chunks; validation errors raise before the first one.
        Leaving the iteration early aborts the request."""
        added: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue: asyncio.Queue[TokenChunk] = asyncio.Queue()

        def add() -> None:
            try:
                self.engine.add_request(request_id, prompt_token_ids, params)
            except Exception as e:  # noqa: BLE001 - handed to the caller
                added.set_exception(e)
                return
            self._streams[request_id] = queue
            added.set_result(None)

        self._submit(add)
        await added
        finished = False
        try:
            while not finished:
                chunk = await queue.get()
                finished = chunk.finish_reason is not None
                yield chunk
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._submit(lambda: self.engine.abort(request_id))

    async def abort(self, request_id: str) -> None:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def abort() -> None:
            found = self.engine.abort(request_id)
            queue = self._streams.pop(request_id, None)
            if queue is not None:
                queue.put_nowait(TokenChunk(request_id, [], "", "abort"))
            done.set_result(found)

        self._submit(abort)
        return await done

    def _submit(self, task: Callable[[], None]) -> None:
        self._control.append(task)
        self._wakeup.set()

    async def _loop(self) -> None:
        while True:
            while self._control:
                self._control.pop(0)()
            if not self.engine.has_unfinished:
                self._wakeup.clear()
                if not self._control:
                    await self._wakeup.wait()
                continue
            try:
                chunks = await asyncio.to_thread(self.engine.step)
            except Exception as e:  # a bug outside the model step
                log.exception("engine step raised outside the model; failing open streams")
                chunks = self._fail_all(e)
            for chunk in chunks:
                queue = self._streams.get(chunk.request_id)
                if queue is not None:
                    queue.put_nowait(chunk)

    def _fail_all(self, error: Exception) -> list[TokenChunk]:
        """Abort every request so no stream waits forever; the loop keeps serving."""
        chunks = []
        for request_id in list(self._streams):
            self.engine.abort(request_id)
            chunks.append(TokenChunk(request_id, [], "", "error",
                                     error=f"{type(error).__name__}: {error}"))
        return chunks
