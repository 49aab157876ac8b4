"""The static decode step (worker/decode_step.py) against the general path it replaces.

The general eager path is the reference. Eager, the static step must give the same
logits on every family (its slot mapping, visible blocks and mask are computed from the
persistent buffers instead of Python lists). Compiled, greedy tokens must be equal,
logits within COMPILED_TOLERANCE, and seeded sampled tokens identical.
"""

from __future__ import annotations

import pytest
import torch

from kernels.block_linear import native_blocks_available
from kernels.fp16_linear import fbgemm_fp16_available
from tests.engine_driver import run_teacher_forced
from tests.tiny_models import FAMILIES, VOCAB, make_tiny_model
from worker.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from worker.decode_step import StaticDecode, batch_buckets, static_decode_mode
from worker.engine import LLMEngine
from worker.loaders.hf import load_hf_dir
from worker.models.registry import build_model
from worker.vocab.sampling_params import SamplingParams

EAGER_TOLERANCE = 1e-5  # same ops, other key padding: float sums may round differently
# inductor fuses norms, rotary and activations and reorders their float sums
COMPILED_TOLERANCE = 1e-3
PROMPT_LENGTHS = [37, 70, 100]  # past the sliding window (48) of mistral and gemma3
DECODE_STEPS = 24


def test_batch_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(2) == [1, 2]
    assert batch_buckets(4) == [1, 2, 4]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]


def test_compile_modes() -> None:
    cpu = torch.device("cpu")
    assert static_decode_mode("on", cpu, torch.float32) == "compiled"
    assert static_decode_mode("off", cpu, torch.bfloat16, "float16") == "off"
    assert static_decode_mode("auto", cpu, torch.float32) == "off"  # dense fp32: eager
    assert static_decode_mode("auto", cpu, torch.float32, "auto") == "off"
    assert static_decode_mode("auto", cpu, torch.float32, "auto", blocks=True) == "compiled"
    assert static_decode_mode("auto", torch.device("cuda"), torch.float32, "auto",
                              blocks=True) == "off"
    want = "compiled" if fbgemm_fp16_available() else "off"
    assert static_decode_mode("auto", cpu, torch.float32, "float16") == want
    assert static_decode_mode("auto", torch.device("cuda"), torch.bfloat16, "float16") == "off"
    with pytest.raises(ValueError, match="compile"):
        static_decode_mode("always", cpu, torch.float32)


def _model(tiny_model_dir, family: str):
    ckpt = load_hf_dir(tiny_model_dir(family))
    return build_model(ckpt.config, ckpt.tensors, torch.float32, torch.device("cpu"))


def _sequences() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(2, VOCAB, (n + DECODE_STEPS,), generator=gen).tolist()
            for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("family", FAMILIES)
def test_static_eager_equals_general_path(tiny_model_dir, family: str, monkeypatch) -> None:
    model = _model(tiny_model_dir, family)
    seqs = _sequences()
    calls = []
    execute = StaticDecode.execute
    monkeypatch.setattr(StaticDecode, "execute",
                        lambda self, s: calls.append(len(s)) or execute(self, s))
    ref = run_teacher_forced(model, seqs, PROMPT_LENGTHS)
    got = run_teacher_forced(model, seqs, PROMPT_LENGTHS, static_decode="eager")
    assert len(calls) >= DECODE_STEPS - 1  # every decode step took the static path
    for want, have in zip(ref, got, strict=True):
        assert sorted(want) == sorted(have)
        for pos in want:
            diff = (want[pos] - have[pos]).abs().max().item()
            assert diff <= EAGER_TOLERANCE, f"{family}: position {pos} differs by {diff}"


def _engine(path, compile: str, weights: str | None = None) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=ModelConfig(model=str(path), compile=compile, weights=weights),
        cache=CacheConfig(block_size=8, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=64)))


def _generate(engine: LLMEngine, prompts: list[list[int]],
              params: list[SamplingParams]) -> dict[str, list[int]]:
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", prompt, p)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished:
        for chunk in engine.step():
            tokens[chunk.request_id].extend(chunk.token_ids)
    return tokens


@pytest.mark.slow  # compiles the decode step (tens of seconds on 2 cores)
@pytest.mark.parametrize("weights", [
    None,  # dense: frozen into the graph
    # packed for FBGEMM: compiled unfrozen, the kernel behind an opaque op
    pytest.param("float16", marks=pytest.mark.skipif(
        not fbgemm_fp16_available(), reason="FBGEMM's fp16 GEMM is x86 only")),
    # 4-bit blocks through slotmesh's native op: compiled unfrozen, with the C++ wrapper
    pytest.param("int4", marks=pytest.mark.skipif(
        not native_blocks_available(), reason="the native block op is not built here")),
])
def test_compiled_step_equals_eager(tmp_path, weights) -> None:
    """gemma3 with 2 layers (one sliding, one full; compile time grows with the layers):
    QK-norm, tied embeddings, embedding scale, GQA."""
    path = make_tiny_model("gemma3", tmp_path / "gemma3", layers=2)
    eager, compiled = _engine(path, "off", weights), _engine(path, "on", weights)
    assert compiled.runner.static is not None and compiled.runner.static.compiled
    if weights == "int4":
        assert compiled.runner.static.cpp_wrapper
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in (30, 55, 9)]
    params = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0.9, top_k=50, top_p=0.9, max_tokens=40,
                             ignore_eos=True, seed=11),
              SamplingParams(temperature=1.0, repetition_penalty=1.2, max_tokens=25,
                             ignore_eos=True, seed=12)]
    want = _generate(eager, prompts, params)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert _generate(compiled, prompts, params) == want
    # warmup compiled every graph: growing contexts and batch sizes compile nothing more
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs

    # logits of one pure-decode batch, both paths, same KV
    prompts = [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in (20, 64)]
    for i, prompt in enumerate(prompts):
        compiled.add_request(f"x{i}", prompt, SamplingParams(temperature=0.0, max_tokens=8,
                                                             ignore_eos=True))
    while True:
        out = compiled.scheduler.schedule()
        runner = compiled.runner
        if runner.static.can_run(out.scheduled):
            break
        results = runner.execute(out)
        compiled.scheduler.update(out, [r.token_id for r in results])
    with torch.inference_mode():
        have = runner.static.execute(out.scheduled)
        static, runner.static = runner.static, None
        _, ref = runner.compute_logits(out.scheduled)
        runner.static = static
    assert (have - ref).abs().max().item() <= COMPILED_TOLERANCE
    assert torch.equal(have.argmax(-1), ref.argmax(-1))
