"""GGUF tensor decoding: every quant type through our reader vs gguf's dequantize, the
llama/gemma renames and transforms on a tiny synthetic file, and corrupt files."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from tests.paths import model_cache_dir
from worker.loaders.gguf import dequantize_tensor, load_gguf, read_gguf_header
from worker.loaders.hub import fetch_model
from worker.vocab.errors import ModelLoadError

ROWS, COLS = 8, 512
QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
# Types gguf can only dequantize: random blocks with sane fp16 scales at these byte offsets.
SCALE_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q5_K: (0, 2), Q.Q4_K: (0, 2),
                 Q.Q6_K: (208,)}
TOLERANCE = {Q.F32: 0, Q.F16: 2e-3, Q.BF16: 2e-2, Q.Q8_0: 0.03, Q.Q5_0: 0.2,  # |x| < 5
             Q.Q5_1: 0.2, Q.Q4_0: 0.4, Q.Q4_1: 0.4}


def cache_dir() -> Path:
    return model_cache_dir()


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, Q]], arch: str = "llama",
               metadata=None) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    if metadata:
        metadata(writer)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def encoded(values: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return values
    if qtype == Q.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, qtype)


def random_blocks(qtype: Q, rng: np.random.Generator) -> np.ndarray:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(ROWS, COLS // block_size, type_size), dtype=np.uint8)
    for offset in SCALE_OFFSETS[qtype]:
        scale = rng.uniform(0.001, 0.01, size=raw.shape[:2]).astype(np.float16)
        raw[:, :, offset:offset + 2] = scale.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(ROWS, -1)


def decode_all(path: Path) -> dict[str, np.ndarray]:
    header = read_gguf_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return {info.name: dequantize_tensor(data, info) for info in header.tensors}


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: q.name)
def test_quantizable_types_round_trip(tmp_path, qtype):
    values = np.random.default_rng(0).standard_normal((ROWS, COLS)).astype(np.float32)
    stored = encoded(values, qtype)
    write_gguf(tmp_path / "q.gguf", {"t": (stored, qtype)})
    got = decode_all(tmp_path / "q.gguf")["t"]
    assert got.dtype == np.float32 and got.shape == (ROWS, COLS)
    reference = values if qtype == Q.F32 else gguf.quants.dequantize(stored, qtype)
    np.testing.assert_array_equal(got, reference)
    assert np.abs(got - values).max() <= TOLERANCE[qtype]


@pytest.mark.parametrize("qtype", list(SCALE_OFFSETS), ids=lambda q: q.name)
def test_k_quants_match_gguf_dequantize(tmp_path, qtype):
    raw = random_blocks(qtype, np.random.default_rng(1))
    write_gguf(tmp_path / "k.gguf", {"t": (raw, qtype)})
    got = decode_all(tmp_path / "k.gguf")["t"]
    np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, qtype))
    assert got.shape == (ROWS, COLS) and np.isfinite(got).all()


@pytest.mark.slow  # reads a real model file
def test_real_k_quant_tensors_from_gemma3(tmp_path):
    """Q4_K / Q6_K / Q5_0 / Q8_0 blocks as llama.cpp wrote them, copied into a new file."""
    source = fetch_model("gemma3-270m", cache_dir())
    header = read_gguf_header(source)
    data = np.memmap(source, dtype=np.uint8, mode="r")
    picked = {}
    for info in header.tensors:
        wanted = info.qtype in (Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.Q8_0) and info.qtype not in picked
        if wanted and info.num_bytes < 4 << 20:
            raw = np.array(data[info.offset:info.offset + info.num_bytes])
            picked[info.qtype] = (info, raw.reshape(info.shape[0], -1))
    assert len(picked) == 4
    write_gguf(tmp_path / "real.gguf", {i.name: (raw, q) for q, (i, raw) in picked.items()})
    got = decode_all(tmp_path / "real.gguf")
    for qtype, (info, raw) in picked.items():
        np.testing.assert_array_equal(got[info.name], gguf.quants.dequantize(raw, qtype))
        assert got[info.name].shape == info.shape


# ---------------------------------------------------------------- tiny whole models

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 4, 2, 16, 128


def tiny_metadata(arch: str, *, tokenizer_model: str = "gpt2"):
    def add(writer: gguf.GGUFWriter) -> None:
        writer.add_block_count(1)
        writer.add_context_length(256)
        writer.add_embedding_length(HIDDEN)
        writer.add_feed_forward_length(FFN)
        writer.add_head_count(HEADS)
        writer.add_head_count_kv(KV_HEADS)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_freq_base(10000.0)
        if arch == "gemma3":
            writer.add_key_length(HEAD_DIM)
            writer.add_value_length(HEAD_DIM)
            writer.add_sliding_window(512)
        tokens = ["<s>", "</s>", "a", "b", "ab"]
        writer.add_tokenizer_model(tokenizer_model)
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types([3, 3, 1, 1, 1])
        writer.add_token_scores([0.0, 0.0, -1.0, -2.0, -0.5])
        if tokenizer_model == "gpt2":
            writer.add_token_merges(["a b"])
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(1)
    return add


def tiny_tensors(rng, names: list[str]) -> dict[str, tuple[np.ndarray, Q]]:
    shapes = {"attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
              "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
              "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
    out = {"token_embd.weight": (rng.standard_normal((5, HIDDEN)).astype(np.float32), Q.F32),
           "output_norm.weight": (rng.standard_normal(HIDDEN).astype(np.float32), Q.F32)}
    for name in names:
        shape = shapes.get(name, (HEAD_DIM,) if "q_norm" in name or "k_norm" in name
                           else (HIDDEN,))
        out[f"blk.0.{name}.weight"] = (rng.standard_normal(shape).astype(np.float32), Q.F32)
    return out


def test_tiny_llama_renames_and_unpermutes(tmp_path):
    names = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
             "ffn_gate", "ffn_up", "ffn_down"]
    tensors = tiny_tensors(np.random.default_rng(2), names)
    write_gguf(tmp_path / "tiny.gguf", tensors, "llama", tiny_metadata("llama"))
    ckpt = load_gguf(tmp_path / "tiny.gguf", name="tiny")
    assert ckpt.config["architectures"] == ["LlamaForCausalLM"]
    assert ckpt.config["tie_word_embeddings"] and "lm_head.weight" not in ckpt.tensors
    assert (ckpt.config["num_key_value_heads"], ckpt.config["head_dim"]) == (KV_HEADS, HEAD_DIM)
    q = tensors["blk.0.attn_q.weight"][0]
    # convert_hf_to_gguf.py permute: HF.reshape(n, 2, half, ...).swapaxes(1, 2) -> GGUF.
    hf_q = ckpt.tensors["model.layers.0.self_attn.q_proj.weight"].numpy()
    repermuted = hf_q.reshape(HEADS, 2, HEAD_DIM // 2, HIDDEN).swapaxes(1, 2).reshape(q.shape)
    np.testing.assert_array_equal(repermuted, q)
    np.testing.assert_array_equal(ckpt.tensors["model.layers.0.post_attention_layernorm.weight"],
                                  tensors["blk.0.ffn_norm.weight"][0])
    assert ckpt.tokenizer.encode("ab", add_special_tokens=False) == [4]


def test_tiny_gemma3_norms_and_config(tmp_path):
    names = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "post_attention_norm",
             "ffn_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm", "ffn_gate", "ffn_up",
             "ffn_down"]
    tensors = tiny_tensors(np.random.default_rng(3), names)
    write_gguf(tmp_path / "g.gguf", tensors, "gemma3", tiny_metadata("gemma3",
                                                                     tokenizer_model="llama"))
    ckpt = load_gguf(tmp_path / "g.gguf")
    layer = "model.layers.0."
    for gguf_name, hf_name in [("ffn_norm", "pre_feedforward_layernorm"),
                               ("post_ffw_norm", "post_feedforward_layernorm"),
                               ("post_attention_norm", "post_attention_layernorm"),
                               ("attn_k_norm", "self_attn.k_norm")]:
        np.testing.assert_allclose(ckpt.tensors[f"{layer}{hf_name}.weight"],
                                   tensors[f"blk.0.{gguf_name}.weight"][0] - 1, rtol=0, atol=0)
    np.testing.assert_array_equal(ckpt.tensors[f"{layer}self_attn.q_proj.weight"],
                                  tensors["blk.0.attn_q.weight"][0])  # no permutation
    config = ckpt.config
    assert config["model_type"] == "gemma3_text" and config["query_pre_attn_scalar"] == HEAD_DIM
    assert config["sliding_window"] == 512 and config["layer_types"] == ["sliding_attention"]


# ---------------------------------------------------------------- corrupt files


def test_truncated_file_is_a_load_error(tmp_path):
    source = fetch_model("smollm2-135m", cache_dir())
    for cut in (10, 4096, 50_000_000):
        truncated = tmp_path / f"cut{cut}.gguf"
        with open(source, "rb") as f:
            truncated.write_bytes(f.read(cut))
        with pytest.raises(ModelLoadError):
            load_gguf(truncated)


def test_garbage_is_a_load_error(tmp_path):
    rng = np.random.default_rng(4)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        load_gguf(garbage)
    magic_then_garbage = tmp_path / "magic.gguf"
    magic_then_garbage.write_bytes(b"GGUF\x03\x00\x00\x00" + garbage.read_bytes())
    with pytest.raises(ModelLoadError):
        load_gguf(magic_then_garbage)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError):
        load_gguf(tmp_path / "empty.gguf")
