"""The weight of one linear layer in the format it is multiplied in.

A `PackedWeight` is frozen and built once at load by a `pack_*` constructor (here for the
dense formats, in `int8_linear` / `int4_linear` / `fp16_linear` for the others);
`packed_linear` dispatches on its `format`. Formats:

  float32 | bfloat16 | float16: `data` is the dense [N, K] weight in that dtype; or, for
        float16 with layout "fbgemm" (x86 CPUs, kernels/fp16_linear.py), FBGEMM's packed
        fp16 matrix (a 1-D fp16 tensor, or torch's opaque handle to it when slotmesh's
        native op is not built), multiplied with fp32 activations.
  int8: weight-only, symmetric per output channel: w[n, k] = data[n, k] * scales[n];
        data int8 [N, K], scales [N] in `compute_dtype`.
  int4: weight-only, asymmetric groups of `group_size` along K, torch's int4pack
        convention w = (q - 8) * scale + zero for q in 0..15; `data` is the kernel's
        device-specific packed layout, `scales` is scales_and_zeros [K / group, N, 2].
  layout "blocks" (int4 and int8, CPU, kernels/block_linear.py): `data` is uint8
        [N, K / 32 · B] of ggml-style blocks of 32 with their fp16 scales inside (int4:
        Q4_1 w = q·d + m; int8: Q8_0 w = q·d), `scales` None, fp32 activations;
        optionally `batched`, a dense copy for steps of many rows.

`compute_dtype` is the activation dtype the kernel runs in (bf16 for torch's int8/int4
kernels: with fp32 activations they are 10-100x slower on the CPU, and they need scales in
the activation dtype; fp32 for fbgemm's fp16 and for the blocks); the output is cast back
to the caller's dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

DENSE_FORMATS = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}
QUANTIZED_FORMATS = ("int8", "int4")
FORMATS = (*DENSE_FORMATS, *QUANTIZED_FORMATS)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class PackedWeight:
    format: str  # one of FORMATS
    data: torch.Tensor | torch.ScriptObject  # see the module docstring, per format
    out_features: int  # N
    in_features: int  # K
    compute_dtype: torch.dtype
    scales: torch.Tensor | None = None  # int8: [N]; int4: [K / group, N, 2]
    group_size: int = 0  # int4 only
    bias: torch.Tensor | None = None  # [N] in compute_dtype
    layout: str = ""  # "" the format's own layout (above); "fbgemm", "blocks": see above
    packed_bytes: int = 0  # bytes behind a handle `data` (0: data holds the weight)
    handle_key: int = 0  # names the handle for compiled graphs (kernels/fp16_linear.py)
    # layout "blocks" only: a dense copy of the same weight that steps of more than
    # kernels.packed_linear.BLOCK_ROWS rows multiply by instead (`--weights auto+bfloat16`)
    batched: PackedWeight | None = None
    # dense bf16/fp32 on the CPU only: the same weight prepacked in oneDNN's blocked
    # layout (an opaque mkldnn tensor, `prepack_dense`), which the multiply takes instead
    prepacked: torch.Tensor | None = None

    @property
    def num_bytes(self) -> int:
        """Resident bytes of the packed tensors (what quantization saves)."""
        tensors = (self.scales, self.bias) if self.packed_bytes else (
            self.data, self.scales, self.bias)
        twin = 0 if self.batched is None else self.batched.num_bytes
        prepacked = 0 if self.prepacked is None else torch.ops.mkldnn._nbytes(self.prepacked)
        return self.packed_bytes + twin + prepacked + sum(
            t.numel() * t.element_size() for t in tensors if t is not None)


def check_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int]:
    """[N, K] weight, [N] bias → (N, K); ValueError otherwise."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, K], got {tuple(weight.shape)}")
    n, k = weight.shape
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias {tuple(bias.shape)} does not match weight [{n}, {k}]")
    return n, k


def flat_input(x: torch.Tensor, w: PackedWeight, fmt: str) -> torch.Tensor:
    """A `fmt` kernel's x [..., K] → [M, K] in w.compute_dtype; ValueError when w is of
    another format or x's K is not w's."""
    if w.format != fmt:
        raise ValueError(f"{fmt}_linear: weight format is {w.format!r}")
    if x.shape[-1] != w.in_features:
        raise ValueError(f"{fmt}_linear: x {tuple(x.shape)} vs weight [{w.out_features}, "
                         f"{w.in_features}]")
    return x.reshape(-1, w.in_features).to(w.compute_dtype)


def pack_dense(weight: torch.Tensor, format: str = "float32",
               bias: torch.Tensor | None = None) -> PackedWeight:
    """weight: [N, K] float → a dense PackedWeight stored (and multiplied) in `format`."""
    if format not in DENSE_FORMATS:
        raise ValueError(f"pack_dense: {format!r} is not one of {sorted(DENSE_FORMATS)}")
    n, k = check_weight(weight, bias)
    dtype = DENSE_FORMATS[format]
    return PackedWeight(
        format=format, data=weight.detach().to(dtype).contiguous(), out_features=n,
        in_features=k, compute_dtype=dtype,
        bias=None if bias is None else bias.detach().to(dtype),
    )


def can_prepack(dtype: torch.dtype) -> bool:
    """Whether oneDNN multiplies prepacked `dtype` weights on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (
        dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def prepack_dense(w: PackedWeight) -> PackedWeight:
    """w (dense bf16 or fp32, on the CPU) with its oneDNN-prepacked copy, when slotmesh's
    native `prepacked_linear` is built here and oneDNN multiplies w's dtype on this CPU
    (bf16 needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT: torch refuses it on plain AVX2); w
    unchanged otherwise.

    A frozen compiled graph prepacks its constant weights the same way, but its constants
    keep inductor's disk cache from serving it (mkldnn tensors do not pickle), so such a
    graph compiles at every start. The prepacked copy is an input of the graph instead
    (kernels/csrc/prepacked_linear.cpp): the graph need not freeze and is cached. The 121
    linears of a SmolLM2 step at 16 rows: 19.6 ms prepacked against 30.3 through
    `F.linear` on the plain bf16 weights (AVX-512 EPYC, 2 threads)."""
    from kernels.native import native_ops

    if (w.format not in ("bfloat16", "float32") or w.layout or w.prepacked is not None
            or w.data.device.type != "cpu" or not can_prepack(w.compute_dtype)
            or native_ops() is None):
        return w
    packed = torch.ops.mkldnn._reorder_linear_weight(w.data, None)
    return dataclasses.replace(w, prepacked=packed)

