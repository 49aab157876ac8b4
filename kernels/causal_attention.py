"""Dense causal self-attention over whole sequences: the training forward's attention.

No KV cache: every query of a [B, L] batch attends to the keys of its own sequence at
positions ≤ its own (and, for a sliding-window layer, within the last `window`
positions, as the serving mask does: q − k < window). The fast path is one SDPA call
with GQA done inside SDPA (no K/V expansion, which would double attention's saved
tensors for backward) and `is_causal` when no window cuts in (SDPA's CPU flash kernel
then never builds an [L, L] mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               scale: float, window: int | None = None) -> torch.Tensor:
    """q: [B, L, H, D]; k, v: [B, L, KVH, D] → [B, L, H, D]. Plain softmax attention."""
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale  # [B, H, L, L]
    allowed = _band(q.shape[1], window, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.float())
    return out.to(q.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     window: int | None = None) -> torch.Tensor:
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"causal_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2] or q.shape[-1] != k.shape[-1]:
        raise ValueError("causal_attention: heads must be a multiple of kv heads")
    seq_len = q.shape[1]
    # SDPA wants heads before positions: [B, H, L, D]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if window is None or window >= seq_len:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                             enable_gqa=True)
    else:
        mask = _band(seq_len, window, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                             enable_gqa=True)
    return out.transpose(1, 2)


def _band(seq_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[L, L] bool: query i may see key j when j ≤ i (and i − j < window)."""
    pos = torch.arange(seq_len, device=device)
    delta = pos[:, None] - pos[None, :]  # i − j
    allowed = delta >= 0
    if window is not None:
        allowed &= delta < window
    return allowed
