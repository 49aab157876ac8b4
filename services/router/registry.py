"""The router's cached copy of the worker registry.

Refreshed from Redis every `poll_s`. While Redis is unreachable the last copy stays in
use (a warning is logged once), so routing survives a Redis blip; the first successful
poll afterwards replaces it. Only records that verify under the cluster key are listed
(the store checks them, services/metadata/signing.py), so every address here, and only
these, gets the worker credential.

Exclusions are local to this router and keyed by incarnation — (worker id, instance id),
the instance id being new at every process start: a worker the router could not reach
is excluded for a few seconds, a drained one for `drain_exclusion_s`, and either way a
new process under the same worker id (a restarted StatefulSet pod, a worker `slotmesh
up` restarted) is routable from the first poll that sees its record.
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
        # (worker id, instance id) -> monotonic time it may return
        self._excluded: dict[tuple[str, str], float] = {}
        self.num_polls = 0  # successful refreshes, monotonic (a metric; tests count polls)
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
        for worker_id in self.workers.keys() & fresh.keys():
            old, new = self.workers[worker_id].instance_id, fresh[worker_id].instance_id
            if old != new:
                log.info("registry: worker %s is a new process (instance %s, was %s)",
                         worker_id, new, old)
        self.workers = fresh
        self.num_polls += 1

    async def lookup(self, worker_id: str) -> WorkerRecord | None:
        """The worker's record: the cached copy, else Redis read now (a worker that
        registered since the last poll is found); None when no worker has that id."""
        if worker_id not in self.workers:
            await self.refresh()
        return self.workers.get(worker_id)

    def exclude(self, worker: WorkerRecord, seconds: float) -> None:
        """No new sequences for this process of the worker for `seconds`."""
        key = (worker.worker_id, worker.instance_id)
        self._excluded[key] = max(self._excluded.get(key, 0.0), time.monotonic() + seconds)

    def include(self, worker_id: str) -> bool:
        """Lift every exclusion of the worker (any process of it); whether there was one."""
        keys = [k for k in self._excluded if k[0] == worker_id]
        for key in keys:
            del self._excluded[key]
        return bool(keys)

    def routable(self) -> list[WorkerRecord]:
        now = time.monotonic()
        self._excluded = {k: t for k, t in self._excluded.items() if t > now}
        return [r for w, r in sorted(self.workers.items())
                if (w, r.instance_id) not in self._excluded and not r.draining]
