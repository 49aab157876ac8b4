"""The index of each row's largest value, exactly `x.argmax(-1)`, fast on the CPU.

torch's CPU argmax over the last dimension walks a row one element at a time: over
SmolLM2's 49,152 logits it took 73 µs for one row and 681 µs for 16, where `amax` over
1024-wide chunks took 8 and 36 µs (AVX-512 EPYC, 2 threads). A greedy step at batch 16
spent ~2% of its time there. So, on the CPU: each chunk's max (vectorised), the first
chunk holding the row's max, then argmax inside that chunk only. The first index of the
maximum overall is the first index of it in the first chunk that holds it, so ties
resolve as in `argmax`. Elsewhere (CUDA) `argmax` itself.
"""

from __future__ import annotations

import torch

CHUNK = 1024


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] float → [B] int64, equal to x.argmax(-1)."""
    b, v = x.shape
    if x.device.type != "cpu" or v < 2 * CHUNK:
        return x.argmax(-1)
    x = x.contiguous()
    whole = v // CHUNK
    chunk_max = x[:, :whole * CHUNK].view(b, whole, CHUNK).amax(-1)  # [B, C]
    if v % CHUNK:  # the short last chunk
        chunk_max = torch.cat([chunk_max, x[:, whole * CHUNK:].amax(-1, keepdim=True)], dim=1)
    start = chunk_max.argmax(-1) * CHUNK  # [B] first index of the first chunk with the max
    # the chosen chunk's indices; past the end of a short last chunk they repeat index
    # v - 1, after its first occurrence, so they change no result
    index = (start[:, None] + torch.arange(CHUNK, device=x.device)).clamp_(max=v - 1)
    return start + x.gather(1, index).argmax(-1)
