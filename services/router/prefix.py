"""Chained hashes of a prompt's leading blocks, for prefix affinity.

The router knows no tokenizer, so it hashes the prompt in the form the client sent:
UTF-8 bytes of text (blocks of 64 bytes, about 16 tokens), the chat messages as canonical
JSON bytes, or token ids (blocks of 16). Equal prompts give equal chains, and a prompt
that extends another shares its leading hashes — which is all affinity needs. The chain
is the block manager's `chain_hash`, seeded with the prompt's kind so a text and a
token-id prompt never collide.
"""

from __future__ import annotations

import json

from services.rpc.convert import Prompt
from worker.vocab.block_hash import chain_hash

BYTE_BLOCK = 64
TOKEN_BLOCK = 16
MAX_BLOCKS = 64  # affinity looks at the first 4 KiB / 1024 tokens at most


def prompt_units(prompt: Prompt) -> tuple[bytes, list[int]]:
    if prompt.text is not None:
        return b"text", list(prompt.text.encode())
    if prompt.messages is not None:
        data = json.dumps([list(m) for m in prompt.messages], ensure_ascii=False,
                          separators=(",", ":"))
        return b"chat", list(data.encode())
    return b"ids", list(prompt.token_ids or ())


def prefix_hashes(prompt: Prompt) -> tuple[list[str], str]:
    """(hex hashes of up to MAX_BLOCKS full leading blocks, hex hash of the whole prompt)."""
    kind, units = prompt_units(prompt)
    block = TOKEN_BLOCK if kind == b"ids" else BYTE_BLOCK
    hashes: list[str] = []
    parent = kind
    num_full = len(units) // block
    for i in range(num_full):
        parent = chain_hash(parent, units[i * block : (i + 1) * block])
        if i < MAX_BLOCKS:
            hashes.append(parent.hex())
    tail = units[num_full * block :]
    whole = chain_hash(parent, tail) if tail or not num_full else parent
    return hashes, whole.hex()
