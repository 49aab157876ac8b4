"""Weight formats at inference (kernels/packed_weight, int8_linear, int4_linear,
fp16_linear, packed_linear) against their dequantize-then-F.linear references, on every
linear shape of SmolLM2-135M.

Tolerances. The quantized kernels run in bf16 (activations cast to bf16, bf16 scales,
bf16 output): the references get the same bf16-rounded activations and scales and run in
fp32, so what is left is the bf16 rounding of the output (2^-8 relative) and summation
order. Bound: |kernel - reference| <= max|reference| / 128 (measured <= 1/300). The
dequantized int4 weight read back through the CPU kernel in fp32 is exact.
fp16 (fbgemm) keeps fp32 activations and accumulation: it matches fp32 F.linear on the
fp16-rounded weight to summation order (1e-5 relative). slotmesh's native multi-threaded
op runs FBGEMM's own kernel on column slices, so it equals torch's single-threaded op
bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from kernels import fp16_linear as fp16_module
from kernels.fp16_linear import (
    fbgemm_fp16_available,
    fp16_linear,
    fp16_linear_reference,
    native_fp16_available,
    pack_fp16,
    pack_fp16_fbgemm,
)
from kernels.int4_linear import (
    dequantize_int4,
    int4_linear,
    int4_linear_reference,
    pack_int4,
    pack_int4_quantized,
    quantize_int4,
)
from kernels.int8_linear import int8_linear, int8_linear_reference, pack_int8, quantize_int8
from kernels.native import native_ops
from kernels.packed_linear import dequantize_packed, packed_linear, packed_linear_reference
from kernels.packed_weight import pack_dense

# SmolLM2-135M (K, N): fused qkv, q, k/v, o_proj, fused gate_up, gate/up, down, lm_head
SHAPES = [(576, 960), (576, 576), (576, 192), (576, 3072), (576, 1536), (1536, 576),
          (576, 49152)]


def _cases(cases):
    """The large shapes take seconds each: slow (the full suite), not unit."""
    return [pytest.param(*c, marks=pytest.mark.slow) if c[0] * c[1] >= 800_000 else c
            for c in cases]
MS = [1, 4, 16]


def _weight(k: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


def _x(m: int, k: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(m + k))


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    bound = ref.abs().max().item() / 128
    assert (out.float() - ref.float()).abs().max().item() <= bound


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("k,n", _cases(SHAPES))
def test_int8_matches_reference(k, n):
    w = _weight(k, n)
    q, scales = quantize_int8(w)
    packed = pack_int8(w)
    for m in MS:
        x = _x(m, k)
        ref = int8_linear_reference(x.bfloat16().float(), q, scales.bfloat16())
        _close(int8_linear(x, packed), ref)


@pytest.mark.parametrize("k,n,group", _cases([(k, n, 32) for k, n in SHAPES]
                                             + [(576, 960, 64), (1536, 576, 64),
                                                (1536, 576, 128)]))
def test_int4_matches_reference(k, n, group):
    w = _weight(k, n)
    q, scales, zeros = quantize_int4(w, group)
    packed = pack_int4_quantized(q, scales, zeros, group)
    s16, z16 = scales.bfloat16(), zeros.bfloat16()
    # the packed weight is exactly the bf16-scaled dequantization (read back through the
    # kernel with fp32 activations, which is slow: not for the 49,152-row lm_head)
    assert n > 4096 or torch.equal(dequantize_packed(packed), dequantize_int4(q, s16, z16, group))
    for m in MS:
        x = _x(m, k)
        _close(int4_linear(x, packed), int4_linear_reference(x.bfloat16().float(), q, s16,
                                                             z16, group))


needs_fbgemm = pytest.mark.skipif(not fbgemm_fp16_available(),
                                  reason="FBGEMM's fp16 GEMM runs on x86 CPUs only")


@needs_fbgemm
@pytest.mark.parametrize("k,n", _cases(SHAPES))
def test_fp16_matches_reference(k, n):
    w = _weight(k, n)
    packed = pack_fp16(w)
    assert packed.layout == "fbgemm" and packed.compute_dtype == torch.float32
    assert torch.equal(dequantize_packed(packed), w.half().float())  # read back exactly
    for m in MS:
        x = _x(m, k)
        out, ref = fp16_linear(x, packed), fp16_linear_reference(x, w)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


needs_native = pytest.mark.skipif(not native_fp16_available(),
                                  reason="slotmesh's native op is not built here")


@needs_native
@pytest.mark.parametrize("k,n", _cases([*SHAPES, (600, 40), (1100, 33)]))
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_fp16_equals_torch_single_threaded_op(k, n, threads):
    """Each thread computes its own column blocks with the same kernel: the result is
    torch's op's, bit for bit, whatever the thread count (3 leaves a thread the fringe
    columns of an N that is no multiple of the block; K = 1100 ends in a partial block of
    rows)."""
    w, b = _weight(k, n), torch.randn(n)
    ops, handle = native_ops(), fp16_module._pack(w)
    packed = ops.fp16_pack(w)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m in (*MS, 37):
            x = _x(m, k)
            want = torch.ops.aten.fbgemm_linear_fp16_weight_fp32_activation(x, handle, b)
            assert torch.equal(ops.fp16_gemm(x, packed, n, b), want)
    finally:
        torch.set_num_threads(before)


@needs_native
def test_native_fp16_checks_its_arguments():
    ops = native_ops()
    packed = ops.fp16_pack(_weight(576, 192))
    with pytest.raises(RuntimeError, match="a \\[193, 576\\] weight packs to"):
        ops.fp16_gemm(_x(2, 576), packed, 193, None)
    with pytest.raises(RuntimeError, match="2-D fp32"):
        ops.fp16_gemm(_x(2, 576).double(), packed, 192, None)
    with pytest.raises(RuntimeError, match="contiguous 1-D fp16"):
        ops.fp16_gemm(_x(2, 576), packed.float(), 192, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.fp16_gemm(_x(2, 576), packed, 192, torch.zeros(5))


@needs_fbgemm
def test_fp16_through_torchs_handle_without_the_native_op(monkeypatch):
    """Where the native op is not built, the weight is torch's handle, named by a key, and
    multiplies as well (and inside a compiled graph, test below)."""
    monkeypatch.setattr(fp16_module, "native_fp16_available", lambda: False)
    w, b = _weight(576, 192), torch.randn(192)
    packed = pack_fp16(w, b)
    assert packed.layout == "fbgemm" and packed.handle_key > 0
    assert packed.num_bytes == 1024 * 192 * 2 + 192 * 4  # K padded to 512s, fp32 bias
    assert torch.equal(dequantize_packed(packed), w.half().float())
    for m in MS:
        x = _x(m, 576)
        ref = fp16_linear_reference(x, w, b)
        torch.testing.assert_close(fp16_linear(x, packed), ref, rtol=1e-5,
                                   atol=1e-5 * ref.abs().max().item())


def test_fp16_without_fbgemm_is_dense_fp16(monkeypatch):
    """Where fbgemm is missing the weight is a plain fp16 tensor and F.linear runs in
    fp16 (fp16-rounded output)."""
    monkeypatch.setattr(fp16_module, "fbgemm_fp16_available", lambda: False)
    w, b = _weight(576, 192), torch.randn(192)
    packed = pack_fp16(w, b)
    assert packed.data.dtype == torch.float16 and packed.compute_dtype == torch.float16
    assert packed.num_bytes == 576 * 192 * 2 + 192 * 2
    x = _x(4, 576)
    _close(packed_linear(x, packed), fp16_linear_reference(x.half(), w, b).float())


def test_quantization_error_is_bounded():
    """Round to nearest: int8 within half a step of max|w|/127; int4 within half a group
    step plus the bf16 rounding of scale and zero (|zero| + 8 scale) / 256."""
    w = _weight(576, 960)
    err8 = (dequantize_packed(pack_int8(w)) - w).abs()
    step8 = w.abs().amax(dim=1, keepdim=True) / 127
    assert (err8 <= step8 * 0.5 + 1e-3 * step8 + w.abs() / 256).all()
    _, scales, zeros = quantize_int4(w, 32)
    err4 = (dequantize_packed(pack_int4(w, 32)) - w).abs().reshape(960, 18, 32)
    bound = scales * 0.5 + (zeros.abs() + 16 * scales) / 256
    assert (err4 <= bound[..., None] * 1.001).all()
    err16 = (dequantize_packed(pack_fp16(w)) - w).abs()
    # half an ulp: 11-bit significand; subnormals (|w| < 2⁻¹⁴) are 2⁻²⁴ apart
    assert (err16 <= w.abs() * 2**-11 + 2**-25).all()


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "float16"])
def test_dense_formats(fmt):
    w, b = _weight(576, 960), torch.randn(960) * 0.1
    packed = pack_dense(w, fmt, b)
    for m in MS:
        x = _x(m, 576)
        out = packed_linear(x, packed)
        assert out.dtype == torch.float32
        ref = packed_linear_reference(x.to(packed.compute_dtype).float(), packed)
        _close(out, ref)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp16"])
def test_bias_batch_dims_and_dtype(fmt):
    """[..., K] inputs in fp32 or bf16 come back in the caller's dtype, with the bias."""
    w, b = _weight(576, 192), torch.randn(192)
    packs = {"int8": lambda: pack_int8(w, b), "int4": lambda: pack_int4(w, 64, b),
             "fp16": lambda: pack_fp16(w, b)}
    packed = packs[fmt]()
    x = torch.randn(2, 3, 576)
    for dtype in (torch.float32, torch.bfloat16):
        out = packed_linear(x.to(dtype), packed)
        assert out.shape == (2, 3, 192) and out.dtype == dtype
        ref = packed_linear_reference(x.to(dtype).bfloat16(), packed).to(dtype)
        _close(out, ref)


def test_shape_checks():
    packed = pack_int4(_weight(576, 192), 32)
    with pytest.raises(ValueError, match="576"):
        packed_linear(torch.randn(1, 512), packed)
    with pytest.raises(ValueError, match="group size"):
        pack_int4(_weight(576, 192), 48)
    with pytest.raises(ValueError, match="not one of"):
        pack_dense(_weight(64, 64), "int3")
    with pytest.raises(ValueError, match="bias"):
        pack_int8(_weight(64, 64), torch.zeros(63))
    # 4 bits a weight + a bf16 scale and zero per 32: 5 bits
    assert packed.num_bytes == 576 * 192 // 2 + 576 // 32 * 192 * 4
    if native_fp16_available():  # fbgemm's fp16: 2 bytes a weight, N padded to 16s/32s
        assert pack_fp16(_weight(576, 200)).num_bytes in (576 * 208 * 2, 576 * 224 * 2)



@needs_fbgemm
@pytest.mark.parametrize("native", [
    pytest.param(True, marks=needs_native), False])
def test_fp16_fbgemm_runs_inside_a_compiled_graph(native, monkeypatch):
    """The native op's packed tensor is a plain constant, cloned by freezing; torch's
    handle is opaque to the compiler: the custom op keeps it out of fake tensors, and
    freezing (the static decode step's setting) keeps it as a constant."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(fp16_module, "native_fp16_available", lambda: native)

    w = _weight(576, 192)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.packed = pack_fp16_fbgemm(w)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.silu(packed_linear(x, self.packed)) * 2

    block = Block().eval()
    x = _x(4, 576)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        out = torch.compile(block)(x)
    ref = torch.nn.functional.silu(fp16_linear_reference(x, w)) * 2
    assert (out - ref).abs().max().item() <= ref.abs().max().item() * 1e-5
