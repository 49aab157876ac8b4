"""How long the warmup takes, and what the first requests after it cost.

    .venv/bin/python -m scripts.warmup_timing --model smollm2-135m --repeat 3
    .venv/bin/python -m scripts.warmup_timing --tiny --repeat 3   # the tests' tiny Llama
    # a compiled decode step: the first start compiles, a second process reads the cache
    .venv/bin/python -m scripts.warmup_timing --model smollm2-135m --weights float16 \
        --compile on --repeat 1     # run twice; TORCHINDUCTOR_CACHE_DIR picks the cache

(from the repository root: `-m` puts it on the path, for `tests.tiny_models`).

Per run: model load, warmup, then two requests of a full prefill chunk (512 prompt tokens,
4 new ones, different tokens so no prefix is shared) and one short one (16 + 4); `--no-warmup`
shows what the first request costs without it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from worker.config import EngineConfig, ModelConfig
from worker.engine import LLMEngine
from worker.vocab.sampling_params import SamplingParams


def one_run(model: str, warmup: bool, seed: int, weights: str | None = None,
            compile: str = "auto") -> dict:
    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=model, weights=weights,
                                                      compile=compile), warmup=warmup))
    built = time.perf_counter() - t0
    vocab = engine.model.args.vocab_size
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=4, temperature=0.8, top_k=40, top_p=0.95,
                            ignore_eos=True, seed=1)
    out = {"load_s": built - engine.warmup_s, "warmup_s": engine.warmup_s}
    chunk = min(engine.config.scheduler.max_num_batched_tokens, engine.max_model_len - 8)
    requests = (("first_full_chunk_s", chunk), ("second_full_chunk_s", chunk),
                ("short_16_s", 16))
    for name, n in requests:
        ids = [rng.randrange(2, vocab) for _ in range(n)]
        t = time.perf_counter()
        engine.generate([ids], params)
        out[name] = time.perf_counter() - t
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model")
    g.add_argument("--tiny", action="store_true")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--weights", default=None)
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    args = p.parse_args()
    model = args.model
    if args.tiny:
        from tests.tiny_models import make_tiny_model

        model = str(make_tiny_model("llama", Path(tempfile.mkdtemp()), window=48))
    for i in range(args.repeat):
        print(json.dumps({k: round(v, 3) for k, v in
                          one_run(model, not args.no_warmup, i, args.weights,
                                  args.compile).items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
