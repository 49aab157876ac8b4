"""Indicative decode throughput of the engine per `ModelConfig.weights` policy.

    .venv/bin/python scripts/bench_decode_weights.py [--model smollm2-135m] [--threads 1]

One engine per policy, all built first, then run round-robin (best of --repeat per
policy and concurrency) so machine noise hits them alike; greedy decoding of
--new-tokens after a --prompt-tokens prompt. Prints decode tokens/s and the ratio to the
fp32 default (weights=None). Shared, noisy machines: read the ratios.
"""

from __future__ import annotations

import argparse

import torch

from services.tools.bench_engine import _bench_engine, _prompt_ids
from worker.config import CacheConfig, EngineConfig, ModelConfig
from worker.engine import LLMEngine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--weights", nargs="*", default=["none", "bfloat16", "auto", "int8",
                                                        "int4"])
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engines = {}
    for w in args.weights:
        cfg = EngineConfig(model=ModelConfig(model=args.model,
                                             weights=None if w == "none" else w),
                           cache=CacheConfig(kv_cache_bytes=64 << 20), warmup=False)
        engines[w] = LLMEngine(cfg)
    prompt = _prompt_ids(next(iter(engines.values())), args.prompt_tokens)
    best: dict[tuple[str, int], float] = {}
    for c in args.concurrency:
        for _ in range(args.repeat):
            for w, engine in engines.items():
                r = _bench_engine(engine, prompt, c, args.new_tokens)
                best[w, c] = max(best.get((w, c), 0.0), r.decode_tokens_per_s)
        base = best[args.weights[0], c]
        cells = [f"{w} {best[w, c]:.1f} tok/s x{best[w, c] / base:.2f}" for w in engines]
        print(f"{args.model} concurrency {c} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
