"""The gated activation of a SwiGLU / GeGLU MLP: act(gate) * up, from the fused gate_up
projection's output [..., 2I] (gate in the first half) → [..., I].

Eager on the CPU, silu and tanh-approximated gelu run as one native pass
(kernels/csrc/layer_elementwise.cpp: the activation rounded to the dtype before the
multiply, as the reference's two ops round it); otherwise the plain-torch reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.native import eager_ops

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}
_NATIVE_KINDS = {"silu": 0, "gelu_pytorch_tanh": 1}  # the native op's `kind`


def gated_act_reference(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return ACTIVATIONS[act](gate) * up


def gated_act(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gated_act: last dim {gate_up.shape[-1]} is not even")
    ops, kind = eager_ops(gate_up), _NATIVE_KINDS.get(act)
    if ops is not None and kind is not None and gate_up.dim() <= 3 and gate_up.stride(-1) == 1:
        return ops.gated_act(gate_up, kind)
    return gated_act_reference(gate_up, act)
