"""The chained block hash: a full block of token ids is named by blake2b(parent hash ‖ ids).

The block manager shares cached prefixes by it, the Redis prompt cache keys its entries by
it and the router hashes prompts with it for prefix affinity; stable across processes.
"""

from __future__ import annotations

import hashlib
from array import array


def chain_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """Hash of one full block given its parent's hash: stable across processes."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


def chain_hashes(token_ids: list[int], block_size: int, num_blocks: int | None = None,
                 hashes: list[bytes] | None = None) -> list[bytes]:
    """Chained hashes of the leading full blocks (all, or num_blocks), extending `hashes`
    (the hashes of a prefix already computed) in place."""
    hashes = [] if hashes is None else hashes
    num_full = len(token_ids) // block_size
    if num_blocks is not None:
        num_full = min(num_full, num_blocks)
    while len(hashes) < num_full:
        i = len(hashes)
        parent = hashes[-1] if hashes else b""
        hashes.append(chain_hash(parent, token_ids[i * block_size : (i + 1) * block_size]))
    return hashes
