"""Decode attention over the paged KV cache: the native kernel (reads K/V in place through
the block table) against the plain-torch reference (gathers, then SDPA).

Both compute softmax(q·Kᵀ·scale + mask)·V in fp32 over the same keys; they differ in
summation order only: |native - reference| <= 1e-5 * max|reference| + 1e-6.
"""

from __future__ import annotations

import pytest
import torch

from kernels import paged_attention as pa
from kernels.native import native_ops
from kernels.paged_attention import (
    PagedAttentionMetadata,
    paged_attention,
    paged_attention_reference,
    paged_decode_attention,
)

needs_native = pytest.mark.skipif(native_ops() is None,
                                  reason="slotmesh's native ops are not built here")

BLOCK = 16


def _case(lengths, heads, kv_heads, dim, window=None, width=None, seed=0):
    """Caches with shuffled block ids, one decode query per sequence at position
    lengths[b] - 1, and the metadata the static decode step builds: `width` blocks a
    row from its first visible block (padding entries → the null block 0)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    need = [-(-n // BLOCK) for n in lengths]
    num_blocks = sum(need) + 1
    k_cache = torch.randn(num_blocks, BLOCK, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_blocks, BLOCK, kv_heads, dim, generator=g)
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    width = width or max(need)
    tables, masks = [], []
    for b, n in enumerate(lengths):
        own, ids = ids[:need[b]], ids[need[b]:]
        pos = n - 1
        first = max(0, pos - window + 1) // BLOCK if window else 0
        row = (own[first:] + [0] * width)[:width]
        key_pos = torch.arange(width * BLOCK) + first * BLOCK
        visible = key_pos <= pos
        if window:
            visible &= key_pos > pos - window
        tables.append(row)
        masks.append(torch.where(visible, 0.0, float("-inf")))
    meta = PagedAttentionMetadata(
        slot_mapping=torch.zeros(batch, dtype=torch.long),
        block_tables=torch.tensor(tables), mask=torch.stack(masks)[:, None, None, :],
        max_q=1, pad_index=None, unpad_index=None)
    q = torch.randn(batch, heads, dim, generator=g)
    return q, k_cache, v_cache, meta


def _check(out, ref):
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item() + 1e-6


# groups of 3, 4, 1, 7 (two rounds of four heads, the last one short) and 8 query heads a
# KV head; head sizes 64, 256, 32 (no vector path), 128
SHAPES = [(9, 3, 64), (4, 1, 256), (8, 8, 32), (14, 2, 64), (16, 2, 128)]


@needs_native
@pytest.mark.parametrize("heads,kv_heads,dim", SHAPES)
@pytest.mark.parametrize("window", [None, 40])
def test_native_decode_matches_reference(heads, kv_heads, dim, window):
    lengths = [1, 17, 200, 33, 64, 5]
    q, k, v, meta = _case(lengths, heads, kv_heads, dim, window=window)
    ref = paged_attention_reference(q, k, v, meta, 0.125)
    _check(paged_decode_attention(q, k, v, meta, 0.125), ref)


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_decode_padding_width_and_threads(threads):
    """A graph's key width rounded up past the longest row (hidden slots skipped), a
    single sequence, and any thread count give the reference's result."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for lengths in ([300], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]):
            q, k, v, meta = _case(lengths, 9, 3, 64, width=32, seed=len(lengths))
            _check(paged_decode_attention(q, k, v, meta, 0.125),
                   paged_attention_reference(q, k, v, meta, 0.125))
    finally:
        torch.set_num_threads(before)


@needs_native
def test_native_decode_reads_a_layers_view_of_the_cache():
    """The model passes each layer's K/V as a view into one [2, layers, ...] tensor."""
    q, k, v, meta = _case([50, 7], 9, 3, 64)
    both = torch.stack([torch.stack([k * 0, k]), torch.stack([v * 0, v])])  # [2, 2, ...]
    _check(paged_decode_attention(q, both[0, 1], both[1, 1], meta, 0.125),
           paged_attention_reference(q, k, v, meta, 0.125))


@needs_native
@pytest.mark.parametrize("heads,kv_heads,dim", SHAPES)
@pytest.mark.parametrize("window", [None, 40])
def test_native_decode_reads_a_bf16_cache(heads, kv_heads, dim, window):
    """A bf16 model's step: the kernel widens the bf16 keys and values and computes in
    fp32, so it matches the fp32 reference over the same (bf16-valued) cache and query to
    the fp32 tolerance before its output is rounded to bf16 (relative step 2⁻⁸)."""
    q, k, v, meta = _case([1, 17, 200, 33], heads, kv_heads, dim, window=window)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    ref = paged_attention_reference(q.float(), k.float(), v.float(), meta, 0.125)
    bf16 = PagedAttentionMetadata(
        slot_mapping=meta.slot_mapping, block_tables=meta.block_tables,
        mask=meta.mask.bfloat16(), max_q=1, pad_index=None, unpad_index=None)
    out = paged_decode_attention(q, k, v, bf16, 0.125)
    assert out.dtype == torch.bfloat16
    tolerance = ref.abs() * 2**-8 + 1e-5 * ref.abs().max() + 1e-6
    assert ((out.float() - ref).abs() <= tolerance).all()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decode_reads_q_and_mask_where_they_lie(dtype):
    """q as the model hands it over (a view of the fused qkv projection: rows of D
    contiguous values, a wider stride between sequences) and a mask whose rows lie apart
    give what contiguous copies give, bit for bit."""
    q, k, v, meta = _case([1, 17, 200, 33], 9, 3, 64)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    fused = torch.cat([q, torch.randn(4, 6, 64).to(dtype)], dim=1)  # [B, 9 + 2·3, D]
    view = fused[:, :9]
    assert not view.is_contiguous() and view.stride(2) == 1
    mask = meta.mask.reshape(4, -1).to(dtype)
    wide = torch.cat([mask, torch.zeros_like(mask)], dim=1)[:, : mask.shape[1]]
    assert not wide.is_contiguous()
    op = native_ops().paged_decode_attention
    want = op(q.contiguous(), k, v, meta.block_tables, mask.contiguous(), 0.125)
    got = op(view, k, v, meta.block_tables, wide, 0.125)
    assert got.is_contiguous() and got.dtype == dtype
    assert torch.equal(got, want)


@needs_native
def test_native_decode_rejects_bad_input():
    q, k, v, meta = _case([20, 9], 9, 3, 64)
    op = native_ops().paged_decode_attention
    mask = meta.mask.reshape(2, -1)
    bad = meta.block_tables.clone()
    bad[1, 0] = k.shape[0]
    with pytest.raises(RuntimeError, match=r"block id .* outside the cache"):
        op(q, k, v, bad, mask, 0.125)
    with pytest.raises(RuntimeError, match="all fp32 or all bf16"):
        op(q.double(), k, v, meta.block_tables, mask, 0.125)
    with pytest.raises(RuntimeError, match="all fp32 or all bf16"):
        op(q.bfloat16(), k, v, meta.block_tables, mask, 0.125)
    with pytest.raises(RuntimeError, match="mask must be"):
        op(q, k, v, meta.block_tables, mask[:, :-1], 0.125)
    with pytest.raises(RuntimeError, match="multiple of"):
        op(q[:, :8], k, v, meta.block_tables, mask, 0.125)


@needs_native
def test_paged_attention_routes_pure_decode_only(monkeypatch):
    """With the native path on, paged_attention sends fp32 and bf16 one-query-per-sequence
    steps to the kernel, and the rest (fp16, prefill chunks) to the reference."""
    calls = []
    monkeypatch.setattr(pa, "paged_decode_attention",
                        lambda *a: calls.append(1) or paged_attention_reference(*a))
    monkeypatch.setattr(pa, "_NATIVE_DECODE", True)
    q, k, v, meta = _case([20, 9], 9, 3, 64)
    paged_attention(q, k, v, meta, 0.125)
    assert calls == [1]
    bf16 = PagedAttentionMetadata(
        slot_mapping=meta.slot_mapping, block_tables=meta.block_tables,
        mask=meta.mask.bfloat16(), max_q=1, pad_index=None, unpad_index=None)
    paged_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bf16, 0.125)
    assert calls == [1, 1]
    fp16 = PagedAttentionMetadata(
        slot_mapping=meta.slot_mapping, block_tables=meta.block_tables,
        mask=meta.mask.half(), max_q=1, pad_index=None, unpad_index=None)
    paged_attention(q.half(), k.half(), v.half(), fp16, 0.125)
    assert calls == [1, 1]
    monkeypatch.setattr(pa, "_NATIVE_DECODE", False)
    paged_attention(q, k, v, meta, 0.125)
    assert calls == [1, 1]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_write_kv_matches_reference(dtype):
    """The native KV write lands the same values in the same slots as the two index_copy_
    calls, into a layer's view of the stacked cache, casting k/v to the cache's dtype."""
    g = torch.Generator().manual_seed(3)
    stacked = torch.randn(2, 3, 9, BLOCK, 2, 64, generator=g).to(dtype)
    want = stacked.clone()
    k = torch.randn(5, 2, 64, generator=g)
    v = torch.randn(5, 2, 64, generator=g)
    slots = torch.tensor([17, 3, 140, 16, 0])
    pa.write_kv_reference(want[0, 1], want[1, 1], k, v, slots)
    torch.ops.slotmesh_native.write_kv(stacked[0, 1], stacked[1, 1], k, v, slots)
    assert torch.equal(stacked, want)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_write_kv_copies_rows_where_they_lie(dtype):
    """k/v as views of the fused qkv projection ([T, kv_heads, D] rows apart), in the
    cache's dtype (copied in place) and in another (converted first): the reference's
    slots and values."""
    g = torch.Generator().manual_seed(4)
    for src_dtype in (dtype, torch.float64):
        cache = torch.randn(2, 9, BLOCK, 2, 64, generator=g).to(dtype)
        want = cache.clone()
        fused = torch.randn(5, 8, 64, generator=g).to(src_dtype)  # [T, 4 + 2 + 2, D]
        k, v = fused[:, 4:6], fused[:, 6:8]
        assert not k.is_contiguous()
        slots = torch.tensor([17, 3, 140, 16, 0])
        pa.write_kv_reference(want[0], want[1], k, v, slots)
        torch.ops.slotmesh_native.write_kv(cache[0], cache[1], k, v, slots)
        assert torch.equal(cache, want)


@needs_native
def test_native_write_kv_rejects_bad_input():
    cache = torch.zeros(4, BLOCK, 2, 64)
    k = torch.zeros(2, 2, 64)
    op = torch.ops.slotmesh_native.write_kv
    with pytest.raises(RuntimeError, match="outside the cache"):
        op(cache, cache.clone(), k, k, torch.tensor([0, 4 * BLOCK]))
    with pytest.raises(RuntimeError, match="outside the cache"):
        op(cache, cache.clone(), k, k, torch.tensor([-1, 0]))
    with pytest.raises(RuntimeError, match="do not fit"):
        op(cache, cache.clone(), torch.zeros(2, 3, 64), torch.zeros(2, 3, 64),
           torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="int64"):
        op(cache, cache.clone(), k, k, torch.tensor([0, 1], dtype=torch.int32))
    assert not cache.any()  # nothing written by a refused call


@needs_native
def test_write_kv_routes_to_the_native_op_in_a_compiled_graph(monkeypatch):
    """Under use_native_decode the write is the native op, which a compiled graph runs in
    place on the cache it was given (no functional copy of the cache comes back)."""
    monkeypatch.setattr(pa, "_NATIVE_DECODE", True)
    cache = torch.zeros(2, 4, BLOCK, 2, 64)
    k = torch.randn(3, 2, 64)
    slots = torch.tensor([5, 20, 63])

    def step(cache, k, slots):
        pa.write_kv(cache[0], cache[1], k, k * 2, slots)
        return k.sum()

    torch.compile(step)(cache, k, slots)
    flat = cache.view(2, -1, 2, 64)
    assert torch.equal(flat[0, slots], k) and torch.equal(flat[1, slots], k * 2)
    assert int((flat[0].abs().sum(dim=(1, 2)) > 0).sum()) == 3  # only those slots
