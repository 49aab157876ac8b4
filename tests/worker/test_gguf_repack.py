"""GGUF blocks → int4 g32 / int8 / fp16 (worker/loaders/gguf_repack.py) vs gguf.quants.dequantize.

Q4_0/Q4_1/Q4_K → int4 are exact block maps: the unpacked (fp32 scale/zero) weight equals
gguf's dequantization up to fp32 rounding of the zero (1e-6 relative), and the packed one
(bf16 scale and zero, the kernel's requirement) within (8·|scale| + |zero|)·2⁻⁸ per group.
Other types are requantized to int8 per output channel (the int8 policy): within half a
step, max|row|/254; under auto they are rounded to fp16: within |w|·2⁻¹¹ (+2⁻²⁵ for fp16
subnormals).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from kernels.block_linear import BLOCKS_LAYOUT
from kernels.packed_linear import dequantize_packed
from worker.loaders.gguf_repack import auto_format, map_rows, repack
from worker.quantize import Q8

ROWS, COLS = 16, 512


def _blocks(qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """[ROWS, bytes] raw GGUF data of a [ROWS, COLS] tensor."""
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0):
        values = rng.standard_normal((ROWS, COLS)).astype(np.float32) * 0.05
        values[:, :32] += 0.1  # a block with a shifted range, where Q4_1's m matters
        return gguf.quants.quantize(values, qtype)
    # Q4_K, Q6_K: gguf cannot quantize them; random bytes with sane fp16 super-scales
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(ROWS, COLS // block, size), dtype=np.uint8)
    offsets = {Q.Q4_K: (0, 2), Q.Q6_K: (208,)}[qtype]
    for off in offsets:
        scale = rng.uniform(0.001, 0.01, size=raw.shape[:2]).astype(np.float16)
        raw[:, :, off:off + 2] = scale.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(ROWS, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K], ids=lambda q: q.name)
def test_four_bit_blocks_map_to_int4_exactly(qtype):
    raw = _blocks(qtype, np.random.default_rng(0))
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype))  # [ROWS, COLS] fp32
    t = repack(raw, qtype, (ROWS, COLS), "int4")
    assert t.format == "int4" and t.group_size == 32 and t.shape == (ROWS, COLS)
    assert int(t.q.max()) <= 15
    torch.testing.assert_close(t.dequantize(), ref, rtol=0, atol=1e-6 * ref.abs().max())
    packed = t.pack()
    err = (dequantize_packed(packed) - ref).abs().reshape(ROWS, COLS // 32, 32)
    if packed.layout == BLOCKS_LAYOUT:  # the CPU's Q4_1 blocks: d and m in fp16
        if qtype != Q.Q4_K:  # the file's own fp16 d (and m): exact
            assert err.max() == 0
        m = t.zeros - 8 * t.scales
        bound = (15 * t.scales.abs() + m.abs()) * 2**-11 + 1e-7  # Q4_K's d·sc, dmin·mn
    else:  # torch's int4 kernels: bf16 scale and zero
        bound = (8 * t.scales.abs() + t.zeros.abs()) / 256 + 1e-7  # [ROWS, COLS/32]
        if qtype == Q.Q4_0:  # fp16 d with 3 more bits than bf16: rounding is visible
            assert err.max() > 0
    assert (err <= bound[..., None]).all()


def _fp16_bound(ref: torch.Tensor) -> torch.Tensor:
    return ref.abs() * 2**-11 + 2**-25


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q8_0], ids=lambda q: q.name)
def test_q8_0_and_q5_0_become_q8_blocks_exactly_under_auto(qtype):
    """d·q with the file's own fp16 d: the Q8 blocks hold the very same weights, packed
    as blocks for the CPU's native op, or as fp16 (2⁻¹¹) without it."""
    raw = _blocks(qtype, np.random.default_rng(1))
    ref = gguf.quants.dequantize(raw, qtype)
    assert auto_format(qtype) == Q8
    t = repack(raw, qtype, (ROWS, COLS), Q8, dequantized=ref)
    assert t.format == Q8 and t.q.dtype == torch.int8 and t.group_size == 32
    assert t.q.abs().max() <= (16 if qtype == Q.Q5_0 else 127)
    ref = torch.from_numpy(ref)
    assert torch.equal(t.dequantize(), ref)
    packed = t.pack()
    if packed.layout == BLOCKS_LAYOUT:
        assert torch.equal(dequantize_packed(packed), ref)
    else:
        assert ((dequantize_packed(packed) - ref).abs() <= _fp16_bound(ref)).all()


@pytest.mark.parametrize("qtype", [Q.Q5_1, Q.Q6_K], ids=lambda q: q.name)
def test_other_types_become_fp16_under_auto(qtype):
    raw = _blocks(qtype, np.random.default_rng(1))
    ref = gguf.quants.dequantize(raw, qtype)
    assert auto_format(qtype) == "fp16"
    t = repack(raw, qtype, (ROWS, COLS), "fp16", dequantized=ref)
    assert t.format == "fp16" and t.q.dtype == torch.float16 and t.scales is None
    ref = torch.from_numpy(ref)
    packed = dequantize_packed(t.pack())
    assert torch.equal(packed, t.dequantize())  # packing adds no rounding
    assert ((packed - ref).abs() <= _fp16_bound(ref)).all()


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q5_1, Q.Q6_K, Q.Q8_0], ids=lambda q: q.name)
def test_other_types_requantize_to_int8(qtype):
    raw = _blocks(qtype, np.random.default_rng(1))
    ref = gguf.quants.dequantize(raw, qtype)
    t = repack(raw, qtype, (ROWS, COLS), "int8", dequantized=ref)
    ref = torch.from_numpy(ref)
    err = (dequantize_packed(t.pack()) - ref).abs()
    # half an int8 step, plus the bf16 rounding of the scale over up to 127 steps
    bound = ref.abs().amax(dim=1, keepdim=True) * (0.5 / 127 + 2**-8)
    assert (err <= bound).all()


def test_requantizing_to_int4_and_auto_formats():
    raw = _blocks(Q.Q8_0, np.random.default_rng(2))
    ref = gguf.quants.dequantize(raw, Q.Q8_0)
    t = repack(raw, Q.Q8_0, (ROWS, COLS), "int4", dequantized=ref)
    assert t.format == "int4" and t.group_size == 32
    with pytest.raises(ValueError, match="dequantized"):
        repack(raw, Q.Q8_0, (ROWS, COLS), "int8")
    assert [auto_format(q) for q in (Q.Q4_0, Q.Q4_K, Q.F16, Q.F32)] == ["int4", "int4",
                                                                        None, None]


def test_row_transform_moves_scales_with_rows():
    raw = _blocks(Q.Q4_1, np.random.default_rng(3))
    t = repack(raw, Q.Q4_1, (ROWS, COLS), "int4")
    flipped = map_rows(t, lambda a: a[::-1])
    torch.testing.assert_close(flipped.dequantize(), t.dequantize().flip(0))


def test_mixed_formats_fuse_as_fp16():
    """A Q4_K q with a Q6_K v (Q4_K_M files) under auto: the fused qkv becomes fp16."""
    from worker.quantize import concat_rows

    rng = np.random.default_rng(4)
    q4 = repack(_blocks(Q.Q4_K, rng), Q.Q4_K, (ROWS, COLS), "int4")
    raw6 = _blocks(Q.Q6_K, rng)
    q6 = repack(raw6, Q.Q6_K, (ROWS, COLS), auto_format(Q.Q6_K),
                dequantized=gguf.quants.dequantize(raw6, Q.Q6_K))
    fused = concat_rows([q4, q6])
    assert fused.format == "fp16" and fused.shape == (2 * ROWS, COLS)
    ref = torch.cat([q4.dequantize(), q6.dequantize()])
    assert ((fused.dequantize() - ref).abs() <= _fp16_bound(ref)).all()
