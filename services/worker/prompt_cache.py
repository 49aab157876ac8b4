"""The cluster-wide prompt cache, the worker's side: publish checkpoints, restore prefixes.

Entries are described in worker/checkpoints.py and their keys in
services/metadata/keys.py. Publishing never blocks the engine: the engine loop hands
each step's captures to `publish`, which only queues them (bounded; the oldest are
dropped when Redis cannot keep up), and one task writes them. A write asks Redis which
full-attention blocks of the prefix it lacks, has the engine copy just those out of its
prefix cache (between steps), and adds them with the checkpoint record in one script
call that keeps the byte budget: all of it or nothing.

A lookup, before a request is queued, finds the longest prefix of the request's tokens
that Redis has a checkpoint for and that is longer than what this worker has cached,
fetches the checkpoint and the blocks this worker lacks, and verifies all of it
(checksums, layout, the prompt's own tokens). Redis being down or an entry being
damaged never fails the request: its prompt is computed as if the cache were empty, and
the fallback is logged and counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections import deque

from services.metadata import keys
from services.metadata.store import RedisStore, StoreUnavailableError
from services.rpc.metrics import PromptCacheMetrics
from worker.async_engine import AsyncEngine
from worker.checkpoints import Capture, PrefixRestore, decode_block, encode_block
from worker.kv_cache import KVView
from worker.snapshot import decode, encode
from worker.vocab.block_hash import chain_hashes
from worker.vocab.errors import (
    DataLossError,
    InvalidRequestError,
    PermissionDeniedError,
    PreconditionError,
)
from worker.vocab.tasks import BackgroundTask

log = logging.getLogger(__name__)


def layout_id(kv: KVView) -> str:
    """Entries are shared by workers whose KV is interchangeable: same model and layout."""
    bm = kv.block_manager
    desc = (f"{kv.fingerprint}|{kv.dtype}|{bm.block_size}|"
            f"{kv.num_kv_heads}|{kv.head_dim}|{[p.window for p in bm.pools]}")
    return hashlib.blake2b(desc.encode(), digest_size=8).hexdigest()


class PromptCache:
    def __init__(self, store: RedisStore, aengine: AsyncEngine, metrics: PromptCacheMetrics,
                 *, max_bytes: int, ttl_s: float, min_tokens: int,
                 key: bytes | None = None, max_pending: int = 8) -> None:
        self.store = store
        self.aengine = aengine
        self.kv = aengine.engine.kv
        self.checkpoints = aengine.engine.checkpoints
        self.metrics = metrics
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.min_tokens = max(min_tokens, self.kv.block_manager.block_size)
        self.max_pending = max_pending
        self.key = key  # the cluster key: entries carry its MAC (worker/vocab/integrity.py)
        self.layout_id = layout_id(self.kv)
        self.block_size = self.kv.block_manager.block_size
        self._full_pools = [p for p in self.kv.block_manager.pools if p.window is None]
        self._shapes = self.checkpoints.full_block_shapes()
        self._pending: deque[Capture] = deque()
        self._wakeup = asyncio.Event()
        self._task = BackgroundTask("prompt-cache-writer")
        self._is_healthy = True

    async def start(self) -> None:
        self._task.start(self._run())

    async def close(self) -> None:
        await self._task.stop()

    # -- publishing ------------------------------------------------------------------------

    def publish(self, captures: list[Capture]) -> None:
        """Queue captures for writing; returns at once (called by the engine loop)."""
        for capture in captures:
            if len(self._pending) >= self.max_pending:
                self._pending.popleft()
                self.metrics.writes.labels("dropped").inc()
            self._pending.append(capture)
        self._wakeup.set()

    async def flush(self) -> None:
        """Wait until every queued capture has been written or given up (tests, bench)."""
        while self._pending or self._wakeup.is_set():
            await asyncio.sleep(0.01)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            while self._pending:
                capture = self._pending.popleft()
                try:
                    self.metrics.writes.labels(await self._write(capture)).inc()
                except StoreUnavailableError as e:
                    self.metrics.writes.labels("failed").inc()
                    self._warn_unavailable(e)
                except Exception:  # a bug here must not stop later writes
                    log.exception("prompt cache write failed")
                    self.metrics.writes.labels("failed").inc()
            self._wakeup.clear()

    async def _write(self, cap: Capture) -> str:
        """One checkpoint and the blocks Redis lacks; returns the result label."""
        if cap.dropped:
            await self.store.delete_prompt_cache(
                self.layout_id, [self._checkpoint_key(h) for h in cap.dropped])
        checkpoint_key = self._checkpoint_key(cap.checkpoint_hash)
        block_keys = [self._block_key(h) for h in cap.block_hashes] if self._full_pools else []
        present = await self.store.exists_many([checkpoint_key, *block_keys])
        self._on_store_ok()
        # present[1:] is empty for a model without full-attention layers
        missing = [h for h, p in zip(cap.block_hashes, present[1:], strict=False) if not p]
        if present[0] and not missing:  # another worker (or this one) made it: refresh
            await self.store.put_prompt_cache(self.layout_id, [checkpoint_key, *block_keys],
                                              [], ttl_s=self.ttl_s, max_bytes=self.max_bytes)
            return "exists"
        kv_bytes = sum(g.data.numel() * g.data.element_size()
                       for g in cap.checkpoint.groups if g.data is not None)
        if kv_bytes + len(missing) * self._block_bytes() > self.max_bytes:
            return "too_big"
        blocks = {}
        if missing:
            blocks = await self.aengine.call(
                lambda: self.checkpoints.gather_full_blocks(missing))
            if blocks is None:
                return "evicted"  # a block left this worker's cache before we copied it

        def encode_all() -> list[tuple[str, bytes]]:
            entries = [(self._block_key(h), encode_block(h, blocks[h], self.key))
                       for h in missing]
            if not present[0]:
                entries.append((checkpoint_key, encode(cap.checkpoint, self.key)))
            return entries

        entries = await asyncio.to_thread(encode_all)
        refs = [k for k, p in zip([checkpoint_key, *block_keys], present, strict=True) if p]
        result = await self.store.put_prompt_cache(self.layout_id, refs, entries,
                                                   ttl_s=self.ttl_s, max_bytes=self.max_bytes)
        if result.status == "ok":
            self.metrics.written_bytes.inc(sum(len(v) for _, v in entries))
            self.metrics.redis_bytes.set(result.num_bytes)
            return "written"
        return result.status  # too_big, or missing: a block expired meanwhile

    def _block_bytes(self) -> int:
        return sum(self.kv.tensor_dtype.itemsize * math.prod(s) for s in self._shapes)

    def _checkpoint_key(self, chain_hash: bytes) -> str:
        return keys.checkpoint(self.layout_id, chain_hash.hex())

    def _block_key(self, chain_hash: bytes) -> str:
        return keys.block(self.layout_id, chain_hash.hex())

    async def fetch_checkpoints(self, hashes: list[bytes]) -> list[bytes]:
        """The encoded checkpoints Redis still holds of these (a file save includes them);
        an outage gives none rather than failing the save."""
        try:
            raws = await self.store.get_many([self._checkpoint_key(h) for h in hashes])
        except StoreUnavailableError as e:
            self._warn_unavailable(e)
            return []
        return [raw for raw in raws if raw is not None]

    # -- restoring -------------------------------------------------------------------------

    async def lookup(self, token_ids: list[int]) -> PrefixRestore | None:
        """The longest prefix of token_ids (short of the last token) that Redis can give
        and this worker has not cached; None when there is none or it is unusable."""
        bs = self.block_size
        num_blocks = (len(token_ids) - 1) // bs
        if num_blocks * bs < self.min_tokens or not self.kv.block_manager.enable_prefix_caching:
            return None
        hashes = chain_hashes(token_ids, bs, num_blocks)
        # a read from outside the engine thread: at worst stale, and install re-checks
        local = self.kv.block_manager.longest_cached_prefix(hashes, len(token_ids)) // bs
        candidates = list(range(num_blocks, local, -1))
        if not candidates:
            return None
        try:
            present = await self.store.exists_many(
                [self._checkpoint_key(hashes[m - 1]) for m in candidates])
            found = next((m for m, p in zip(candidates, present, strict=True) if p), None)
            if found is None:
                self.metrics.lookups.labels("miss").inc()
                return None
            need = [h for h in hashes[:found]
                    if any(pool.lookup(h) is None for pool in self._full_pools)]
            raws = await self.store.get_many([self._checkpoint_key(hashes[found - 1]),
                                              *(self._block_key(h) for h in need)])
            self._on_store_ok()
        except StoreUnavailableError as e:
            self._warn_unavailable(e)
            return self._fallback("unavailable")
        if any(raw is None for raw in raws):
            self.metrics.lookups.labels("miss").inc()  # evicted or expired meanwhile
            return None
        self.metrics.read_bytes.inc(sum(map(len, raws)))
        try:
            restore = await asyncio.to_thread(self._decode, token_ids, hashes[:found], need,
                                              raws)
        except PreconditionError as e:
            log.warning("prompt cache entry of another layout; computing the prompt: %s", e)
            return self._fallback("foreign")
        except (DataLossError, InvalidRequestError, PermissionDeniedError) as e:
            reason = "unauthenticated" if isinstance(e, PermissionDeniedError) else "corrupt"
            log.warning("%s prompt cache entry; removing it and computing the prompt: %s",
                        "unauthenticated" if reason == "unauthenticated" else "damaged", e)
            # else every later lookup would fall back, and writers would keep refreshing it
            await self._remove([self._checkpoint_key(hashes[found - 1]),
                                *(self._block_key(h) for h in need)])
            return self._fallback(reason)
        self.metrics.lookups.labels("hit").inc()
        return restore

    async def _remove(self, entry_keys: list[str]) -> None:
        try:
            await self.store.delete_prompt_cache(self.layout_id, entry_keys)
        except StoreUnavailableError as e:
            self._warn_unavailable(e)

    def _decode(self, token_ids: list[int], hashes: list[bytes], need: list[bytes],
                raws: list[bytes]) -> PrefixRestore:
        snap = decode(raws[0], self.key)
        self.checkpoints.check_checkpoint(snap, token_ids)
        if snap.num_computed_tokens != len(hashes) * self.block_size:
            raise DataLossError("checkpoint: stored under another position's hash")
        blocks = {h: decode_block(raw, h, self._shapes, self.kv.tensor_dtype, self.key)
                  for h, raw in zip(need, raws[1:], strict=True)}
        return PrefixRestore(snap.num_computed_tokens, hashes, snap, blocks)

    def _fallback(self, reason: str) -> None:
        self.metrics.lookups.labels("fallback").inc()
        self.metrics.fallbacks.labels(reason).inc()

    def _warn_unavailable(self, error: StoreUnavailableError) -> None:
        if self._is_healthy:
            log.warning("prompt cache unavailable; prompts are computed until Redis is back: "
                        "%s", error)
        self._is_healthy = False

    def _on_store_ok(self) -> None:
        if not self._is_healthy:
            log.warning("prompt cache: Redis is back")
        self._is_healthy = True
