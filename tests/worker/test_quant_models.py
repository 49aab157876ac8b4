"""Models with packed weights (ModelConfig.weights / build_model(weights=...)).

Tiny random models have flat logits (top-1 margins of a few hundredths), so quantization
noise alone flips many argmaxes: against the fp32 model, teacher-forced top-1 agreement
is measured at 0.92-1.0 for int8 and only 0.44-0.81 for int4 (int4 g32 moves logits by up
to 0.3 here). Wiring (fusion order, biases, tied tables, experts) is therefore checked
against an fp32 model built from the *same* quantized weights, dequantized: only the bf16
activations and outputs of the kernels differ. Measured: per-position max |logit diff|
<= 0.007, except mixtral int4 where 3 of 64 positions reach 0.02-0.044 (bf16 noise flips
a top-2 routing choice), and top-1 agreement 0.94-1.0 (gemma3 lowest, flat logits again).
Bounds: 90% of positions within 0.01, all within 0.1, agreement >= 0.90; a wiring mistake
moves every position by about what quantization noise does, 0.1-0.3.
The real SmolLM2-135M, Gemma 3 270M and Qwen2.5-0.5B with weights=auto (4-bit blocks as
int4, Q8_0/Q5_0 as int8 blocks, other 5/6-bit types as fp16) are held to the issue's >= 99%
top-1 against the fp32 path. Packed references mirror the registry: on the CPU with the
native block op, int4 and the tables are blocks (fp16 scales) multiplied in fp32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.fp16_linear import fbgemm_fp16_available
from kernels.packed_linear import dequantize_packed
from kernels.paged_attention import use_native_decode
from tests.engine_driver import run_teacher_forced
from tests.tiny_models import FAMILIES, VOCAB
from worker import model_runner
from worker.config import EngineConfig, ModelConfig
from worker.engine import LLMEngine
from worker.loaders import load_model_files
from worker.loaders.hf import load_hf_dir
from worker.models.packing import weight_bytes
from worker.models.registry import build_model, hf_state_dict
from worker.quantize import Q8, pack_weight, use_blocks
from worker.vocab.errors import PreconditionError
from worker.vocab.sampling_params import SamplingParams

CPU = torch.device("cpu")
MIN_SAME_WEIGHTS_AGREEMENT = 0.90
MAX_SAME_WEIGHTS_LOGIT_DIFF = 0.1
TYPICAL_SAME_WEIGHTS_LOGIT_DIFF = 0.01  # for 90% of the positions
PROMPTS = [37, 70]


def _sequences() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(2, VOCAB, (n + 32,), generator=gen).tolist() for n in PROMPTS]


def _round_trip(t: torch.Tensor, fmt: str) -> torch.Tensor:
    """What the packed model multiplies by: packed as the registry packs it on the CPU
    (scales rounded to the kernel's dtype), read back."""
    return dequantize_packed(pack_weight(t, fmt, gathered=fmt == Q8))


def _dequantized_tensors(tensors: dict, fmt: str) -> dict:
    """Every 2-D weight but norms/biases/the MoE router through the same quantization;
    the embedding table (and a tied head) is int8 under both int8 and int4: in blocks of
    32 where the CPU's native block op is built, per row otherwise."""
    table = Q8 if use_blocks(CPU) else "int8"
    out = {}
    for name, t in tensors.items():
        if t.dim() == 2 and not name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
            out[name] = _round_trip(t, table if "embed_tokens" in name else fmt)
        elif t.dim() == 3:  # stacked experts [E, rows, K]
            out[name] = torch.stack([_round_trip(x, fmt) for x in t])
        else:
            out[name] = t
    return out


def _agreement(a: list[dict], b: list[dict]) -> tuple[float, list[float]]:
    """(top-1 agreement, sorted per-position max |logit diff|)."""
    same = total = 0
    diffs = []
    for x, y in zip(a, b, strict=True):
        for pos in x:
            same += int(x[pos].argmax() == y[pos].argmax())
            total += 1
            diffs.append((x[pos] - y[pos]).abs().max().item())
    return same / total, sorted(diffs)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_model_matches_its_dequantized_weights(tiny_model_dir, family, fmt):
    ckpt = load_hf_dir(tiny_model_dir(family))
    packed = build_model(ckpt.config, ckpt.tensors, torch.float32, CPU, fmt)
    assert packed.is_packed and packed.embed_tokens.packed.format == "int8"
    assert packed.layers[0].self_attn.qkv_proj.weight is None
    reference = build_model(ckpt.config, _dequantized_tensors(ckpt.tensors, fmt),
                            torch.float32, CPU)
    seqs = _sequences()
    agree, diffs = _agreement(run_teacher_forced(reference, seqs, PROMPTS),
                              run_teacher_forced(packed, seqs, PROMPTS))
    print(f"{family} {fmt}: same-weights top-1 {agree:.3f}, max |logit diff| {diffs[-1]:.4f}")
    assert agree >= MIN_SAME_WEIGHTS_AGREEMENT
    assert diffs[-1] <= MAX_SAME_WEIGHTS_LOGIT_DIFF
    assert diffs[int(len(diffs) * 0.9)] <= TYPICAL_SAME_WEIGHTS_LOGIT_DIFF


@pytest.mark.parametrize("fmt", ["bfloat16", "float16", "int8", "int4"])
def test_engine_generates_greedily_with_packed_weights(tiny_model_dir, fmt):
    path = tiny_model_dir("llama")
    results = {}
    for weights in (None, fmt):
        engine = LLMEngine(EngineConfig(model=ModelConfig(model=str(path), weights=weights,
                                                          compile="off")))
        assert engine.model.is_packed == (weights is not None)
        prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
        res = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0,
                                                      ignore_eos=True))
        results[weights] = [r.token_ids for r in res]
    assert all(len(t) == 8 for t in results[fmt])
    if fmt != "int4":  # flat random logits: int4 noise may flip even the first token
        assert [t[0] for t in results[fmt]] == [t[0] for t in results[None]]


def test_dense_policy_and_training_refusal(tiny_model_dir):
    ckpt = load_hf_dir(tiny_model_dir("qwen2"))
    same = build_model(ckpt.config, ckpt.tensors, torch.float32, CPU, "float32")
    assert not same.is_packed  # weights == dtype: nothing to pack
    bf16 = build_model(ckpt.config, ckpt.tensors, torch.float32, CPU, "bfloat16")
    head = bf16.layers[0].self_attn.qkv_proj.packed
    assert head.format == "bfloat16" and head.bias is not None  # qwen2's qkv bias
    with pytest.raises(PreconditionError, match="dense float weights"):
        bf16.forward_dense(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(PreconditionError, match="packed"):
        hf_state_dict(bf16)
    with pytest.raises(ValueError, match="weights="):
        build_model(ckpt.config, ckpt.tensors, torch.float32, CPU, "int3")


@pytest.mark.skipif(not fbgemm_fp16_available(), reason="FBGEMM's fp16 GEMM is x86 only")
def test_float16_tied_head_gets_its_own_fbgemm_copy(tiny_model_dir):
    """gemma3 ties its head to the table: the table stays a gatherable fp16 tensor, the
    head multiplies an FBGEMM copy of the same fp16 values (fp32 logits). Bound: fp32
    summation order only, 1e-5 of the largest logit."""
    ckpt = load_hf_dir(tiny_model_dir("gemma3"))
    model = build_model(ckpt.config, ckpt.tensors, torch.float32, CPU, "float16")
    table = model.embed_tokens
    assert table.packed.layout == "" and table.packed.data.dtype == torch.float16
    assert table.packed_head.layout == "fbgemm"
    hidden = torch.randn(3, model.args.hidden_size)
    logits = model.compute_logits(hidden)
    cap = model.args.final_logit_softcapping
    ref = hidden @ table.packed.data.float().t()
    ref = ref if cap is None else torch.tanh(ref / cap) * cap
    assert logits.dtype == torch.float32
    assert (logits - ref).abs().max().item() <= ref.abs().max().item() * 1e-5


def test_auto_weights_on_a_mixed_gguf(tmp_path):
    """A tiny llama GGUF with Q4_0, Q5_0 and Q8_0 tensors and an untied Q8_0 head under
    auto: 4-bit → int4, 5/8-bit → fp16 (a qkv of Q5_0 q/k and Q8_0 v fuses as fp16), the
    head fp16 with fp32 output, the untied table an fp16 tensor; logits track fp32."""
    from worker.loaders.gguf import load_gguf
    from worker.models.packing import describe_weights

    _write_mixed_gguf(tmp_path / "mixed.gguf")
    models = {}
    for weights in (None, "auto"):
        ckpt = load_gguf(tmp_path / "mixed.gguf", weights=weights)
        models[weights] = build_model(ckpt.config, ckpt.tensors, torch.float32, CPU, weights)
    auto = models["auto"]
    layer = auto.layers[0]
    formats = {name: m.packed.format for name, m in [
        ("qkv", layer.self_attn.qkv_proj), ("o", layer.self_attn.o_proj),
        ("gate_up", layer.mlp.gate_up_proj), ("down", layer.mlp.down_proj),
        ("head", auto.lm_head), ("table", auto.embed_tokens)]}
    if use_blocks(CPU):  # the native block op: 5/6/8-bit (and the table) as Q8 blocks
        assert formats == {"qkv": "int8", "o": "int4", "gate_up": "int8", "down": "int4",
                           "head": "int8", "table": "int8"}
        assert describe_weights(auto) == "int4 x2, int8 x4 (activations float32)"
    else:
        assert formats == {"qkv": "float16", "o": "int4", "gate_up": "float16",
                           "down": "int4", "head": "float16", "table": "float16"}
        assert "float16 x3 (activations float32)" in describe_weights(auto)
    assert auto.lm_head.packed.compute_dtype == torch.float32  # fp32 logits
    seqs = [torch.randint(0, 5, (24,), generator=torch.Generator().manual_seed(i)).tolist()
            for i in range(2)]
    _agree, diffs = _agreement(run_teacher_forced(models[None], seqs, [4, 9]),
                               run_teacher_forced(auto, seqs, [4, 9]))
    assert diffs[-1] <= 0.01  # int4 layers with bf16 activations; fp16 adds ~1e-4


def _write_mixed_gguf(path) -> None:
    """A tiny llama GGUF: Q4_0, Q5_0 and Q8_0 linears, an untied Q8_0 head and table."""
    from gguf import GGMLQuantizationType as Q

    from tests.worker.test_gguf_quants import encoded, tiny_metadata, tiny_tensors, write_gguf

    types = {"attn_q": Q.Q5_0, "attn_k": Q.Q5_0, "attn_v": Q.Q8_0, "attn_output": Q.Q4_0,
             "ffn_gate": Q.Q5_0, "ffn_up": Q.Q5_0, "ffn_down": Q.Q4_0}
    rng = np.random.default_rng(5)
    tensors = tiny_tensors(rng, ["attn_norm", *types, "ffn_norm"])
    tensors["output.weight"] = (rng.standard_normal((5, 64)).astype(np.float32), Q.Q8_0)
    tensors["token_embd.weight"] = (tensors["token_embd.weight"][0], Q.Q8_0)
    for name, qtype in types.items():
        tensors[f"blk.0.{name}.weight"] = (tensors[f"blk.0.{name}.weight"][0], qtype)
    tensors = {n: (encoded(a * 0.1, q), q) for n, (a, q) in tensors.items()}
    write_gguf(path, tensors, "llama", tiny_metadata("llama"))


@pytest.mark.skipif(not use_blocks(CPU), reason="twins are for the native op's blocks")
def test_auto_bfloat16_gives_every_block_weight_a_bf16_twin(tmp_path):
    """`--weights auto+bfloat16` packs as auto does, and each block weight that multiplies
    (the untied head, not the untied table, which is only read) also holds its own values
    in bf16 for steps of more rows."""
    from kernels.block_linear import BLOCKS_LAYOUT, dequantize_blocks
    from worker.loaders.gguf import load_gguf
    from worker.models.packing import describe_weights
    from worker.quantize import HYBRID

    _write_mixed_gguf(tmp_path / "mixed.gguf")
    models = {}
    for weights in ("auto", HYBRID):
        ckpt = load_gguf(tmp_path / "mixed.gguf", weights=weights)
        models[weights] = build_model(ckpt.config, ckpt.tensors, torch.bfloat16, CPU, weights)
    twins = 0
    for (name, m), (_, a) in zip(models[HYBRID].named_modules(), models["auto"].named_modules(),
                                 strict=True):
        packed = getattr(m, "packed", None)
        if packed is None:
            continue
        assert packed.layout == BLOCKS_LAYOUT, name
        assert torch.equal(packed.data, a.packed.data) and a.packed.batched is None, name
        if name == "embed_tokens":
            assert packed.batched is None
            continue
        assert torch.equal(packed.batched.data, dequantize_blocks(
            packed.data, packed.format, packed.in_features).bfloat16()), name
        twins += packed.batched.num_bytes
    assert describe_weights(models[HYBRID]) == (
        "int4 x2, int8 x4 (activations float32); a bfloat16 copy of 5 for steps of 2+ rows")
    assert weight_bytes(models[HYBRID]) == weight_bytes(models["auto"]) + twins


def _auto_vs_fp32(name: str, model_cache, monkeypatch) -> tuple[float, list[float], dict]:
    """Teacher-forced over the real models' 64-token text: (top-1 agreement of auto with
    the fp32 path, sorted per-position max |logit diff|, weight bytes per policy).

    Both sides run the reference attention (gather + SDPA), so the weights are all that
    differs: the packed kernels round activations (int16 blocks on the CPU, bf16 in
    torch's int4), which turns any 1e-6 change elsewhere into rounding flips; with the
    native decode kernel in both runs and torch's int4 SmolLM2 scored 62/63, its one miss
    a near-tie (fp32's top-2 gap 0.089, auto's 0.001). The kernel is held to its
    reference in tests/kernels/test_paged_attention.py.
    """
    from tests.worker.test_real_models import NUM_TOKENS, TEXT

    monkeypatch.setattr(model_runner, "use_native_decode", lambda: use_native_decode(False))

    logits, sizes = {}, {}
    for weights in (None, "auto"):
        ckpt = load_model_files(name, model_cache, weights)
        ids = ckpt.tokenizer.encode(TEXT)[:NUM_TOKENS]
        model = build_model(ckpt.config, ckpt.tensors, torch.float32, CPU, weights)
        del ckpt
        sizes[weights] = weight_bytes(model)
        logits[weights] = run_teacher_forced(model, [ids], [1], max_model_len=128)[0]
        del model
    agree, diffs = _agreement([logits[None]], [logits["auto"]])
    print(f"{name} auto: top-1 {agree:.4f}, max |logit diff| {diffs[-1]:.3f}, weights "
          f"{sizes[None] >> 20} → {sizes['auto'] >> 20} MiB")
    return agree, diffs, sizes


@pytest.mark.slow  # the real SmolLM2 GGUF, loaded twice
def test_smollm2_auto_weights_track_fp32(model_cache, monkeypatch):
    """SmolLM2-135M (Q4_1 body, Q8_0 tied embeddings) with weights=auto: its Q4_1 blocks
    become int4 g32 as they are; the tied table is Q8 blocks (the file's own, exactly) on
    the CPU with the native block op, fp32 otherwise. Teacher-forced over the real
    models' 64-token text, top-1 must agree with the fp32 path >= 99% (measured 63/63,
    max |logit diff| 0.015; int8 scored 57/63 and int4 59/63 there: requantized body, and
    bf16 logits from an int8 lm_head turn near-ties into exact ties). With the blocks the
    weights take no more than the GGUF file (92 MiB against 93)."""
    agree, _diffs, sizes = _auto_vs_fp32("smollm2-135m", model_cache, monkeypatch)
    assert agree >= 0.99
    assert sizes["auto"] < sizes[None] * 0.4
    if use_blocks(CPU):
        assert sizes["auto"] <= (model_cache / "smollm2-135m.gguf").stat().st_size


@pytest.mark.slow  # real GGUFs, each loaded twice: ~90 s each on a busy 2-core machine
@pytest.mark.parametrize(("name", "max_fraction", "max_of_file"), [
    ("gemma3-270m", 0.9, 1.2), ("qwen2.5-0.5b", 0.6, 1.5)])
def test_auto_weights_with_5_6_8_bit_types_track_fp32(model_cache, monkeypatch, name,
                                                      max_fraction, max_of_file):
    """Gemma 3 270M and Qwen2.5-0.5B are mostly Q5_0/Q8_0 (some Q6_K, Q4_K): under auto,
    on the CPU with the native block op, Q5_0/Q8_0 become Q8 blocks exactly, Q6_K fp16,
    Q4_K int4 blocks and the tables Q8. Measured 63/63 on both, max |logit diff| 0.029
    and 0.051; weight bytes 1022 → 272 MiB and 2403 → 663 MiB (Q5_0 requantized by
    amax/127 instead of its own scale scored 62/63 on both). Without the native op: fp16
    and torch's int4, 63/63, 875 and 1245 MiB (int8 per channel scored 62/63, 60/63)."""
    agree, _diffs, sizes = _auto_vs_fp32(name, model_cache, monkeypatch)
    assert agree >= 0.99
    assert sizes["auto"] < sizes[None] * max_fraction
    if use_blocks(CPU):  # measured 1.13x and 1.42x the file (Qwen: its Q6_K tensors fp16)
        file_bytes = (model_cache / f"{name}.gguf").stat().st_size
        assert sizes["auto"] <= file_bytes * max_of_file


def test_activation_dtype_probe():
    from worker.quantize import activation_dtype, cpu_has_native_bf16

    assert cpu_has_native_bf16("flags\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert cpu_has_native_bf16("flags\t: fpu amx_bf16 amx_tile\n")
    assert not cpu_has_native_bf16("flags\t: fpu sse avx2 avx512f avx512bw\n")
    dtype = activation_dtype("cpu")
    assert dtype in (torch.float32, torch.bfloat16)
    if not cpu_has_native_bf16():
        assert dtype == torch.float32
    assert activation_dtype("cpu") is dtype  # probed once


def test_the_command_lines_weight_formats_are_the_engines() -> None:
    from worker.config import WEIGHT_FORMATS
    from worker.quantize import WEIGHTS

    assert WEIGHT_FORMATS == WEIGHTS


@pytest.mark.parametrize(("weights", "summary"), [
    (None, "float32 x18"),
    # with the CPU's native block op the table is int8 blocks, multiplied in fp32
    ("int8", "int8 x17 (activations bfloat16); int8 x1 (activations float32)"
     if use_blocks(CPU) else "int8 x18 (activations bfloat16)"),
    ("int4", "int4 x17, int8 x1 (activations float32)" if use_blocks(CPU)
     else "int4 x17, int8 x1 (activations bfloat16)"),
    # the untied tiny llama's table is gathered in fp16; its 17 linears run on FBGEMM
    pytest.param("float16", "float16 x1 (activations float16); float16 x17 (activations "
                 "float32)", marks=pytest.mark.skipif(not fbgemm_fp16_available(),
                                                      reason="FBGEMM's fp16 GEMM is x86 only")),
])
def test_info_says_what_the_weights_multiply_in(tiny_model_dir, weights, summary) -> None:
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=str(tiny_model_dir("llama")),
                                                      weights=weights), warmup=False))
    assert engine.info()["weights"] == summary
