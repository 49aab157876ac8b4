"""OpenAI request bodies → typed gateway requests, checked field by field.

Every refusal is an InvalidRequestError whose field is the OpenAI parameter (`param` in
the 400 answer). Ranges the engine knows (temperature, top_p, penalties, …) are left to
the router and the worker, whose messages name the same fields; this module checks
types, the OpenAI-only parameters, and what the gateway does not support.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from services.rpc.convert import Prompt
from worker.vocab.errors import InvalidRequestError
from worker.vocab.sampling_params import SamplingParams

MAX_N = 16  # choices per request (each is a sequence of its own)
MAX_PROMPTS = 64  # strings or token lists in one completions request
MAX_LOGPROBS = 20
OPENAI_DEFAULT_MAX_TOKENS = 16  # /v1/completions without max_tokens
_ROLES = ("system", "user", "assistant", "developer")
# parameters OpenAI defines that the gateway refuses instead of silently ignoring
_UNSUPPORTED = {
    "tools": "tools / function calling is not supported yet",
    "functions": "function calling is not supported yet",
    "tool_choice": "tools / function calling is not supported yet",
    "function_call": "function calling is not supported yet",
    "suffix": "suffix (insertion) is not supported",
    "audio": "audio output is not supported",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayRequest:
    """One /v1/completions or /v1/chat/completions request.

    prompts: one per prompt (chat: exactly one); each runs `n` times with seeds from
    `choice_params`, as choices prompt_index * n + j.
    num_logprobs: None = no logprobs; else the top alternatives per token to return.
    """

    is_chat: bool
    model: str | None
    prompts: tuple[Prompt, ...]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    num_logprobs: int | None
    max_tokens_field: str  # the name the client gave the limit (errors name it)
    has_max_tokens: bool  # False: the default, which fit_context may lower

    def choice_params(self, choice: int) -> SamplingParams:
        """The sampling of choice j of a prompt: the request's seed for j = 0 (so n=1
        equals the gRPC API with that seed), a seed derived from it for the others."""
        seed = self.params.seed
        if choice == 0 or seed is None:
            return self.params
        digest = hashlib.blake2b(f"{seed}:{choice}".encode(), digest_size=8).digest()
        return replace(self.params, seed=int.from_bytes(digest, "big") >> 1)  # < 2^63

    def fit_context(self, max_model_len: int) -> GatewayRequest:
        """A default max_tokens no larger than the model's context (generation stops
        where the context is full anyway); a limit the client gave stays as given."""
        if self.has_max_tokens or self.params.max_tokens <= max_model_len:
            return self
        return replace(self, params=replace(self.params, max_tokens=max_model_len))


def parse_completion(body: object, default_max_tokens: int) -> GatewayRequest:
    body = _object(body)
    prompts = _prompts(body.get("prompt"))
    if body.get("echo"):
        raise InvalidRequestError("echo", "echo is not supported")
    logprobs = _optional_int(body, "logprobs", 0, MAX_LOGPROBS)
    best_of = _optional_int(body, "best_of", 1, MAX_N)
    n = _optional_int(body, "n", 1, MAX_N) or 1
    if best_of is not None and best_of != n:
        raise InvalidRequestError("best_of", "best_of other than n is not supported")
    return _request(body, prompts, is_chat=False, num_logprobs=logprobs,
                    default_max_tokens=min(OPENAI_DEFAULT_MAX_TOKENS, default_max_tokens))


def parse_chat(body: object, default_max_tokens: int) -> GatewayRequest:
    body = _object(body)
    prompt = Prompt(messages=_messages(body.get("messages")))
    want = _optional_bool(body, "logprobs")
    top = _optional_int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise InvalidRequestError("top_logprobs", "needs logprobs: true")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict)
                                        or response_format.get("type") != "text"):
        raise InvalidRequestError("response_format", "only {\"type\": \"text\"} is supported")
    return _request(body, (prompt,), is_chat=True,
                    num_logprobs=(top or 0) if want else None,
                    default_max_tokens=default_max_tokens)


def _request(body: dict, prompts: tuple[Prompt, ...], *, is_chat: bool,
             num_logprobs: int | None, default_max_tokens: int) -> GatewayRequest:
    for name, why in _UNSUPPORTED.items():
        if body.get(name) not in (None, [], "none"):
            raise InvalidRequestError(name, why)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequestError("model", "must be a string")
    stream = _optional_bool(body, "stream") or False
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequestError("stream_options", "must be an object")
        if not stream:
            raise InvalidRequestError("stream_options", "only allowed with stream: true")
        include_usage = _optional_bool(options, "include_usage", "stream_options.") or False
    _optional_str(body, "user")  # accepted, not used
    max_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _optional_int(body, max_field, None, None)
    params = _sampling(body, default_max_tokens if max_tokens is None else max_tokens,
                       num_logprobs)
    try:
        params.validate(None)  # the router's check, here to name OpenAI's fields
    except InvalidRequestError as e:
        raise e.renamed(openai_param(e.field, is_chat=is_chat, max_tokens_field=max_field)
                        ) from None
    return GatewayRequest(
        is_chat=is_chat, model=model, prompts=prompts, params=params,
        n=_optional_int(body, "n", 1, MAX_N) or 1, stream=stream,
        include_usage=include_usage, num_logprobs=num_logprobs, max_tokens_field=max_field,
        has_max_tokens=max_tokens is not None)


def _sampling(body: dict, max_tokens: int, num_logprobs: int | None) -> SamplingParams:
    """The engine's parameters; unset fields keep its defaults (OpenAI's defaults are the
    same: temperature 1, top_p 1, penalties 0)."""
    values: dict = {"max_tokens": max_tokens}
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p",
                 "typical_p", "repetition_penalty"):
        value = _optional_number(body, name)
        if value is not None:
            values[name] = value
    top_k = _optional_int(body, "top_k", -1, None)
    values["top_k"] = 0 if top_k in (None, -1) else top_k  # vLLM's -1 is off, as our 0
    values["seed"] = _optional_int(body, "seed", None, None)
    values["ignore_eos"] = _optional_bool(body, "ignore_eos") or False
    values["stop"] = _stop(body.get("stop"))
    values["stop_token_ids"] = _int_list(body, "stop_token_ids")
    values["logit_bias"] = _logit_bias(body.get("logit_bias"))
    # the engine returns the sampled token's logprob only with logprobs >= 1
    values["logprobs"] = 0 if num_logprobs is None else max(num_logprobs, 1)
    return SamplingParams(**values)


# -- prompts -----------------------------------------------------------------------------

def _prompts(value: object) -> tuple[Prompt, ...]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(value, str):
        return (_text(value, "prompt"),)
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("prompt", "must be a string, a list of strings, or token "
                                            "ids (a list of integers or of lists)")
    if all(_is_int(t) for t in value):
        return (Prompt(token_ids=tuple(value)),)
    if len(value) > MAX_PROMPTS:
        raise InvalidRequestError("prompt", f"{len(value)} prompts; at most {MAX_PROMPTS}")
    prompts = []
    for item in value:
        if isinstance(item, str):
            prompts.append(_text(item, "prompt"))
        elif isinstance(item, list) and item and all(_is_int(t) for t in item):
            prompts.append(Prompt(token_ids=tuple(item)))
        else:
            raise InvalidRequestError("prompt", "each prompt must be a string or a non-empty "
                                                "list of token ids")
    return tuple(prompts)


def _text(value: str, name: str) -> Prompt:
    if not value:
        raise InvalidRequestError(name, "must not be empty")
    return Prompt(text=value)


def _messages(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("messages", "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"messages[{i}]", "must be an object")
        role = m.get("role")
        if role not in _ROLES:
            raise InvalidRequestError(f"messages[{i}].role",
                                      f"must be one of {', '.join(_ROLES)} (tool messages "
                                      "are not supported)")
        if m.get("tool_calls"):
            raise InvalidRequestError(f"messages[{i}].tool_calls",
                                      "tools / function calling is not supported yet")
        out.append(("system" if role == "developer" else role,
                    _content(m.get("content"), f"messages[{i}].content")))
    return tuple(out)


def _content(value: object, name: str) -> str:
    """A string, or a list of text parts (other part types are refused)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise InvalidRequestError(name, "only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequestError(name, "must be a string or a list of text parts")


# -- typed fields --------------------------------------------------------------------------

def _object(body: object) -> dict:
    if not isinstance(body, dict):
        raise InvalidRequestError("body", "must be a JSON object")
    return body


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_int(body: dict, name: str, low: int | None, high: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise InvalidRequestError(name, f"must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidRequestError(name, f"must be in [{low}, {high}], got {value}")
    return value


def _optional_number(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(name, f"must be a number, got {value!r}")
    return float(value)


def _optional_bool(body: dict, name: str, prefix: str = "") -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidRequestError(prefix + name, f"must be true or false, got {value!r}")
    return value


def _optional_str(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidRequestError(name, "must be a string")
    return value


def _stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise InvalidRequestError("stop", "must be a string or a list of strings")


def _int_list(body: dict, name: str) -> tuple[int, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(_is_int(t) for t in value):
        raise InvalidRequestError(name, "must be a list of integers")
    return tuple(value)


def _logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} (keys are strings in JSON)."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidRequestError("logit_bias", "must be an object of token id → bias")
    out = []
    for key, bias in value.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise InvalidRequestError("logit_bias", f"key {key!r} is not a token id") from None
        if isinstance(bias, bool) or not isinstance(bias, int | float):
            raise InvalidRequestError("logit_bias", f"bias of {key} must be a number")
        out.append((token_id, float(bias)))
    return tuple(out)


# the engine's (and the gRPC request's) field names → OpenAI's, for `param`
_PROMPT_FIELDS = ("text", "token_ids", "prompt_token_ids", "prompt", "chat.messages",
                  "chat.messages.role", "messages")


def openai_param(field: str, *, is_chat: bool, max_tokens_field: str = "max_tokens") -> str:
    """The OpenAI parameter an engine-side error about `field` is about."""
    name = field.removeprefix("params.")
    if name in _PROMPT_FIELDS:
        return "messages" if is_chat else "prompt"
    if name == "max_tokens":
        return max_tokens_field
    if name == "logprobs" and is_chat:
        return "top_logprobs"
    return name
