"""The unified KV cache tensors and their sizing.

One tensor per KV group, [2, layers_in_group, num_blocks, block_size, kv_heads, head_dim]
(0 = keys, 1 = values), shared by every slot; the block manager decides which blocks a
sequence owns. Sliding-window groups are sized to hold the window (plus one step's
chunk) of every slot, so the window itself never runs out; the full-attention group
takes the rest of the byte budget.

`KVView` is the narrow handle on a built cache that snapshots, prompt-cache checkpoints and
the Redis prompt cache take instead of the engine: the block manager, the tensors, their
layout and identity, and the two tensor ops (gather blocks to the host, install blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from worker.block_manager import BlockManager, cdiv
from worker.config import CacheConfig, SchedulerConfig
from worker.models.args import FULL, ModelArgs


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Pool size (blocks, null block included) and window per KV group."""

    block_size: int
    pool_sizes: list[int]
    windows: list[int | None]
    layers_per_group: list[int]

    def bytes_per_block(self, args: ModelArgs, group: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        per_layer = self.block_size * args.num_kv_heads * args.head_dim * elem
        return 2 * self.layers_per_group[group] * per_layer


def plan_kv_layout(args: ModelArgs, cache: CacheConfig, sched: SchedulerConfig,
                   max_model_len: int, dtype: torch.dtype) -> KVLayout:
    bs = cache.block_size
    windows = args.windows
    layers = [sum(1 for t in args.layer_types if t == gt) for gt in args.group_types]
    elem = torch.empty((), dtype=dtype).element_size()
    per_block = [2 * n * bs * args.num_kv_heads * args.head_dim * elem for n in layers]
    if cache.swa_full:  # every group keeps whole sequences: equal block counts
        n = cache.num_blocks or max(cache.kv_cache_bytes // sum(per_block),
                                    cdiv(max_model_len, bs) + 1)
        return KVLayout(bs, [n] * len(windows), windows, layers)
    sizes: list[int] = []
    for window in windows:
        if window is None:
            sizes.append(0)  # filled in below from what is left
            continue
        span = min(window - 1, max_model_len) + sched.max_num_batched_tokens
        need = sched.max_num_seqs * (cdiv(span, bs) + 1) + 1
        sizes.append(min(need, cache.num_blocks or need))
    if FULL in args.group_types:
        g = args.group_types.index(FULL)
        if cache.num_blocks is not None:
            sizes[g] = cache.num_blocks
        else:
            left = cache.kv_cache_bytes - sum(s * b for s, b in zip(sizes, per_block, strict=True))
            sizes[g] = max(left // per_block[g], cdiv(max_model_len, bs) + 1)
    return KVLayout(bs, sizes, windows, layers)


def allocate_kv_caches(args: ModelArgs, layout: KVLayout, dtype: torch.dtype,
                       device: torch.device) -> list[torch.Tensor]:
    return [
        torch.zeros(2, n_layers, n_blocks, layout.block_size, args.num_kv_heads, args.head_dim,
                    dtype=dtype, device=device)
        for n_layers, n_blocks in zip(layout.layers_per_group, layout.pool_sizes, strict=True)
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class KVView:
    """A built KV cache as its users see it; made once by the engine, handed around
    instead of the engine. Use it only between engine steps (it reaches live tensors)."""

    block_manager: BlockManager
    kv_caches: tuple[torch.Tensor, ...]  # per group [2, layers, num_blocks, bs, kvh, hd]
    layers_per_group: tuple[int, ...]
    fingerprint: str  # the model's identity: KV from another model never fits
    model_name: str
    dtype: str  # ModelConfig.dtype, e.g. "float32"
    device: torch.device
    num_kv_heads: int
    head_dim: int
    max_model_len: int

    @property
    def block_size(self) -> int:
        return self.block_manager.block_size

    @property
    def tensor_dtype(self) -> torch.dtype:
        return self.kv_caches[0].dtype

    def layout(self) -> tuple[Any, ...]:
        """What two caches must share for KV to move between them."""
        return (self.dtype, self.block_size, self.num_kv_heads, self.head_dim,
                [(p.window, n) for p, n in zip(self.block_manager.pools, self.layers_per_group,
                                               strict=True)])

    def gather(self, group: int, block_ids: list[int]) -> torch.Tensor:
        """CPU copy of some blocks of one group: [2, layers, len(block_ids), block_size,
        kv_heads, head_dim], one copy to the host."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return self.kv_caches[group].index_select(2, index).cpu()

    def install(self, group: int, block_ids: list[int], data: torch.Tensor) -> None:
        """Write data [2, layers, len(block_ids), block_size, kv_heads, head_dim] into
        those blocks of one group."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        self.kv_caches[group].index_copy_(2, index, data.to(self.device))
