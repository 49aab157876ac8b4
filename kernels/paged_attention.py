"""Attention over the paged KV cache for a mixed batch of prefill chunks and decodes.

Plain-torch path: write the step's new K/V into their slots, gather each sequence's
visible blocks into a padded [B, S, kv_heads, head_dim] view, and run one SDPA call with
a boolean mask (causal, sliding window, padding). One call per layer, whatever the mix
of query lengths; the masks and indices are built once per step by the model runner and
shared by every layer of a KV group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# enable_gqa arrived in torch 2.5; older releases get the repeat_interleave path
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


@dataclass(slots=True)
class PagedAttentionMetadata:
    """Per step, per KV group. B sequences, T new tokens in all, S = gathered key slots.

    slot_mapping: [T] int64 flat cache slot (block * block_size + offset) per new token.
    block_tables: [B, num_blocks] int64 blocks to gather, from each sequence's first
        visible block; padding entries point at the null block.
    mask: [B, 1, max_q, S] bool, True where query i of sequence b may see key slot j.
    pad_index: [B * max_q] int64 index into the T new tokens (pad rows repeat token 0),
        or None when every sequence has exactly one query (pure decode: no padding).
    unpad_index: [T] int64 index into the flattened [B * max_q] rows, or None likewise.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    mask: torch.Tensor
    max_q: int
    pad_index: torch.Tensor | None
    unpad_index: torch.Tensor | None


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_cache: [num_blocks, block_size, kv_heads, head_dim]; k: [T, kv_heads, head_dim]."""
    kv_heads, head_dim = k.shape[-2:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: PagedAttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, heads, head_dim] → [T, heads, head_dim]. KV for this step already written."""
    num_heads, head_dim = q.shape[1:]
    batch = meta.block_tables.shape[0]
    kv_heads = k_cache.shape[2]
    k = k_cache[meta.block_tables].view(batch, -1, kv_heads, head_dim)  # [B, S, kvh, D]
    v = v_cache[meta.block_tables].view(batch, -1, kv_heads, head_dim)
    if meta.pad_index is not None:
        q = q[meta.pad_index]
    q = q.view(batch, meta.max_q, num_heads, head_dim).transpose(1, 2)  # [B, H, max_q, D]
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, kvh, S, D]
    if _SDPA_HAS_GQA:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=meta.mask, scale=scale,
                                             enable_gqa=num_heads != kv_heads)
    else:
        group = num_heads // kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=meta.mask, scale=scale)
    out = out.transpose(1, 2).reshape(batch * meta.max_q, num_heads, head_dim)
    if meta.unpad_index is not None:
        out = out[meta.unpad_index]
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: PagedAttentionMetadata, scale: float) -> torch.Tensor:
    if q.dim() != 3 or k_cache.dim() != 4 or q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(f"paged_attention: q {tuple(q.shape)} vs cache {tuple(k_cache.shape)}")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError("paged_attention: heads must be a multiple of kv heads")
    return paged_attention_reference(q, k_cache, v_cache, meta, scale)
