"""The unified paged KV cache's bookkeeping: block pools, block tables, prefix sharing.

Plain Python, no torch (tested to import without it). The model runner owns the tensors;
this module only decides which block ids a sequence uses.

One pool per KV group: the full-attention layers share one group, the sliding-window
layers another (each with its own window). A pool is shared by every slot. Full blocks
are content-addressed by a chained hash of the token prefix and shared with reference
counts; a block whose count drops to zero goes to the tail of an LRU free queue but keeps
its hash, so an idle cached prefix is reused until the space is needed (it is the first
thing given up under pressure). Sliding-window groups hand back blocks that have left
the window while the sequence is still running.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from worker.sequence import Sequence
from worker.vocab.block_hash import chain_hashes

NULL_BLOCK = 0  # never allocated; padding and given-back table entries point here
EMPTY = -1  # a block-table entry whose block has left the sliding window


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(slots=True)
class _Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


class BlockPool:
    """Blocks of one KV group. Ids 1..num_blocks-1 are allocatable; 0 is the null block.

    window is the attention window (None: full attention). keep_all (`--swa-full`) keeps
    a sliding group's blocks for the whole sequence, like a full-attention group, so any
    earlier prefix stays reusable without checkpoints.
    """

    def __init__(self, num_blocks: int, block_size: int, window: int | None,
                 keep_all: bool = False) -> None:
        assert num_blocks >= 2, "a pool needs the null block and at least one more"
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.window = window
        self.keep_all = keep_all
        self.blocks = [_Block(i) for i in range(num_blocks)]
        # LRU: least recently freed first; cached prefixes wait here until reused
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self.cached: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def allocate(self) -> int:
        """Pop the least recently freed block, evicting the cached prefix it held."""
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def touch(self, block_id: int) -> None:
        """Take one more reference on a cached block (a prefix hit)."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def free(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"double free of block {block_id}"
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue[block_id] = None

    def cache(self, block_id: int, block_hash: bytes) -> None:
        block = self.blocks[block_id]
        if block.block_hash is None and block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block_id

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash)

    @property
    def trims(self) -> bool:
        """Gives back blocks that left the window while the sequence runs."""
        return self.window is not None and not self.keep_all

    def first_needed_block(self, position: int) -> int:
        """First block holding a key that the query at `position` attends to."""
        if self.window is None:
            return 0
        return max(0, position - self.window + 1) // self.block_size

    def first_kept_block(self, position: int) -> int:
        """First block a sequence at `position` keeps (keep_all: every block)."""
        return self.first_needed_block(position) if self.trims else 0


class BlockManager:
    """can_allocate / allocate / free over every KV group of one worker."""

    def __init__(
        self,
        block_size: int,
        pool_sizes: list[int],
        windows: list[int | None],
        enable_prefix_caching: bool = True,
        keep_all: bool = False,
    ) -> None:
        self.block_size = block_size
        self.pools = [
            BlockPool(n, block_size, w, keep_all) for n, w in zip(pool_sizes, windows,
                                                                  strict=True)
        ]
        self.enable_prefix_caching = enable_prefix_caching
        self._hashes: dict[str, list[bytes]] = {}

    # -- queries ---------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> list[int]:
        return [pool.num_free_blocks for pool in self.pools]

    @property
    def num_total_blocks(self) -> list[int]:
        return [pool.num_blocks - 1 for pool in self.pools]

    def block_hashes(self, seq: Sequence) -> list[bytes]:
        """Chained hashes of the sequence's full blocks, extended incrementally."""
        return chain_hashes(seq.token_ids, self.block_size,
                            hashes=self._hashes.setdefault(seq.seq_id, []))

    def find_prefix_hit(self, seq: Sequence) -> int:
        """Longest cached prefix in tokens (block-aligned, always < num_tokens)."""
        if not self.enable_prefix_caching:
            return 0
        return self.longest_cached_prefix(self.block_hashes(seq), seq.num_tokens)

    def longest_cached_prefix(self, hashes: list[bytes], num_tokens: int) -> int:
        """Tokens of the longest prefix (of a sequence of num_tokens with these block
        hashes) whose KV is cached here. Full-attention groups need every block of the
        prefix; sliding groups only the blocks the first uncomputed query still sees.
        Reads only, so another thread may ask (the answer can be stale by then)."""
        max_blocks = (num_tokens - 1) // self.block_size
        for num_blocks in range(min(max_blocks, len(hashes)), 0, -1):
            if all(self._has_prefix(pool, hashes, num_blocks) for pool in self.pools):
                return num_blocks * self.block_size
        return 0

    def _has_prefix(self, pool: BlockPool, hashes: list[bytes], num_blocks: int) -> bool:
        first = pool.first_needed_block(num_blocks * self.block_size)
        return all(pool.lookup(h) is not None for h in hashes[first:num_blocks])

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int,
                          prefix_hit: int = 0) -> list[int]:
        """Blocks each pool must hand out to cover num_new_tokens more tokens."""
        start = max(seq.num_computed_tokens, prefix_hit)
        end = start + num_new_tokens
        needed = []
        for g, pool in enumerate(self.pools):
            table = seq.block_tables[g] if seq.block_tables else []
            held_until = len(table)
            if not table:
                # prefix-hit blocks come from the cache; count those sitting in the free queue
                held_until = start // self.block_size
                needed.append(self._num_free_hit_blocks(pool, seq, prefix_hit))
            else:
                needed.append(0)
            needed[-1] += max(0, cdiv(end, self.block_size) - held_until)
        return needed

    def _num_free_hit_blocks(self, pool: BlockPool, seq: Sequence, prefix_hit: int) -> int:
        num_hit = prefix_hit // self.block_size
        if num_hit == 0:
            return 0
        hashes = self.block_hashes(seq)
        first = pool.first_needed_block(prefix_hit)
        return sum(
            1 for h in hashes[first:num_hit] if pool.blocks[pool.cached[h]].ref_count == 0
        )

    def can_allocate(self, seq: Sequence, num_new_tokens: int, prefix_hit: int = 0) -> bool:
        needed = self.num_blocks_needed(seq, num_new_tokens, prefix_hit)
        return all(n <= pool.num_free_blocks for n, pool in zip(needed, self.pools, strict=True))

    # -- changes ---------------------------------------------------------------------

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix_hit: int = 0) -> None:
        """Give the sequence blocks for num_new_tokens more tokens (after any prefix hit).

        The caller checked can_allocate. A first allocation takes the prefix hit's cached
        blocks and sets num_computed_tokens / num_cached_tokens accordingly.
        """
        if not seq.block_tables:
            seq.block_tables = [[] for _ in self.pools]
            self._take_prefix(seq, prefix_hit)
        end = seq.num_computed_tokens + num_new_tokens
        for g, pool in enumerate(self.pools):
            table = seq.block_tables[g]
            while len(table) < cdiv(end, self.block_size):
                table.append(pool.allocate())

    def allocate_imported(self, seq: Sequence, first_blocks: list[int],
                          num_blocks: list[int]) -> bool:
        """Block tables for an imported sequence's computed KV: per group, EMPTY entries
        up to first_blocks[g] (left the window), then num_blocks[g] fresh blocks. False
        (nothing taken) when a pool lacks the room."""
        if any(n > pool.num_free_blocks for n, pool in zip(num_blocks, self.pools,
                                                          strict=True)):
            return False
        seq.block_tables = [[EMPTY] * first + [pool.allocate() for _ in range(n)]
                            for pool, first, n in zip(self.pools, first_blocks, num_blocks,
                                                      strict=True)]
        return True

    def allocate_prefix(self, seq: Sequence, position: int, fetched: set[bytes]
                        ) -> list[list[int]] | None:
        """Block tables for a prefix [0, position) restored from the cluster cache: per
        group, the blocks the query at `position` sees (full-attention groups: all),
        shared where this worker has them cached, fresh elsewhere. A fresh full-attention
        block needs its hash in `fetched`; a sliding one comes from the checkpoint.
        Returns per group the table indices of the fresh blocks (the caller writes their
        KV), or None with nothing taken when a block is missing or a pool lacks room."""
        num_blocks = position // self.block_size
        hashes = self.block_hashes(seq)[:num_blocks]
        plans = []
        for pool in self.pools:
            first = pool.first_needed_block(position)
            cached = [pool.lookup(h) for h in hashes[first:]]
            fresh = [first + i for i, b in enumerate(cached) if b is None]
            if pool.window is None and any(hashes[i] not in fetched for i in fresh):
                return None
            idle = sum(1 for b in cached if b is not None and pool.blocks[b].ref_count == 0)
            if len(fresh) + idle > pool.num_free_blocks:
                return None
            plans.append((first, cached, fresh))
        seq.block_tables = []
        for pool, (first, cached, _) in zip(self.pools, plans, strict=True):
            for b in cached:  # shared ones first, so allocating cannot evict them
                if b is not None:
                    pool.touch(b)
            seq.block_tables.append([EMPTY] * first + [
                b if b is not None else pool.allocate() for b in cached])
        return [fresh for _, _, fresh in plans]

    def _take_prefix(self, seq: Sequence, prefix_hit: int) -> None:
        num_hit = prefix_hit // self.block_size
        hashes = self.block_hashes(seq)
        for g, pool in enumerate(self.pools):
            first = pool.first_needed_block(prefix_hit)
            table = seq.block_tables[g]
            for i in range(num_hit):
                if i < first:
                    table.append(EMPTY)
                    continue
                block_id = pool.cached[hashes[i]]
                pool.touch(block_id)
                table.append(block_id)
        seq.num_computed_tokens = prefix_hit
        seq.num_cached_tokens = prefix_hit

    def trim_window(self, seq: Sequence) -> None:
        """Give back sliding-window blocks that the next query can no longer see."""
        if not seq.block_tables:
            return
        for g, pool in enumerate(self.pools):
            if not pool.trims:
                continue
            table = seq.block_tables[g]
            first = min(pool.first_needed_block(seq.num_computed_tokens), len(table))
            for i in range(first):
                if table[i] != EMPTY:
                    pool.free(table[i])
                    table[i] = EMPTY

    def commit(self, seq: Sequence) -> None:
        """Publish the hashes of blocks that are now full and computed (after a step)."""
        if not self.enable_prefix_caching or not seq.block_tables:
            return
        hashes = self.block_hashes(seq)
        num_full = min(seq.num_computed_tokens // self.block_size, len(hashes))
        for g, pool in enumerate(self.pools):
            table = seq.block_tables[g]
            for i in range(num_full):
                if table[i] != EMPTY:
                    pool.cache(table[i], hashes[i])

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix that no sequence holds (vLLM's reset_prefix_cache):
        after a weight update, or to measure a cold cache. Returns the blocks forgotten."""
        num_forgotten = 0
        for pool in self.pools:
            for block_hash, block_id in list(pool.cached.items()):
                block = pool.blocks[block_id]
                if block.ref_count == 0:
                    del pool.cached[block_hash]
                    block.block_hash = None
                    num_forgotten += 1
        return num_forgotten

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references, tail blocks first so they are evicted first."""
        for g, pool in enumerate(self.pools):
            if not seq.block_tables:
                break
            for block_id in reversed(seq.block_tables[g]):
                if block_id != EMPTY:
                    pool.free(block_id)
        seq.block_tables = []
        self._hashes.pop(seq.seq_id, None)
