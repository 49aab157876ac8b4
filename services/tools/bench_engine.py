"""`slotmesh bench engine`: the engine against transformers `generate()` in one run.

Both sides use the same weights (transformers gets our loaded checkpoint's config and
tensors, so there is no second conversion), the same dtype, the same prompts (real text,
cut to --prompt-tokens) and greedy decoding of exactly --new-tokens tokens. Reported per
concurrency: aggregate decode tokens/s, mean time to first token, their ratio to
transformers, and the device→host bytes one decode step moves with device sampling
(int32 ids) versus copying full fp32 logits. The sides alternate per concurrency and
the best of --repeat runs of each is kept, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import torch

from services.tools.plots import Chart, add_plot_flag, render, series

_TEXT = (
    "The history of computing is a story of layered abstractions. Early machines were "
    "programmed by rewiring panels; stored programs replaced the wires with memory, and "
    "assemblers replaced raw numbers with mnemonics. Compilers then let people describe "
    "what to compute instead of how, operating systems shared one machine among many "
    "users, and networks joined machines into systems that no single person could hold in "
    "mind. Each layer hid the one below it, and each brought new ways to fail. "
)


@dataclass(frozen=True, slots=True)
class RunResult:
    tokens_per_s: float  # generated tokens / wall time of the whole run (prefill included)
    decode_tokens_per_s: float  # tokens after each first one / time after the last first one
    ttft_s: float  # mean time to first token


def add_bench_parser(sub, add_model_flags):
    """Add `bench` and `bench engine`; return the bench subparsers for the others."""
    p = sub.add_parser("bench", help="benchmarks (results in docs/benchmarks.md)")
    bench_sub = p.add_subparsers(dest="bench", required=True)
    e = bench_sub.add_parser("engine", help="engine vs transformers generate(), same run",
                             description=__doc__)
    add_model_flags(e, slots=False)  # the engine gets one slot per concurrent sequence
    e.add_argument("--concurrency", default="1,4,16",
                   help="comma-separated concurrent sequence counts (default: %(default)s)")
    e.add_argument("--prompt-tokens", type=int, default=128)
    e.add_argument("--new-tokens", type=int, default=128)
    e.add_argument("--repeat", type=int, default=2,
                   help="runs per side and concurrency, alternating; best kept (default: 2)")
    e.add_argument("--skip-transformers", action="store_true",
                   help="measure the engine only (no ratios)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    add_plot_flag(e, "tokens/s against concurrency")
    e.set_defaults(func=run_engine_bench)
    return bench_sub


def run_engine_bench(args: argparse.Namespace) -> int:
    from services.cli.flags import model_config
    from worker.config import EngineConfig, SchedulerConfig
    from worker.engine import LLMEngine
    from worker.loaders import load_model_files

    levels = [int(x) for x in args.concurrency.split(",")]
    model = model_config(args)
    ckpt = load_model_files(model.model, model.cache_dir)  # dense: what transformers runs
    budget = max(512, args.prompt_tokens)
    config = EngineConfig(model=model, scheduler=SchedulerConfig(
        max_num_seqs=max(levels), max_num_batched_tokens=budget))
    engine = LLMEngine(config, model_files=ckpt if model.weights is None else
                       load_model_files(model.model, model.cache_dir, model.weights))
    prompt = _prompt_ids(engine, args.prompt_tokens)
    hf = None if args.skip_transformers else transformers_model(ckpt, engine.dtype)
    ours: dict[int, RunResult] = {}
    theirs: dict[int, RunResult] = {}
    # the two sides alternate, best of --repeat each, so a noisy minute hits both alike
    for c in levels:
        for _ in range(args.repeat):
            ours[c] = _best(ours.get(c), _bench_engine(engine, prompt, c, args.new_tokens))
            if hf is not None:
                run = _bench_transformers(hf, prompt, c, args.new_tokens)
                theirs[c] = _best(theirs.get(c), run)
    report = _report(args, engine, levels, ours, theirs)
    print(json.dumps(report, indent=None if args.json else 2))
    if args.plot:
        render(engine_chart(report), args.plot)
    return 0


def engine_chart(report: dict) -> Chart:
    """Tokens/s against concurrent sequences, slotmesh and (when run) transformers."""
    lines = [series("slotmesh", report["slotmesh"], lambda r: r["tokens_per_s"])]
    if "transformers" in report:
        lines.append(series("transformers generate()", report["transformers"],
                            lambda r: r["tokens_per_s"], dashed=True))
    return Chart(title=f"slotmesh bench engine: {report['model']}",
                 note=f"{report['dtype']}, weights {report['weights']}, "
                      f"{report['prompt_tokens']} + {report['new_tokens']} tokens, "
                      f"{report['threads']} threads",
                 xlabel="concurrent sequences", ylabel="generated tokens/s",
                 series=tuple(lines), logx=True)


def _best(a: RunResult | None, b: RunResult) -> RunResult:
    if a is None:
        return b
    return RunResult(max(a.tokens_per_s, b.tokens_per_s),
                     max(a.decode_tokens_per_s, b.decode_tokens_per_s), min(a.ttft_s, b.ttft_s))


def _prompt_ids(engine, n: int) -> list[int]:
    ids = engine.tokenizer.encode(_TEXT * (1 + n // 64))
    return ids[:n]


def _bench_engine(engine, prompt: list[int], concurrency: int, new_tokens: int) -> RunResult:
    from worker.vocab.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.block_manager.enable_prefix_caching = False  # every request computes its prompt
    t0 = time.perf_counter()
    for i in range(concurrency):
        engine.add_request(f"bench-{concurrency}-{i}", prompt, params)
    first: dict[str, float] = {}
    generated = 0
    while engine.has_unfinished:
        for chunk in engine.step():
            first.setdefault(chunk.request_id, time.perf_counter() - t0)
            generated += len(chunk.token_ids)
    elapsed = time.perf_counter() - t0
    engine.block_manager.enable_prefix_caching = engine.config.cache.enable_prefix_caching
    decode_time = elapsed - max(first.values())
    return RunResult(generated / elapsed, (generated - concurrency) / decode_time,
                     sum(first.values()) / len(first))


def transformers_model(ckpt, dtype: torch.dtype):
    """A transformers model over our loaded checkpoint's config and dense tensors (no
    second conversion), in `dtype`; `bench peers` uses it too."""
    import transformers

    config = transformers.AutoConfig.for_model(**{k: v for k, v in ckpt.config.items()
                                                  if k != "architectures"})
    config.architectures = ckpt.config.get("architectures")
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(ckpt.tensors, strict=False)
    missing = [m for m in missing if "lm_head" not in m or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"transformers model: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}")
    model.tie_weights()
    return model.to(dtype).eval()


def _bench_transformers(model, prompt: list[int], concurrency: int,
                        new_tokens: int) -> RunResult:
    ids = torch.tensor([prompt] * concurrency)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        elapsed = time.perf_counter() - t0
    generated = (out.shape[1] - ids.shape[1]) * concurrency
    return RunResult(generated / elapsed, (generated - concurrency) / (elapsed - ttft), ttft)


def _report(args, engine, levels, ours, theirs) -> dict:
    vocab = engine.model.args.vocab_size
    report = {
        "model": engine.model_name, "dtype": args.dtype, "weights": args.weights or "dense",
        "threads": torch.get_num_threads(),
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "repeat": args.repeat,
        "slotmesh": {str(c): _as_dict(ours[c]) for c in levels},
        "device_to_host_bytes_per_step": {
            str(c): {"device_sampling": 4 * c, "full_logits": 4 * c * vocab} for c in levels
        },
    }
    if theirs:
        report["transformers"] = {str(c): _as_dict(theirs[c]) for c in levels}
        report["vs_transformers"] = {
            str(c): round(ours[c].tokens_per_s / theirs[c].tokens_per_s, 3) for c in levels
        }
        report["decode_vs_transformers"] = {
            str(c): round(ours[c].decode_tokens_per_s / theirs[c].decode_tokens_per_s, 3)
            for c in levels
        }
        report["ttft_vs_transformers"] = {
            str(c): round(theirs[c].ttft_s / ours[c].ttft_s, 3) for c in levels
        }
    return report


def _as_dict(r: RunResult) -> dict:
    return {"tokens_per_s": round(r.tokens_per_s, 2),
            "decode_tokens_per_s": round(r.decode_tokens_per_s, 2), "ttft_s": round(r.ttft_s, 4)}
