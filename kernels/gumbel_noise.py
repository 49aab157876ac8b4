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

`gumbel_noise` ([B, V]) and `gumbel_noise_at` ([B, K] for given ids) are the entry points;
`gumbel_noise_reference` is the plain formula they must match bit for bit. The fast path
precomputes the per-token part once per (vocab, device) (rotl is linear over xor, so the token
word enters as one xor), runs the rest in place (no [B, V] allocation per op: on CPU a fresh
33 MB int64 tensor costs more page faults than the op itself), and on CPU works in
cache-sized column chunks. A fused Triton/compiled variant would slot in behind the same seam.
"""

from __future__ import annotations

from functools import lru_cache
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


_CPU_CHUNK_ELEMS = 1 << 18  # 2 MiB of int64 lanes: stays in cache, few per-op launches


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """seeds, positions: [B] int64 -> [B, vocab_size] float32; bit-identical to the reference."""
    _check_lanes(seeds, positions, seeds[:0])
    tokens = _rotated_token_words(vocab_size, seeds.device)  # [V]
    rows = _rotl32(_row_state(seeds, positions), 13)[:, None]  # [B, 1]
    out = torch.empty(len(seeds), vocab_size, dtype=torch.float32, device=seeds.device)
    if seeds.device.type != "cpu" or len(seeds) * vocab_size <= _CPU_CHUNK_ELEMS:
        return out.copy_(_noise_from_rotated_(rows ^ tokens))
    width = max(1, _CPU_CHUNK_ELEMS // max(1, len(seeds)))  # columns per chunk
    for start in range(0, vocab_size, width):
        chunk = rows ^ tokens[start:start + width]  # [B, width]
        out[:, start:start + width] = _noise_from_rotated_(chunk)
    return out


def gumbel_noise_at(seeds: torch.Tensor, positions: torch.Tensor,
                    token_ids: torch.Tensor) -> torch.Tensor:
    """Noise at given ids only: seeds, positions [B]; token_ids [B, K] int64 -> [B, K] float32.

    Equals `gumbel_noise(...)[b, token_ids[b]]` bit for bit (noise depends only on the id),
    for K << V when a row's candidate set is bounded.
    """
    assert token_ids.dim() == 2 and len(token_ids) == len(seeds), "token_ids: [B, K]"
    _check_lanes(seeds, positions, token_ids.reshape(-1))
    rows = _rotl32(_row_state(seeds, positions), 13)[:, None]  # [B, 1]
    return _noise_from_rotated_(rows ^ _rotl32(_scramble(token_ids), 13)).float()


@lru_cache(maxsize=8)
def _rotated_token_words(vocab_size: int, device: torch.device) -> torch.Tensor:
    """[V] int64 rotl13(scramble(v)): the seed/position-free part, computed once per vocab."""
    token_ids = torch.arange(vocab_size, dtype=torch.int64, device=device)
    return _rotl32(_scramble(token_ids), 13)


def _noise_from_rotated_(h: torch.Tensor) -> torch.Tensor:
    """h = rotl13(row state ^ token word), any shape, overwritten -> float64 Gumbel noise.

    The in-place spelling of `_absorb`'s tail, `_finish` and the uniform/log transform.
    Multiplies by the fmix constants (top bit set) as x * (c - 2^31) ^ (x << 31), masked: the
    product stays below 2^63 and adding x * 2^31 mod 2^32 is a flip of bit 31.
    """
    h.mul_(5).add_(0xE6546B64).bitwise_and_(_MASK32).bitwise_xor_(_NUM_BYTES)
    h.bitwise_xor_(h >> 16)
    _mul32_top_bit_(h, _F1)
    h.bitwise_xor_(h >> 13)
    _mul32_top_bit_(h, _F2)
    h.bitwise_xor_(h >> 16)
    u = h.bitwise_right_shift_(8).bitwise_or_(1).double().mul_(2.0**-24)  # (2m + 1) / 2^24
    return u.log_().neg_().log_().neg_()


def _mul32_top_bit_(x: torch.Tensor, c: int) -> torch.Tensor:
    assert c >> 31 == 1
    high = x << 31
    return x.mul_(c - (1 << 31)).bitwise_xor_(high).bitwise_and_(_MASK32)


def _check_lanes(seeds: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor) -> None:
    assert seeds.dtype == positions.dtype == token_ids.dtype == torch.int64, "int64 lanes"
    assert seeds.dim() == 1 and seeds.shape == positions.shape, "seeds/positions: [B]"
    assert token_ids.dim() == 1, "token_ids: [V]"
