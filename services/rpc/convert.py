"""Protobuf ↔ dataclasses, at the gRPC edge only (TGI's from_pb / to_pb).

Inside the router and the worker everything is a typed dataclass; this module is the
only place that reads or builds slotmesh.v1 messages field by field. Conversion from
protobuf validates: a bad field raises InvalidRequestError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

from protos.slotmesh.v1 import common_pb2 as pb
from services.metadata.records import WorkerRecord
from worker.vocab.errors import InvalidRequestError
from worker.vocab.sampling_params import SamplingParams
from worker.vocab.snapshot_kind import SnapshotKind
from worker.vocab.streams import Resume, TokenChunk

MAX_REQUEST_ID_CHARS = 128

_FINISH_TO_PB = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "error": pb.FINISH_REASON_ERROR,
    "migrated": pb.FINISH_REASON_MIGRATED,
}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}


@dataclass(frozen=True, slots=True, kw_only=True)
class Prompt:
    """Exactly one of the three is set."""

    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content)
    token_ids: tuple[int, ...] | None = None

    @property
    def field(self) -> str:
        """The GenerateRequest field that holds this prompt (what an error names)."""
        if self.text is not None:
            return "text"
        return "chat.messages" if self.messages is not None else "token_ids"

    def as_engine_kwargs(self) -> dict:
        """Keyword arguments of LLMEngine.encode_prompt."""
        messages = None
        if self.messages is not None:
            messages = [{"role": r, "content": c} for r, c in self.messages]
        return {"prompt": self.text, "messages": messages,
                "prompt_token_ids": list(self.token_ids) if self.token_ids is not None
                else None}


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    resume: Resume | None = None


# -- sampling parameters -----------------------------------------------------------------

def params_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    """Unset optional fields keep the dataclass defaults; ranges are checked by validate()."""
    defaults = SamplingParams()

    def opt(name: str):
        return getattr(msg, name) if msg.HasField(name) else getattr(defaults, name)

    params = SamplingParams(
        max_tokens=opt("max_tokens"), temperature=opt("temperature"), top_k=msg.top_k,
        top_p=opt("top_p"), min_p=msg.min_p, typical_p=opt("typical_p"),
        repetition_penalty=opt("repetition_penalty"),
        presence_penalty=msg.presence_penalty, frequency_penalty=msg.frequency_penalty,
        logit_bias=tuple((b.token_id, b.bias) for b in msg.logit_bias),
        seed=msg.seed if msg.HasField("seed") else None, logprobs=msg.logprobs,
        stop=tuple(msg.stop), stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos, num_candidates=msg.num_candidates,
    )
    params.check_finite()  # before anything compares them
    return params


def params_to_pb(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_k=params.top_k,
        top_p=params.top_p, min_p=params.min_p, typical_p=params.typical_p,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        logit_bias=[pb.LogitBias(token_id=t, bias=b) for t, b in params.logit_bias],
        logprobs=params.logprobs, stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos,
        num_candidates=params.num_candidates,
    )
    if params.seed is not None:
        msg.seed = params.seed
    return msg


# -- requests ----------------------------------------------------------------------------

def request_from_pb(msg: pb.GenerateRequest, vocab_size: int | None) -> GenerationRequest:
    """Validate and convert. vocab_size None (the router) skips vocabulary checks."""
    request_id = msg.request_id
    if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
        raise InvalidRequestError("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} "
                                                "printable characters")
    prompt = _prompt_from_pb(msg, vocab_size)
    params = params_from_pb(msg.params)
    params.validate(vocab_size)
    resume = None
    if msg.HasField("resume"):
        resume = Resume(output_token_ids=tuple(msg.resume.output_token_ids),
                        emitted_chars=msg.resume.emitted_chars)
    return GenerationRequest(request_id=request_id, prompt=prompt, params=params,
                             resume=resume)


def _prompt_from_pb(msg: pb.GenerateRequest, vocab_size: int | None) -> Prompt:
    kind = msg.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequestError("prompt", "set one of text, chat or token_ids")
    if kind == "text":
        if not msg.text:
            raise InvalidRequestError("text", "must not be empty")
        return Prompt(text=msg.text)
    if kind == "chat":
        if not msg.chat.messages:
            raise InvalidRequestError("chat.messages", "must not be empty")
        if any(not m.role for m in msg.chat.messages):
            raise InvalidRequestError("chat.messages.role", "every message needs a role")
        return Prompt(messages=tuple((m.role, m.content) for m in msg.chat.messages))
    ids = tuple(msg.token_ids.ids)
    if not ids:
        raise InvalidRequestError("token_ids", "must not be empty")
    upper = vocab_size if vocab_size is not None else 2**31
    bad = [t for t in ids if not 0 <= t < upper]
    if bad:
        raise InvalidRequestError("token_ids", f"token id {bad[0]} out of vocabulary "
                                               f"[0, {vocab_size or 'vocab size'})")
    return Prompt(token_ids=ids)


def request_to_pb(req: GenerationRequest) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(request_id=req.request_id, params=params_to_pb(req.params))
    prompt = req.prompt
    if req.resume is not None:
        msg.resume.output_token_ids.extend(req.resume.output_token_ids)
        msg.resume.emitted_chars = req.resume.emitted_chars
    if prompt.text is not None:
        msg.text = prompt.text
    elif prompt.messages is not None:
        msg.chat.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in prompt.messages)
    else:
        msg.token_ids.ids.extend(prompt.token_ids or ())
    return msg


# -- output chunks -----------------------------------------------------------------------

def chunk_to_pb(chunk: TokenChunk) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(
        request_id=chunk.request_id, token_ids=list(chunk.token_ids), text=chunk.text,
        finish_reason=_FINISH_TO_PB[chunk.finish_reason], error=chunk.error,
        num_prompt_tokens=chunk.num_prompt_tokens, worker_id=chunk.worker_id,
        seed=chunk.seed or 0, num_resumed_tokens=chunk.num_resumed_tokens,
        num_cached_tokens=chunk.num_cached_tokens or 0,
    )
    for i, logprob in enumerate(chunk.logprobs):
        top = chunk.top_logprobs[i] if i < len(chunk.top_logprobs) else ()
        msg.logprobs.append(pb.TokenLogprob(
            logprob=logprob, top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in top]))
    return msg


def chunk_from_pb(msg: pb.GenerateResponse) -> TokenChunk:
    return TokenChunk(
        request_id=msg.request_id, token_ids=tuple(msg.token_ids), text=msg.text,
        finish_reason=_FINISH_FROM_PB.get(msg.finish_reason, "error"),
        logprobs=tuple(lp.logprob for lp in msg.logprobs),
        top_logprobs=tuple(tuple((t.token_id, t.logprob) for t in lp.top)
                           for lp in msg.logprobs),
        error=msg.error, num_prompt_tokens=msg.num_prompt_tokens, worker_id=msg.worker_id,
        # protobuf's 0 = not on this chunk, the engine's None
        seed=msg.seed or None, num_resumed_tokens=msg.num_resumed_tokens,
        num_cached_tokens=msg.num_cached_tokens or None,
    )


# -- workers ---------------------------------------------------------------------------

def record_to_info(record: WorkerRecord) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        worker_id=record.worker_id, address=record.address, model=record.model,
        fingerprint=record.fingerprint, architecture=record.architecture,
        dtype=record.dtype, device=record.device, max_model_len=record.max_model_len,
        slots=record.slots, block_size=record.block_size,
        attention_backend=record.attention_backend, version=record.version,
        load=pb.WorkerLoad(
            num_running=record.num_running, num_waiting=record.num_waiting,
            kv_blocks_free=record.kv_blocks_free, kv_blocks_total=record.kv_blocks_total),
        draining=record.draining, instance_id=record.instance_id, weights=record.weights,
    )


def kind_from_pb(value: int) -> SnapshotKind:
    """Unset = FULL; an unknown enum value is a bad request."""
    if value == pb.SNAPSHOT_KIND_UNSPECIFIED:
        return SnapshotKind.FULL
    if value not in SnapshotKind._value2member_map_:
        raise InvalidRequestError("kind", f"unknown snapshot kind {value}")
    return SnapshotKind(value)
