"""GGUF quantized blocks → `QuantizedTensor` (int4 g32 / int8 per channel / fp16).

4-bit types map onto torch's int4 group-32 convention w = (q - 8)·scale + zero without a
float round trip of the weights (only scale and zero are computed):
  Q4_0 (d, 32 × q):      w = d·(q − 8)                  → scale d, zero 0;
  Q4_1 (d, m, 32 × q):   w = d·q + m = (q − 8)·d + (m + 8d) → scale d, zero m + 8d;
  Q4_K (256-superblock d, dmin; 8 × 6-bit sc, mn; 256 × q):
                         w = d·sc·q − dmin·mn          → scale d·sc, zero 8·d·sc − dmin·mn.
The kernels hold scale and zero in bf16, so the packed weight equals the GGUF
dequantization up to that rounding: |Δw| ≤ (8·|scale| + |zero|)·2⁻⁸ per group.
Every other type (Q5_*, Q6_K, Q8_0, Q2_K, Q3_K, Q5_K, F16, ...) is dequantized by the
gguf package and requantized (int8 per output channel, or int4 g32 min/max), or rounded to
fp16, as `weights=auto` does: their blocks are small integers times an fp16 scale (Q8_0
d·q with |q| ≤ 127, Q5_0 d·(q − 16) with q < 32, Q6_K d·sc·q with |sc| ≤ 127,
|q| ≤ 32), so fp16's 11-bit significand keeps each weight to a relative 2⁻¹¹:
|Δw| ≤ |w|·2⁻¹¹ (fp16 subnormals below 6·10⁻⁵ keep an absolute 2⁻²⁵).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K

from worker.quantize import INT4_GROUP, Q8, QuantizedTensor, quantize_tensor

Q = GGMLQuantizationType
FOUR_BIT = (Q.Q4_0, Q.Q4_1, Q.Q4_K)
EXACT_Q8 = (Q.Q8_0, Q.Q5_0)  # d·q with an fp16 d a block of 32 and |q| ≤ 127
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes of one 32-value block → [..., 32]: low nibbles are values 0..15,
    high nibbles 16..31 (ggml's Q4_0/Q4_1/Q4_K layout)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _blocks(raw: np.ndarray, qtype: Q, shape: tuple[int, int]) -> np.ndarray:
    """Raw tensor bytes → [N, K / block, type_size] uint8."""
    block, size = GGML_QUANT_SIZES[qtype]
    return np.asarray(raw, dtype=np.uint8).reshape(shape[0], shape[1] // block, size)


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] bytes → [...] fp16 values as float32."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def q4_0_to_int4(raw: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """→ q uint8 [N, K], scales, zeros fp32 [N, K/32]."""
    b = _blocks(raw, Q.Q4_0, shape)  # [N, K/32, 18]
    d = _f16(b[..., 0:2])
    q = _nibbles(b[..., 2:]).reshape(shape)
    return q, d, np.zeros_like(d)


def q4_1_to_int4(raw: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
    b = _blocks(raw, Q.Q4_1, shape)  # [N, K/32, 20]
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    q = _nibbles(b[..., 4:]).reshape(shape)
    return q, d, m + 8.0 * d


def q4_k_to_int4(raw: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
    b = _blocks(raw, Q.Q4_K, shape)  # [N, K/256, 144]
    n, num_super = b.shape[:2]
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])  # [N, K/256]
    sc, mn = Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12))  # [N·K/256, 8] each
    scales = d[..., None] * sc.reshape(n, num_super, 8).astype(np.float32)
    mins = dmin[..., None] * mn.reshape(n, num_super, 8).astype(np.float32)
    # 4 chunks of 32 bytes: low nibbles are sub-block 2i, high nibbles sub-block 2i + 1
    qs = b[..., 16:].reshape(n, num_super, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(shape)
    return q, scales.reshape(n, -1), (8.0 * scales - mins).reshape(n, -1)


_TO_INT4 = {Q.Q4_0: q4_0_to_int4, Q.Q4_1: q4_1_to_int4, Q.Q4_K: q4_k_to_int4}


def auto_format(qtype: Q) -> str | None:
    """`weights=auto`: 4-bit stays int4; Q8_0 and Q5_0 become Q8 (int8 in blocks of 32,
    exactly: fp16 where the CPU's block op is not built); other quantized types fp16
    (they have no exact Q8 form: requantizing Gemma 3's and Qwen2.5's 5/6-bit tensors to
    Q8 by max|w| / 127 moved their logits by up to 0.34 and cost a top-1 token of 63 on
    each); floats dense."""
    if qtype in FOUR_BIT:
        return "int4"
    if qtype in EXACT_Q8:
        return Q8
    return None if qtype in FLOAT_TYPES else "fp16"


def q8_exact(raw: np.ndarray, qtype: Q, shape: tuple[int, int],
             dequantized: np.ndarray) -> QuantizedTensor:
    """A Q8_0 / Q5_0 tensor as Q8 blocks with the file's own fp16 d: its weights are
    d·q with |q| ≤ 127 (Q5_0's q − 16 in −16..15), exact in fp32, so q = w / d exactly."""
    d = _f16(_blocks(raw, qtype, shape)[..., 0:2])  # [N, K/32]
    w = np.asarray(dequantized, dtype=np.float32).reshape(*d.shape, 32)
    q = np.rint(w / np.where(d == 0, 1, d)[..., None]).clip(-127, 127).astype(np.int8)
    return QuantizedTensor(Q8, torch.from_numpy(q.reshape(shape)), torch.from_numpy(d),
                           None, INT4_GROUP)


def repack(raw: np.ndarray, qtype: Q, shape: tuple[int, int], fmt: str,
           dequantized: np.ndarray | None = None) -> QuantizedTensor:
    """A 2-D GGUF tensor's raw bytes → QuantizedTensor in `fmt` (int4, int8 or fp16).

    Q4_0/Q4_1/Q4_K to int4 are exact block maps; anything else needs `dequantized`
    (the fp32 [N, K] weight, HF layout not required: rows are not permuted here).
    """
    if fmt == "int4" and qtype in _TO_INT4:
        q, scales, zeros = _TO_INT4[qtype](raw, shape)
        return QuantizedTensor("int4", torch.from_numpy(np.ascontiguousarray(q)),
                               torch.from_numpy(np.ascontiguousarray(scales)),
                               torch.from_numpy(np.ascontiguousarray(zeros)), INT4_GROUP)
    if dequantized is None:
        raise ValueError(f"repack {qtype.name} → {fmt} needs the dequantized weight")
    if fmt == Q8 and qtype in EXACT_Q8:
        return q8_exact(raw, qtype, shape, dequantized)
    return quantize_tensor(torch.from_numpy(np.ascontiguousarray(dequantized)), fmt)


def map_rows(t: QuantizedTensor, fn) -> QuantizedTensor:
    """Apply a row transform (fn: ndarray [N, ...] → [N, ...], e.g. llama's rope
    un-permutation) to every per-row part of a QuantizedTensor."""
    def rows(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else torch.from_numpy(np.ascontiguousarray(fn(x.numpy())))
    return QuantizedTensor(t.format, rows(t.q), rows(t.scales), rows(t.zeros), t.group_size)
