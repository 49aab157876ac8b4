"""Attention over the paged KV cache for a mixed batch of prefill chunks and decodes.

Plain-torch path: write the step's new K/V into their slots, gather each sequence's
visible blocks into a padded [B, S, kv_heads, head_dim] view, and run one SDPA call with
a boolean mask (causal, sliding window, padding). One call per layer, whatever the mix
of query lengths; the masks and indices are built once per step by the model runner and
shared by every layer of a KV group.

Native path (kernels/csrc/paged_attention.cpp): a pure-decode step (one query per
sequence) in fp32 or bf16 on the CPU reads K/V in place through the block table and skips the
slots the mask hides, instead of gathering a padded copy of every layer's K/V. It is on
once `use_native_decode()` found the native library (the model runner asks at start);
the plain path stays the reference it is tested against.

A mixed step (decodes beside prefill chunks, or chunks of different lengths) arrives in
parts (`meta.parts`, built by the model runner): each part's query rows are attended with
its own metadata, so the decode rows take the decode path and chunks are padded only to
the longest of their part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Set by use_native_decode(), read inside compiled graphs (a plain global: dynamo guards it)
_NATIVE_DECODE = False
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def use_native_decode(enable: bool = True) -> bool:
    """Route pure fp32/bf16 CPU decode steps through the native kernel, and CPU cache writes
    (any dtype) through the native `write_kv`, when `enable` and the native library loads
    here; whether they now are."""
    global _NATIVE_DECODE
    if enable:
        from kernels.native import native_ops

        enable = native_ops() is not None
    _NATIVE_DECODE = enable
    return enable


@dataclass(slots=True)
class PagedAttentionMetadata:
    """Per step, per KV group. B sequences, T new tokens in all, S = gathered key slots.

    slot_mapping: [T] int64 flat cache slot (block * block_size + offset) per new token.
    block_tables: [B, num_blocks] int64 blocks to gather, from each sequence's first
        visible block; padding entries point at the null block.
    mask: [B, 1, max_q, S] additive, 0 where query i of sequence b may see key slot j and
        -inf elsewhere, in the query dtype (SDPA's CPU kernels run ~2x faster on an
        additive mask than on a boolean one).
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
    grouped_mask: torch.Tensor | None = None  # mask repeated per query head, made lazily
    # a step attended in parts (the model runner splits decodes from chunks, and chunks
    # of different lengths): (rows, metadata) pairs, each part's rows of q (a slice
    # where adjacent, else an int64 index) attended with its own metadata (its sequences
    # only); the fields above then describe the last part
    parts: tuple[tuple[slice | torch.Tensor, PagedAttentionMetadata], ...] | None = None


def write_kv_reference(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k_cache: [num_blocks, block_size, kv_heads, head_dim]; k: [T, kv_heads, head_dim]."""
    kv_heads, head_dim = k.shape[-2:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


# An opaque op that declares which arguments it mutates. Traced as plain index_copy_ on a
# view of the [2, layers, ...] cache, the compiler's functional graph rebuilt the whole
# cache tensor in every layer (a 0.5 GB copy per layer for SmolLM2); as a custom op with
# mutates_args it is re-inplaced onto the cache and costs what the eager write costs.
@torch.library.custom_op("slotmesh::write_kv", mutates_args=("k_cache", "v_cache"))
def _write_kv_op(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    write_kv_reference(k_cache, v_cache, k, v, slot_mapping)


@_write_kv_op.register_fake
def _(k_cache, v_cache, k, v, slot_mapping) -> None:
    return None


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write the step's new K/V into their cache slots (in place)."""
    if k.shape[-2:] != k_cache.shape[-2:] or k.shape[0] != slot_mapping.shape[0]:
        raise ValueError(f"write_kv: k {tuple(k.shape)} vs cache {tuple(k_cache.shape)}, "
                         f"{slot_mapping.shape[0]} slots")
    if _NATIVE_DECODE and k_cache.device.type == "cpu":
        torch.ops.slotmesh_native.write_kv(k_cache, v_cache, k, v, slot_mapping)
    else:
        _write_kv_op(k_cache, v_cache, k, v, slot_mapping)


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: PagedAttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, heads, head_dim] → [T, heads, head_dim]. KV for this step already written.

    The query heads that share a KV head are folded into the query-length axis
    ([B, kv_heads, max_q * group, D]), so SDPA sees plain multi-head attention with no
    GQA expansion: measured ~1.3x faster on CPU than `enable_gqa` for decode batches.
    """
    num_heads, head_dim = q.shape[1:]
    batch = meta.block_tables.shape[0]
    kv_heads = k_cache.shape[2]
    group = num_heads // kv_heads
    # index_select on the flat table is several times faster than advanced indexing on CPU
    flat = meta.block_tables.view(-1)
    k = k_cache.index_select(0, flat).view(batch, -1, kv_heads, head_dim).transpose(1, 2)
    v = v_cache.index_select(0, flat).view(batch, -1, kv_heads, head_dim).transpose(1, 2)
    if meta.pad_index is not None:
        q = q[meta.pad_index]
    q = q.view(batch, meta.max_q, kv_heads, group, head_dim).permute(0, 2, 1, 3, 4)
    q = q.reshape(batch, kv_heads, meta.max_q * group, head_dim)  # rows: (position, head)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_grouped_mask(meta, group),
                                         scale=scale)  # [B, kvh, max_q * group, D]
    out = out.view(batch, kv_heads, meta.max_q, group, head_dim).permute(0, 2, 1, 3, 4)
    out = out.reshape(batch * meta.max_q, num_heads, head_dim)
    if meta.unpad_index is not None:
        out = out[meta.unpad_index]
    return out


def _grouped_mask(meta: PagedAttentionMetadata, group: int) -> torch.Tensor:
    """The mask with each query row repeated per head of its group; built once per step."""
    if group == 1:
        return meta.mask
    if meta.grouped_mask is None or meta.grouped_mask.shape[2] != meta.max_q * group:
        meta.grouped_mask = meta.mask.repeat_interleave(group, dim=2)
    return meta.grouped_mask


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: PagedAttentionMetadata, scale: float) -> torch.Tensor:
    if q.dim() != 3 or k_cache.dim() != 4 or q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(f"paged_attention: q {tuple(q.shape)} vs cache {tuple(k_cache.shape)}")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError("paged_attention: heads must be a multiple of kv heads")
    if meta.parts is not None:
        out = torch.empty_like(q)
        for rows, part in meta.parts:
            if isinstance(rows, slice):  # adjacent rows: a view in, a copy out
                out[rows] = paged_attention(q[rows], k_cache, v_cache, part, scale)
            else:
                out.index_copy_(0, rows, paged_attention(q.index_select(0, rows), k_cache,
                                                         v_cache, part, scale))
        return out
    if (_NATIVE_DECODE and meta.max_q == 1 and meta.pad_index is None
            and q.device.type == "cpu" and q.dtype == k_cache.dtype == meta.mask.dtype
            and q.dtype in _NATIVE_DTYPES and q.shape[0] == meta.block_tables.shape[0]):
        return paged_decode_attention(q, k_cache, v_cache, meta, scale)
    return paged_attention_reference(q, k_cache, v_cache, meta, scale)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: PagedAttentionMetadata, scale: float) -> torch.Tensor:
    """The native kernel on a pure-decode step: q [B, heads, head_dim], one query per
    sequence, mask [B, 1, 1, S] → [B, heads, head_dim]; q, cache and mask all fp32 or
    all bf16 (arithmetic in fp32, the output rounded to q's dtype)."""
    batch = q.shape[0]
    return torch.ops.slotmesh_native.paged_decode_attention(
        q, k_cache, v_cache, meta.block_tables, meta.mask.reshape(batch, -1), scale)
