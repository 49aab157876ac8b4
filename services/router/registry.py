"""The router's cached copy of the worker registry.

Refreshed from Redis every `poll_s`. While Redis is unreachable the last copy stays in
use (a warning is logged once), so routing survives a Redis blip; the first successful
poll afterwards replaces it. A worker the router could not reach is excluded locally for
one heartbeat expiry, long enough for its registry key to lapse if it is really gone.
Only records that verify under the cluster key are listed (the store checks them,
services/metadata/signing.py), so every address here, and only these, gets the worker
credential.
"""

from __future__ import annotations

import logging
import time

from services.metadata.records import WorkerRecord
from services.metadata.store import RedisStore, StoreUnavailableError
from services.rpc.periodic import Periodic

log = logging.getLogger(__name__)


class WorkerRegistry:
    def __init__(self, store: RedisStore, poll_s: float) -> None:
        self.store = store
        self.poll_s = poll_s
        self.workers: dict[str, WorkerRecord] = {}
        self.is_store_healthy = True
        self._excluded: dict[str, float] = {}  # worker id -> monotonic time it may return
        self._poller = Periodic(self.refresh, poll_s, name="registry")

    async def start(self) -> None:
        await self.refresh()
        self._poller.start()

    async def stop(self) -> None:
        await self._poller.stop()

    async def refresh(self) -> None:
        try:
            records = await self.store.list_workers()
        except StoreUnavailableError as e:
            if self.is_store_healthy:
                log.warning("registry: Redis unreachable; routing with the %d workers last "
                            "seen until it is back: %s", len(self.workers), e)
            self.is_store_healthy = False
            return
        if not self.is_store_healthy:
            log.warning("registry: Redis reachable again; registry resumed (%d workers)",
                        len(records))
        self.is_store_healthy = True
        fresh = {r.worker_id: r for r in records}
        for worker_id in fresh.keys() - self.workers.keys():
            log.info("registry: worker %s joined at %s", worker_id, fresh[worker_id].address)
        for worker_id in self.workers.keys() - fresh.keys():
            log.info("registry: worker %s left", worker_id)
        self.workers = fresh

    def exclude(self, worker_id: str, seconds: float) -> None:
        self._excluded[worker_id] = time.monotonic() + seconds

    def routable(self) -> list[WorkerRecord]:
        now = time.monotonic()
        self._excluded = {w: t for w, t in self._excluded.items() if t > now}
        return [r for w, r in sorted(self.workers.items())
                if w not in self._excluded and not r.draining]
