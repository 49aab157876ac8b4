"""One pure-decode step three ways, on the same KV, in one process: the general eager path
(ModelRunner's reference), the static decode step eager, and the static step compiled.

    .venv/bin/python -m scripts.decode_step_timing --model smollm2-135m --batches 1,4,16

Per batch size: the first compiled call (compiling, or not when an earlier size's graph
serves it), the largest logit difference of each static variant from the general path,
the host time of the static path outside the graph, and ms per step (median of --steps)
twice, the three paths alternating so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import time

import torch

from worker.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from worker.decode_step import StaticDecode
from worker.engine import LLMEngine
from worker.vocab.sampling_params import SamplingParams


def _decoding_batch(engine: LLMEngine, size: int, prompt_tokens: int):
    """Queue `size` requests and step until all of them decode together; returns that
    step's scheduled entries (not executed)."""
    gen = torch.Generator().manual_seed(0)
    vocab = engine.model.args.vocab_size
    for i in range(size):
        ids = torch.randint(100, vocab - 100, (prompt_tokens,), generator=gen).tolist()
        engine.add_request(f"r{i}", ids, SamplingParams(temperature=0.0, max_tokens=200,
                                                        ignore_eos=True))
    runner = engine.runner
    while True:
        out = engine.scheduler.schedule()
        if len(out.scheduled) == size and all(s.num_new_tokens == 1 for s in out.scheduled):
            return out.scheduled
        results = runner.execute(out)
        engine.scheduler.update(out, [r.token_id for r in results])


def _median_ms(fn, steps: int) -> float:
    fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[steps // 2] * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--weights", default=None)
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    slots = max(batches)
    engine = LLMEngine(EngineConfig(
        model=ModelConfig(model=args.model, dtype=args.dtype, weights=args.weights,
                          max_model_len=1024, compile="off"),
        scheduler=SchedulerConfig(max_num_seqs=slots, max_num_batched_tokens=4096),
        cache=CacheConfig(enable_prefix_caching=False), warmup=False))
    r = engine.runner
    full = _decoding_batch(engine, slots, args.prompt_tokens)
    paths = {compiled: StaticDecode(engine.model, r.layout, r.pools, r.kv_caches, r.rope,
                                    r.max_model_len, slots, r.device, r.dtype, compile=compiled)
             for compiled in (False, True)}
    eager, compiled = paths[False], paths[True]
    graph = compiled.forward
    in_graph: list[float] = []

    def timed_graph(*a):
        t = time.perf_counter()
        out = graph(*a)
        in_graph.append(time.perf_counter() - t)
        return out

    compiled.forward = timed_graph

    def general(batch):
        return r.compute_logits(batch)[1]

    with torch.inference_mode():
        for b in batches:
            batch = full[:b]
            t0 = time.perf_counter()
            compiled.execute(batch)
            print(f"batch {b}: first compiled call {time.perf_counter() - t0:.1f}s", flush=True)
            ref = general(batch)
            print(f"  max |logit diff| static eager {(eager.execute(batch) - ref).abs().max():.2e}"
                  f", compiled {(compiled.execute(batch) - ref).abs().max():.2e}")
            for _ in range(2):
                in_graph.clear()
                totals: list[float] = []

                def step(batch=batch, totals=totals):
                    t = time.perf_counter()
                    compiled.execute(batch)
                    totals.append(time.perf_counter() - t)

                total = _median_ms(step, args.steps)
                # per call: the step's time less its graph's, i.e. the host work around it
                host = sorted(a - b for a, b in zip(totals, in_graph, strict=True))
                host = host[len(host) // 2] * 1e3
                plain = _median_ms(lambda batch=batch: general(batch), args.steps)
                static = _median_ms(lambda batch=batch: eager.execute(batch), args.steps)
                print(f"  ms/step general {plain:.1f}  static eager {static:.1f}  compiled "
                      f"{total:.1f} (host outside the graph {host:.2f})", flush=True)

if __name__ == "__main__":
    main()
