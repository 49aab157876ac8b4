"""What goes into a generation stream besides the prompt, and what comes out of it.

`Resume` is the typed state a failover replay carries (the output another worker already
streamed). It is torch-free, so the router and the clients build it too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Resume:
    """Output already streamed by another worker (failover replay): the sequence goes on
    after these tokens, and its text after the first `emitted_chars` characters."""

    output_token_ids: tuple[int, ...]
    emitted_chars: int = 0


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """The one output type, from the engine step to the client: what one step produced
    for one request. finish_reason is set on the last chunk. The engine fills the first
    five fields and, on a sequence's first chunk, seed, num_cached_tokens and
    queue_time_s; the worker's edge adds num_prompt_tokens, num_resumed_tokens and
    worker_id to the first chunk it sends (`dataclasses.replace`). Protobuf's zero means
    "not on this chunk"."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    error: str = ""
    logprobs: tuple[float, ...] = ()  # per token, when the request asked for logprobs
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()  # per token: (id, logprob)
    seed: int | None = None  # on a sequence's first chunk: the seed it samples with
    num_cached_tokens: int | None = None  # on the first chunk: prompt tokens not computed
    queue_time_s: float | None = None  # on the first chunk: arrival to its first step
    num_prompt_tokens: int = 0
    num_resumed_tokens: int = 0
    worker_id: str = ""
