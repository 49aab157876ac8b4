"""Routing policies: which worker gets a request. Small, pure, and composable.

A policy sees the candidate workers (already filtered to live, reachable ones) and the
request's prefix hashes with their recorded owners; it does no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from services.metadata.records import WorkerRecord


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    record: WorkerRecord
    num_inflight: int  # streams this router relays to it now (fresher than the heartbeat)

    @property
    def worker_id(self) -> str:
        return self.record.worker_id

    @property
    def load(self) -> float:
        """Sequences per slot; the heartbeat's count may lag, the router's own may not."""
        r = self.record
        return max(r.num_running + r.num_waiting, self.num_inflight) / max(r.slots, 1)

    @property
    def kv_free_ratio(self) -> float:
        r = self.record
        return r.kv_blocks_free / r.kv_blocks_total if r.kv_blocks_total else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteRequest:
    prefix_hashes: tuple[str, ...]
    prefix_owners: tuple[str | None, ...]  # recorded owner of each hash, same length


class RoutingPolicy(Protocol):
    def select(self, request: RouteRequest, candidates: Sequence[Candidate]
               ) -> Candidate | None: ...


class LeastLoaded:
    """Fewest sequences per slot, then most free KV, then the id (deterministic)."""

    def select(self, request: RouteRequest, candidates: Sequence[Candidate]
               ) -> Candidate | None:
        if not candidates:
            return None
        return min(candidates, key=lambda c: (c.load, -c.kv_free_ratio, c.worker_id))


class PrefixAffinity:
    """The worker that served the longest matching prefix, unless it is much busier."""

    def __init__(self, fallback: RoutingPolicy, max_load_imbalance: float) -> None:
        self.fallback = fallback
        self.max_load_imbalance = max_load_imbalance

    def owner(self, request: RouteRequest, candidates: Sequence[Candidate]
              ) -> Candidate | None:
        by_id = {c.worker_id: c for c in candidates}
        for owner in reversed(request.prefix_owners):  # longest prefix first
            if owner in by_id:
                return by_id[owner]
        return None

    def select(self, request: RouteRequest, candidates: Sequence[Candidate]
               ) -> Candidate | None:
        owner = self.owner(request, candidates)
        if owner is not None:
            least = min(c.load for c in candidates)
            if owner.load <= least + self.max_load_imbalance:
                return owner
        return self.fallback.select(request, candidates)
