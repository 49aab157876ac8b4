"""Teacher-forced top-1 agreement of weight formats with the fp32 path on a real model.

    .venv/bin/python -m scripts.weights_accuracy --model qwen2.5-0.5b \\
        [--weights auto int8] [--simulate int8 int8g32 bf16 fp16 fp16+head]

Over tests/worker/test_real_models.py's 64-token text (63 positions), like the tests:
the first token is the prompt, the rest are decode steps. `--weights` builds the model
with that policy and its real kernels. `--simulate` keeps the fp32 path and replaces
only the weights of the GGUF's 5/6/8-bit tensors (Q5_*, Q6_K, Q8_0; the embedding
table and lm_head excepted) by a round trip through a candidate format, so the format's
weight error is measured apart from any kernel's:
  int8     per output channel, scale max|row| / 127 (the int8 kernel's);
  int8g32  groups of 32 along K, scale max|group| / 127 rounded to bf16;
  bf16 / fp16  each weight rounded to that dtype;
  fp16+head    fp16, and the embedding table and lm_head too.
Per row: agreement, the largest |logit difference| over all positions and logits, and
each miss as (position, the fp32 logits' top-1 − top-2 margin).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as Q

from tests.engine_driver import run_teacher_forced
from tests.worker.test_real_models import NUM_TOKENS, TEXT
from worker.config import ModelConfig
from worker.loaders import load_model_files
from worker.loaders.gguf import ARCHITECTURES, hf_tensor_name, read_gguf_header
from worker.models.registry import build_model

HIGH_BIT = (Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q6_K, Q.Q8_0)
TABLES = ("model.embed_tokens.weight", "lm_head.weight")


def round_trip(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """w: fp32 [N, K] → what format `fmt` would hold, as fp32."""
    if fmt in ("bf16", "fp16", "fp16+head"):
        return w.to(torch.bfloat16 if fmt == "bf16" else torch.float16).float()
    if fmt == "int8":
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        return (w / scale).round().clamp(-127, 127) * scale
    if fmt == "int8g32":
        n, k = w.shape
        g = w.reshape(n, k // 32, 32)
        scale = (g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127).bfloat16().float()
        return ((g / scale).round().clamp(-127, 127) * scale).reshape(n, k)
    raise ValueError(fmt)


def high_bit_names(path: Path) -> set[str]:
    """HF names of the GGUF's 2-D 5/6/8-bit tensors."""
    header = read_gguf_header(path)
    spec = ARCHITECTURES[header.metadata["general.architecture"]]
    return {hf_tensor_name(t.name, spec) for t in header.tensors
            if t.qtype in HIGH_BIT and len(t.shape) == 2}


def logits(model_name: str, cache_dir: Path, weights: str | None = None,
           simulate: str | None = None) -> dict[int, torch.Tensor]:
    files = load_model_files(model_name, cache_dir, weights)
    if simulate:
        names = high_bit_names(Path(files.source_path))
        for name in list(files.tensors):
            if (name in names and name not in TABLES) or (
                    simulate == "fp16+head" and name in TABLES):
                files.tensors[name] = round_trip(files.tensors[name], simulate)
    ids = files.tokenizer.encode(TEXT)[:NUM_TOKENS]
    model = build_model(files.config, files.tensors, torch.float32, torch.device("cpu"),
                        weights)
    del files
    return run_teacher_forced(model, [ids], [1], max_model_len=128)[0]


def compare(ref: dict[int, torch.Tensor], out: dict[int, torch.Tensor]) -> str:
    misses = []
    for pos, r in ref.items():
        if int(r.argmax()) != int(out[pos].argmax()):
            top2 = r.topk(2).values
            misses.append(f"({pos}, {top2[0] - top2[1]:.4f})")
    diff = max((ref[p] - out[p]).abs().max().item() for p in ref)
    return (f"{len(ref) - len(misses)}/{len(ref)}, max |Δlogit| {diff:.4f}, "
            f"misses {' '.join(misses) or '-'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--weights", nargs="*", default=["auto"])
    ap.add_argument("--simulate", nargs="*", default=[],
                    choices=["int8", "int8g32", "bf16", "fp16", "fp16+head"])
    ap.add_argument("--cache-dir", type=Path, default=ModelConfig().cache_dir)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref = logits(args.model, args.cache_dir)
    for weights in args.weights:
        print(f"{args.model} weights={weights}: "
              f"{compare(ref, logits(args.model, args.cache_dir, weights))}", flush=True)
    for fmt in args.simulate:
        print(f"{args.model} fp32 path, 5/6/8-bit weights as {fmt}: "
              f"{compare(ref, logits(args.model, args.cache_dir, simulate=fmt))}", flush=True)


if __name__ == "__main__":
    main()
