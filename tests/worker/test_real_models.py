"""The real GGUF models from PyPI against transformers loading the same GGUF file.

Teacher-forced over a fixed 64-token text: our engine runs the first token as a prompt
and the other 63 as decode steps through the paged cache; transformers runs the whole
text in one forward. Top-1 agreement must be >= 99% (fp32 on both sides, identical
dequantised weights, so in practice every position agrees).
"""

from __future__ import annotations

import pytest
import torch

from tests.engine_driver import run_teacher_forced
from worker.loaders import load_model_files
from worker.models.registry import build_model

TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a "
    "lantern and a notebook. He wrote down the colour of the sea, the direction of the "
    "wind, and the names of the ships that passed. Over forty years the notebooks filled "
    "a whole shelf, and nobody ever asked to read them. When he retired, the keeper who "
    "followed him found the shelf and started at the first page."
)
NUM_TOKENS = 64
MIN_AGREEMENT = 0.99


@pytest.mark.slow  # real models in slotmesh and in transformers
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"])
def test_top1_agreement_with_transformers(name: str, model_cache) -> None:
    import transformers as tf

    ckpt = load_model_files(name, model_cache)
    ids = ckpt.tokenizer.encode(TEXT)[:NUM_TOKENS]
    assert len(ids) == NUM_TOKENS
    model = build_model(ckpt.config, ckpt.tensors, torch.float32, torch.device("cpu"))
    del ckpt
    ours = run_teacher_forced(model, [ids], [1], max_model_len=128)[0]
    del model

    gguf = model_cache / f"{name}.gguf"
    reference = tf.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0]  # [64, vocab]
    ref_top1 = ref[:-1].argmax(-1).tolist()
    our_top1 = [int(ours[pos][: ref.shape[-1]].argmax()) for pos in range(1, NUM_TOKENS)]
    agree = sum(a == b for a, b in zip(our_top1, ref_top1, strict=True)) / len(ref_top1)
    max_diff = max((ours[pos][: ref.shape[-1]] - ref[pos - 1]).abs().max().item()
                   for pos in range(1, NUM_TOKENS))
    print(f"{name}: top-1 agreement {agree:.4f}, max |logit diff| {max_diff:.2e}")
    assert agree >= MIN_AGREEMENT, f"{name}: top-1 agreement {agree:.3f}"
