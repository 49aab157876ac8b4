"""Tiny random models in the Hugging Face format, one per supported family.

transformers builds them from a config offline and is the oracle the tests compare
against. Each directory also gets a small byte-level BPE tokenizer so the whole engine
(tokenize → generate → detokenize) runs on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 512
SPECIALS = ["<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)


def tiny_config(family: str, window: int = 48, max_positions: int = 512, layers: int = 4):
    import transformers as tf

    common = _COMMON | {"max_position_embeddings": max_positions, "num_hidden_layers": layers}
    if family == "llama":
        return tf.LlamaConfig(**common, rope_theta=10000.0)
    if family == "qwen2":
        return tf.Qwen2Config(**common, rope_theta=10000.0)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=window, rope_theta=10000.0)
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            **(common | dict(tie_word_embeddings=True)), head_dim=32, sliding_window=window,
            layer_types=(["sliding_attention", "full_attention"] * layers)[:layers],
            query_pre_attn_scalar=24,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        )
    if family == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=None, rope_theta=1e6)
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "mistral", "gemma3", "mixtral"]


def make_tiny_model(family: str, path: Path, window: int = 48, seed: int = 0,
                    max_positions: int = 512, layers: int = 4) -> Path:
    """Write a random tiny model of `family` with a tokenizer to `path`; returns path."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_config(family, window, max_positions, layers)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _spread_norm_weights(model)
    model.save_pretrained(path)
    model.generation_config.eos_token_id = 1
    model.generation_config.save_pretrained(path)
    write_tokenizer(path)
    return path


def _spread_norm_weights(model: torch.nn.Module) -> None:
    """Random init leaves norms at exactly 1 (or 0 for Gemma); perturb them so a loader
    that forgets a norm or its offset shows up in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [
        "The quick brown fox jumps over the lazy dog. " * 3,
        "Once upon a time there was a little engine that served tokens.",
        "Hello, world! Numbers 0123456789 and symbols #$%&*()[]{}.",
        "Ünïcödé café naïve — 日本語 テキスト 😀 emoji",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE, "model_max_length": 512,
    }))
