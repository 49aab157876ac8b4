"""Sparse MoE (worker/models/decoder.py SparseMoE) on the tiny random Mixtral: 4 experts,
top-2, hidden 64.

Eager, each expert runs only on the tokens routed to it; that must equal
`sparse_moe_reference` (every expert on every token, weighted) within TOLERANCE, for
dense and packed experts, with token counts that leave some experts without a token.
Under torch.compile the layer takes the reference formula (static shapes). Warmup mode
sends every token to every expert, and the engine's warmup switches it off afterwards.
"""

from __future__ import annotations

import pytest
import torch

from kernels.block_linear import BLOCKS_LAYOUT
from tests.tiny_models import make_tiny_model
from worker.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from worker.engine import LLMEngine
from worker.loaders.hf import load_hf_dir
from worker.models.decoder import SparseMoE, sparse_moe_reference
from worker.models.registry import build_model
from worker.vocab.sampling_params import SamplingParams

CPU = torch.device("cpu")
# Relative to the output's largest |value| (about 0.01 here). The same products and
# sums on fewer rows, but fp32 GEMM blocking may order a row's sum differently. Measured
# over every layer at 1-200 tokens: dense 1.6e-7, int8 and int4 0 (equal bits).
TOLERANCE = 1e-5
# int4 experts as the CPU's native blocks (kernels/block_linear.py): a call with at most 32
# rows rounds them to int16 per block of 32 (1/65534 of the block's largest value), one
# with more multiplies in fp32, so the reference's 64-row calls and the routed experts'
# smaller ones differ by that rounding: measured 9.7e-5 at 64 tokens, 0 at 1 and 3.
TOLERANCE_BLOCKS = 1e-3
NUM_TOKENS = [1, 3, 64]  # 1 token: 2 of the 4 experts get none


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir):
    return load_hf_dir(tiny_model_dir("mixtral"))


def _moe(checkpoint, weights: str | None) -> SparseMoE:
    model = build_model(checkpoint.config, checkpoint.tensors, torch.float32, CPU, weights)
    return model.layers[1].mlp


def _hidden(num_tokens: int) -> torch.Tensor:
    return torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(num_tokens))


def _record_experts(moe: SparseMoE, monkeypatch) -> list[tuple[int, int]]:
    """(expert, rows) of every expert the layer runs from now on."""
    calls = []
    run = moe.run_expert
    monkeypatch.setattr(moe, "run_expert", lambda e, x: calls.append((e, len(x))) or run(e, x))
    return calls


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("weights", [None, "int8", "int4"])
def test_sparse_equals_all_experts_reference(checkpoint, weights, num_tokens) -> None:
    moe = _moe(checkpoint, weights)
    assert (moe.packed_experts is not None) == (weights is not None)
    x = _hidden(num_tokens)
    with torch.no_grad():
        routing = moe.routing_weights(x)  # [T, E]
        want = sparse_moe_reference(x, routing, moe.run_expert)
        got = moe(x)
    if num_tokens == 1:
        assert (routing == 0).all(dim=0).sum() == 2  # two experts with no token
    diff = ((got - want).abs().max() / want.abs().max()).item()
    blocks = any(w.layout == BLOCKS_LAYOUT for pair in moe.packed_experts or () for w in pair)
    tolerance = TOLERANCE_BLOCKS if blocks else TOLERANCE
    assert diff <= tolerance, f"{weights} T={num_tokens}: differs by {diff} (relative)"


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_experts_run_only_on_their_tokens(checkpoint, num_tokens, monkeypatch) -> None:
    moe = _moe(checkpoint, None)
    x = _hidden(num_tokens)
    routed = (moe.routing_weights(x) > 0).sum(dim=0).tolist()  # tokens per expert
    calls = _record_experts(moe, monkeypatch)
    with torch.no_grad():
        moe(x)
    assert calls == [(e, n) for e, n in enumerate(routed) if n]
    assert sum(n for _, n in calls) == num_tokens * moe.top_k


def test_warmup_mode_runs_every_expert_on_every_token(checkpoint, monkeypatch) -> None:
    moe = _moe(checkpoint, None)
    x = _hidden(3)
    calls = _record_experts(moe, monkeypatch)
    moe.is_warmup = True
    with torch.no_grad():
        out = moe(x)
    assert calls == [(e, 3) for e in range(moe.num_experts)]
    assert out.isfinite().all()


def test_compiling_takes_the_static_all_experts_path(checkpoint, monkeypatch) -> None:
    """Under torch.compile (faked here: the flag only) every expert runs on all T
    tokens, warmup or not, and the result is the sparse one."""
    moe = _moe(checkpoint, None)
    x = _hidden(3)
    with torch.no_grad():
        sparse = moe(x)
    calls = _record_experts(moe, monkeypatch)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for is_warmup in (False, True):
        moe.is_warmup = is_warmup
        with torch.no_grad():
            static = moe(x)
        assert (static - sparse).abs().max() <= TOLERANCE * sparse.abs().max()
    assert calls == [(e, 3) for e in range(moe.num_experts)] * 2


def test_engine_warmup_runs_every_expert_then_routes_top_k(tiny_model_dir,
                                                           monkeypatch) -> None:
    """In warmup mode every expert of every layer sees every warmup step's tokens; after
    it, the mode is off and the outputs match an engine that skipped warmup."""
    calls = []
    run = SparseMoE.run_expert
    monkeypatch.setattr(SparseMoE, "run_expert",
                        lambda self, e, x: calls.append((id(self), e, len(x))) or run(self, e, x))
    model = ModelConfig(model=str(tiny_model_dir("mixtral")))
    engine = LLMEngine(EngineConfig(model=model))
    layers = [m for m in engine.model.modules() if isinstance(m, SparseMoE)]
    for m in layers:
        rows = [[n for layer, e, n in calls if layer == id(m) and e == expert]
                for expert in range(m.num_experts)]
        assert rows[0] and all(r == rows[0] for r in rows)  # every expert, every step
    assert not any(m.is_warmup for m in layers)

    calls.clear()  # after warmup: one prompt token, then one decode step
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    tokens = engine.generate([[5]], params)[0].token_ids
    assert len([n for _, _, n in calls if n == 1]) == len(calls) > 0
    assert len(calls) == 8 * len(layers) * layers[0].top_k
    cold = LLMEngine(EngineConfig(model=model, warmup=False))
    assert cold.generate([[5]], params)[0].token_ids == tokens


@pytest.mark.slow  # compiles the decode step of a 1-layer model (tens of seconds)
def test_compiled_mixtral_equals_eager_and_warmup_compiled_every_graph(tmp_path) -> None:
    path = make_tiny_model("mixtral", tmp_path / "mixtral", layers=1)
    engines = {compile: LLMEngine(EngineConfig(
        model=ModelConfig(model=str(path), compile=compile),
        cache=CacheConfig(block_size=8, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64)))
        for compile in ("off", "on")}
    assert engines["on"].runner.static.compiled
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    want = [r.token_ids for r in engines["off"].generate(prompts, params)]
    assert [r.token_ids for r in engines["on"].generate(prompts, params)] == want
    # warmup mode did not become part of a guard: serving compiled nothing new
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
