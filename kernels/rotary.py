"""Rotary position embedding, NEOX / HF `rotate_half` layout (GGUF llama weights are
un-permuted into this layout at load, so one rotary serves every model)."""

from __future__ import annotations

import math

import torch

from kernels.native import eager_ops


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """[head_dim // 2] inverse frequencies, with linear or llama3 scaling applied."""
    # fp32 like the HF implementations, so positions far out agree bit for bit
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling)
    elif rope_type not in ("default", None):
        raise NotImplementedError(f"rope scaling type {rope_type!r}")
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cache(head_dim: int, max_positions: int, theta: float, scaling: dict | None,
               device: torch.device) -> torch.Tensor:
    """[max_positions, head_dim] fp32: cos in the first half, sin in the second."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # [P, head_dim // 2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


def apply_rotary_reference(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos_sin: [T, head_dim] rows of rope_cache at the positions."""
    half = x.shape[-1] // 2
    cos = cos_sin[:, None, :half].to(x.dtype)
    sin = cos_sin[:, None, half:].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def apply_rotary(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] != cos_sin.shape[-1] or x.shape[0] != cos_sin.shape[0]:
        raise ValueError(f"apply_rotary: x {tuple(x.shape)} vs cos_sin {tuple(cos_sin.shape)}")
    ops = eager_ops(x)
    if (ops is not None and x.dim() == 3 and x.stride(-1) == 1
            and cos_sin.dtype == torch.float32 and cos_sin.stride(-1) == 1):
        # one native pass, the reference's roundings (kernels/csrc/layer_elementwise.cpp)
        return ops.rotary(x, cos_sin)
    return apply_rotary_reference(x, cos_sin)
