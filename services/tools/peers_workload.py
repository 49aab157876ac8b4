"""The `bench peers` workload and its bookkeeping, shared by every system it measures.

Owns the prompts (real text cut into `prompt_tokens`-token windows at distinct offsets, so
no two requests share a first token sequence and no prefix cache helps), the per-request
record every client fills in (start, first token, end, tokens received), and the figures
a run reduces to: tokens/s over the whole run (all tokens received / wall time, prefill
included) and the median time to first token. Also the two in-process closed loops:
the slotmesh engine (the path `bench engine` drives) and transformers `generate()`.
The HTTP peers' client lives in `peers_http.py` and fills in the same records.

Closed loop: `concurrency` clients each send `rounds` requests one after another, a new
one as soon as its previous one finished; every request asks for exactly `new_tokens`
greedy tokens with EOS ignored.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """What every system is asked to do (the issue's table: 128 + 128, c = 1/4/16)."""

    prompt_tokens: int = 128
    new_tokens: int = 128
    levels: tuple[int, ...] = (1, 4, 16)  # concurrent closed-loop clients per run
    rounds: int = 2  # requests each client sends per run, back to back
    repeat: int = 3  # runs per level; the report keeps the median

    @property
    def num_prompts(self) -> int:
        """Prompts one system consumes: one warmup request, then every measured one."""
        return 1 + self.repeat * self.rounds * sum(self.levels)


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRecord:
    """One request as its client saw it; times in seconds since the run started."""

    start_s: float
    first_token_s: float
    end_s: float
    num_tokens: int  # generated tokens received

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.start_s


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    """One run of one system at one concurrency."""

    tokens_per_s: float  # all generated tokens / wall time of the run (prefill included)
    ttft_p50_s: float  # median time to first token over the run's requests
    num_requests: int
    num_tokens: int
    min_tokens: int  # fewest tokens any request got: < new_tokens means a peer stopped early
    wall_s: float


def summarize(records: Sequence[RequestRecord], wall_s: float) -> RunResult:
    if not records:
        raise ValueError("a run with no requests")
    num_tokens = sum(r.num_tokens for r in records)
    return RunResult(tokens_per_s=num_tokens / wall_s,
                     ttft_p50_s=statistics.median(r.ttft_s for r in records),
                     num_requests=len(records), num_tokens=num_tokens,
                     min_tokens=min(r.num_tokens for r in records), wall_s=wall_s)


def median_result(runs: Sequence[RunResult]) -> RunResult:
    """The median of repeated runs, figure by figure (tokens/s and TTFT separately)."""
    return RunResult(tokens_per_s=statistics.median(r.tokens_per_s for r in runs),
                     ttft_p50_s=statistics.median(r.ttft_p50_s for r in runs),
                     num_requests=runs[0].num_requests,
                     num_tokens=runs[0].num_tokens,
                     min_tokens=min(r.min_tokens for r in runs),
                     wall_s=statistics.median(r.wall_s for r in runs))


def make_prompts(corpus_ids: Sequence[int], num_prompts: int, prompt_tokens: int,
                 bos_token_id: int | None = None) -> list[list[int]]:
    """`num_prompts` windows of the corpus, each starting at its own offset (spread evenly),
    each `prompt_tokens` long including the BOS when one is given. Raises when the corpus
    has fewer distinct windows than prompts asked for (a repeat would hit a prefix cache).
    """
    body = prompt_tokens - (bos_token_id is not None)
    num_offsets = len(corpus_ids) - body + 1
    if body < 1 or num_offsets < num_prompts:
        raise ValueError(f"the corpus has {len(corpus_ids)} tokens: not enough for "
                         f"{num_prompts} distinct {prompt_tokens}-token prompts")
    stride = num_offsets // num_prompts
    head = [] if bos_token_id is None else [bos_token_id]
    return [head + list(corpus_ids[i * stride:i * stride + body]) for i in range(num_prompts)]


class PromptFeed:
    """Hands out prompts in order, each once; thread-safe (the HTTP clients are threads)."""

    def __init__(self, prompts: Sequence[list[int]]) -> None:
        self._prompts = prompts
        self._next = 0
        self._lock = threading.Lock()

    def take(self, n: int = 1) -> list[list[int]]:
        with self._lock:
            if self._next + n > len(self._prompts):
                raise IndexError(f"the workload needs more than {len(self._prompts)} prompts")
            out = list(self._prompts[self._next:self._next + n])
            self._next += n
            return out


# -- in-process systems ---------------------------------------------------------------


def run_engine(engine, feed: PromptFeed, concurrency: int, rounds: int,
               new_tokens: int) -> RunResult:
    """Closed loop on an in-process `LLMEngine` (prefix caching off in its config): a
    finished request's client adds its next one before the next step."""
    from worker.vocab.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    remaining = dict.fromkeys(range(concurrency), rounds)
    open_requests: dict[str, dict] = {}  # request id -> {client, start, first, tokens}
    records: list[RequestRecord] = []
    t0 = time.perf_counter()

    def submit(client: int) -> None:
        remaining[client] -= 1
        request_id = f"peers-{client}-{remaining[client]}-{time.perf_counter_ns()}"
        open_requests[request_id] = {"client": client, "start": time.perf_counter() - t0,
                                     "first": None, "tokens": 0}
        engine.add_request(request_id, feed.take()[0], params)

    for client in range(concurrency):
        submit(client)
    while engine.has_unfinished:
        for chunk in engine.step():
            if chunk.error:
                raise RuntimeError(f"engine request {chunk.request_id}: {chunk.error}")
            now = time.perf_counter() - t0
            state = open_requests[chunk.request_id]
            if state["first"] is None:
                state["first"] = now
            state["tokens"] += len(chunk.token_ids)
            if chunk.finish_reason is not None:
                del open_requests[chunk.request_id]
                records.append(RequestRecord(start_s=state["start"],
                                             first_token_s=state["first"], end_s=now,
                                             num_tokens=state["tokens"]))
                if remaining[state["client"]]:
                    submit(state["client"])
    return summarize(records, time.perf_counter() - t0)


def run_transformers(model, feed: PromptFeed, concurrency: int, rounds: int,
                     new_tokens: int) -> RunResult:
    """transformers `generate()` has no continuous batching: the closed loop is `rounds`
    static batches of `concurrency` prompts (all the same length, so no padding), each
    exactly `new_tokens` long (min_new_tokens suppresses EOS). A streamer times the first
    token of each batch, which is every request's first token in it."""
    import torch

    records: list[RequestRecord] = []
    t0 = time.perf_counter()
    for _ in range(rounds):
        ids = torch.tensor(feed.take(concurrency))
        streamer = _FirstTokenTimer(t0)
        start = time.perf_counter() - t0
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=0, streamer=streamer)
        end = time.perf_counter() - t0
        num_tokens = out.shape[1] - ids.shape[1]
        records += [RequestRecord(start_s=start, first_token_s=streamer.first_s, end_s=end,
                                  num_tokens=num_tokens)] * concurrency
    return summarize(records, time.perf_counter() - t0)


class _FirstTokenTimer:
    """A transformers streamer: `put` gets the prompt ids first, then each new token."""

    def __init__(self, t0: float) -> None:
        self._t0 = t0
        self._puts = 0
        self.first_s = float("nan")

    def put(self, value) -> None:
        self._puts += 1
        if self._puts == 2:
            self.first_s = time.perf_counter() - self._t0

    def end(self) -> None:
        pass
