"""4/8-bit block weights (kernels/block_linear.py, kernels/csrc/block_gemm.cpp) against
their dequantize-then-fp32-F.linear reference, on every linear shape of SmolLM2-135M.

Tolerance, stated by `error_bound`: at M ≤ 32 the native op rounds each row of x to int16
in blocks of 32 (scale max|x| / 32767), so an activation moves by at most half a step and
an output by at most Σ_k |w_k|·step_k / 2; plus fp32 summation order (2⁻²⁰ of Σ|w·x|).
Larger M widens the weights and calls the same fp32 GEMM as the reference. The packing
itself is exact: the blocks read back as q·d + m with d and m rounded to fp16, and a
GGUF Q4_0 / Q4_1 / Q8_0 tensor reads back as the gguf package dequantizes it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from kernels.block_linear import (
    BLOCKS_LAYOUT,
    block_linear,
    block_linear_reference,
    dequantize_blocks,
    error_bound,
    native_blocks_available,
    pack_blocks,
    q4_blocks,
    q8_blocks,
    quantize_q8,
)
from kernels.int4_linear import quantize_int4
from kernels.native import native_ops
from kernels.packed_linear import dequantize_packed, packed_linear
from kernels.packed_weight import can_prepack
from worker.loaders.gguf_repack import repack
from worker.quantize import pack_weight, use_blocks

needs_native = pytest.mark.skipif(not native_blocks_available(),
                                  reason="slotmesh's native ops are not built here")

# SmolLM2-135M (K, N): fused qkv, o_proj, fused gate_up, down, lm_head
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576),
          pytest.param(576, 49152, marks=pytest.mark.slow)]
MS = [1, 2, 3, 4, 5, 8, 16, 32, 33, 64]


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def _x(m: int, k: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(m + k))


def _packed(fmt: str, weight: torch.Tensor, bias: torch.Tensor | None = None):
    n, k = weight.shape
    blocks = (q4_blocks(*quantize_int4(weight, 32)) if fmt == "int4"
              else q8_blocks(*quantize_q8(weight)))
    return pack_blocks(blocks, fmt, n, k, bias)


def _within_bound(x: torch.Tensor, w) -> None:
    out, ref = block_linear(x, w), block_linear_reference(x, w)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert ((out - ref).abs() <= error_bound(x, w)).all()


def test_q4_blocks_read_back_exactly():
    w = _weight(64, 96)
    q, scales, zeros = quantize_int4(w, 32)
    d = scales.half().float()[..., None]
    m = (zeros - 8 * scales).half().float()[..., None]
    want = (q.float().reshape(64, 3, 32) * d + m).reshape(64, 96)
    assert torch.equal(dequantize_blocks(q4_blocks(q, scales, zeros), "int4", 96), want)


def test_q8_blocks_read_back_exactly():
    w = _weight(64, 96)
    q, scales = quantize_q8(w)
    assert q.abs().max() <= 127 and torch.equal(scales, scales.half().float())
    want = (q.float().reshape(64, 3, 32) * scales[..., None]).reshape(64, 96)
    assert torch.equal(dequantize_blocks(q8_blocks(q, scales), "int8", 96), want)
    # symmetric per block: each block's largest |w| is ±127 steps, the error half a step
    assert ((want - w).abs() <= scales.repeat_interleave(32, dim=1) / 2 * 1.001).all()


def test_dequantize_gathered_rows():
    """An embedding lookup widens just the rows it reads (any leading shape)."""
    w = _weight(40, 64)
    blocks = q8_blocks(*quantize_q8(w))
    ids = torch.tensor([[3, 0], [39, 3]])
    rows = dequantize_blocks(blocks[ids], "int8", 64)
    assert torch.equal(rows, dequantize_blocks(blocks, "int8", 64)[ids])


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_map_exactly(qtype):
    """GGUF Q4_0 / Q4_1 tensors (through the loader's int4 map) and a Q8_0 one (requantized
    from its dequantized values, which gives back its own blocks) read back as the gguf
    package dequantizes them: no loss."""
    q = GGMLQuantizationType[qtype]
    block, size = GGML_QUANT_SIZES[q]
    rows, cols = 8, 128
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.05, size=(rows, cols // block, 2)).astype(np.float16)
    raw[..., 0:2] = scales[..., :1].view(np.uint8).reshape(rows, cols // block, 2)
    if q == GGMLQuantizationType.Q4_1:
        raw[..., 2:4] = (-scales[..., 1:]).view(np.uint8).reshape(rows, cols // block, 2)
    if q == GGMLQuantizationType.Q8_0:  # ggml writes |q| ≤ 127, the largest at ±127
        qs = raw[..., 2:].view(np.int8)
        np.clip(qs, -127, 127, out=qs)
        qs[..., 0] = 127
    want = gguf_dequantize(raw.reshape(-1), q).reshape(rows, cols)
    if q == GGMLQuantizationType.Q8_0:
        blocks = q8_blocks(*quantize_q8(torch.from_numpy(want)))
        got = dequantize_blocks(blocks, "int8", cols)
    else:
        t = repack(raw.reshape(-1), q, (rows, cols), "int4")
        got = dequantize_blocks(q4_blocks(t.q, t.scales, t.zeros), "int4", cols)
    assert torch.equal(got, torch.from_numpy(want))


@needs_native
@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("k,n", SHAPES)
def test_native_matches_reference(fmt, k, n):
    w = _packed(fmt, _weight(n, k), bias=_weight(1, n, 1)[0])
    for m in MS:
        _within_bound(_x(m, k), w)


@needs_native
def test_the_bound_is_tight_enough_to_mean_something():
    """The int16 rounding bound is under 1e-3 of the outputs' size, and ~40x under what
    bf16 activations alone may cost (each rounded by up to 2⁻⁹ of itself)."""
    w = _packed("int4", _weight(576, 576))
    x = _x(4, 576)
    ref = block_linear_reference(x, w)
    bound = error_bound(x, w)
    assert bound.max() < 1e-3 * ref.abs().max()
    weight = dequantize_blocks(w.data, "int4", 576)
    bf16_bound = torch.nn.functional.linear(x.abs(), weight.abs()) * 2**-9
    assert (bound < bf16_bound / 20).all()  # measured 39-43x


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_a_row_does_not_depend_on_its_batch(fmt, threads):
    """Each row of x adds its blocks in one fixed order whatever the rows beside it and
    the thread count: a sequence's logits are bit for bit the same alone or in a batch."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = _packed(fmt, _weight(1000, 576))
        x = _x(11, 576)
        batched = block_linear(x, w)
        for i in (0, 4, 10):
            assert torch.equal(block_linear(x[i:i + 1], w)[0], batched[i])
        assert torch.equal(block_linear(x[3:7], w), batched[3:7])
    finally:
        torch.set_num_threads(before)


@needs_native
def test_zero_and_odd_rows():
    """All-zero activation blocks (scale 0) and an odd number of blocks a row."""
    w = _packed("int4", _weight(64, 96))
    x = _x(3, 96)
    x[1] = 0
    x[2, 32:64] = 0
    _within_bound(x, w)
    assert torch.equal(block_linear(x, w)[1], torch.zeros(64))


@needs_native
def test_checks_its_arguments():
    w = _packed("int8", _weight(64, 96))
    op = torch.ops.slotmesh_native.block_gemm
    with pytest.raises(RuntimeError, match="kind"):
        op(_x(1, 96), w.data, 64, 2, None)
    with pytest.raises(RuntimeError, match="float32"):
        op(_x(1, 96).double(), w.data, 64, 1, None)
    with pytest.raises(RuntimeError, match="do not hold"):
        op(_x(1, 96), w.data, 65, 1, None)
    with pytest.raises(RuntimeError, match="do not hold"):
        op(_x(1, 96), w.data, 64, 0, None)  # int8 blocks read as int4
    with pytest.raises(RuntimeError, match="multiple of 32"):
        op(_x(1, 95), w.data, 64, 1, None)
    with pytest.raises(RuntimeError, match="bias"):
        op(_x(1, 96), w.data, 64, 1, torch.zeros(63))
    with pytest.raises(ValueError, match="not a int8"):
        pack_blocks(w.data[:, :-1], "int8", 64, 96)


@needs_native
def test_through_packed_linear_and_pack_weight():
    """The registry's path: pack_weight on the CPU gives blocks for int4 and the Q8 table
    format; packed_linear dispatches on the layout; dequantize_packed reads them back."""
    assert use_blocks("cpu") and not use_blocks("meta")
    w = _weight(192, 576)
    for fmt, want in (("int4", "int4"), ("q8", "int8")):
        packed = pack_weight(w, fmt)
        assert packed.layout == BLOCKS_LAYOUT and packed.format == want
        assert packed.compute_dtype == torch.float32 and packed.scales is None
        x = _x(2, 576)
        assert torch.equal(packed_linear(x, packed), block_linear(x, packed))
        assert torch.equal(dequantize_packed(packed),
                           dequantize_blocks(packed.data, want, 576))
        assert packed.num_bytes == 192 * 576 // 32 * (20 if want == "int4" else 34)


@needs_native
def test_runs_inside_a_compiled_graph():
    """The op has a fake kernel: the compiled graph calls it with a symbolic batch and
    gives the eager result bit for bit."""
    w = _packed("int4", _weight(192, 576))

    def f(x):
        return torch.nn.functional.silu(packed_linear(x, w)) * 2

    compiled = torch.compile(f, dynamic=True)
    with torch.no_grad():
        for m in (1, 3, 40):
            x = _x(m, 576)
            assert torch.equal(compiled(x), f(x))


@needs_native
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_a_batched_twin_takes_steps_of_more_rows(fmt):
    """`--weights auto+bfloat16`: a block weight with a bf16 twin (worker/models/packing.py)
    multiplies up to BLOCK_ROWS rows by its blocks, bit for bit the block op, and more
    rows by the twin: bf16 `F.linear` over the blocks' own values rounded to bf16, or,
    where the twin is prepacked for oneDNN (native ops built), the prepacked op, within
    one bf16 ulp of that `F.linear` (same products, another summation order). A compiled
    graph with a symbolic batch takes the same branch per size, bit for bit."""
    from kernels.packed_linear import BLOCK_ROWS
    from worker.models.packing import with_batched_twin

    bias = torch.randn(192, generator=torch.Generator().manual_seed(3))
    w = with_batched_twin(_packed(fmt, _weight(192, 576), bias))
    twin = w.batched
    assert twin.format == "bfloat16" and twin.layout == ""
    assert (twin.prepacked is not None) == (native_ops() is not None
                                            and can_prepack(torch.bfloat16))
    assert torch.equal(twin.data, dequantize_blocks(w.data, fmt, 576).bfloat16())
    assert w.num_bytes == _packed(fmt, _weight(192, 576), bias).num_bytes + twin.num_bytes

    def f(x):
        return packed_linear(x, w) * 2

    compiled = torch.compile(f, dynamic=True)
    with torch.no_grad():
        for m in (1, BLOCK_ROWS, BLOCK_ROWS + 1, 40):
            for dtype in (torch.float32, torch.bfloat16):
                x = _x(m, 576).to(dtype)
                if m <= BLOCK_ROWS:
                    want = block_linear(x, w)
                else:
                    plain = torch.nn.functional.linear(x.bfloat16(), twin.data, twin.bias)
                    want = plain.to(dtype)
                    if twin.prepacked is not None:
                        want = torch.ops.slotmesh_native.prepacked_linear(
                            x.bfloat16(), twin.prepacked, twin.bias, 192).to(dtype)
                        ulp = 2.0**-7 * plain.double().abs()
                        assert ((want.double() - plain.double()).abs() <= ulp).all()
                assert torch.equal(packed_linear(x, w), want)
                assert torch.equal(compiled(x), want * 2)
