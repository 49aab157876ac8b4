"""Where a burst of requests spends its time in the engine, step by step, in one process.

    .venv/bin/python -m scripts.burst_timing [--weights auto+bfloat16] [--dtype bfloat16]
        [--requests 16] [--prompt-tokens 128] [--new-tokens 128] [--budget 512] [--rounds 2]

Each round adds --requests random prompts at once (prefix cache off, greedy, EOS
ignored) and steps the engine until all are done, timing every model step. Prints, per
round: the steps that computed prompt tokens (tokens, sequences, seconds), the pure-decode
steps' count, sum and median, tokens/s over the round and the median time to first
token. The engine compiles at start (`--compile` as given), as `slotmesh bench peers`'s
does.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from worker.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from worker.engine import LLMEngine
from worker.loaders import load_model_files
from worker.vocab.sampling_params import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--weights", default="auto+bfloat16")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--compile", default="auto")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    weights = None if args.weights == "dense" else args.weights
    model = ModelConfig(model=args.model, weights=weights, dtype=args.dtype,
                        compile=args.compile)
    config = EngineConfig(model=model, cache=CacheConfig(enable_prefix_caching=False),
                          scheduler=SchedulerConfig(max_num_seqs=args.requests,
                                                    max_num_batched_tokens=args.budget))
    t0 = time.perf_counter()
    engine = LLMEngine(config, model_files=load_model_files(model.model, model.cache_dir,
                                                            weights))
    print(f"start (load, compile, warmup): {time.perf_counter() - t0:.1f} s")
    steps: list[tuple[int, int, float]] = []  # (tokens, sequences, seconds)
    execute = engine.runner.execute

    def timed(out):
        start = time.perf_counter()
        result = execute(out)
        steps.append((out.num_batched_tokens, len(out.scheduled), time.perf_counter() - start))
        return result

    engine.runner.execute = timed
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    for r in range(args.rounds):
        steps.clear()
        for i in range(args.requests):
            prompt = [rng.randrange(100, 40000) for _ in range(args.prompt_tokens)]
            engine.add_request(f"burst-{r}-{i}", prompt, params)
        first: dict[str, float] = {}
        t0 = time.perf_counter()
        while engine.has_unfinished:
            for chunk in engine.step():
                first.setdefault(chunk.request_id, time.perf_counter() - t0)
        wall = time.perf_counter() - t0
        prompt_steps = [(t, s, round(sec, 3)) for t, s, sec in steps if t > s]
        decode = [sec for t, s, sec in steps if t == s]
        print(f"round {r}: {args.requests * args.new_tokens / wall:.1f} tok/s, "
              f"TTFT p50 {statistics.median(first.values()):.2f} s; steps with prompt "
              f"tokens (tokens, sequences, s): {prompt_steps}; {len(decode)} decode steps, "
              f"{sum(decode):.2f} s, median {statistics.median(decode) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
