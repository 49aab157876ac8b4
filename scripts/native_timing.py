"""slotmesh's native CPU ops against the torch ops they replace, in one process.

    .venv/bin/python -m scripts.native_timing [--threads 2]

fp16: one SmolLM2-135M layer's four linears plus the lm_head, FBGEMM's kernel through
torch's op (one thread) and through `slotmesh_native::fp16_gemm` (torch's intra-op
threads), per M. Blocks: the same shapes as int4 (Q4_1) and int8 (Q8_0) blocks through
`slotmesh_native::block_gemm`, against the native fp16 op and fp32 `F.linear`.
Attention: one layer's pure-decode attention over the paged cache for
B sequences of about L tokens, the gather-and-SDPA reference against
`slotmesh_native::paged_decode_attention`. Medians of --reps calls, alternating.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kernels.block_linear import block_linear, pack_blocks, q4_blocks, q8_blocks, quantize_q8
from kernels.fp16_linear import _pack, native_fp16_available
from kernels.int4_linear import quantize_int4
from kernels.native import native_ops
from kernels.paged_attention import (
    PagedAttentionMetadata,
    paged_attention_reference,
    paged_decode_attention,
)
from scripts.decode_step_timing import _median_ms

# (N, K): fused qkv, o_proj, fused gate_up, down, lm_head
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]


def _decode_case(batch: int, length: int, block: int = 16, width: int = 32):
    """SmolLM2's heads (9 query, 3 KV, 64 wide), shuffled blocks, keys up to length."""
    g = torch.Generator().manual_seed(0)
    need = -(-length // block)
    k = torch.randn(batch * need + 1, block, 3, 64, generator=g)
    v = torch.randn(batch * need + 1, block, 3, 64, generator=g)
    ids = (torch.randperm(batch * need, generator=g) + 1).view(batch, need)
    tables = torch.zeros(batch, width, dtype=torch.long)
    tables[:, :need] = ids
    visible = torch.arange(width * block) < length
    mask = torch.where(visible, 0.0, float("-inf")).expand(batch, width * block)
    meta = PagedAttentionMetadata(slot_mapping=torch.zeros(batch, dtype=torch.long),
                                  block_tables=tables, mask=mask[:, None, None, :].clone(),
                                  max_q=1, pad_index=None, unpad_index=None)
    return torch.randn(batch, 9, 64, generator=g), k, v, meta


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ops = native_ops()
    if ops is None or not native_fp16_available():
        raise SystemExit("native ops are not available here (see kernels/native.py)")
    print(f"threads {args.threads}")
    weights = [torch.randn(n, k) * 0.05 for n, k in SHAPES]
    handles = [_pack(w) for w in weights]
    packed = [ops.fp16_pack(w) for w in weights]
    for m in (1, 4, 16, 128, 512):
        xs = [torch.randn(m, k) for _, k in SHAPES]
        torch_ms = native_ms = 0.0
        for (n, _), x, h, pk in zip(SHAPES, xs, handles, packed, strict=True):
            torch_ms += _median_ms(lambda x=x, h=h: torch.ops.aten
                                   .fbgemm_linear_fp16_weight_fp32_activation(x, h, None),
                                   args.reps)
            native_ms += _median_ms(lambda x=x, pk=pk, n=n: ops.fp16_gemm(x, pk, n, None),
                                    args.reps)
        print(f"fp16 GEMM M={m:4d}: torch {torch_ms:7.3f} ms  native {native_ms:7.3f} ms  "
              f"{torch_ms / native_ms:.2f}x")
    blocks = {fmt: [pack_blocks(q4_blocks(*quantize_int4(w, 32)) if fmt == "int4"
                                else q8_blocks(*quantize_q8(w)), fmt, *w.shape)
                    for w in weights] for fmt in ("int4", "int8")}
    for m in (1, 4, 16, 32, 128):
        xs = [torch.randn(m, k) for _, k in SHAPES]
        ms = {name: 0.0 for name in ("int4", "int8", "fp16", "fp32")}
        for i, ((n, _), x) in enumerate(zip(SHAPES, xs, strict=True)):
            for fmt in ("int4", "int8"):
                ms[fmt] += _median_ms(lambda x=x, w=blocks[fmt][i]: block_linear(x, w),
                                      args.reps)
            ms["fp16"] += _median_ms(lambda x=x, pk=packed[i], n=n: ops.fp16_gemm(x, pk, n, None),
                                     args.reps)
            ms["fp32"] += _median_ms(lambda x=x, w=weights[i]: F.linear(x, w), args.reps)
        print(f"blocks M={m:4d}: int4 {ms['int4']:7.3f} ms  int8 {ms['int8']:7.3f} ms  "
              f"fp16 {ms['fp16']:7.3f} ms  fp32 {ms['fp32']:7.3f} ms  "
              f"(int4 {ms['fp16'] / ms['int4']:.2f}x fp16, {ms['fp32'] / ms['int4']:.2f}x fp32)")
    for batch, length in ((1, 300), (4, 300), (16, 300)):
        case = _decode_case(batch, length)
        ref = _median_ms(lambda c=case: paged_attention_reference(*c, 0.125), args.reps)
        nat = _median_ms(lambda c=case: paged_decode_attention(*c, 0.125), args.reps)
        print(f"decode attention B={batch:2d} L={length}: gather+SDPA {ref:.3f} ms  "
              f"native {nat:.3f} ms  {ref / nat:.2f}x (one layer)")


if __name__ == "__main__":
    main()
