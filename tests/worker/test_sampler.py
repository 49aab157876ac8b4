"""Tests for the on-device sampler (worker/sampler.py) and its noise (kernels/gumbel_noise.py).

CPU only and deterministic: every draw is a pure function of (seed, position, token id),
so the statistical tests below see the same samples on every run. Frequencies are checked
against a float64 reference of the filter chain written here from the definitions.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.stats
import torch

from kernels.gumbel_noise import (
    gumbel_from_uniform_numpy,
    gumbel_noise,
    gumbel_noise_at,
    gumbel_noise_reference,
    uniform_from_hash,
    uniform_from_hash_numpy,
)
from worker import sampler as sampler_module
from worker.sampler import GumbelHostSampler, Sampler, SampleResult, SamplingRow
from worker.vocab.sampling_params import SamplingParams

CPU = torch.device("cpu")
VOCAB_SIZE = 32
NUM_DRAWS = 20_000
P_VALUE_THRESHOLD = 1e-3  # chi-square / KS goodness of fit must not reject at this level
MIN_EXPECTED = 5.0  # bins expected below this are pooled before the chi-square test
SEED = 20240601


def make_logits(seed: int, vocab_size: int = VOCAB_SIZE, scale: float = 1.5) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0.0, scale, vocab_size)).float()


def rows_for(params: SamplingParams, num_rows: int, slot: int = 0,
             seed: int = SEED) -> list[SamplingRow]:
    return [SamplingRow(params, slot=slot, position=i, seed=seed) for i in range(num_rows)]


# ---- float64 reference of the chain, written from the definitions ------------------------

def softmax64(x: np.ndarray) -> np.ndarray:
    finite = np.isfinite(x)
    e = np.where(finite, np.exp(x - x[finite].max()), 0.0)
    return e / e.sum()


def reference_probs(logits: torch.Tensor, p: SamplingParams, counts: np.ndarray | None = None,
                    in_prompt: np.ndarray | None = None) -> np.ndarray:
    """[V] float64 probabilities after bias, penalties, temperature and the four filters."""
    x = logits.double().numpy().copy()
    for token_id, bias in p.logit_bias:
        x[token_id] += bias
    if counts is not None:
        seen = (counts > 0) | in_prompt
        rep = p.repetition_penalty
        x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
        x = x - p.presence_penalty * (counts > 0) - p.frequency_penalty * counts
    x = x / p.temperature
    if p.top_k:
        x = np.where(x >= np.sort(x)[::-1][p.top_k - 1], x, -np.inf)
    if p.top_p < 1.0:
        x = ref_top_p(x, p.top_p)
    if p.min_p > 0.0:
        probs = softmax64(x)
        assert_clear_of(probs / probs.max(), p.min_p)
        x = np.where(probs >= p.min_p * probs.max(), x, -np.inf)
    if p.typical_p < 1.0:
        x = ref_typical_p(x, p.typical_p)
    return softmax64(x)


def ref_top_p(x: np.ndarray, top_p: float) -> np.ndarray:
    probs = softmax64(x)
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    assert_clear_of(cum[:-1], top_p)
    num_kept = int(np.searchsorted(cum, top_p)) + 1  # first prefix with mass >= top_p
    keep = np.zeros(x.shape, dtype=bool)
    keep[order[:num_kept]] = True
    return np.where(keep, x, -np.inf)


def ref_typical_p(x: np.ndarray, mass: float) -> np.ndarray:
    """HF TypicalLogitsWarper, transcribed to numpy float64."""
    probs = softmax64(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.log(probs)
        entropy = -np.nansum(np.where(probs > 0, probs * logp, 0.0))
        shifted = np.abs(-logp - entropy)
    order = np.argsort(shifted, kind="stable")
    cum = np.cumsum(probs[order])
    assert_clear_of(cum[:-1], mass)
    last_ind = min(int((cum < mass).sum()), len(x) - 1)
    remove = shifted > shifted[order[last_ind]]
    return np.where(remove, -np.inf, x)


def assert_clear_of(values: np.ndarray, threshold: float, margin: float = 1e-4) -> None:
    """Fixture sanity: no value sits so close to a cut that float32 rounding could flip it."""
    assert np.abs(values - threshold).min() > margin, "fixture too close to a filter boundary"


def assert_frequencies_match(tokens: list[int], probs: np.ndarray) -> None:
    observed = np.bincount(tokens, minlength=len(probs)).astype(np.float64)
    assert observed[probs == 0].sum() == 0, "a filtered-out token was sampled"
    expected = probs[probs > 0] * len(tokens)
    observed = observed[probs > 0]
    small = expected < MIN_EXPECTED
    if small.any():
        expected = np.append(expected[~small], expected[small].sum())
        observed = np.append(observed[~small], observed[small].sum())
    if len(expected) < 2:
        assert observed.sum() == len(tokens)
        return
    p_value = scipy.stats.chisquare(observed, expected).pvalue
    assert p_value > P_VALUE_THRESHOLD, f"chi-square p = {p_value:.2e}"


# ---- the noise -----------------------------------------------------------------------------

def test_numpy_twin_gives_bit_identical_uniforms_and_noise() -> None:
    seeds = torch.tensor([0, 1, 2**31, 2**32 + 7, 2**63 - 1], dtype=torch.int64)
    positions = torch.tensor([0, 5, 2**32 - 1, 2**40 + 3, 123_456], dtype=torch.int64)
    token_ids = torch.arange(50_000, dtype=torch.int64)
    u = uniform_from_hash(seeds, positions, token_ids)  # [5, V]
    noise = gumbel_noise(seeds, positions, len(token_ids))  # [5, V]
    assert u.dtype == torch.float32 and bool((u > 0).all()) and bool((u < 1).all())
    for b in range(len(seeds)):
        u_host = uniform_from_hash_numpy(int(seeds[b]), int(positions[b]), token_ids.numpy())
        assert u_host.dtype == np.float32
        np.testing.assert_array_equal(u_host, u[b].numpy())
        np.testing.assert_array_equal(gumbel_from_uniform_numpy(u_host), noise[b].numpy())


def test_noise_is_standard_gumbel() -> None:
    seeds = torch.arange(64, dtype=torch.int64) * 7919
    noise = gumbel_noise(seeds, torch.arange(64, dtype=torch.int64), 1000)  # [64, 1000]
    p_value = scipy.stats.kstest(noise.double().numpy().ravel(), "gumbel_r").pvalue
    assert p_value > P_VALUE_THRESHOLD


def test_noise_depends_only_on_its_own_row() -> None:
    seeds = torch.tensor([3, 3, 9, 2**62], dtype=torch.int64)
    positions = torch.tensor([0, 1, 1, 8], dtype=torch.int64)
    full = gumbel_noise(seeds, positions, 100)  # [4, 100]
    for b in range(4):
        alone = gumbel_noise(seeds[b:b + 1], positions[b:b + 1], 100)
        assert torch.equal(alone[0], full[b])
    assert not torch.equal(full[0], full[1])  # a new position is a new draw


# ---- sampled frequencies match the filtered softmax ---------------------------------------

FILTER_CASES = {
    "temperature": SamplingParams(temperature=0.7),
    "top_k": SamplingParams(top_k=5),
    "top_p": SamplingParams(top_p=0.8),
    "min_p": SamplingParams(min_p=0.1),
    "typical_p": SamplingParams(typical_p=0.6),
    "combined": SamplingParams(temperature=1.3, top_k=12, top_p=0.9, min_p=0.05, typical_p=0.9),
    "logit_bias": SamplingParams(top_p=0.9, logit_bias=((3, 2.5), (7, -100.0), (11, 1.0))),
}


@pytest.mark.parametrize("name", FILTER_CASES)
def test_frequencies_match_filtered_softmax(name: str) -> None:
    params = FILTER_CASES[name]
    logits = make_logits(seed=1)
    sampler = Sampler(VOCAB_SIZE, max_num_seqs=1, device=CPU)
    results = sampler.sample(logits.repeat(NUM_DRAWS, 1), rows_for(params, NUM_DRAWS))
    assert_frequencies_match([r.token_id for r in results], reference_probs(logits, params))


def test_frequencies_match_with_penalties() -> None:
    params = SamplingParams(temperature=0.9, top_p=0.97, repetition_penalty=1.3,
                            presence_penalty=0.4, frequency_penalty=0.25)
    logits = make_logits(seed=2)
    ranked = logits.argsort(descending=True).tolist()  # penalise likely and unlikely tokens
    prompt = [ranked[0], ranked[3], ranked[3], ranked[20]]
    output = [ranked[1], ranked[1], ranked[1], ranked[3], ranked[6], ranked[25]]
    counts = np.bincount(output, minlength=VOCAB_SIZE)
    in_prompt = np.isin(np.arange(VOCAB_SIZE), prompt)
    sampler = Sampler(VOCAB_SIZE, max_num_seqs=2, device=CPU)
    sampler.reset_slot(1, prompt, output)
    results = sampler.sample(logits.repeat(NUM_DRAWS, 1), rows_for(params, NUM_DRAWS, slot=1))
    expected = reference_probs(logits, params, counts, in_prompt)
    assert_frequencies_match([r.token_id for r in results], expected)


def test_frequencies_match_over_several_calls_in_mixed_batches() -> None:
    """The same draws split across calls, next to greedy and top-k rows, keep the law."""
    params, other = SamplingParams(min_p=0.08, temperature=1.2), SamplingParams(top_k=3)
    greedy = SamplingParams(temperature=0.0)
    logits = make_logits(seed=3)
    sampler = Sampler(VOCAB_SIZE, max_num_seqs=1, device=CPU)
    tokens = []
    for start in range(0, NUM_DRAWS, 5_000):
        rows = [SamplingRow(params, 0, start + i, SEED) for i in range(5_000)]
        rows += [SamplingRow(other, 0, start, 7), SamplingRow(greedy, 0, start, 7)]
        tokens += [r.token_id for r in sampler.sample(logits.repeat(len(rows), 1), rows)[:-2]]
    assert_frequencies_match(tokens, reference_probs(logits, params))


# ---- greedy ------------------------------------------------------------------------------

def test_greedy_is_argmax_of_penalised_logits() -> None:
    logits = torch.stack([make_logits(seed=s) for s in range(6)])  # [6, V]
    biased = SamplingParams(temperature=0.0, logit_bias=((0, 50.0),))
    penalised = SamplingParams(temperature=0.0, repetition_penalty=100.0, top_p=0.5)
    sampler = Sampler(VOCAB_SIZE, max_num_seqs=6, device=CPU)
    winner = int(logits[5].argmax())
    sampler.reset_slot(5, prompt_token_ids=[winner], output_token_ids=[])
    rows = [SamplingRow(SamplingParams(temperature=0.0, top_k=3), b, b, b) for b in range(4)]
    rows += [SamplingRow(biased, 4, 0, 1), SamplingRow(penalised, 5, 0, 1)]
    tokens = [r.token_id for r in sampler.sample(logits, rows)]
    runner_up = int(logits[5].topk(2).indices[1])
    assert tokens == [*logits[:4].argmax(-1).tolist(), 0, runner_up]


def test_repetition_penalty_pushes_positive_and_negative_logits_down() -> None:
    logits = torch.full((2, VOCAB_SIZE), -9.0)
    logits[0, :2] = torch.tensor([2.0, 1.5])  # 2 / 1.5 < 1.5
    logits[1, :2] = torch.tensor([-1.0, -1.2])  # -1 * 1.5 < -1.2
    sampler = Sampler(VOCAB_SIZE, max_num_seqs=2, device=CPU)
    sampler.reset_slot(0, prompt_token_ids=[0], output_token_ids=[])
    sampler.reset_slot(1, prompt_token_ids=[], output_token_ids=[0])
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    results = sampler.sample(logits, [SamplingRow(params, 0, 0, 0), SamplingRow(params, 1, 0, 0)])
    assert [r.token_id for r in results] == [1, 1]


def test_all_greedy_batch_never_computes_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_noise(*args: object) -> torch.Tensor:
        raise AssertionError("greedy rows must not touch the noise")
    monkeypatch.setattr(sampler_module, "gumbel_noise", no_noise)
    logits = torch.stack([make_logits(seed=s) for s in range(4)])
    rows = [SamplingRow(SamplingParams(temperature=0.0), 0, b, b) for b in range(4)]
    results = Sampler(VOCAB_SIZE, 1, CPU).sample(logits, rows)
    assert [r.token_id for r in results] == logits.argmax(-1).tolist()


def test_greedy_rows_ignore_noise_in_a_mixed_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    def wild_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
        return torch.randn(len(seeds), vocab, generator=torch.Generator().manual_seed(0)) * 1e4
    monkeypatch.setattr(sampler_module, "gumbel_noise", wild_noise)
    logits = torch.stack([make_logits(seed=s) for s in range(8)])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)] * 4
    rows = [SamplingRow(p, 0, b, b) for b, p in enumerate(params)]
    results = Sampler(VOCAB_SIZE, 1, CPU).sample(logits, rows)
    assert [r.token_id for r in results][::2] == logits[::2].argmax(-1).tolist()


# ---- seeded determinism across batch compositions ---------------------------------------

TARGETS = [
    SamplingParams(),
    SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(top_k=20, min_p=0.02, typical_p=0.95, logprobs=3),
    SamplingParams(temperature=1.4, repetition_penalty=1.2, frequency_penalty=0.5),
]
FILLERS = [
    SamplingParams(temperature=0.0),
    SamplingParams(top_k=2, logprobs=2),
    SamplingParams(top_p=0.5, min_p=0.2, presence_penalty=1.0),
    SamplingParams(typical_p=0.3, logit_bias=((1, 5.0),)),
    SamplingParams(num_candidates=16, temperature=0.5),
]
BIG_VOCAB = 256


def run_in_batch(target: SamplingRow, target_logits: torch.Tensor, batch_size: int,
                 dtype: torch.dtype) -> int:
    """Put `target` at a batch-size-dependent index among filler rows on fresh state."""
    rng = np.random.default_rng(batch_size)
    sampler = Sampler(BIG_VOCAB, max_num_seqs=64, device=CPU)
    rows, logits = [], []
    for b in range(batch_size - 1):
        rows.append(SamplingRow(FILLERS[b % len(FILLERS)], b + 1, int(rng.integers(1000)), b))
        logits.append(make_logits(seed=100 + b, vocab_size=BIG_VOCAB))
    index = int(rng.integers(batch_size))
    rows.insert(index, target)
    logits.insert(index, target_logits)
    for row in rows:
        sampler.reset_slot(row.slot, [1, 2, 3], [3, 4, 4, 5])
    return sampler.sample(torch.stack(logits).to(dtype), rows)[index].token_id


@pytest.mark.parametrize("target_index", range(len(TARGETS)))
def test_same_seed_and_position_give_same_token_in_any_batch(target_index: int) -> None:
    params = TARGETS[target_index]
    target_logits = make_logits(seed=7, vocab_size=BIG_VOCAB, scale=2.0)
    target_logits = target_logits.to(torch.bfloat16).float()  # exact in both dtypes
    for position in range(4):
        target = SamplingRow(params, slot=0, position=position, seed=99)
        tokens = {run_in_batch(target, target_logits, size, dtype)
                  for size in (1, 5, 33) for dtype in (torch.float32, torch.bfloat16)}
        assert len(tokens) == 1, f"position {position}: {tokens}"


def test_different_positions_and_seeds_draw_differently() -> None:
    logits = torch.zeros(64, VOCAB_SIZE)  # uniform: every draw is pure noise
    rows = [SamplingRow(SamplingParams(), 0, position=i, seed=5) for i in range(32)]
    rows += [SamplingRow(SamplingParams(), 0, position=0, seed=s) for s in range(32)]
    tokens = [r.token_id for r in Sampler(VOCAB_SIZE, 1, CPU).sample(logits, rows)]
    assert len(set(tokens[:32])) > 10 and len(set(tokens[32:])) > 10


# ---- exactly one device->host copy -------------------------------------------------------

HOST_COPY_METHODS = ("cpu", "tolist", "item", "numpy", "__bool__", "__int__", "__float__")


@pytest.mark.parametrize("extra", [
    {},
    {"logprobs": 2},
    {"num_candidates": 8},
    {"num_candidates": 8, "logprobs": 3, "top_p": 0.9, "typical_p": 0.9, "min_p": 0.01},
])
def test_one_device_to_host_copy_per_call(monkeypatch: pytest.MonkeyPatch,
                                          extra: dict[str, object]) -> None:
    sampler = Sampler(VOCAB_SIZE, max_num_seqs=3, device=CPU)
    sampler.reset_slot(2, [1, 2], [3])
    params = [SamplingParams(temperature=0.0), SamplingParams(**extra),
              SamplingParams(top_k=4, repetition_penalty=1.1, logit_bias=((0, 1.0),))]
    rows = [SamplingRow(p, slot, slot, slot) for slot, p in enumerate(params)]
    logits = torch.stack([make_logits(seed=s) for s in range(3)])
    calls: list[str] = []
    for name in HOST_COPY_METHODS:
        monkeypatch.setattr(torch.Tensor, name, _counting(getattr(torch.Tensor, name), name, calls))
    results = sampler.sample(logits, rows)
    assert calls[:1] == ["cpu"] and set(calls[1:]) <= {"numpy"} and len(calls) <= 2
    assert all(isinstance(r, SampleResult) for r in results)


def _counting(method, name: str, calls: list[str]):
    def wrapper(self, *args, **kwargs):
        calls.append(name)
        return method(self, *args, **kwargs)
    return wrapper


# ---- hybrid mode --------------------------------------------------------------------------

HYBRID_CASES = [
    SamplingParams(top_k=6, num_candidates=6),
    SamplingParams(top_p=0.7, temperature=0.8, num_candidates=VOCAB_SIZE),
    SamplingParams(typical_p=0.5, min_p=0.05, num_candidates=VOCAB_SIZE, logprobs=2),
    SamplingParams(num_candidates=1024, repetition_penalty=1.5, logit_bias=((4, 3.0),)),  # > V
]


def test_hybrid_equals_device_when_candidates_cover_the_support() -> None:
    logits = make_logits(seed=11)
    results = {}
    for hybrid in (True, False):
        sampler = Sampler(VOCAB_SIZE, max_num_seqs=1, device=CPU)
        sampler.reset_slot(0, [4, 5, 6], [6])
        rows = [SamplingRow(p if hybrid else dataclasses.replace(p, num_candidates=0),
                            0, position, 31)
                for position in range(250) for p in HYBRID_CASES]
        results[hybrid] = sampler.sample(logits.repeat(len(rows), 1), rows)
    assert [r.token_id for r in results[True]] == [r.token_id for r in results[False]]
    assert [r.logprob for r in results[True]] == [r.logprob for r in results[False]]


class RecordingHostSampler:
    """Takes the last candidate the filters kept; records what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, np.ndarray, int, int]] = []

    def sample(self, candidate_ids: np.ndarray, candidate_logits: np.ndarray, seed: int,
               position: int) -> int:
        self.calls.append((candidate_ids, candidate_logits, seed, position))
        return int(candidate_ids[np.isfinite(candidate_logits)][-1])


def test_host_sampler_gets_filtered_top_candidates_and_its_token_counts() -> None:
    logits = make_logits(seed=12)
    host = RecordingHostSampler()
    sampler = Sampler(VOCAB_SIZE, max_num_seqs=2, device=CPU, host_sampler=host)
    params = SamplingParams(top_k=3, num_candidates=5, logprobs=1)
    rows = [SamplingRow(params, 1, 17, 4), SamplingRow(SamplingParams(temperature=0.0), 0, 0, 0)]
    results = sampler.sample(logits.repeat(2, 1), rows)
    (candidate_ids, candidate_logits, seed, position), = host.calls
    assert (seed, position) == (4, 17)
    assert candidate_ids.tolist()[:3] == logits.topk(3).indices.tolist()
    assert np.isfinite(candidate_logits[:3]).all() and np.isneginf(candidate_logits[3:]).all()
    third = int(logits.topk(3).indices[2])
    assert results[0].token_id == third
    assert results[0].logprob == pytest.approx(float(logits.log_softmax(-1)[third]), abs=1e-6)
    assert int(sampler.output_counts[1, third]) == 1 and int(sampler.output_counts[1].sum()) == 1


def test_gumbel_host_sampler_matches_device_noise() -> None:
    candidate_ids = np.array([9, 3, 27, 14], dtype=np.int64)
    candidate_logits = np.array([1.0, 0.5, 0.25, -np.inf], dtype=np.float32)
    noise = gumbel_noise(torch.tensor([8]), torch.tensor([2]), VOCAB_SIZE)[0].numpy()
    expected = candidate_ids[np.argmax(candidate_logits + noise[candidate_ids])]
    assert GumbelHostSampler().sample(candidate_ids, candidate_logits, 8, 2) == expected


# ---- logprobs -----------------------------------------------------------------------------

def test_logprobs_match_log_softmax_of_raw_logits() -> None:
    logits = torch.stack([make_logits(seed=s, scale=3.0) for s in range(5)])  # [5, V]
    params = [
        SamplingParams(logprobs=5, temperature=0.0, logit_bias=((0, 9.0),)),
        SamplingParams(logprobs=1, top_k=4, repetition_penalty=2.0),
        SamplingParams(logprobs=0),
        SamplingParams(logprobs=20, num_candidates=10, top_p=0.8),
        SamplingParams(logprobs=3, min_p=0.3),
    ]
    sampler = Sampler(VOCAB_SIZE, max_num_seqs=1, device=CPU)
    sampler.reset_slot(0, [0, 1, 2], [])
    results = sampler.sample(logits.to(torch.bfloat16), [SamplingRow(p, 0, 3, 1) for p in params])
    expected = torch.log_softmax(logits.to(torch.bfloat16).float(), dim=-1)  # raw, unprocessed
    for b, (p, r) in enumerate(zip(params, results, strict=True)):
        if p.logprobs == 0:
            assert r.logprob is None and r.top_logprobs == []
            continue
        assert r.logprob == pytest.approx(float(expected[b, r.token_id]), abs=1e-6)
        top = expected[b].topk(p.logprobs)
        assert [i for i, _ in r.top_logprobs] == top.indices.tolist()
        np.testing.assert_allclose([v for _, v in r.top_logprobs], top.values.numpy(), atol=1e-6)
    assert results[0].token_id == 0  # bias moves the draw, not the reported distribution


# ---- penalty state ------------------------------------------------------------------------

def test_reset_slot_and_sampled_tokens_update_the_counts() -> None:
    sampler = Sampler(VOCAB_SIZE, max_num_seqs=3, device=CPU)
    sampler.reset_slot(1, prompt_token_ids=[3, 3, 5], output_token_ids=[7, 7, 2])
    expected = np.zeros((3, VOCAB_SIZE), dtype=np.int32)
    expected[1, [7, 2]] = [2, 1]
    np.testing.assert_array_equal(sampler.output_counts.numpy(), expected)
    assert torch.nonzero(sampler.prompt_mask).tolist() == [[1, 3], [1, 5]]

    logits = torch.stack([make_logits(seed=s) for s in range(4)])
    rows = [SamplingRow(SamplingParams(), 1, 6, 1), SamplingRow(SamplingParams(), 2, 0, 1),
            SamplingRow(SamplingParams(temperature=0.0), 2, 1, 1),
            SamplingRow(SamplingParams(num_candidates=4), 0, 9, 9)]
    for _ in range(3):
        for row, result in zip(rows, sampler.sample(logits, rows), strict=True):
            expected[row.slot, result.token_id] += 1
    np.testing.assert_array_equal(sampler.output_counts.numpy(), expected)

    sampler.reset_slot(1, prompt_token_ids=[], output_token_ids=[4])
    expected[1] = 0
    expected[1, 4] = 1
    np.testing.assert_array_equal(sampler.output_counts.numpy(), expected)
    assert not bool(sampler.prompt_mask[1].any())


def test_penalties_follow_the_state_between_steps() -> None:
    """Greedy with a huge frequency penalty never repeats: the count lands before the next step."""
    logits = make_logits(seed=13).repeat(1, 1)
    params = SamplingParams(temperature=0.0, frequency_penalty=2.0, logit_bias=((0, -100.0),))
    sampler = Sampler(VOCAB_SIZE, max_num_seqs=1, device=CPU)
    sampler.reset_slot(0, [], [])
    scaled = logits * 0.01  # spread < 2: one penalty drops a token below all fresh ones
    tokens = [sampler.sample(scaled, [SamplingRow(params, 0, i, 0)])[0].token_id
              for i in range(VOCAB_SIZE - 1)]
    assert len(set(tokens)) == VOCAB_SIZE - 1 and 0 not in tokens


# ---- fast paths give the reference result -----------------------------------------------

def test_fast_noise_matches_reference_bit_for_bit() -> None:
    seeds = torch.tensor([0, 2**31, 2**63 - 1], dtype=torch.int64)
    positions = torch.tensor([7, 2**40 + 3, 0], dtype=torch.int64)
    vocab_size = 200_003  # 3 x V > 2^18: the CPU path works in column chunks
    expected = gumbel_noise_reference(seeds, positions, vocab_size)  # [3, V]
    assert torch.equal(gumbel_noise(seeds, positions, vocab_size), expected)
    ids = torch.randint(vocab_size, (3, 50), generator=torch.Generator().manual_seed(0))
    assert torch.equal(gumbel_noise_at(seeds, positions, ids), expected.gather(1, ids))


SLICE_CASES = [
    SamplingParams(top_k=5),
    SamplingParams(top_k=12, temperature=1.3, top_p=0.9, min_p=0.05, typical_p=0.9),
    SamplingParams(top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.2, logprobs=2),
    SamplingParams(top_k=3, num_candidates=8),
]


@pytest.mark.parametrize("params", SLICE_CASES)
def test_top_k_slice_draws_what_the_full_vocab_chain_draws(params: SamplingParams) -> None:
    """A batch of top-k rows runs on a [B, W] slice; one row without top-k forces [B, V]."""
    vocab_size = 300
    logits = torch.stack([make_logits(seed=s, vocab_size=vocab_size) for s in range(64)])
    logits = logits.to(torch.bfloat16).float()  # bf16 logits: ties at the k-th value happen
    logits[0, :50] = logits[0].max() + 1.0  # a tie run longer than any k at the cut
    rows = [SamplingRow(params, 0, position, 11) for position in range(64)]
    tokens = {}
    for extra in ([], [SamplingRow(SamplingParams(), 0, 0, 0)]):
        sampler = Sampler(vocab_size, max_num_seqs=1, device=CPU)
        sampler.reset_slot(0, [1, 2, 3], [4, 4])
        batch_logits = torch.cat([logits, make_logits(seed=99, vocab_size=vocab_size)[None]])
        results = sampler.sample(batch_logits[:len(rows) + len(extra)], rows + extra)
        tokens[len(extra)] = [(r.token_id, r.logprob, r.top_logprobs) for r in results[:64]]
    assert tokens[0] == tokens[1]
