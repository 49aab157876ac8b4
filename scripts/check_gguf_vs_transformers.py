"""Compare load_gguf against transformers on the real PyPI-shipped GGUFs (slow: ~1 min per
model, most of it transformers). Usage: python scripts/check_gguf_vs_transformers.py [names]

Prints per model: our load time, max |ours - theirs| over all tensors, missing/extra
names, and config fields that disagree.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import transformers

from worker.loaders.gguf import load_gguf
from worker.loaders.hub import fetch_model

FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
          "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
          "sliding_window", "query_pre_attn_scalar", "rope_local_base_freq", "layer_types",
          "model_type", "rope_theta"]


def their_value(config, field):
    if field == "rope_theta" and getattr(config, "rope_parameters", None):
        params = config.rope_parameters
        params = params.get("full_attention", params)
        return params.get("rope_theta")
    return getattr(config, field, None)


def compare(name: str, cache: Path) -> None:
    path = fetch_model(name, cache)
    start = time.perf_counter()
    ours = load_gguf(path, name=name)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    theirs_s = time.perf_counter() - start
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    worst = max((ours.tensors[k] - state[k]).abs().max().item()
                for k in ours.tensors if k in state)
    print(f"{name}: ours {load_s:.1f}s, transformers {theirs_s:.1f}s, "
          f"{len(ours.tensors)} tensors, max|diff| {worst:g}")
    print("  missing:", sorted(set(state) - set(ours.tensors)))
    print("  extra:", sorted(set(ours.tensors) - set(state)))
    for field in FIELDS:
        mine, theirs = ours.config.get(field), their_value(model.config, field)
        close = isinstance(mine, float) and isinstance(theirs, float) and abs(mine - theirs) < 1e-9
        if mine != theirs and not close:
            print(f"  config {field}: ours {mine!r} transformers {theirs!r}")
    print("  eos ids:", ours.eos_token_ids, "architectures:", ours.config["architectures"])


if __name__ == "__main__":
    cache = Path(os.environ.get("SLOTMESH_TEST_CACHE") or ".cache/models")
    for model_name in sys.argv[1:] or ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"]:
        compare(model_name, cache)
