"""Weight formats of a loaded model: which format each weight gets, and the quantized
weights on their way from a loader to the model.

`ModelConfig.weights` picks the policy:
  None: today's behaviour, every weight dense in the model dtype (nothing is packed);
  float32 | bfloat16 | float16: every linear weight dense in that dtype;
  int8: every linear weight int8 weight-only, per output channel;
  int4: every linear weight int4 weight-only, groups of 32 (GGUF Q4_0/Q4_1/Q4_K blocks
        map onto these exactly, see `worker/loaders/gguf_repack.py`); on the CPU with
        slotmesh's native op these are Q4_1 blocks multiplied in fp32
        (kernels/block_linear.py), elsewhere torch's int4 kernel in bf16;
  auto: a GGUF's 4-bit tensors stay 4-bit (int4 g32), its Q8_0 and Q5_0 ones become
        `Q8`: int8 in blocks of 32 with an fp16 scale, ggml's Q8_0 (both exactly), other
        quantized types (Q6_K, Q5_1, ...) fp16; float ones stay dense; the embedding
        table of a quantized file is Q8 too (requantized from its floats: a Q8_0 table
        exactly, others within half a step of 1/127 of each block's largest weight), and
        a tied lm_head multiplies by it. That is on the CPU with slotmesh's native block
        op (kernels/block_linear.py: fp32 activations and logits, the weights at 5 / 8.5
        bits). Without it Q8 falls back to fp16 (fbgemm's fp16
        GEMM, fp32 activations and output: int8 per channel in torch's bf16 kernel lost 1
        and 3 of 63 teacher-forced top-1 tokens on Gemma 3 270M and Qwen2.5-0.5B, fp16
        none), an untied table to an fp16 tensor and a tied one stays in the model dtype
        (torch's int8/int4 kernels return bf16 logits, 1/16 apart at |8..16|, which turns
        near-ties into ties); an HF checkpoint keeps its own dtype.
  auto+bfloat16: auto, and every 4/8-bit block weight (CPU, native op) also holds a bf16
        copy that steps of more than one row multiply by (prefill, batched decode):
        kernels/packed_linear.py. One configuration for every batch size, at the blocks'
        bytes plus bf16's; meant with `--dtype bfloat16`.
Norms, biases and the MoE router stay dense in the model dtype. Under int8/int4 the
embedding table is int8 per row (a gather dequantizes just the rows it reads) and a
tied lm_head multiplies by that same int8 table: one copy serves both. On the CPU with
the native block op the table is int8 in blocks of 32 instead (`Q8`, ggml's Q8_0: a
GGUF Q8_0 table exactly), under auto too when the file is quantized, and a tied head
multiplies by it in fp32.

A loader that quantizes hands `QuantizedTensor`s (unpacked, HF layout, rows can be
concatenated to fuse q/k/v and gate/up) in `ModelFiles.tensors`; the model registry packs
them on the target device. Fine-tuning needs dense float weights and refuses packed ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.block_linear import (
    BLOCK,
    native_blocks_available,
    pack_blocks,
    q4_blocks,
    q8_blocks,
    quantize_q8,
)
from kernels.fp16_linear import pack_fp16, to_fp16
from kernels.int4_linear import pack_int4_quantized, quantize_int4
from kernels.int8_linear import pack_int8_quantized, quantize_int8
from kernels.packed_weight import DENSE_FORMATS, PackedWeight, pack_dense

HYBRID = "auto+bfloat16"
WEIGHTS = ("auto", HYBRID, *DENSE_FORMATS, "int8", "int4")  # == worker.config.WEIGHT_FORMATS
INT4_GROUP = 32
Q8 = "q8"  # internal: int8 in blocks of 32 (Q8_0), the CPU embedding table's format


def use_blocks(device: torch.device | str) -> bool:
    """Whether 4/8-bit weights on `device` are packed as blocks for slotmesh's native op
    (kernels/block_linear.py: CPU, the op built and checked) rather than for torch's
    int4/int8 kernels."""
    return torch.device(device).type == "cpu" and native_blocks_available()


def base_policy(weights: str | None) -> str | None:
    """The policy that decides each weight's format: auto+bfloat16 loads and packs as auto
    (its bf16 twins come on top, `worker/models/packing.py`)."""
    return "auto" if weights == HYBRID else weights


def check_weights(weights: str | None) -> None:
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}; expected one of {', '.join(WEIGHTS)}")


@dataclass(frozen=True, slots=True, eq=False)
class QuantizedTensor:
    """An unpacked quantized [N, K] weight (CPU tensors).

    int8: q int8 [N, K], scales [N] (w = q * scale).
    q8: q int8 [N, K], scales [N, K / 32] (w = q * scale, per block of 32; fp16 scales).
    int4: q uint8 [N, K] in 0..15, scales and zeros [N, K / group_size]
          (w = (q - 8) * scale + zero, torch's int4pack convention).
    fp16: q float16 [N, K] (w = q), no scales.
    """

    format: str
    q: torch.Tensor
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    group_size: int = 0

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K]."""
        if self.format == "fp16":
            return self.q.float()
        if self.format == "int8":
            return self.q.float() * self.scales.float()[:, None]
        if self.format == Q8:
            n, k = self.q.shape
            return (self.q.float().reshape(n, -1, BLOCK) * self.scales[..., None]).reshape(n, k)
        n, k = self.q.shape
        qg = self.q.float().reshape(n, k // self.group_size, self.group_size) - 8.0
        return (qg * self.scales[..., None] + self.zeros[..., None]).reshape(n, k)

    def pack(self, bias: torch.Tensor | None = None,
             device: torch.device | str = "cpu") -> PackedWeight:
        q, b = self.q.to(device), None if bias is None else bias.to(device)
        if self.format == "fp16":
            return pack_fp16(q, b)
        if self.format == Q8:  # blocks for the CPU's native op, fp16 elsewhere
            if use_blocks(device):
                return pack_blocks(q8_blocks(self.q, self.scales), "int8", *self.q.shape, b)
            return pack_fp16(self.dequantize().to(device), b)
        s = self.scales.to(device)
        if self.format == "int8":
            return pack_int8_quantized(q, s, b)
        if self.group_size == BLOCK and use_blocks(device):
            n, k = q.shape
            return pack_blocks(q4_blocks(q, s, self.zeros), "int4", n, k, b)
        return pack_int4_quantized(q, s, self.zeros.to(device), self.group_size, b)


def quantize_tensor(weight: torch.Tensor, fmt: str) -> QuantizedTensor:
    """A float [N, K] weight → int8 per-channel, Q8 (int8 per block of 32), int4 g32 or
    fp16 QuantizedTensor (fp16 saturates at ±65504)."""
    if fmt == "fp16":
        return QuantizedTensor("fp16", to_fp16(weight))
    if fmt == Q8:
        q, scales = quantize_q8(weight)
        return QuantizedTensor(Q8, q, scales, None, BLOCK)
    if fmt == "int8":
        q, scales = quantize_int8(weight)
        return QuantizedTensor("int8", q, scales)
    if fmt == "int4":
        q, scales, zeros = quantize_int4(weight, INT4_GROUP)
        return QuantizedTensor("int4", q, scales, zeros, INT4_GROUP)
    raise ValueError(f"quantize_tensor: {fmt!r} is not int8, q8, int4 or fp16")


def concat_rows(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """Fuse row blocks (q/k/v, gate/up) into one weight.

    Parts of different formats (a Q4_K_M file's Q4_K q/k with a Q6_K v under auto) are
    all brought to Q8 first where they are all int4 or Q8 (a 4-bit weight lands within
    half a step of 1/127 of its block's largest), to fp16 otherwise, which holds any of
    them to a relative 2⁻¹¹.
    """
    first = parts[0]
    if any(p.format != first.format or p.group_size != first.group_size for p in parts):
        common = Q8 if all(p.format in ("int4", Q8) for p in parts) else "fp16"
        parts = [p if p.format == common else quantize_tensor(p.dequantize(), common)
                 for p in parts]
        first = parts[0]
    scales = None if first.scales is None else torch.cat([p.scales for p in parts])
    zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts])
    return QuantizedTensor(first.format, torch.cat([p.q for p in parts]), scales, zeros,
                           first.group_size)


def pack_weight(weight: torch.Tensor | QuantizedTensor, fmt: str,
                bias: torch.Tensor | None = None,
                device: torch.device | str = "cpu", gathered: bool = False) -> PackedWeight:
    """One linear's weight in format `fmt` (a dense one, int8, int4, or a QuantizedTensor
    as it came). gathered: the weight is an embedding table whose rows are read, so it
    keeps a plain layout.

    float16 on an x86 CPU is packed for FBGEMM's fp16 GEMM (fp32 activations), the fast
    16-bit path where bf16/fp16 arithmetic is emulated (kernels/fp16_linear.py)."""
    if isinstance(weight, QuantizedTensor):
        return weight.pack(bias, device)
    weight = weight.to(device)
    if fmt == "int4" and weight.shape[1] % INT4_GROUP:  # no int4 layout for this K
        fmt = "int8"
    if fmt == "float16" and not gathered:
        return pack_fp16(weight, bias)
    if fmt == Q8:
        n, k = weight.shape
        return pack_blocks(q8_blocks(*quantize_q8(weight)), "int8", n, k, bias)
    if fmt in DENSE_FORMATS:
        return pack_dense(weight, fmt, bias)
    return quantize_tensor(weight, fmt).pack(bias, device)


_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_activation_dtypes: dict[str, torch.dtype] = {}


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """AVX512_BF16 or AMX-BF16 among the CPU flags (Linux /proc/cpuinfo); False when
    unknown. torch's get_cpu_capability() stops at "AVX512", so the flags are read."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), [])
    return any(flag in flags for flag in _NATIVE_BF16_FLAGS)


def activation_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype a model's activations should run in on `device` (for an entry point
    that offers `--dtype auto`: it resolves it once and puts the concrete name in
    ModelConfig.dtype, which snapshots and prompt-cache keys record).

    CUDA: bf16. CPU: bf16 only with native bf16 (AVX512_BF16/AMX) *and* a probe that
    finds a decode-sized bf16 matmul (M=4, 576x1536) faster than fp32; fp32 otherwise
    (without native bf16, bf16 F.linear measured 0.3-0.8x of fp32 at M >= 4 on AVX2).
    The probe takes a few ms and runs once per process.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16
    if kind not in _activation_dtypes:
        faster = cpu_has_native_bf16() and _bf16_matmul_is_faster()
        _activation_dtypes[kind] = torch.bfloat16 if faster else torch.float32
    return _activation_dtypes[kind]


def _bf16_matmul_is_faster(reps: int = 20) -> bool:
    import time

    import torch.nn.functional as F

    w = torch.randn(1536, 576)
    x = torch.randn(4, 576)
    times = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):
        wd, xd = w.to(dtype), x.to(dtype)
        F.linear(xd, wd)
        start = time.perf_counter()
        for _ in range(reps):
            F.linear(xd, wd)
        times[dtype] = min(times.get(dtype, float("inf")), time.perf_counter() - start)
    return times[torch.bfloat16] < times[torch.float32]
