"""Logits parity with transformers on tiny random models of every family (fp32).

Three sequences of different lengths are prefilled in chunks and then decoded for 32
steps through the paged cache, all batched together; the sliding window (48) is shorter
than every sequence. Each step's logits must match transformers' full forward over the
same tokens to within 1e-4 (max abs).
"""

from __future__ import annotations

import pytest
import torch

from tests.engine_driver import run_teacher_forced
from tests.tiny_models import FAMILIES, VOCAB, make_tiny_model
from worker.loaders.hf import load_hf_dir
from worker.models.registry import build_model

TOLERANCE = 1e-4
PROMPT_LENGTHS = [37, 70, 100]
DECODE_STEPS = 32


@pytest.mark.slow  # imports transformers (10-20 s on the dev machine)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family: str, tmp_path) -> None:
    import transformers as tf

    path = make_tiny_model(family, tmp_path / family)
    reference = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ckpt = load_hf_dir(path)
    model = build_model(ckpt.config, ckpt.tensors, torch.float32, torch.device("cpu"))

    gen = torch.Generator().manual_seed(1)
    sequences = [
        torch.randint(2, VOCAB, (n + DECODE_STEPS,), generator=gen).tolist()
        for n in PROMPT_LENGTHS
    ]
    ours = run_teacher_forced(model, sequences, PROMPT_LENGTHS)

    for tokens, n, got in zip(sequences, PROMPT_LENGTHS, ours, strict=True):
        with torch.no_grad():
            ref = reference(torch.tensor([tokens])).logits[0]  # [L, vocab]
        assert sorted(got) == list(range(n, len(tokens)))
        for pos, logits in got.items():
            diff = (logits - ref[pos - 1]).abs().max().item()
            assert diff <= TOLERANCE, f"{family}: position {pos} differs by {diff}"


@pytest.mark.slow  # imports transformers
def test_sharded_safetensors_load_the_same(tiny_model_dir, tmp_path) -> None:
    import transformers as tf

    src = tiny_model_dir("qwen2")
    model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="200KB")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (sharded / f).write_bytes((src / f).read_bytes())
    assert (sharded / "model.safetensors.index.json").exists()
    one, many = load_hf_dir(src), load_hf_dir(sharded)
    assert one.tensors.keys() == many.tensors.keys()
    assert all(torch.equal(one.tensors[k], many.tensors[k]) for k in one.tensors)
    assert many.eos_token_ids == (1,)
