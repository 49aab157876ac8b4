"""The fused elementwise ops of the eager decoder layer (kernels/csrc/layer_elementwise.cpp)
against their plain-torch references: RMSNorm (Llama and Gemma style, alone and fused
with the residual add), rotary, act(gate) · up.

The native ops round every intermediate the reference stores in the activation dtype, so
what is left is summation order (the sum of squares) and the exponential (a polynomial
there, Sleef in torch). Tolerances:
- exact (torch.equal): rotary in fp32 and bf16, the residual sum of add_rms_norm;
- fp32: |native - ref| <= 1e-6 * |ref| + 1e-6 * max|ref| for the norm, 4e-6 * |ref| +
  1e-6 * max|ref| for the activations (a few fp32 ulps);
- bf16: |native - ref| <= 2^-7 * |ref| + 1e-6 * max|ref| (one bf16 ulp where a value
  lands on the other side of a rounding boundary), and at most 1% of the elements
  differ (5% for tanh-gelu, whose tanh near ±1 rounds differently) — the roundings are
  the reference's, not merely close to them.
"""

from __future__ import annotations

import pytest
import torch

from kernels.gated_act import gated_act, gated_act_reference
from kernels.native import eager_ops, native_ops
from kernels.rms_norm import (
    add_rms_norm,
    add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
)
from kernels.rotary import apply_rotary, apply_rotary_reference

pytestmark = pytest.mark.skipif(native_ops() is None,
                                reason="slotmesh's native ops are not built here")

DTYPES = (torch.float32, torch.bfloat16)


def _close(out: torch.Tensor, ref: torch.Tensor, fp32_rtol: float = 1e-6,
           max_unequal: float = 0.01) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    out64, ref64 = out.double(), ref.double()
    rtol = fp32_rtol if ref.dtype == torch.float32 else 2.0**-7
    bound = rtol * ref64.abs() + 1e-6 * ref64.abs().max()
    assert ((out64 - ref64).abs() <= bound).all(), (out64 - ref64).abs().max()
    if ref.dtype == torch.bfloat16:
        assert (out != ref).float().mean().item() <= max_unequal


def _rows(shape, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 100, 576, 896])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_rms_norm_matches_reference(dtype, dim, offset, tokens):
    x = _rows((tokens, dim), dtype)
    weight = (torch.rand(dim, generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype)
    with torch.inference_mode():
        _close(eager_ops(x).rms_norm(x, weight, 1e-6, offset),
               rms_norm_reference(x, weight, 1e-6, offset))
        residual = _rows((tokens, dim), dtype, seed=2)
        out, total = eager_ops(x).add_rms_norm(x, residual, weight, 1e-6, offset)
        ref_out, ref_total = add_rms_norm_reference(x, residual, weight, 1e-6, offset)
        assert torch.equal(total, ref_total)
        _close(out, ref_out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_reads_strided_heads(dtype):
    """Gemma's QK-norm normalises q as a view of the fused qkv projection: [T, H, D] rows
    with a token stride wider than H × D."""
    qkv = _rows((9, 12, 256), dtype)
    q = qkv[:, :8]
    weight = _rows((256,), dtype, scale=0.1, seed=3)
    with torch.inference_mode():
        out = rms_norm(q, weight, 1e-6, 1.0)
    assert out.is_contiguous()
    _close(out, rms_norm_reference(q, weight, 1e-6, 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_rotary_is_the_reference_bit_for_bit(dtype, dim):
    tokens, heads, kv_heads = 37, 9, 3
    qkv = _rows((tokens, heads + 2 * kv_heads, dim), dtype)
    cos_sin = _rows((tokens, dim), torch.float32, scale=1.0, seed=4)
    qk = qkv[:, : heads + kv_heads]  # strided: the fused projection's q and k heads
    with torch.inference_mode():
        out = apply_rotary(qk, cos_sin)
    assert torch.equal(out, apply_rotary_reference(qk, cos_sin))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("tokens", [1, 5, 257])
def test_gated_act_matches_reference(dtype, act, tokens):
    gate_up = _rows((tokens, 2 * 1536), dtype, scale=4.0)
    with torch.inference_mode():
        out = gated_act(gate_up, act)
    _close(out, gated_act_reference(gate_up, act), fp32_rtol=4e-6,
           max_unequal=0.05 if act != "silu" else 0.01)


def test_gated_act_extremes_stay_finite():
    """Far out the exponential is clamped: silu(g) → g above, → 0 below, never NaN/inf."""
    g = torch.tensor([-1e4, -200.0, -88.0, -20.0, 0.0, 20.0, 88.0, 200.0, 1e4])
    gate_up = torch.cat([g, torch.ones_like(g)])[None]
    with torch.inference_mode():
        out = gated_act(gate_up, "silu")
    ref = gated_act_reference(gate_up, "silu")
    assert torch.isfinite(out).all()
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-30)


def test_autograd_and_other_dtypes_take_the_reference():
    """Training (autograd on) and dtypes the kernels do not cover keep plain torch."""
    x = _rows((4, 64), torch.float32).requires_grad_()
    weight = torch.ones(64, requires_grad=True)
    assert eager_ops(x) is None  # grad mode is on here
    rms_norm(x, weight, 1e-6).sum().backward()
    assert x.grad is not None and weight.grad is not None
    with torch.inference_mode():
        assert eager_ops(torch.zeros(2, 4, dtype=torch.float16)) is None
        half = _rows((3, 64), torch.float16)
        assert torch.equal(gated_act(half, "silu"), gated_act_reference(half, "silu"))
        ones = torch.ones(64, dtype=torch.float16)
        normed, total = add_rms_norm(half, half, ones, 1e-6)
        assert torch.equal(total, half + half)
        assert torch.equal(normed, rms_norm_reference(half + half, ones, 1e-6))


def test_bad_shapes_are_refused():
    ops = native_ops()
    x = torch.zeros(3, 8)
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(x, torch.ones(7), 1e-6, 0.0)
    with pytest.raises(RuntimeError, match="weight dtype"):
        ops.rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-6, 0.0)
    with pytest.raises(RuntimeError, match="residual"):
        ops.add_rms_norm(x, torch.zeros(3, 9), torch.ones(8), 1e-6, 0.0)
    with pytest.raises(RuntimeError, match="cos_sin"):
        ops.rotary(torch.zeros(3, 2, 8), torch.zeros(3, 6))
    with pytest.raises(RuntimeError, match="even"):
        ops.gated_act(torch.zeros(3, 7), 0)
    with pytest.raises(RuntimeError, match="kind"):
        ops.gated_act(torch.zeros(3, 8), 5)
