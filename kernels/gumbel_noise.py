"""Counter-based Gumbel noise: a pure function of (seed, position, token id).

Owns the hash behind every random draw in the sampler. There is no generator state: the
noise for token v of a row is `-log(-log(u))` with `u = uniform(seed, position, v)`, so a
row draws the same token alone or in any batch, and replays identically after preemption.

The hash is murmur3_32 over five 32-bit words (seed lo/hi, position lo/hi, v), computed in
int64 lanes. Every 32-bit multiply is split into 16-bit halves so no intermediate exceeds
2^49: the result never relies on signed-overflow wrapping and is the same on any device.
The same integer code runs on numpy arrays (`uniform_from_hash_numpy`), which gives the
host sampler bit-identical u values. The two logs run in float64 and round once to float32:
float32 logs differ by an ulp between numpy, torch CPU and CUDA for about a third of all
u, while float64 results rounded to float32 agree except at a rounding boundary (none in
4M samples), so host and device add the same noise to the same logits.

`gumbel_noise` is the entry point; today it is the plain-torch `gumbel_noise_reference`
(about 30 elementwise int64 passes over [B, V]). A fused Triton/compiled variant would slot in
behind `gumbel_noise` only where it can run.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
_H0 = 0x9747B28C  # murmur3 seed word; any constant works, it only has to stay fixed
_C1, _C2 = 0xCC9E2D51, 0x1B873593
_F1, _F2 = 0x85EBCA6B, 0xC2B2AE35
_NUM_BYTES = 20  # five 32-bit words: seed lo/hi, position lo/hi, token id

# The integer helpers below use only * & ^ | << >> with Python-int constants, so they run
# unchanged on int64 torch tensors and int64 numpy arrays. Inputs are in [0, 2^32).
Lanes = TypeVar("Lanes", torch.Tensor, np.ndarray)


def _mul32(x: Lanes, c: int) -> Lanes:
    """(x * c) mod 2^32 without overflowing int64: products stay below 2^49."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _rotl32(x: Lanes, r: int) -> Lanes:
    return ((x << r) | (x >> (32 - r))) & _MASK32


def _scramble(k: Lanes) -> Lanes:
    """murmur3 per-word key scramble."""
    return _mul32(_rotl32(_mul32(k, _C1), 15), _C2)


def _absorb(h: Lanes, k_scrambled: Lanes) -> Lanes:
    """murmur3 per-word state update with an already scrambled key."""
    h = _rotl32(h ^ k_scrambled, 13)
    return (_mul32(h, 5) + 0xE6546B64) & _MASK32


def _fmix32(h: Lanes) -> Lanes:
    h = h ^ (h >> 16)
    h = _mul32(h, _F1)
    h = h ^ (h >> 13)
    h = _mul32(h, _F2)
    return h ^ (h >> 16)


def _row_state(seeds: Lanes, positions: Lanes) -> Lanes:
    """Hash state after the four per-row words; seeds and positions in [0, 2^63)."""
    h = seeds * 0 + _H0
    for word in (seeds & _MASK32, seeds >> 32, positions & _MASK32, positions >> 32):
        h = _absorb(h, _scramble(word))
    return h


def _finish(row_state: Lanes, token_scrambled: Lanes) -> Lanes:
    """Absorb the token word and finalise; broadcasting gives [B, V] from [B, 1] and [V]."""
    return _fmix32(_absorb(row_state, token_scrambled) ^ _NUM_BYTES)


def uniform_from_hash(seeds: torch.Tensor, positions: torch.Tensor,
                      token_ids: torch.Tensor) -> torch.Tensor:
    """u in the open interval (0, 1), float32 exact: u = (2m + 1) / 2^24 with m the top 23 bits.

    seeds, positions: [B] int64 in [0, 2^63); token_ids: [V] int64. Returns [B, V] float32.
    """
    _check_lanes(seeds, positions, token_ids)
    state = _row_state(seeds, positions)[:, None]  # [B, 1]
    bits = _finish(state, _scramble(token_ids)[None, :])  # [B, V] in [0, 2^32)
    return ((bits >> 9).to(torch.float32) * 2.0 + 1.0) * 2.0**-24


def uniform_from_hash_numpy(seed: int, position: int, token_ids: np.ndarray) -> np.ndarray:
    """numpy twin of `uniform_from_hash` for one row: [N] ids -> [N] float32, bit-identical."""
    state = _row_state(np.int64(seed), np.int64(position))
    bits = _finish(state, _scramble(np.asarray(token_ids, dtype=np.int64)))  # [N]
    return ((bits >> 9).astype(np.float32) * np.float32(2) + np.float32(1)) * np.float32(2.0**-24)


def gumbel_from_uniform_numpy(u: np.ndarray) -> np.ndarray:
    """Host twin of the device transform: float64 logs, rounded once to float32."""
    return (-np.log(-np.log(u.astype(np.float64)))).astype(np.float32)


def gumbel_noise_reference(seeds: torch.Tensor, positions: torch.Tensor,
                           vocab_size: int) -> torch.Tensor:
    """seeds, positions: [B] int64 -> [B, vocab_size] float32 standard Gumbel noise."""
    token_ids = torch.arange(vocab_size, dtype=torch.int64, device=seeds.device)  # [V]
    u = uniform_from_hash(seeds, positions, token_ids).double()  # [B, V]
    return (-torch.log(-torch.log(u))).float()


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Import seam for a fused variant; the plain-torch reference is the only path today."""
    return gumbel_noise_reference(seeds, positions, vocab_size)


def _check_lanes(seeds: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor) -> None:
    assert seeds.dtype == positions.dtype == token_ids.dtype == torch.int64, "int64 lanes"
    assert seeds.dim() == 1 and seeds.shape == positions.shape, "seeds/positions: [B]"
    assert token_ids.dim() == 1, "token_ids: [V]"
