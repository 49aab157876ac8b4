"""Every numeric sampling field at its extremes, in mixed batches.

The values run from subnormals and 1e-300 through huge (up to the largest double: NaN and
inf are refused as not finite) and the exact edges of each valid range. The ones float32
rounds to 0, 1 or inf are the dangerous ones (a top_p of 1e-50 used to fail the whole
step; a temperature of 1e-300 emitted token 0). For each batch:
- the step does not raise;
- every ordinary row draws what it draws alone (no row can change another's token);
- every extreme row draws what its mathematical limit draws: the same row with the
  limit's parameters (greedy, the filter off, the top token only) or a float64 reference
  of the draw (argmax of scaled logits + the row's Gumbel noise) written here.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels.gumbel_noise import gumbel_noise_reference
from worker.sampler import Sampler, SamplingRow
from worker.vocab.sampling_params import MIN_SAMPLING_TEMPERATURE, SamplingParams

CPU = torch.device("cpu")
VOCAB_SIZES = (64, 4608)  # 4608 > 4096: full-vocab top-p takes the radix select
INF = math.inf
TINY = (5e-324, 1e-310, 1e-300, 1e-50, 1e-40)  # float64 subnormal .. float32 subnormal
JUST_BELOW_ONE = 1.0 - 2.0**-53  # < 1 as a double, exactly 1 in float32

EXTREMES: dict[str, tuple] = {
    "temperature": (0.0, *TINY, 9.99e-6, MIN_SAMPLING_TEMPERATURE, 1e38, 1e300, 1.7e308),
    "top_p": (*TINY, 1e-8, JUST_BELOW_ONE, 1.0),
    "min_p": (0.0, *TINY, JUST_BELOW_ONE, 1.0),
    "typical_p": (*TINY, JUST_BELOW_ONE, 1.0),
    "repetition_penalty": (*TINY, 1e38, 1e300, 1.7e308),
    "presence_penalty": (-2.0, 2.0, 5e-324, -5e-324, 1e-300),
    "frequency_penalty": (-2.0, 2.0, 5e-324, -5e-324, 1e-300),
    "logit_bias": (-100.0, 100.0, 5e-324, -1e-300),
    "top_k": ("1", "V-1", "V", "V+1", 2**62),
    "seed": (0, 2**63 - 1),
    "logprobs": (20,),
    "num_candidates": (1, 1024),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: its parameters, its logits and what its slot has seen."""

    params: SamplingParams
    logits: torch.Tensor  # [V] float32
    prompt: list[int]
    output: list[int]
    position: int


def ordinary_params(draw) -> SamplingParams:
    return SamplingParams(
        temperature=draw(st.sampled_from([0.0, 0.4, 1.0, 1.6])),
        top_k=draw(st.sampled_from([0, 5, 20])),
        top_p=draw(st.sampled_from([1.0, 0.9])),
        min_p=draw(st.sampled_from([0.0, 0.05])),
        typical_p=draw(st.sampled_from([1.0, 0.9])),
        repetition_penalty=draw(st.sampled_from([1.0, 1.3])),
        presence_penalty=draw(st.sampled_from([0.0, 0.5])),
        frequency_penalty=draw(st.sampled_from([0.0, -0.4])),
        seed=draw(st.integers(0, 2**32)),
        logprobs=draw(st.sampled_from([0, 3])),
    )


def extreme_params(field: str, value, vocab_size: int, seed: int) -> SamplingParams:
    if field == "top_k":
        value = {"1": 1, "V-1": vocab_size - 1, "V": vocab_size,
                 "V+1": vocab_size + 1}.get(value, value)
    if field == "logit_bias":
        return SamplingParams(seed=seed, logit_bias=((3, value),))
    if field == "seed":
        return SamplingParams(seed=value)
    return SamplingParams(seed=seed, **{field: value})


@st.composite
def batches(draw) -> tuple[int, list[Case], list[str | None]]:
    """-> vocab size, rows, and per row the extreme field it carries (None: ordinary)."""
    vocab_size = draw(st.sampled_from(VOCAB_SIZES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    fields = draw(st.lists(st.sampled_from(sorted(EXTREMES)), min_size=1, max_size=3))
    kinds = fields + [None] * draw(st.integers(1, 3))
    kinds = draw(st.permutations(kinds))
    cases = []
    for kind in kinds:
        if kind is None:
            params = ordinary_params(draw)
        else:
            value = draw(st.sampled_from(EXTREMES[kind]))
            params = extreme_params(kind, value, vocab_size, draw(st.integers(0, 2**32)))
        logits = torch.from_numpy(rng.normal(0.0, 1.5, vocab_size)).float()
        top = int(logits.argmax())
        prompt = [top, *rng.integers(0, vocab_size, 5).tolist()]  # the top token is in context
        output = rng.integers(0, vocab_size, 3).tolist()
        cases.append(Case(params, logits, prompt, output, int(rng.integers(0, 10_000))))
    return vocab_size, cases, kinds


def run(vocab_size: int, cases: list[Case]) -> list[int]:
    """Sample one step of `cases` together (slot b = row b), fresh penalty state."""
    sampler = Sampler(vocab_size, max_num_seqs=len(cases), device=CPU)
    rows = []
    for b, case in enumerate(cases):
        sampler.reset_slot(b, case.prompt, case.output)
        rows.append(SamplingRow(case.params, slot=b, position=case.position,
                                seed=case.params.seed))
    logits = torch.stack([case.logits for case in cases])  # [B, V]
    return [r.token_id for r in sampler.sample(logits, rows)]


def solo(vocab_size: int, case: Case, **changes) -> int:
    return run(vocab_size, [dataclasses.replace(
        case, params=dataclasses.replace(case.params, **changes))])[0]


# ---- float64 references of the limits ------------------------------------------------------

def context_mask(case: Case, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(case.output, minlength=vocab_size).astype(np.float64)
    seen = counts > 0
    seen[case.prompt] = True
    return seen, counts


def noise64(case: Case, vocab_size: int) -> np.ndarray:
    lanes = torch.tensor([case.params.seed]), torch.tensor([case.position])
    return gumbel_noise_reference(*lanes, vocab_size)[0].double().numpy()  # [V]


def reference_draw(case: Case, vocab_size: int, x: np.ndarray | None = None) -> int:
    """argmax(x / T + noise) in float64 over the tokens top-k keeps; x: penalised logits."""
    p = case.params
    x = case.logits.double().numpy().copy() if x is None else x.copy()
    for token_id, bias in p.logit_bias:
        x[token_id] += bias
    seen, counts = context_mask(case, vocab_size)
    if p.repetition_penalty != 1.0:
        rep = p.repetition_penalty
        x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
    x = x - p.presence_penalty * (counts > 0) - p.frequency_penalty * counts
    scores = x / p.temperature + noise64(case, vocab_size)
    if 0 < p.top_k < vocab_size:
        scores = np.where(x >= np.sort(x)[::-1][p.top_k - 1], scores, -INF)
    return int(np.argmax(scores))


def most_typical(case: Case) -> int:
    """The token whose surprise -log p is closest to the entropy (typical_p -> 0)."""
    x = case.logits.double().numpy()
    logp = x - x.max() - np.log(np.exp(x - x.max()).sum())
    entropy = -(np.exp(logp) * logp).sum()
    return int(np.argmin(np.abs(-logp - entropy)))


def limit_token(field: str, case: Case, vocab_size: int) -> int:
    """What the row draws at the limit its extreme value stands for."""
    p, value = case.params, getattr(case.params, field, None)
    greedy = solo(vocab_size, case, temperature=0.0)
    if field == "temperature":
        if value < MIN_SAMPLING_TEMPERATURE:
            return greedy
        if value > 1e30:  # T -> inf: every token equally likely, the noise alone decides
            return int(np.argmax(noise64(case, vocab_size)))
        return reference_draw(case, vocab_size)
    if field == "top_p":
        if value < 1e-6:
            return greedy  # only the top token has mass >= top_p
        return solo(vocab_size, case, top_p=1.0)
    if field == "min_p":
        if np.float32(value) == 1.0:
            return greedy
        return solo(vocab_size, case, min_p=0.0)  # log(min_p) < -90: keeps every token here
    if field == "typical_p":
        if np.float32(value) == 1.0:
            return solo(vocab_size, case, typical_p=1.0)
        return most_typical(case)
    if field == "repetition_penalty":
        x = case.logits.double().numpy()
        seen, _ = context_mask(case, vocab_size)
        if value < 1.0:  # r -> 0: context tokens with positive logits outgrow everything
            return int(np.argmax(np.where(seen & (x > 0), x, -INF)))
        # r -> inf: context tokens with positive logits go to 0, negative ones to -inf
        limit = np.where(seen, np.where(x > 0, 0.0, -INF), x)
        return reference_draw(dataclasses.replace(
            case, params=dataclasses.replace(p, repetition_penalty=1.0)), vocab_size, limit)
    if field in ("presence_penalty", "frequency_penalty", "logit_bias", "seed", "top_k"):
        if field == "top_k" and p.top_k == 1:
            return greedy
        return reference_draw(case, vocab_size)
    if field == "logprobs":
        return solo(vocab_size, case, logprobs=0)
    assert field == "num_candidates"  # hybrid: the host draws among the top N only
    x = case.logits.double().numpy()
    candidates = np.argsort(-x, kind="stable")[:p.num_candidates]
    return int(candidates[np.argmax((x / p.temperature + noise64(case, vocab_size))[candidates])])


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_extreme_values_in_mixed_batches(batch) -> None:
    vocab_size, cases, kinds = batch
    for case in cases:
        case.params.validate(vocab_size)  # every value here is a valid request
    tokens = run(vocab_size, cases)  # must not raise
    for case, kind, token in zip(cases, kinds, tokens, strict=True):
        assert token == solo(vocab_size, case), f"{kind}: batched != solo for {case.params}"
        if kind is not None:
            assert token == limit_token(kind, case, vocab_size), f"{kind}: {case.params}"


def test_top_p_that_rounds_to_zero_keeps_the_top_token_on_both_cut_paths() -> None:
    """The reported case: 1e-50 is 0 in float32; the radix path used to index past V."""
    for vocab_size in VOCAB_SIZES:
        logits = torch.from_numpy(np.random.default_rng(1).normal(0, 2, (3, vocab_size))).float()
        rows = [SamplingRow(SamplingParams(top_p=1e-50, seed=s), slot=0, position=s, seed=s)
                for s in range(3)]
        tokens = [r.token_id for r in Sampler(vocab_size, 1, CPU).sample(logits, rows)]
        assert tokens == logits.argmax(-1).tolist()
