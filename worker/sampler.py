"""The on-device sampler: one step's logits in, one token (and optional logprobs) per row out.

Owns the per-slot penalty state on the device (output token counts and a prompt-token mask,
both [max_num_seqs, V]) and the sampling chain, per row and in this order: logit bias,
repetition/presence/frequency penalties, temperature (0 = greedy), top-k, top-p, min-p,
typical-p, then a Gumbel-max draw whose noise is a pure function of (seed, position, token
id) (`kernels.gumbel_noise`), so a row draws the same token in any batch, on any device.

The model runner calls `reset_slot` when a sequence takes a slot and `sample` once per step.
`sample` syncs with the host exactly once, in `_to_host`; rows with `num_candidates > 0`
(hybrid mode) get their filtered top-N candidates in that same copy and a `HostSampler`
draws their token. Stages run only when some row in the batch uses them (decided on the
Python side); inside a stage, rows with the filter off hold a neutral value.

When every row that draws has a top-k, the whole filter chain and the noise run on a
[B, W] slice of the top W = max top-k (+ a margin for ties at the k-th value) logits instead
of [B, V]: the kept set lies inside the slice, and noise depends only on the token id, so the
draw is the same. Only when a row's tie run at the k-th value overflows the margin does the
slice keep fewer tied tokens than the full chain would. Top-p finds its cut with exact
fixed-point masses (a radix select on wide rows, no [B, V] sort), so it cuts at the same
token on the slice and on [B, V].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from kernels.argmax import argmax_rows
from kernels.gumbel_noise import (
    gumbel_from_uniform_numpy,
    gumbel_noise,
    gumbel_noise_at,
    uniform_from_hash_numpy,
)
from worker import sampling_filters as filters
from worker.vocab.sampling_params import SamplingParams

_NEG_INF = float("-inf")
_MAX_EXACT_FLOAT32_ID = 2**24  # token ids travel as float32 in the packed copy
_TOP_K_TIE_MARGIN = 64  # extra slice columns so ties at the k-th logit stay kept
# Repetition penalties are clamped into [2^-100, 2^100]: float32 x / r and x * r stay finite
# (|logit + bias| < 2^10, then / temperature >= 1e-5 stays < 2^128) and keep their order,
# so beyond the clamp the draw is already the limit (r -> 0: the largest positive logit
# among context tokens; r -> inf: context tokens at 0 or removed).
_MAX_REPETITION_SCALE = 2.0**100
# Temperatures above 2^64 are 2^64: x / T then still orders the logits (top-k, top-p keep
# what they keep at any finite T) while the noise decides the draw, the T -> inf limit;
# in float32 1e300 would be inf and x / inf = 0 ties every token.
_MAX_TEMPERATURE = 2.0**64


@dataclass(frozen=True, slots=True)
class SamplingRow:
    params: SamplingParams
    slot: int  # row of the persistent per-sequence state (0 <= slot < max_num_seqs)
    position: int  # absolute position of the token being sampled (= number of tokens before it)
    seed: int  # resolved seed (the engine fills in a random one when params.seed is None)


@dataclass(slots=True)
class SampleResult:
    token_id: int
    logprob: float | None  # of the sampled token under the raw distribution; None if not asked
    top_logprobs: list[tuple[int, float]]  # top-n (id, logprob) of the raw distribution


class HostSampler(Protocol):
    def sample(self, candidate_ids: np.ndarray, candidate_logits: np.ndarray, seed: int,
               position: int) -> int:
        """Pick one of `candidate_ids`.

        candidate_ids: [N] int64, best first. candidate_logits: [N] float32, temperature-scaled
        and filtered (steps 1-7); -inf marks a candidate the filters removed.
        """
        ...


class GumbelHostSampler:
    """The device draw redone in numpy: same hash, same noise, same argmax."""

    def sample(self, candidate_ids: np.ndarray, candidate_logits: np.ndarray, seed: int,
               position: int) -> int:
        noise = gumbel_from_uniform_numpy(uniform_from_hash_numpy(seed, position, candidate_ids))
        return int(candidate_ids[np.argmax(candidate_logits + noise)])  # [N] -> one id


@dataclass(frozen=True, slots=True)
class _Layout:
    """Columns of the packed float32 host copy; all int32 ids when nothing is packed."""

    num_logprobs: int  # L = max n over rows
    num_candidates: int  # N = max num_candidates over hybrid rows, at most V
    has_candidate_logprobs: bool  # a hybrid row wants logprobs: ship raw logprobs of candidates

    @property
    def is_packed(self) -> bool:
        return self.num_logprobs > 0 or self.num_candidates > 0

    @property
    def candidates_at(self) -> int:
        # col 0: token id; then [sampled logprob, L top ids, L top logprobs] when L > 0
        return 1 + (1 + 2 * self.num_logprobs if self.num_logprobs else 0)


@dataclass(frozen=True, slots=True)
class _Batch:
    """Per-row parameters on the device, [B] each, and Python-side flags that pick stages."""

    temperatures: torch.Tensor  # [B] float32, 1 for greedy rows
    top_k: torch.Tensor  # [B] int64, 0 = off
    top_p: torch.Tensor  # [B] float32, inf = off
    min_p: torch.Tensor  # [B] float32, 0 = off
    typical_p: torch.Tensor  # [B] float32, inf = off
    repetition: torch.Tensor  # [B] float32, 1 = off
    presence: torch.Tensor  # [B] float32, 0 = off
    frequency: torch.Tensor  # [B] float32, 0 = off
    seeds: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64
    slots: torch.Tensor  # [B] int64
    bias: tuple[torch.Tensor, torch.Tensor] | None  # flat ids row * V + id [K], values [K]
    is_hybrid: tuple[bool, ...]  # per row, Python side
    noise_rows: torch.Tensor | None  # [D] int64 rows drawn on the device; None = all rows
    num_noise_rows: int  # D; greedy and hybrid rows need no device noise
    max_top_k: int  # 0 = no row uses top-k
    is_top_k_bounded: bool  # every non-greedy row has a top-k: filter and draw on a slice
    has_top_p: bool
    has_min_p: bool
    has_typical_p: bool
    has_penalties: bool
    has_repetition: bool
    has_additive_penalties: bool  # presence or frequency
    layout: _Layout


class Sampler:
    """Samples one token per row of a step's logits; owns the per-slot penalty state.

    Greedy rows (temperature 0) are always decided on the device, even with num_candidates:
    the HostSampler protocol has no notion of temperature, and argmax needs no host help.
    """

    def __init__(self, vocab_size: int, max_num_seqs: int, device: torch.device,
                 host_sampler: HostSampler | None = None) -> None:
        assert vocab_size < _MAX_EXACT_FLOAT32_ID, "token ids must be exact in float32"
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.host_sampler = host_sampler if host_sampler is not None else GumbelHostSampler()
        # [max_num_seqs, V]: how often each token was sampled; which tokens the prompt holds
        self.output_counts = torch.zeros(max_num_seqs, vocab_size, dtype=torch.int32,
                                         device=self.device)
        self.prompt_mask = torch.zeros(max_num_seqs, vocab_size, dtype=torch.bool,
                                       device=self.device)

    def reset_slot(self, slot: int, prompt_token_ids: list[int],
                   output_token_ids: list[int]) -> None:
        """Set the penalty state of `slot` for the sequence taking it (admit, resume, import)."""
        prompt = self._to_device(torch.tensor(prompt_token_ids, dtype=torch.int64))  # [P]
        output = self._to_device(torch.tensor(output_token_ids, dtype=torch.int64))  # [O]
        self.prompt_mask[slot].zero_().index_fill_(0, prompt, True)
        ones = torch.ones_like(output, dtype=torch.int32)
        self.output_counts[slot].zero_().scatter_add_(0, output, ones)

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampleResult]:
        """logits: [B, V] on the device, any float dtype. One device->host copy in all."""
        assert logits.shape == (len(rows), self.vocab_size), "logits: [len(rows), vocab_size]"
        batch = self._prepare(rows)
        raw = logits.float()  # [B, V]; only out-of-place ops below, raw may alias the input
        penalised = self._apply_bias_and_penalties(raw, batch)  # [B, V]
        token_ids, filtered = self._filter_and_draw(penalised, batch)  # [B] int64, [B, V]
        host = self._to_host(_pack(raw, filtered, token_ids, batch.layout))
        results = self._unpack(host, rows, batch)
        self._update_counts(token_ids, results, batch)
        return results

    def _to_host(self, packed: torch.Tensor) -> np.ndarray:
        """The step's one device->host copy, and so its one sync."""
        return packed.cpu().numpy()

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """Host->device without a sync: pinned staging and a non-blocking copy."""
        if self.device.type == "cpu":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _prepare(self, rows: list[SamplingRow]) -> _Batch:
        """Per-row parameter tables, built on the host and sent in two non-blocking copies."""
        vocab_size = self.vocab_size
        params = [row.params for row in rows]
        floats = torch.tensor([_float_params(p) for p in params], dtype=torch.float32)  # [B, 7]
        int_rows = [_int_params(r, vocab_size) for r in rows]
        ints = torch.tensor(int_rows, dtype=torch.int64)  # [B, 4]
        f = self._to_device(floats.T.contiguous())  # [7, B]
        i = self._to_device(ints.T.contiguous())  # [4, B]
        is_hybrid = tuple(p.num_candidates > 0 and not p.is_greedy for p in params)
        noise_row_list = [b for b, p in enumerate(params) if not (p.is_greedy or is_hybrid[b])]
        noise_rows = self._to_device(torch.tensor(noise_row_list, dtype=torch.int64))  # [D]
        return _Batch(
            temperatures=f[0], top_p=f[1], min_p=f[2], typical_p=f[3],
            repetition=f[4], presence=f[5], frequency=f[6],
            seeds=i[0], positions=i[1], top_k=i[2], slots=i[3],
            bias=self._prepare_bias(params),
            is_hybrid=is_hybrid,
            noise_rows=noise_rows if len(noise_row_list) < len(rows) else None,
            num_noise_rows=len(noise_row_list),
            max_top_k=max((top_k for _, _, top_k, _ in int_rows), default=0),
            is_top_k_bounded=all(p.is_greedy or top_k > 0
                                 for p, (_, _, top_k, _) in zip(params, int_rows, strict=True)),
            has_top_p=any(p.top_p < 1.0 for p in params),
            has_min_p=any(p.min_p > 0.0 for p in params),
            has_typical_p=any(p.typical_p < 1.0 for p in params),
            has_penalties=any(_has_penalties(p) for p in params),
            has_repetition=any(p.repetition_penalty != 1.0 for p in params),
            has_additive_penalties=any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
                                       for p in params),
            layout=_make_layout(params, is_hybrid, vocab_size),
        )

    def _prepare_bias(self, params: list[SamplingParams]
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Logit bias as flat (row * V + id) indices and values, for one scatter_add."""
        flat_ids = [b * self.vocab_size + t for b, p in enumerate(params) for t, _ in p.logit_bias]
        if not flat_ids:
            return None
        values = [v for p in params for _, v in p.logit_bias]
        return (self._to_device(torch.tensor(flat_ids, dtype=torch.int64)),
                self._to_device(torch.tensor(values, dtype=torch.float32)))

    def _apply_bias_and_penalties(self, x: torch.Tensor, batch: _Batch) -> torch.Tensor:
        if batch.bias is not None:
            flat_ids, values = batch.bias
            x = x.reshape(-1).scatter_add(0, flat_ids, values).view(x.shape)  # [B, V]
        if batch.has_penalties:
            counts = self.output_counts.index_select(0, batch.slots)  # [B, V]
            in_prompt = self.prompt_mask.index_select(0, batch.slots)  # [B, V]
            x = _apply_penalties(x, counts, in_prompt, batch)
        return x

    def _filter_and_draw(self, penalised: torch.Tensor,
                         batch: _Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> token ids [B] int64 and the filtered logits [B, V] (None when nothing packs them)."""
        if batch.num_noise_rows == 0 and not any(batch.is_hybrid):
            return argmax_rows(penalised), None  # all greedy: the filters cannot matter
        scaled = penalised / batch.temperatures[:, None]  # [B, V]
        if not batch.is_top_k_bounded:
            filtered = _apply_filters(scaled, batch)  # [B, V]
            return self._draw(penalised, filtered, batch), filtered
        values, ids = _filter_top_k_slice(scaled, batch)  # [B, W] each, W << V
        token_ids = self._draw_from_slice(penalised, values, ids, batch)  # [B]
        return token_ids, (_unslice(values, ids, scaled) if batch.layout.num_candidates else None)

    def _draw(self, penalised: torch.Tensor, filtered: torch.Tensor,
              batch: _Batch) -> torch.Tensor:
        """[B] int64: Gumbel-max for rows drawn on the device, argmax of penalised for the rest.

        Noise is computed only for the D drawn rows: greedy rows never see it, and hybrid rows
        (whose argmax here is a placeholder) get theirs on the host.
        """
        if batch.num_noise_rows == 0:
            return argmax_rows(penalised)  # [B]
        rows = batch.noise_rows  # [D] or None for all
        noise = gumbel_noise(*_noise_lanes(batch), self.vocab_size)  # [D, V]
        if rows is None:
            return argmax_rows(filtered + noise)  # [B]
        drawn = argmax_rows(filtered.index_select(0, rows) + noise)  # [D]
        return argmax_rows(penalised).index_copy(0, rows, drawn)  # [B]

    def _draw_from_slice(self, penalised: torch.Tensor, values: torch.Tensor, ids: torch.Tensor,
                         batch: _Batch) -> torch.Tensor:
        """`_draw` on the top-k slice: values, ids [B, W]; noise only at the W ids of D rows."""
        if batch.num_noise_rows == 0:
            return argmax_rows(penalised)  # [B]
        rows = batch.noise_rows
        if rows is not None:
            values, ids = values.index_select(0, rows), ids.index_select(0, rows)  # [D, W]
        scores = values + gumbel_noise_at(*_noise_lanes(batch), ids)  # [D, W]
        # argmax over V picks the lowest id among equal scores; do the same on the slice
        is_best = scores == scores.amax(-1, keepdim=True)  # [D, W]
        drawn = torch.where(is_best, ids, self.vocab_size).amin(-1)  # [D]
        if rows is None:
            return drawn
        return argmax_rows(penalised).index_copy(0, rows, drawn)  # [B]

    def _unpack(self, host: np.ndarray, rows: list[SamplingRow],
                batch: _Batch) -> list[SampleResult]:
        layout = batch.layout
        if not layout.is_packed:
            return [SampleResult(int(t), None, []) for t in host.tolist()]  # host: [B] int32
        return [self._unpack_row(host[b], row, batch.is_hybrid[b], layout)  # host: [B, W]
                for b, row in enumerate(rows)]

    def _unpack_row(self, packed: np.ndarray, row: SamplingRow, is_hybrid: bool,
                    layout: _Layout) -> SampleResult:
        n = row.params.logprobs
        token_id, logprob = int(packed[0]), (float(packed[1]) if n else None)
        if is_hybrid:
            token_id, logprob = self._draw_on_host(packed, row, layout)
        top = packed[2:2 + n].astype(np.int64).tolist()
        top_logprobs = packed[2 + layout.num_logprobs:2 + layout.num_logprobs + n].tolist()
        return SampleResult(token_id, logprob, list(zip(top, top_logprobs, strict=True)))

    def _draw_on_host(self, packed: np.ndarray, row: SamplingRow,
                      layout: _Layout) -> tuple[int, float | None]:
        """Hybrid row: the HostSampler picks among the top-N candidates. -> (id, logprob)."""
        start, width = layout.candidates_at, layout.num_candidates
        n = min(row.params.num_candidates, width)  # width is capped at V
        candidate_ids = packed[start:start + n].astype(np.int64)  # [n]
        candidate_logits = packed[start + width:start + width + n]  # [n] float32
        token_id = self.host_sampler.sample(candidate_ids, candidate_logits, row.seed,
                                            row.position)
        if not row.params.logprobs:
            return token_id, None
        (hits,) = np.nonzero(candidate_ids == token_id)
        assert hits.size, "HostSampler must return one of the candidate ids"
        return token_id, float(packed[start + 2 * width + hits[0]])

    def _update_counts(self, token_ids: torch.Tensor, results: list[SampleResult],
                       batch: _Batch) -> None:
        """Add this step's tokens to the per-slot counts, on the device, without a sync."""
        if any(batch.is_hybrid):  # some ids were drawn on the host: send the final ids back
            ids = torch.tensor([r.token_id for r in results], dtype=torch.int64)
            token_ids = self._to_device(ids)  # [B]
        flat_ids = batch.slots * self.vocab_size + token_ids  # [B]
        ones = torch.ones_like(flat_ids, dtype=torch.int32)
        self.output_counts.view(-1).scatter_add_(0, flat_ids, ones)


def _noise_lanes(batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(seeds, positions) [D] of the rows drawn on the device."""
    if batch.noise_rows is None:
        return batch.seeds, batch.positions
    rows = batch.noise_rows
    return batch.seeds.index_select(0, rows), batch.positions.index_select(0, rows)


def _float_params(p: SamplingParams) -> tuple[float, ...]:
    """One row of the float parameter table; a filter that is off gets its neutral value."""
    return (
        1.0 if p.is_greedy else min(p.temperature, _MAX_TEMPERATURE),
        p.top_p if p.top_p < 1.0 else float("inf"),
        p.min_p,
        p.typical_p if p.typical_p < 1.0 else float("inf"),
        min(max(p.repetition_penalty, 1.0 / _MAX_REPETITION_SCALE), _MAX_REPETITION_SCALE),
        p.presence_penalty,
        p.frequency_penalty,
    )


def _int_params(row: SamplingRow, vocab_size: int) -> tuple[int, int, int, int]:
    top_k = row.params.top_k if row.params.top_k < vocab_size else 0  # k >= V keeps all
    return (row.seed, row.position, top_k, row.slot)


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _make_layout(params: list[SamplingParams], is_hybrid: tuple[bool, ...],
                 vocab_size: int) -> _Layout:
    hybrid = [p for p, h in zip(params, is_hybrid, strict=True) if h]
    return _Layout(
        num_logprobs=max((p.logprobs for p in params), default=0),
        num_candidates=min(vocab_size, max((p.num_candidates for p in hybrid), default=0)),
        has_candidate_logprobs=any(p.logprobs > 0 for p in hybrid),
    )


def _apply_penalties(x: torch.Tensor, counts: torch.Tensor, in_prompt: torch.Tensor,
                     batch: _Batch) -> torch.Tensor:
    """x, counts, in_prompt: [B, V]. Repetition (HF/vLLM), then presence and frequency."""
    in_output = counts > 0  # [B, V]
    if batch.has_repetition:
        # x / r where x > 0, else x * r: clamps instead of a compare and a where, in place on
        # fresh temporaries (on CPU each new [B, V] tensor costs page faults)
        repetition = batch.repetition[:, None]  # [B, 1]
        penalised = x.clamp(min=0.0).div_(repetition).add_(x.clamp(max=0.0).mul_(repetition))
        x = torch.where(in_prompt.logical_or_(in_output), penalised, x)  # [B, V]
    if batch.has_additive_penalties:
        x = x - batch.presence[:, None] * in_output - batch.frequency[:, None] * counts
    return x


def _apply_filters(x: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """x: [B, V] temperature-scaled logits -> [B, V] with removed tokens at -inf.

    Each filter sees the distribution renormalised over what the previous ones kept (as HF's
    chained warpers do) and always keeps the top token.
    """
    if batch.max_top_k:
        x = filters.apply_top_k(x, batch.top_k, batch.max_top_k)
    return _apply_mass_filters(x, batch)


def _apply_mass_filters(x: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """top-p, min-p, typical-p in that order, each only when some row uses it."""
    if batch.has_top_p:
        x = filters.apply_top_p(x, batch.top_p)
    if batch.has_min_p:
        x = filters.apply_min_p(x, batch.min_p)
    if batch.has_typical_p:
        x = filters.apply_typical_p(x, batch.typical_p)
    return x


def _filter_top_k_slice(x: torch.Tensor, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, V] scaled logits -> the chain on the top-W slice: values [B, W] (best first,
    removed at -inf) and their ids [B, W]. Exact when every drawn row has top_k > 0: the
    later filters renormalise over what top-k kept, and that all lies in the slice.
    """
    width = min(x.shape[-1], batch.max_top_k + _TOP_K_TIE_MARGIN)
    values, ids = x.topk(width, dim=-1)  # [B, W] each, sorted descending
    values = filters.mask_below_kth(values, values, batch.top_k)
    return _apply_mass_filters(values, batch), ids


def _unslice(values: torch.Tensor, ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Slice values [B, W] at ids [B, W] -> [B, V], -inf elsewhere (hybrid candidates)."""
    return torch.full_like(like, _NEG_INF).scatter_(1, ids, values)


def _pack(raw: torch.Tensor, filtered: torch.Tensor | None, token_ids: torch.Tensor,
          layout: _Layout) -> torch.Tensor:
    """[B] int32 ids, or [B, W] float32: ids | logprobs section | candidates section."""
    if not layout.is_packed:
        return token_ids.to(torch.int32)
    columns = [token_ids[:, None].float()]  # [B, 1]
    needs_logprobs = layout.num_logprobs > 0 or layout.has_candidate_logprobs
    logprobs = raw.log_softmax(-1) if needs_logprobs else None  # [B, V]
    if layout.num_logprobs:
        top = logprobs.topk(layout.num_logprobs, dim=-1)  # [B, L] each
        columns += [logprobs.gather(1, token_ids[:, None]), top.indices.float(), top.values]
    if layout.num_candidates:
        candidates = filtered.topk(layout.num_candidates, dim=-1)  # [B, N] each, best first
        columns += [candidates.indices.float(), candidates.values]
        if layout.has_candidate_logprobs:
            columns.append(logprobs.gather(1, candidates.indices))  # [B, N]
    return torch.cat(columns, dim=1)  # [B, W]
