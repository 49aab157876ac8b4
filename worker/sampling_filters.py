"""Logit filters of the sampler chain: top-k, top-p, min-p, typical-p.

Stateless and vectorised over the batch: x is [B, V] (or a [B, W] top-k slice, best first)
of temperature-scaled logits, per-row parameters are [B] tensors, removed tokens become
-inf and at least one token is always kept (the top one; for typical-p the most typical),
also when a parameter rounds to 0 in float32. No host syncs. `worker/sampler.py` decides which
run and in what order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_NEG_INF = float("-inf")
_MASS_SCALE = 2.0**40  # top-p weights: exp(x - x_max) in fixed point, summed exactly in int64
_MAX_SORTED_TOP_P_WIDTH = 4096  # wider rows find the top-p cut by radix select, not a sort
_RADIX_DIGITS = ((21, 11), (10, 11), (0, 10))  # (shift, bits) of the 32-bit order key
_CPU_CHUNK_ELEMS = 1 << 18


def apply_top_k(x: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Keep logits >= the k-th largest (ties at the boundary stay). top_k: [B], 0 = off."""
    return mask_below_kth(x, x.topk(max_top_k, dim=-1).values, top_k)


def mask_below_kth(x: torch.Tensor, top_values: torch.Tensor,
                   top_k: torch.Tensor) -> torch.Tensor:
    """x: [B, N]; top_values: [B, W >= max top_k], descending. -inf where x < the k-th."""
    kth = top_values.gather(1, (top_k.clamp(min=1) - 1)[:, None])  # [B, 1]
    threshold = torch.where(top_k[:, None] > 0, kth, _NEG_INF)  # [B, 1]
    return x.masked_fill(x < threshold, _NEG_INF)


def apply_top_p(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Smallest prefix (by probability) with mass >= top_p. top_p: [B], inf = off.

    Keeps x >= the logit of the first token at which the mass strictly above reaches top_p
    (ties at the cut stay together). Masses are exp(x - x_max) in 2^-40 fixed point, summed
    in int64: exact and order-free, so the cut is the same on a [B, W] top-k slice as on
    [B, V], and the same whether found by a sort (narrow rows) or a radix select (wide rows,
    where a full sort costs ~100 ns per element on CPU). On CPU the cut is found in row chunks
    of <= 2^18 elements, so the int64 temporaries stay in cache instead of costing fresh page
    faults per op.
    """
    num_rows = len(x) if x.device.type != "cpu" else max(1, _CPU_CHUNK_ELEMS // x.shape[-1])
    cut_keys = torch.cat([_top_p_cut_key(x[i:i + num_rows], top_p[i:i + num_rows])
                          for i in range(0, len(x), num_rows)])  # [B, 1]
    return x.masked_fill(x < _float_of_key(cut_keys), _NEG_INF)


def _top_p_cut_key(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """x: [b, W], top_p: [b] -> [b, 1] int64: keep the tokens with order key >= it."""
    key = _order_key(x)  # [b, W] int64 in [0, 2^32), monotone in x
    weight = (x - x.amax(-1, keepdim=True)).exp_().mul_(_MASS_SCALE).long()  # [b, W]
    total = weight.sum(-1, keepdim=True)  # [b, 1]
    # >= 1: a top_p that rounds to 0 (float32 has no 1e-50) keeps the top token, its limit
    cut_mass = torch.ceil(top_p[:, None].double() * total.double()).long().clamp_(min=1)
    need = torch.where(top_p[:, None] <= 1.0, cut_mass, total + 1)  # off: keep everything
    if x.shape[-1] <= _MAX_SORTED_TOP_P_WIDTH:
        return _top_mass_key_by_sort(key, weight, need)
    return _top_mass_key_by_radix(key, weight, need)


def _order_key(x: torch.Tensor) -> torch.Tensor:
    """float32 [B, W] -> int64 [B, W] in [0, 2^32) with the same order (-inf lowest)."""
    bits = x.contiguous().view(torch.int32).long()  # sign-extended
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)) + 2**31


def _float_of_key(key: torch.Tensor) -> torch.Tensor:
    """Inverse of `_order_key` (the flip of negative values is an involution)."""
    bits = key - 2**31
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).int().view(torch.float32)


def _top_mass_key_by_sort(key: torch.Tensor, weight: torch.Tensor,
                          need: torch.Tensor) -> torch.Tensor:
    """[B, 1]: the smallest key whose strictly-greater mass is < need (keep key >= it)."""
    sorted_key, order = key.sort(-1, descending=True)  # [B, W]
    before = _exclusive_cumsum(weight.gather(1, order))  # [B, W] int64, exact
    num_eligible = (before < need).sum(-1, keepdim=True)  # >= 1: the top token always is
    return sorted_key.gather(1, num_eligible - 1)  # [B, 1]


def _top_mass_key_by_radix(key: torch.Tensor, weight: torch.Tensor,
                           need: torch.Tensor) -> torch.Tensor:
    """Same result as `_top_mass_key_by_sort`, digit by digit (11 + 11 + 10 bits), no sort.

    With R(d) the mass above digit d among keys that share the prefix found so far (plus the
    mass above that prefix), R is non-increasing, and the cut digit is the number of d with
    R(d) >= need. Keys outside the prefix land in two spill bins (below, above) of a
    [B, 2^bits + 2] histogram, so each digit costs three [B, W] passes and a scatter.
    """
    prefix = torch.zeros_like(need)  # [B, 1]: the cut key's digits so far
    above = torch.zeros_like(need)  # [B, 1]: mass of keys above the current prefix
    for shift, bits in _RADIX_DIGITS:
        # bin 0: below the prefix, 1 + d: digit d inside it, 2^bits + 1: above it
        bins = ((key >> shift) - ((prefix << bits) - 1)).clamp_(0, (1 << bits) + 1)  # [B, W]
        hist = weight.new_zeros(len(weight), (1 << bits) + 2).scatter_add_(1, bins, weight)
        inclusive = hist[:, 1:-1].cumsum(-1)  # [B, 2^bits]
        mass_above = above + (inclusive[:, -1:] - inclusive)  # [B, 2^bits], non-increasing
        cut = (mass_above >= need).sum(-1, keepdim=True)  # [B, 1]
        above = mass_above.gather(1, cut)
        prefix = (prefix << bits) | cut
    return prefix  # [B, 1]


def apply_min_p(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep p >= min_p * p_max, i.e. x - x_max >= log(min_p): no softmax over V needed.

    min_p: [B], 0 = off (log 0 = -inf keeps everything).
    """
    threshold = x.amax(-1, keepdim=True) + min_p[:, None].log()  # [B, 1]
    return x.masked_fill(x < threshold, _NEG_INF)


def apply_typical_p(x: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (HF TypicalLogitsWarper). typical_p: [B], inf = off.

    Order tokens by |-log p - H| ascending and keep the smallest prefix with mass >= typical_p
    (at least the first token, as HF's min_tokens_to_keep=1), plus every token tied with the
    last one kept (so the result does not depend on how a sort
    orders ties). The sums run in fp64, so whether this runs on [B, V] or on a top-k slice
    changes a decision only at a 1e-16 near-tie: the draw stays batch-independent.
    """
    logp = x.double().log_softmax(-1)  # [B, V]
    probs = logp.exp()  # [B, V]
    entropy = -torch.where(probs > 0, probs * logp, 0.0).sum(-1, keepdim=True)  # [B, 1]
    surprise_gap = (-logp - entropy).abs()  # [B, V]; removed tokens: +inf, sorted last
    sorted_gap, order = surprise_gap.sort(-1)  # [B, V]
    keep = _exclusive_cumsum(probs.gather(1, order)) < typical_p[:, None]  # [B, V] sorted
    keep[:, 0] = True  # the most typical token stays, also when typical_p rounds to 0
    cut = sorted_gap.masked_fill(keep.logical_not(), -float("inf")).amax(-1, keepdim=True)
    return x.masked_fill(surprise_gap > cut, _NEG_INF)  # [B, V]


def _exclusive_cumsum(p: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B, V]: mass strictly before each position (0 for the first)."""
    return F.pad(p.cumsum(-1)[:, :-1], (1, 0))
