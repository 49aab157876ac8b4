"""The `slotmesh` command: every subcommand builds its config here, once, from flags and
the environment, and passes it down."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from worker.errors import SlotmeshError

DEFAULT_MODEL = "smollm2-135m"


def _cache_dir() -> Path:
    from worker.loaders.hub import default_cache_dir

    return default_cache_dir(os.environ)


def add_model_flags(p: argparse.ArgumentParser, slots: bool = True) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="known name (smollm2-135m, gemma3-270m, qwen2.5-0.5b, qwen2.5-1.5b), "
                        "a GGUF file or a Hugging Face directory (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute and KV dtype (default: %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where model files are fetched to (default: $SLOTMESH_CACHE or "
                        "~/.cache/slotmesh)")
    if slots:
        p.add_argument("--slots", type=int, default=4,
                       help="concurrent sequences (default: 4)")
    p.add_argument("--ctx", type=int, default=None,
                   help="max context length (default: the model's own, capped at 8192)")


def model_config(args: argparse.Namespace):
    from worker.config import ModelConfig

    return ModelConfig(model=args.model, dtype=args.dtype, cache_dir=args.cache_dir or _cache_dir(),
                       max_model_len=args.ctx or 8192)


def engine_config(args: argparse.Namespace):
    from worker.config import EngineConfig, SchedulerConfig

    return EngineConfig(model=model_config(args),
                        scheduler=SchedulerConfig(max_num_seqs=args.slots))


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt in-process",
                       description="Load a model and generate from PROMPT. The prompt is "
                                   "tokenized as llama.cpp does for that model (BOS where the "
                                   "model asks for it).")
    p.add_argument("prompt")
    add_model_flags(p)
    p.add_argument("--max-tokens", type=int, default=64,
                   help="most tokens to generate (default: 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="0 = off (default: 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off (default: 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="0 = off (default: 0.05)")
    p.add_argument("--seed", type=int, default=None, help="seed of the draw (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message in the model's chat template")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with text, token_ids, finish_reason")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from worker.engine import LLMEngine
    from worker.sampling_params import SamplingParams

    engine = LLMEngine(engine_config(args))
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=tuple(args.stop),
    )
    if args.chat:
        ids = engine.encode_prompt(messages=[{"role": "user", "content": args.prompt}])
    else:
        ids = engine.encode_prompt(prompt=args.prompt)
    engine.add_request("cli", ids, params)
    text, token_ids, finish = "", [], None
    while engine.has_unfinished:
        for chunk in engine.step():
            text += chunk.text
            token_ids += chunk.token_ids
            finish = chunk.finish_reason or finish
            if not args.json:
                print(chunk.text, end="", flush=True)
    if args.json:
        print(json.dumps({"text": text, "token_ids": token_ids, "finish_reason": finish,
                          "prompt_tokens": len(ids), "model": engine.model_name}))
    else:
        print()
    return 0


def _bench_parser(sub) -> None:
    from worker.bench import add_bench_parser
    from worker.training.cli import add_finetune_bench_parser

    bench_sub = add_bench_parser(sub, add_model_flags)
    add_finetune_bench_parser(bench_sub)


def build_parser() -> argparse.ArgumentParser:
    from worker.training.cli import add_finetune_parser

    parser = argparse.ArgumentParser(prog="slotmesh", description="slotmesh: an LLM serving "
                                     "cluster; this build has the worker engine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _bench_parser(sub)
    add_finetune_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SlotmeshError as e:
        print(f"slotmesh: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
