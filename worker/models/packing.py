"""Pack a built DecoderModel's weights into the format `ModelConfig.weights` asks for.

The registry calls `detach_quantized` before the float parameters are allocated (so the
weights a loader handed over quantized never exist in float) and `pack_model` once the
model sits on its device in its dtype. A packed linear keeps its bias parameter (also
copied into the PackedWeight) and loses `weight` (None); see worker/models/decoder.py.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kernels.block_linear import BLOCKS_LAYOUT, dequantize_blocks
from kernels.packed_linear import BLOCK_ROWS
from kernels.packed_weight import PackedWeight, pack_dense, prepack_dense
from worker.models.decoder import DecoderModel, SparseMoE
from worker.quantize import QuantizedTensor, pack_weight

# module names (as in named_modules) whose weight is a plain linear one
_LINEAR_SUFFIXES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


def _packable(model: DecoderModel) -> dict[str, nn.Module]:
    """name → module for every linear that may be packed, and the embedding table."""
    out = {name: m for name, m in model.named_modules()
           if isinstance(m, nn.Linear) and name.endswith(_LINEAR_SUFFIXES)}
    out["embed_tokens"] = model.embed_tokens
    return out


def detach_quantized(model: DecoderModel, quantized: dict[str, QuantizedTensor]) -> None:
    """Drop the float `weight` parameter of every module a QuantizedTensor will fill.

    quantized: our fused parameter name ("layers.0.self_attn.qkv_proj.weight") → weight.
    """
    modules = _packable(model)
    for name in quantized:
        module_name = name.removesuffix(".weight")
        if module_name not in modules:
            raise ValueError(f"{name}: a quantized tensor for a weight that cannot be packed")
        modules[module_name].register_parameter("weight", None)


def pack_model(model: DecoderModel, quantized: dict[str, QuantizedTensor],
               fmt: str | None, embed_fmt: str | None, device: torch.device,
               batched_twins: bool = False) -> None:
    """Pack in place: the `quantized` weights as they are, every other linear weight in
    `fmt` and the embedding table in `embed_fmt` (None: leave it dense in the model
    dtype). A tied lm_head multiplies by the embedding table in whatever format it has.
    batched_twins (`--weights auto+bfloat16`): every block weight that multiplies (all
    but an untied table, which is only read) also gets a bf16 copy of itself
    (`PackedWeight.batched`) for steps of many rows (kernels/packed_linear.py).
    """
    for name, module in _packable(model).items():
        source = quantized.get(f"{name}.weight")
        target = embed_fmt if name == "embed_tokens" else fmt
        if source is None:
            if target is None:
                continue
            source = module.weight.data
        bias = getattr(module, "bias", None)
        module.packed = pack_weight(source, target, None if bias is None else bias.data,
                                    device, gathered=name == "embed_tokens")
        # an untied table is only read (rows gathered): it gets no twin
        multiplies = name != "embed_tokens" or model.lm_head is None
        if batched_twins and multiplies and module.packed.layout == BLOCKS_LAYOUT:
            module.packed = with_batched_twin(module.packed)
        if name == "embed_tokens" and model.lm_head is None and target == "float16":
            _pack_tied_head(module, source, target, device)
        module.register_parameter("weight", None)
    if fmt is not None:
        for m in model.modules():
            if isinstance(m, SparseMoE):
                _pack_experts(m, fmt, device)


def with_batched_twin(w: PackedWeight) -> PackedWeight:
    """A block weight with a bf16 copy of the same values (widened from its blocks, so
    both multiply by exactly one weight) for steps of many rows."""
    dense = dequantize_blocks(w.data, w.format, w.in_features)
    return dataclasses.replace(w, batched=prepack_dense(pack_dense(dense, "bfloat16", w.bias)))


def _pack_tied_head(table: nn.Module, source, fmt: str, device: torch.device) -> None:
    """A tied lm_head multiplies by the embedding table as packed. Where the format's
    matmul layout differs from the gatherable one (float16 for FBGEMM; int8 tables are
    both), the head gets its own copy, `packed_head`: twice the table's bytes for a head
    that runs at FBGEMM's speed instead of an emulated fp16 `F.linear`."""
    head = pack_weight(source, fmt, None, device)
    if head.layout != table.packed.layout:
        table.packed_head = head


def _pack_experts(moe: SparseMoE, fmt: str, device: torch.device) -> None:
    """Stacked experts → one (gate_up, down) PackedWeight pair per expert."""
    moe.packed_experts = [
        (pack_weight(moe.gate_up_proj.data[e], fmt, None, device),
         pack_weight(moe.down_proj.data[e], fmt, None, device))
        for e in range(moe.gate_up_proj.shape[0])
    ]
    moe.register_parameter("gate_up_proj", None)
    moe.register_parameter("down_proj", None)


def multiplies_blocks(model: DecoderModel) -> bool:
    """Whether any weight is 4/8-bit blocks for the CPU's native op (kernels/block_linear)."""
    return any(getattr(m, "packed", None) is not None and m.packed.layout == BLOCKS_LAYOUT
               for m in model.modules())


def weight_bytes(model: DecoderModel) -> int:
    """Resident bytes of the model's parameters and packed weights (a tied table once)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        for packed in (getattr(m, "packed", None), getattr(m, "packed_head", None)):
            total += 0 if packed is None else packed.num_bytes
        for pair in getattr(m, "packed_experts", None) or ():
            total += sum(w.num_bytes for w in pair)
    return total


def describe_weights(model: DecoderModel) -> str:
    """What the linears and the embedding table multiply in, for Info and the logs, e.g.
    "int4 x150, int8 x31 (activations bfloat16); float32 x1": packed formats with the
    activation dtype their kernels run in, then the weights left dense in the model dtype."""
    packed: dict[tuple[str, torch.dtype], int] = {}
    twins = 0
    for m in model.modules():
        weights = [w for pair in getattr(m, "packed_experts", None) or () for w in pair]
        multiplied = getattr(m, "packed_head", None) or getattr(m, "packed", None)
        if multiplied is not None:  # a tied head's own copy is what multiplies
            weights.append(multiplied)
        for w in weights:
            packed[(w.format, w.compute_dtype)] = packed.get((w.format, w.compute_dtype), 0) + 1
            if w.batched is not None:
                twins += 1
    dense = sum(1 for m in _packable(model).values() if getattr(m, "weight", None) is not None)
    dense += sum(1 for m in model.modules()
                 if isinstance(m, SparseMoE) and m.gate_up_proj is not None)
    parts = []
    for act in sorted({a for _f, a in packed}, key=str):
        formats = ", ".join(f"{f} x{n}" for (f, a), n in sorted(packed.items(), key=str)
                            if a == act)
        parts.append(f"{formats} (activations {str(act).removeprefix('torch.')})")
    if twins:
        parts.append(f"a bfloat16 copy of {twins} for steps of {BLOCK_ROWS + 1}+ rows")
    if dense:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        parts.append(f"{dtype} x{dense}")
    return "; ".join(parts)
