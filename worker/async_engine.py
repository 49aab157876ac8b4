"""The in-process async engine API: add a request → async stream of TokenChunks; abort.

One asyncio task owns the LLMEngine. Adds and aborts are queued as control tasks and
applied only between steps; each step runs in a worker thread so the event loop (and
later the gRPC server on it) stays responsive while the model computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from worker.checkpoints import Capture, PrefixRestore
from worker.engine import LLMEngine
from worker.snapshot import Snapshot, SnapshotKind
from worker.vocab.sampling_params import SamplingParams
from worker.vocab.streams import Resume, TokenChunk
from worker.vocab.tasks import BackgroundTask

T = TypeVar("T")

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, min_step_s: float = 0.0) -> None:
        self.engine = engine
        self.min_step_s = min_step_s  # a testing aid (ServerConfig.min_step_s); 0: off
        self._control: list[Callable[[], None]] = []
        self._wakeup = asyncio.Event()
        self._streams: dict[str, asyncio.Queue[TokenChunk]] = {}
        self._task = BackgroundTask("engine-loop")
        # the step's own thread: asyncio.to_thread's shared pool also runs tokenizing and
        # snapshot encoding, and a pool busy with those must not delay the next step
        self._stepper: ThreadPoolExecutor | None = None
        # gets the prompt-cache checkpoints each step captured (the worker publishes
        # them); without one, the engine should be configured to capture none
        self.on_captures: Callable[[list[Capture]], None] | None = None

    async def start(self) -> None:
        self._stepper = ThreadPoolExecutor(1, thread_name_prefix="engine-step")
        self._task.start(self._loop(), on_done=_log_death)

    async def stop(self) -> None:
        await self._task.stop()
        if self._stepper is not None:
            self._stepper.shutdown(wait=False)
            self._stepper = None

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, *, resume: Resume | None = None
                       ) -> AsyncIterator[TokenChunk]:
        """Stream the request's chunks; validation errors raise before the first one.
        Leaving the iteration early aborts the request. `resume`: the output another
        worker already streamed (failover replay)."""
        stream = await self.submit(request_id, prompt_token_ids, params, resume=resume)
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                yield chunk

    async def import_(self, snap: Snapshot, request_id: str | None = None
                      ) -> AsyncIterator[TokenChunk]:
        """Import a snapshot and stream the sequence's continuation (like generate)."""
        stream = await self.submit_import(snap, request_id)
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                yield chunk

    async def submit(self, request_id: str, prompt_token_ids: list[int],
                     params: SamplingParams, *, resume: Resume | None = None,
                     restore: PrefixRestore | None = None) -> AsyncIterator[TokenChunk]:
        """Add the request (raising its validation error here) and return its stream."""
        return await self._stream(request_id, lambda: self.engine.add_request(
            request_id, prompt_token_ids, params, resume=resume, restore=restore))

    async def submit_import(self, snap: Snapshot, request_id: str | None = None,
                            restore: PrefixRestore | None = None
                            ) -> AsyncIterator[TokenChunk]:
        """Import (raising a bad snapshot's error here) and return the continuation."""
        rid = request_id or snap.request_id
        return await self._stream(rid, lambda: self.engine.import_(snap, rid, restore))

    async def _stream(self, request_id: str, add: Callable[[], object]
                      ) -> AsyncIterator[TokenChunk]:
        added: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue: asyncio.Queue[TokenChunk] = asyncio.Queue()

        def control() -> None:
            if added.cancelled():  # the caller went away while queued: add nothing, or
                return             # the sequence would run (and hold KV) for nobody
            try:
                add()
            except Exception as e:  # noqa: BLE001 - handed to the caller
                added.set_exception(e)
                return
            self._streams[request_id] = queue
            added.set_result(None)

        self._submit(control)
        await added
        return self._drain(request_id, queue)

    async def _drain(self, request_id: str, queue: asyncio.Queue[TokenChunk]
                     ) -> AsyncIterator[TokenChunk]:
        finished = False
        try:
            while not finished:
                chunk = await queue.get()
                finished = chunk.finish_reason is not None
                yield chunk
        finally:
            if self._streams.get(request_id) is queue:
                del self._streams[request_id]
            if not finished:
                self._submit(lambda: self.engine.abort(request_id))

    async def export(self, request_id: str, kind: SnapshotKind, pause: bool) -> Snapshot:
        """Snapshot at the next step boundary (see LLMEngine.export)."""
        return await self.call(lambda: self.engine.export(request_id, kind, pause))

    async def commit_export(self, request_id: str, committed: bool) -> bool:
        """Free a paused, exported sequence (its stream ends "migrated") or resume it."""
        def commit() -> bool:
            found = self.engine.commit_export(request_id, committed)
            if found and committed:
                queue = self._streams.pop(request_id, None)
                if queue is not None:
                    queue.put_nowait(TokenChunk(request_id, (), "", "migrated"))
            return found

        return await self.call(commit)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run fn between steps; its result or exception comes back here."""
        done: asyncio.Future = asyncio.get_running_loop().create_future()

        def control() -> None:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - handed to the caller
                result, error = None, e
            else:
                error = None
            if done.cancelled():  # the caller went away; fn ran all the same
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)

        self._submit(control)
        return await done

    async def abort(self, request_id: str) -> bool:
        def abort() -> bool:
            found = self.engine.abort(request_id)
            queue = self._streams.pop(request_id, None)
            if queue is not None:
                queue.put_nowait(TokenChunk(request_id, (), "", "abort"))
            return found

        return await self.call(abort)

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
            started = time.monotonic()
            try:
                chunks = await asyncio.get_running_loop().run_in_executor(
                    self._stepper, self.engine.step)
            except Exception as e:  # a bug outside the model step
                log.exception("engine step raised outside the model; failing open streams")
                chunks = self._fail_all(e)
            for chunk in chunks:
                queue = self._streams.get(chunk.request_id)
                if queue is not None:
                    queue.put_nowait(chunk)
            captures = self.engine.checkpoints.take_captures()
            if captures and self.on_captures is not None:
                self.on_captures(captures)
            if self.min_step_s > 0:
                await asyncio.sleep(self.min_step_s - (time.monotonic() - started))

    def _fail_all(self, error: Exception) -> list[TokenChunk]:
        """Abort every request so no stream waits forever; the loop keeps serving."""
        chunks = []
        for request_id in list(self._streams):
            self.engine.abort(request_id)
            chunks.append(TokenChunk(request_id, (), "", "error",
                                     error=f"{type(error).__name__}: {error}"))
        return chunks


def _log_death(task: asyncio.Task) -> None:
    """The loop never returns: if it raised, every stream now waits forever, so say why."""
    if not task.cancelled() and task.exception() is not None:
        log.critical("engine loop died; no sequence will make progress",
                     exc_info=task.exception())
