"""Write-behind for per-sequence metadata and prefix owners.

Streams never wait on Redis: `put`, `delete` and `record_prefixes` only update a pending
map (the latest state per key wins), and one task flushes it in a single pipeline every
`interval_s`. While Redis is down the pending writes are kept (bounded) and retried; one
warning is logged per outage, and one line when it is back.

A record's TTL is a lease: the relaying router renews it (RouterService re-puts every
live stream's record every third of `sequence_ttl_s`), so a record outlives its
sequence only when its router died, and then by at most `sequence_ttl_s`. The last
word on a sequence is its delete: nothing is put after it (callers check that the
stream is still relayed), and a flush that is cancelled (shutdown) keeps its batch
pending for the final flush instead of dropping it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.metadata.records import SequenceRecord
from services.metadata.store import RedisStore, StoreUnavailableError
from worker.vocab.tasks import BackgroundTask

log = logging.getLogger(__name__)

_DELETE = None  # marker in the pending map


class MetadataWriter:
    def __init__(self, store: RedisStore, *, sequence_ttl_s: float = 3600.0,
                 prefix_ttl_s: float = 600.0, interval_s: float = 0.05,
                 max_pending: int = 100_000) -> None:
        self.store = store
        self.sequence_ttl_s = sequence_ttl_s
        self.prefix_ttl_s = prefix_ttl_s
        self.interval_s = interval_s
        self.max_pending = max_pending
        self._sequences: dict[str, SequenceRecord | None] = {}
        self._prefixes: dict[str, str] = {}
        self._in_flight = 0  # records and prefixes of the flush being written
        self._dirty = asyncio.Event()
        self._task = BackgroundTask("metadata-writer")
        self.is_healthy = True

    def put(self, record: SequenceRecord) -> None:
        self._sequences[record.request_id] = record
        self._dirty.set()

    def delete(self, request_id: str) -> None:
        self._sequences[request_id] = _DELETE
        self._dirty.set()

    def record_prefixes(self, prefix_hashes: list[str], worker_id: str) -> None:
        for h in prefix_hashes:
            self._prefixes[h] = worker_id
        self._dirty.set()

    @property
    def num_pending(self) -> int:
        """Writes not yet in Redis, the batch being written included (0: all flushed)."""
        return len(self._sequences) + len(self._prefixes) + self._in_flight

    async def start(self) -> None:
        self._task.start(self._run())

    async def close(self, timeout_s: float = 1.0) -> None:
        """Stop the task and try one last flush (bounded: Redis may be gone)."""
        await self._task.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout_s)

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if not await self.flush():
                self._dirty.set()  # retry after the pause
            await asyncio.sleep(self.interval_s)  # coalesce writes between flushes

    async def flush(self) -> bool:
        """One pipeline with everything pending; False (and everything kept) on failure."""
        if not self._sequences and not self._prefixes:
            return True
        sequences, prefixes = self._sequences, self._prefixes
        self._sequences, self._prefixes = {}, {}
        puts = [r for r in sequences.values() if r is not None]
        deletes = [i for i, r in sequences.items() if r is None]
        self._in_flight = len(sequences) + len(prefixes)
        try:
            await self.store.write_batch(puts, deletes, prefixes, self.sequence_ttl_s,
                                         self.prefix_ttl_s)
        except asyncio.CancelledError:  # shutdown mid-write: close() flushes it again
            self._requeue(sequences, prefixes)
            raise
        except StoreUnavailableError as e:
            self._requeue(sequences, prefixes)
            if self.is_healthy:
                log.warning("metadata writes are pending until Redis is back: %s", e)
            self.is_healthy = False
            return False
        finally:
            self._in_flight = 0
        if not self.is_healthy:
            log.warning("Redis is back; pending metadata written")
        self.is_healthy = True
        return True

    def _requeue(self, sequences: dict, prefixes: dict) -> None:
        """Newer states (set while the flush was in flight) win over the failed batch."""
        self._in_flight = 0
        self._sequences = {**sequences, **self._sequences}
        self._prefixes = {**prefixes, **self._prefixes}
        if self.num_pending > self.max_pending:
            # prefix hints are only hints: drop them first
            self._prefixes.clear()
            while len(self._sequences) > self.max_pending:
                self._sequences.pop(next(iter(self._sequences)))
