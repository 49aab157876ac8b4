"""TokenChunks → OpenAI response objects and stream chunks (plain dicts, JSON-ready).

The gateway has no tokenizer, so a logprobs entry names its token as vLLM's
`--return-tokens-as-token-ids` does: "token_id:1234" (and `bytes` is null). `usage`
counts each prompt once however many choices it has (OpenAI and vLLM do the same);
`completion_tokens` counts every token of every choice, EOS included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.vocab.streams import TokenChunk


def token_name(token_id: int) -> str:
    return f"token_id:{token_id}"


@dataclass(slots=True)
class Choice:
    """What one choice (one Generate stream) produced so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    def add(self, chunk: TokenChunk) -> None:
        self.text += chunk.text
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        self.top_logprobs.extend(chunk.top_logprobs)
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.num_prompt_tokens = chunk.num_prompt_tokens or self.num_prompt_tokens
        self.num_cached_tokens = chunk.num_cached_tokens or self.num_cached_tokens


def usage(choices: list[Choice], n: int) -> dict:
    """Prompt tokens once per prompt (choice j = 0 of each), completion tokens of all."""
    firsts = [c for c in choices if c.index % n == 0]
    prompt = sum(c.num_prompt_tokens for c in firsts)
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(c.num_cached_tokens
                                                           for c in firsts)}}


def completion_logprobs(chunk: TokenChunk | Choice, k: int) -> dict:
    """The legacy completions shape: parallel lists per token."""
    ids, lps, tops = chunk.token_ids, chunk.logprobs, chunk.top_logprobs
    return {"tokens": [token_name(t) for t in ids],
            "token_logprobs": list(lps),
            "top_logprobs": [{token_name(t): lp for t, lp in top[:k]} for top in tops],
            "text_offset": None}


def chat_logprobs(chunk: TokenChunk | Choice, k: int) -> dict:
    """The chat shape: one entry per token with its top alternatives."""
    return {"content": [
        {"token": token_name(t), "logprob": lp, "bytes": None,
         "top_logprobs": [{"token": token_name(a), "logprob": alp, "bytes": None}
                          for a, alp in top[:k]]}
        for t, lp, top in zip(chunk.token_ids, chunk.logprobs, chunk.top_logprobs,
                              strict=False)]}


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseHead:
    """What every object of one response repeats."""

    id: str
    created: int
    model: str
    is_chat: bool
    num_logprobs: int | None  # None: no logprobs asked

    def logprobs(self, part: TokenChunk | Choice) -> dict | None:
        if self.num_logprobs is None or not part.token_ids:
            return None
        build = chat_logprobs if self.is_chat else completion_logprobs
        return build(part, self.num_logprobs)

    def _object(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}

    def response(self, choices: list[Choice], n: int) -> dict:
        """The whole answer of a non-streaming request."""
        if self.is_chat:
            body = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                     "logprobs": self.logprobs(c), "finish_reason": c.finish_reason}
                    for c in choices]
            out = self._object("chat.completion", body)
        else:
            body = [{"index": c.index, "text": c.text, "logprobs": self.logprobs(c),
                     "finish_reason": c.finish_reason} for c in choices]
            out = self._object("text_completion", body)
        return {**out, "usage": usage(choices, n)}

    def role_chunk(self, index: int) -> dict:
        """A chat stream's first chunk of a choice: it carries the role."""
        return self._object("chat.completion.chunk", [
            {"index": index, "delta": {"role": "assistant", "content": ""},
             "logprobs": None, "finish_reason": None}])

    def chunk(self, index: int, chunk: TokenChunk) -> dict:
        """One stream chunk of a choice: its new text (and logprobs, finish reason)."""
        if self.is_chat:
            delta = {"content": chunk.text} if chunk.text or not chunk.finish_reason else {}
            return self._object("chat.completion.chunk", [
                {"index": index, "delta": delta, "logprobs": self.logprobs(chunk),
                 "finish_reason": chunk.finish_reason}])
        return self._object("text_completion", [
            {"index": index, "text": chunk.text, "logprobs": self.logprobs(chunk),
             "finish_reason": chunk.finish_reason}])

    def usage_chunk(self, choices: list[Choice], n: int) -> dict:
        """stream_options.include_usage: the last chunk, with no choices."""
        kind = "chat.completion.chunk" if self.is_chat else "text_completion"
        return {**self._object(kind, []), "usage": usage(choices, n)}
